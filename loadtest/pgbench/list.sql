-- GET /todos?limit=20: the service's SQL_LIST_TODOS for a first page (one extra row tells it
-- whether there is a next page).
SELECT id, title, completed, position, sort_key, created_at, updated_at FROM todos WHERE (NULL::boolean IS NULL OR completed = NULL::boolean) AND (sort_key, id) > (-9223372036854775808, 0) ORDER BY sort_key, id LIMIT 21;
