-- GET /todos?limit=20: the service's SQL_LIST_TODOS for a first page (one extra row tells it
-- whether there is a next page; the completed filter, unset, is a NULL pgbench cannot bind).
\set start -9223372036854775807 - 1
\set limit 21
SELECT p.sort_key, p.id, (SELECT row_to_json(j)::text FROM (SELECT p.id, :url_prefix::text || p.id AS url, p.title, p.completed, p.position AS "order", to_char(p.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24":"MI":"SS.US"Z"') AS created_at, to_char(p.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24":"MI":"SS.US"Z"') AS updated_at) j) FROM todos p WHERE (NULL::boolean::boolean IS NULL OR p.completed = NULL::boolean) AND (p.sort_key, p.id) > (:start, :start) ORDER BY p.sort_key, p.id LIMIT :limit;
