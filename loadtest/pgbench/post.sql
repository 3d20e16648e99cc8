-- POST /todos {"title": "load test"}: the service's SQL_CREATE_TODO.
INSERT INTO todos (title, completed, position, owner) VALUES ('load test', false, NULL::bigint, :owner) RETURNING id, title, completed, position, sort_key, created_at, updated_at, version;
