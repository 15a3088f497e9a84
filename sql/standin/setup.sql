-- The RDS stand-in's roles and databases (TEST-ONLY). scripts/standin init runs this as the
-- superuser standin_admin, connected to database postgres, over the unix socket.
\set ON_ERROR_STOP on

-- RDS has this role built in; pg_hba.conf of the stand-in sends its members to PAM, whose
-- verifier checks the password as an IAM auth token.
CREATE ROLE rds_iam NOLOGIN;

-- What a user runs on real RDS (creates app_user and the read-only reporter).
\ir ../iam-users.sql

-- A third IAM user, for tests with several pools.
CREATE USER second_user;
GRANT rds_iam TO second_user;

-- Not an IAM user: logs in with a SCRAM password (for tests that such a user fails clearly
-- when it is served tokens).
SET password_encryption = 'scram-sha-256';
CREATE USER password_user PASSWORD 'password_user_secret';

-- A second database, as an application would use, with a table app_user owns.
CREATE DATABASE appdb;
\connect appdb
GRANT ALL ON SCHEMA public TO app_user;
GRANT USAGE ON SCHEMA public TO reporter;
ALTER DEFAULT PRIVILEGES FOR ROLE app_user IN SCHEMA public GRANT SELECT ON TABLES TO reporter;
SET ROLE app_user;
CREATE TABLE public.items (id integer PRIMARY KEY, name text NOT NULL);
INSERT INTO public.items VALUES (1, 'one'), (2, 'two'), (3, 'three');
RESET ROLE;
