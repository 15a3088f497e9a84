-- Database users that log in with RDS IAM authentication (run as the RDS master user).
--
-- On RDS the role rds_iam is built in: a member of it must log in with an IAM auth token
-- (which aws-pgbouncer supplies to PgBouncer); its password, if any, is ignored. The IAM
-- policy of the daemon's AWS identity must allow rds-db:connect on
-- arn:aws:rds-db:REGION:ACCOUNT:dbuser:DB_RESOURCE_ID/app_user (and /reporter).
--
-- Run it connected to the database the users work in; repeat the GRANT part in every
-- other database they need.

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
