-- The todos table.
--
-- Applied by the service at startup (sqlx::migrate!, under sqlx's advisory lock, so replicas that
-- start together apply it once). Never edit an applied migration: add a new file instead, and make
-- breaking changes in expand/contract steps so old and new replicas can run side by side.

CREATE TABLE todos (
    -- Identity, not serial: no separate sequence grants to manage, and ids cannot be set by hand.
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The API enforces the same rule with a field-level message; the CHECK is the last line of
    -- defence for anything that writes to the table directly.
    title       text        NOT NULL CHECK (char_length(title) BETWEEN 1 AND 1000),
    completed   boolean     NOT NULL DEFAULT false,
    -- The API's optional "order" (a reserved word in SQL, hence the name).
    position    bigint      NULL,
    -- The list's sort key: todos without a position sort after all positioned ones. Stored so that
    -- keyset paging can compare one row value, (sort_key, id), against the cursor and use an index.
    sort_key    bigint      GENERATED ALWAYS AS (COALESCE(position, 9223372036854775807)) STORED,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Keyset paging of the whole list and of the ?completed= filter.
CREATE INDEX todos_sort_key_id_idx ON todos (sort_key, id);
CREATE INDEX todos_completed_sort_key_id_idx ON todos (completed, sort_key, id);
