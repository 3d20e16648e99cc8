-- Todos per owner: each todo and each idempotency key belongs to the `sub` of the token that
-- created it, and every query names its owner, so one caller can neither see nor reach another's.
--
-- '' is the owner of AUTH_MODE=none, where every caller is the same anonymous one. Existing rows
-- become its: a deployment that stays on `none` sees all of them as before, and one that turns
-- on `jwt` sees none of them until an operator hands them to a token's sub, e.g.
--     UPDATE todos SET owner = 'alice' WHERE owner = '';
-- (no token can have an empty sub, so no caller ever inherits them by accident).
--
-- Constant defaults are catalog-only (no table rewrite). The two list indexes are rebuilt with
-- the owner first, so each owner's page stays one index range scan however many todos others
-- have; building them locks writes to `todos` for as long as the build takes, so on a large table
-- apply this migration in a quiet moment. During a rolling upgrade, replicas still on the previous
-- release keep working except for keyed POSTs (their ON CONFLICT names the old key-only primary
-- key), which fail until those replicas are replaced.

ALTER TABLE todos ADD COLUMN owner text NOT NULL DEFAULT '';

DROP INDEX todos_sort_key_id_idx;
DROP INDEX todos_completed_sort_key_id_idx;
CREATE INDEX todos_owner_sort_key_id_idx ON todos (owner, sort_key, id);
CREATE INDEX todos_owner_completed_sort_key_id_idx ON todos (owner, completed, sort_key, id);

ALTER TABLE idempotency_keys ADD COLUMN owner text NOT NULL DEFAULT '';
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (owner, key);
