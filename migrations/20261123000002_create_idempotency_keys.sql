-- Idempotency keys for POST /todos.
--
-- A client that retries a create (timeout, dropped connection) sends the same Idempotency-Key; the
-- service then answers with the todo it created the first time instead of creating a second one.
-- The claim (INSERT ... ON CONFLICT DO NOTHING), the todo insert and the stored response happen in
-- one transaction, so a concurrent retry waits for the first to commit and then replays it.

CREATE TABLE idempotency_keys (
    key         text        PRIMARY KEY CHECK (char_length(key) BETWEEN 1 AND 255),
    -- The normalised request ({"title", "completed", "order"}), to tell a retry from a key reused
    -- for a different todo (answered 422).
    request     jsonb       NOT NULL,
    -- The created todo as first returned; set in the same transaction as the claim.
    response    jsonb       NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- Expired keys are swept periodically by the service.
CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
