-- Run once by the postgres image when it creates its data directory (/docker-entrypoint-initdb.d).
-- The replicas of the `scale` profile reach PostgreSQL through PgBouncer with
-- DB_POOLER_MODE=transaction-prepared: no per-call transaction sets their timeouts and the pooler
-- passes no login options, so the server's sessions for this role and database must start with
-- them. The service checks them before serving (docs/scaling-out.md). They match the replicas'
-- DB_STATEMENT_TIMEOUT and DB_IDLE_IN_TRANSACTION_TIMEOUT (5s each, the defaults); the single
-- service and migrations set their own at login.
ALTER ROLE todo IN DATABASE todos SET statement_timeout = '5s';
ALTER ROLE todo IN DATABASE todos SET idle_in_transaction_session_timeout = '5s';
