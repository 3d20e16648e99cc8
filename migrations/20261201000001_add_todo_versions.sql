-- A version per todo, for optimistic concurrency: the API's ETag is the version, `PATCH` and
-- `DELETE` with `If-Match` change the row only while its version is still the one the client saw,
-- and every update increments it in the same statement.
--
-- A constant default is a catalog-only change (no table rewrite), so existing rows become
-- version 1 at once, and replicas still running the previous release (which neither read nor
-- write the column) keep working during a rolling upgrade; their updates do not bump it, which
-- only matters to clients that use If-Match against an old replica.

ALTER TABLE todos ADD COLUMN version bigint NOT NULL DEFAULT 1;
