-- PATCH /todos/{id} {"completed": true}: the service's SQL_UPDATE_TODO on a random seeded id.
\set id random(1, :seed_rows)
UPDATE todos SET title = COALESCE(NULL::text, title), completed = COALESCE(true, completed), position = CASE WHEN false THEN NULL::bigint ELSE position END, updated_at = now(), version = version + 1 WHERE id = :id AND (NULL::bigint[]::bigint[] IS NULL OR version = ANY(NULL::bigint[])) AND owner = :owner RETURNING id, title, completed, position, sort_key, created_at, updated_at, version;
