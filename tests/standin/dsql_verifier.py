"""Aurora DSQL auth token verifier for the test stand-in's DSQL flavour (TEST-ONLY).

pam_standin.so runs this (PAM service aws-pgbouncer-standin-dsql) as it runs verifier.py for
the RDS flavour: the password on stdin, the login role in PAM_USER, exit 0 to accept. It checks
the password as Aurora DSQL checks an auth token, and refuses RDS tokens:
  - the URL is the host alone, `host/?Action=...&X-Amz-...`: no port, no DBUser;
  - service `dsql`; Action `DbConnectAdmin` for the role `admin` and `DbConnect` for every
    other role, the other way round refused (DSQL's IAM policy actions are per role kind);
  - X-Amz-Expires 1 to 604800 (a week);
  - the signature recomputed with botocore's SigV4 query signer at the token's own X-Amz-Date,
    as botocore's generate_db_connect_auth_token and ..._admin_auth_token sign.

Configuration and log are verifier.py's (the same verifier.json keys; `port` is not used: DSQL
tokens do not carry one). Log lines add "action", and "endpoint" is the host.
Extra reasons: "rds_token" (Action=connect or DBUser: an RDS token), "port_in_url".

The checks after the URL's shape (scope, dates, key, session token, signature) are verifier.py's
check_signed, with this flavour's service, lifetime and signer; its query parsing, Reject and main
are reused too.
"""

import sys

import verifier
from verifier import Reject

REQUIRED = (
    "Action",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)
MAX_EXPIRES = 604800
ADMIN_ROLE = "admin"


def parse_token(token):
    """Split `host/?k=v&...` into (host, params), refusing RDS's shape by name."""
    host, query = verifier.split_token(token, "host/?query")
    params = verifier.parse_query(query)
    if "DBUser" in params or params.get("Action") == "connect":
        raise Reject("rds_token", "Action=connect and DBUser: an RDS IAM token")
    if ":" in host:
        raise Reject("port_in_url", f"{host[:80]}: DSQL signs the host alone")
    verifier.check_parameters(params, REQUIRED)
    return host, params


def botocore_token(host, action, region, akid, secret, session_token, amz_date, expires):
    """What botocore's generate_db_connect(_admin)_auth_token returns for these at amz_date."""
    credentials = (akid, secret, session_token)
    data = {"Action": action}
    return verifier.botocore_presign(host, data, "dsql", region, credentials, amz_date, expires)


def verify(cfg, pam_user, token, now, info):
    host, p = parse_token(token)
    info["endpoint"] = host
    info["action"] = p["Action"][:40]
    if host.lower() != str(cfg["host"]).lower():
        raise Reject("wrong_endpoint", f"token for {host}, this is {cfg['host']}")
    want_action = "DbConnectAdmin" if pam_user == ADMIN_ROLE else "DbConnect"
    if p["Action"] != want_action:
        raise Reject("wrong_action", f"{p['Action'][:40]} for role {pam_user!r}, want {want_action}")
    verifier.check_signed(
        cfg,
        p,
        "dsql",
        MAX_EXPIRES,
        now,
        info,
        token,
        lambda akid, secret, session_token, amz_date, expires: botocore_token(
            host, p["Action"], cfg["region"], akid, secret, session_token, amz_date, expires
        ),
    )


if __name__ == "__main__":
    # verifier.main reads the config, the token and PAM_USER, logs, and decides with
    # verifier.verify: this flavour's.
    verifier.verify = verify
    sys.exit(verifier.main())
