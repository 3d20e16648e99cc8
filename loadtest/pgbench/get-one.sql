-- GET /todos/{id}: the service's SQL_GET_TODO (src/db/todos.rs; a unit test keeps this line
-- identical), on a random seeded id.
\set id random(1, :seed_rows)
SELECT id, title, completed, position, sort_key, created_at, updated_at, version FROM todos WHERE id = :id AND owner = :owner;
