-- GET /todos?limit=20: the service's SQL_LIST_TODOS for a first page (one extra row tells it
-- whether there is a next page; the completed filter, unset, is a NULL pgbench cannot bind).
\set start -9223372036854775807 - 1
\set limit 21
SELECT id, title, completed, position, sort_key, created_at, updated_at, version FROM todos WHERE owner = :owner AND (NULL::boolean::boolean IS NULL OR completed = NULL::boolean) AND (sort_key, id) > (:start, :start) ORDER BY sort_key, id LIMIT :limit;
