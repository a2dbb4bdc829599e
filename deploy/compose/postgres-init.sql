-- Run once by the postgres image on a new data directory (/docker-entrypoint-initdb.d).
-- Creates the role pgwarden's monitoring connection logs in as (monitor_url, see
-- deploy/compose/pgwarden.yaml): it runs EXPLAIN for sampled executions, compares
-- the catalog with its last snapshot, and measures the round trip to the server.
-- A local stack's password; in production take it from a secret.
CREATE ROLE pgwarden_monitor LOGIN PASSWORD 'monitor' CONNECTION LIMIT 10;

-- Statistics views and server settings of every session and database.
GRANT pg_monitor TO pgwarden_monitor;
GRANT pg_read_all_stats TO pgwarden_monitor;

-- EXPLAIN plans the application's statements as the application's own role (SET
-- LOCAL ROLE inside a READ ONLY transaction that is always rolled back) where the
-- monitor is a member of it: GRANT app TO pgwarden_monitor WITH INHERIT FALSE, SET
-- TRUE for a real application role. This local stack's application is the superuser
-- postgres, whose membership would make the monitor a superuser: instead the monitor
-- plans as itself, only statements whose planning stays within pg_catalog, and
-- EXPLAIN needs SELECT on the tables the application creates.
-- Never grant pg_read_all_data: planning runs functions a client may have created.
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT SELECT ON TABLES TO pgwarden_monitor;
