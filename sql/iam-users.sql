-- Database users that log in with RDS IAM authentication (run as the RDS master user).
--
-- On RDS the role rds_iam is built in: a member of it must log in with an IAM auth token
-- (which aws-pgbouncer supplies to PgBouncer); its password, if any, is ignored. The IAM
-- policy of the daemon's AWS identity must allow rds-db:connect on
-- arn:aws:rds-db:REGION:ACCOUNT:dbuser:DB_RESOURCE_ID/app_user (and /reporter).
--
-- Run it connected to the database the users work in; repeat the GRANT part in every
-- other database they need.
--
-- Auth-query mode (--mode auth-query) needs nothing more on RDS: no auth_user, no
-- auth_query function, no SECURITY DEFINER lookup of pg_shadow. PgBouncer's auth_query goes
-- to the daemon's own endpoint beside it, which answers with tokens. Each user on the
-- allow-list (--allow-users, or users = [...]) only needs to exist here with rds_iam, as
-- below, and its rds-db:connect permission.

-- An application user with ordinary privileges.
CREATE USER app_user;
GRANT rds_iam TO app_user;

-- A read-only user: may read what exists now and what app_user creates later in schema public.
CREATE USER reporter;
GRANT rds_iam TO reporter;
GRANT USAGE ON SCHEMA public TO reporter;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO reporter;
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO reporter;
ALTER DEFAULT PRIVILEGES FOR ROLE app_user IN SCHEMA public GRANT SELECT ON TABLES TO reporter;
ALTER DEFAULT PRIVILEGES FOR ROLE app_user IN SCHEMA public GRANT SELECT ON SEQUENCES TO reporter;
-- Optional belt and braces: every session of reporter starts read-only, so even a grant
-- made by mistake later cannot be used to write.
-- ALTER ROLE reporter SET default_transaction_read_only = on;
