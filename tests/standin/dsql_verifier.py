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
tokens do not carry one). Log lines add "action" and "service", and "endpoint" is the host.
Extra reasons: "rds_token" (Action=connect or DBUser: an RDS token), "port_in_url".

The checks after the URL's shape (scope, dates, key, session token) are the same as
verifier.py's, which keeps them inline; verifier.py's Reject, key lookup and main are reused.
"""

import datetime
import hmac
import sys
import urllib.parse

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
OPTIONAL = ("X-Amz-Security-Token",)
MAX_EXPIRES = 604800
ADMIN_ROLE = "admin"


def parse_token(token):
    """Split `host/?k=v&...` into (host, params), refusing RDS's shape by name."""
    if "\n" in token or "\r" in token or " " in token:
        raise Reject("malformed", "whitespace in token")
    host, sep, query = token.partition("/?")
    if not sep or not host or not query:
        raise Reject("malformed", "not host/?query")
    params = {}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq:
            raise Reject("malformed", f"parameter without value: {key[:40]}")
        key = urllib.parse.unquote(key, errors="strict")
        if key in params:
            raise Reject("malformed", f"repeated parameter {key}")
        params[key] = urllib.parse.unquote(value, errors="strict")
    if "DBUser" in params or params.get("Action") == "connect":
        raise Reject("rds_token", "Action=connect and DBUser: an RDS IAM token")
    if ":" in host:
        raise Reject("port_in_url", f"{host[:80]}: DSQL signs the host alone")
    for key in params:
        if key not in REQUIRED and key not in OPTIONAL:
            raise Reject("malformed", f"unexpected parameter {key[:40]}")
    for key in REQUIRED:
        if key not in params:
            raise Reject("malformed", f"missing {key}")
    return host, params


def botocore_token(host, action, region, akid, secret, session_token, amz_date, expires):
    """What botocore's generate_db_connect(_admin)_auth_token returns for these at amz_date."""
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    frozen = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
    botocore.auth.get_current_datetime = lambda *a, **k: frozen
    request = AWSRequest(method="GET", url=f"https://{host}/", data={"Action": action})
    creds = Credentials(akid, secret, session_token)
    botocore.auth.SigV4QueryAuth(creds, "dsql", region, expires=expires).add_auth(request)
    return request.url[len("https://") :]


def verify(cfg, pam_user, token, now, info):
    host, p = parse_token(token)
    info["endpoint"] = host
    info["action"] = p["Action"][:40]
    if host.lower() != str(cfg["host"]).lower():
        raise Reject("wrong_endpoint", f"token for {host}, this is {cfg['host']}")
    want_action = "DbConnectAdmin" if pam_user == ADMIN_ROLE else "DbConnect"
    if p["Action"] != want_action:
        raise Reject("wrong_action", f"{p['Action'][:40]} for role {pam_user!r}, want {want_action}")
    if p["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise Reject("bad_algorithm", p["X-Amz-Algorithm"][:40])
    scope = p["X-Amz-Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise Reject("bad_credential_scope", "want AKID/date/region/service/aws4_request")
    akid, scope_date, scope_region, scope_service, _ = scope
    info["akid"] = akid
    info["service"] = scope_service[:40]
    if scope_service != "dsql":
        raise Reject("wrong_service", scope_service[:40])
    if scope_region != cfg["region"]:
        raise Reject("wrong_region", f"token for {scope_region}, this is {cfg['region']}")
    try:
        signed_at = (
            datetime.datetime.strptime(p["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
            .replace(tzinfo=datetime.timezone.utc)
            .timestamp()
        )
    except ValueError as e:
        raise Reject("bad_date", p["X-Amz-Date"][:40]) from e
    if scope_date != p["X-Amz-Date"][:8]:
        raise Reject("bad_credential_scope", "scope date differs from X-Amz-Date")
    if not p["X-Amz-Expires"].isdigit() or not 0 < int(p["X-Amz-Expires"]) <= MAX_EXPIRES:
        raise Reject("bad_expires", f"X-Amz-Expires={p['X-Amz-Expires'][:20]} (1..{MAX_EXPIRES})")
    expires = int(p["X-Amz-Expires"])
    if now > signed_at + expires:
        raise Reject("expired", f"expired {int(now - signed_at - expires)} s ago")
    if signed_at > now + float(cfg.get("max_skew_seconds", 300)):
        raise Reject("future_date", f"X-Amz-Date {int(signed_at - now)} s in the future")
    if p["X-Amz-SignedHeaders"] != "host":
        raise Reject("bad_signed_headers", p["X-Amz-SignedHeaders"][:40])

    key = verifier.lookup_key(cfg, akid)
    want_token = key.get("session_token") or None
    got_token = p.get("X-Amz-Security-Token")
    if want_token is not None and got_token is None:
        raise Reject("security_token_mismatch", "temporary credentials need X-Amz-Security-Token")
    if got_token is not None and (
        want_token is None or not hmac.compare_digest(got_token.encode(), want_token.encode())
    ):
        raise Reject("security_token_mismatch", "X-Amz-Security-Token does not belong to the key")
    exp = verifier.expiration_epoch(key.get("expiration"))
    if exp is not None and now > exp:
        raise Reject("credentials_expired", f"credentials expired {int(now - exp)} s ago")

    expected = botocore_token(
        host, p["Action"], cfg["region"], akid, key["secret"], want_token, p["X-Amz-Date"], expires
    )
    want_sig = expected.rpartition("&X-Amz-Signature=")[2]
    if not hmac.compare_digest(p["X-Amz-Signature"].encode(), want_sig.encode()):
        raise Reject("bad_signature", "signature does not match the request")
    info["botocore_identical"] = hmac.compare_digest(expected.encode(), token.encode())


if __name__ == "__main__":
    # verifier.main reads the config, the token and PAM_USER, logs, and decides with
    # verifier.verify: this flavour's.
    verifier.verify = verify
    sys.exit(verifier.main())
