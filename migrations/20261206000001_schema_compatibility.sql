-- Which releases may serve on this schema. Two releases run side by side during a rolling
-- upgrade, one migration apart, so every migration is expand-only by default: it adds what the
-- new release needs and leaves what the previous one uses (docs/scaling-out.md, "Upgrading").
-- A migration that cannot (it drops or changes what an older release reads or writes) raises
-- `oldest_serving_schema` to its own version in the same transaction; a release whose
-- migrations end before that refuses to serve on the schema (not ready, saying which release it
-- needs) rather than fail request by request. The contracting migration ships only once no
-- replica of the older release runs.
--
-- Releases from before this table cannot read it. The owner migration (20261202000001) was such a
-- contraction: releases before it fail keyed POSTs on the new key. So it starts there.

CREATE TABLE schema_compatibility (
    -- One row: the key is always true.
    single                boolean PRIMARY KEY DEFAULT true CHECK (single),
    oldest_serving_schema bigint  NOT NULL
);

INSERT INTO schema_compatibility (oldest_serving_schema) VALUES (20261202000001);
