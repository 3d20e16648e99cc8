-- GET /todos/{id}: the service's SQL_GET_TODO (src/db/todos.rs; a unit test keeps this line
-- identical), on a random seeded id. url_prefix comes from pgbench -D.
\set id random(1, :seed_rows)
SELECT p.id, (SELECT row_to_json(j)::text FROM (SELECT p.id, :url_prefix::text || p.id AS url, p.title, p.completed, p.position AS "order", to_char(p.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24":"MI":"SS.US"Z"') AS created_at, to_char(p.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24":"MI":"SS.US"Z"') AS updated_at) j) FROM todos p WHERE p.id = :id;
