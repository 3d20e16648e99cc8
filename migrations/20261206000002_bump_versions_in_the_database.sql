-- Every update of a todo moves its version on, whoever makes it. The service's own UPDATE sets
-- version = version + 1; this trigger adds one only when a writer left the version as it was (a
-- release from before versions existed, a script, an operator's UPDATE), so no change can slip
-- past a client's If-Match unseen, and each update moves the version exactly once.
--
-- Expand only (docs/scaling-out.md, "Upgrading"): the previous release keeps working against it.
-- CREATE TRIGGER locks todos in SHARE ROW EXCLUSIVE mode (writes wait, reads do not) until the
-- migration commits, a moment; behind a long transaction that wrote to todos it waits at most the
-- migrations' lock_timeout and tries again later.

CREATE FUNCTION todos_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.version = OLD.version THEN
        NEW.version := OLD.version + 1;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER todos_bump_version BEFORE UPDATE ON todos
    FOR EACH ROW EXECUTE FUNCTION todos_bump_version();
