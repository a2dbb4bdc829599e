-- Run once by the postgres image on a new data directory (/docker-entrypoint-initdb.d).
-- Creates the role pgwarden's monitoring connection logs in as (monitor_url, see
-- deploy/compose/pgwarden.yaml): it runs EXPLAIN for sampled executions, compares
-- the catalog with its last snapshot, and measures the round trip to the server.
-- A local stack's password; in production take it from a secret.
CREATE ROLE pgwarden_monitor LOGIN PASSWORD 'monitor' CONNECTION LIMIT 10;

-- Statistics views and server settings of every session and database.
GRANT pg_monitor TO pgwarden_monitor;
GRANT pg_read_all_stats TO pgwarden_monitor;

-- EXPLAIN checks the privileges of the statement it plans (without running it), so
-- the monitoring role needs to be allowed to read what the application's queries
-- read. pgwarden explains in a READ ONLY transaction that it always rolls back, and
-- never with ANALYZE; shapes that write (INSERT, UPDATE, DELETE) are only explained
-- where the role also holds those privileges, otherwise their samples fail and are
-- counted in pgwarden_plan_sample_failures_total.
GRANT pg_read_all_data TO pgwarden_monitor;
