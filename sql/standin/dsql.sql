-- The DSQL flavour's extra role (TEST-ONLY), after setup.sql: Aurora DSQL's built-in `admin`,
-- which logs in with DbConnectAdmin tokens. Its other roles log in with DbConnect tokens; the
-- stand-in's IAM users (app_user, reporter, second_user) play them. pg_hba.conf sends members
-- of rds_iam to the DSQL flavour's PAM service, so admin joins them.
CREATE USER admin;
GRANT rds_iam TO admin;
