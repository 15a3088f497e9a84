"""RDS IAM auth token verifier for the test stand-in (TEST-ONLY).

pam_standin.so runs this with the client's password on stdin and the login user in
PAM_USER. It checks the password the way RDS checks an IAM auth token and exits 0 to
accept, 1 to reject. The signature is recomputed with botocore's SigV4 query signer
(the signer behind botocore's generate_db_auth_token) at the token's own X-Amz-Date.

Configuration: the JSON file named by STANDIN_VERIFIER_CONFIG:
  host, port      the endpoint a token must name (as the client connects to it)
  region          the region a token must be scoped to
  keys_file       JSON {akid: {"secret": ..., "session_token": ..., "expiration": epoch}},
                  re-read on every call (tests add rotated keys while the server runs)
  moto_url        optional: a moto server whose STS-issued credentials are also trusted
  log             file to append one JSON line per decision (never the token or signature)
  max_skew_seconds optional (default 300): how far X-Amz-Date may lie in the future

Each log line: {"time", "user", "token_user", "akid", "service", "endpoint", "length", "accepted",
"reason", "detail", "botocore_identical"}; reason is a short code such as "ok",
"expired", "bad_signature", "wrong_user", "wrong_endpoint"; botocore_identical tells whether
the token is byte for byte what botocore's generate_db_auth_token makes.
"""

import datetime
import hmac
import json
import os
import sys
import time
import urllib.parse
import urllib.request

REQUIRED = (
    "Action",
    "DBUser",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)
OPTIONAL = ("X-Amz-Security-Token",)
MAX_EXPIRES = 900


class Reject(Exception):
    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_token(token):
    """Split `host:port/?k=v&...` into (host, port, params); params keep their order."""
    endpoint, query = split_token(token, "host:port/?query")
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise Reject("malformed", "endpoint without port")
    params = parse_query(query)
    check_parameters(params, REQUIRED)
    return host, int(port), params


def split_token(token, shape):
    """`endpoint/?query` into its two halves, refusing whitespace; `shape` names the form."""
    if "\n" in token or "\r" in token or " " in token:
        raise Reject("malformed", "whitespace in token")
    endpoint, sep, query = token.partition("/?")
    if not sep or not endpoint or not query:
        raise Reject("malformed", f"not {shape}")
    return endpoint, query


def parse_query(query):
    """`k=v&...` into a dict in order, refusing a parameter without value or given twice."""
    params = {}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq:
            raise Reject("malformed", f"parameter without value: {key[:40]}")
        key = urllib.parse.unquote(key, errors="strict")
        if key in params:
            raise Reject("malformed", f"repeated parameter {key}")
        params[key] = urllib.parse.unquote(value, errors="strict")
    return params


def check_parameters(params, required):
    """Refuses a parameter neither `required` nor the session token, and a missing one."""
    for key in params:
        if key not in required and key not in OPTIONAL:
            raise Reject("malformed", f"unexpected parameter {key[:40]}")
    for key in required:
        if key not in params:
            raise Reject("malformed", f"missing {key}")


def moto_credentials(moto_url, akid):
    """Credentials a moto server issued (STS AssumedRole, IAM AccessKey), from its state dump."""
    url = moto_url.rstrip("/") + "/moto-api/data.json"
    with urllib.request.urlopen(url, timeout=5) as resp:
        data = json.load(resp)
    found = []
    for models in data.values():
        if not isinstance(models, dict):
            continue
        for instances in models.values():
            if not isinstance(instances, list):
                continue
            for obj in instances:
                if (
                    isinstance(obj, dict)
                    and obj.get("access_key_id") == akid
                    and obj.get("secret_access_key")
                ):
                    found.append(
                        {
                            "secret": obj["secret_access_key"],
                            "session_token": obj.get("session_token"),
                        }
                    )
    # moto also records an IAM access key (without the session token) for an STS-issued
    # key id: the STS record, which has the session token, wins.
    found.sort(key=lambda k: k["session_token"] is None)
    return found[0] if found else None


def lookup_key(cfg, akid):
    keys_file = cfg.get("keys_file")
    if keys_file:
        keys = load_json(keys_file)
        if akid in keys:
            return keys[akid]
    if cfg.get("moto_url"):
        try:
            found = moto_credentials(cfg["moto_url"], akid)
        except OSError as e:
            raise Reject("unknown_key", f"moto lookup failed: {e}") from e
        if found:
            return found
    raise Reject("unknown_key", f"no secret for access key id {akid}")


def expiration_epoch(value):
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text).timestamp()


def botocore_token(host, port, user, region, akid, secret, session_token, amz_date, expires):
    """What botocore's RDS generate_db_auth_token returns for these inputs at amz_date."""
    data = {"Action": "connect", "DBUser": user}
    credentials = (akid, secret, session_token)
    return botocore_presign(f"{host}:{port}", data, "rds-db", region, credentials, amz_date, expires)


def botocore_presign(endpoint, data, service, region, credentials, amz_date, expires):
    """botocore's SigV4 query signature of `https://endpoint/?data` at amz_date, without the
    scheme: how botocore's token generators for RDS and Aurora DSQL sign."""
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    frozen = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
    botocore.auth.get_current_datetime = lambda *a, **k: frozen
    request = AWSRequest(method="GET", url=f"https://{endpoint}/", data=data)
    signer = botocore.auth.SigV4QueryAuth(Credentials(*credentials), service, region, expires=expires)
    signer.add_auth(request)
    return request.url[len("https://") :]


def check_signed(cfg, p, service, max_expires, now, info, token, sign):
    """The SigV4 query-signing checks RDS and Aurora DSQL make alike once the token's shape and
    endpoint are right: one place, so that the two flavours cannot drift apart. Checks the
    algorithm, the credential scope (`service`, region, date), the lifetime (1..max_expires s)
    and dates, the signed headers, the key and its session token, and the signature against
    `sign(akid, secret, session_token, amz_date, expires)`: what botocore makes of them."""
    if p["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise Reject("bad_algorithm", p["X-Amz-Algorithm"][:40])
    scope = p["X-Amz-Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise Reject("bad_credential_scope", "want AKID/date/region/service/aws4_request")
    akid, scope_date, scope_region, scope_service, _ = scope
    info["akid"] = akid
    info["service"] = scope_service[:40]
    if scope_service != service:
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
    if not p["X-Amz-Expires"].isdigit() or not 0 < int(p["X-Amz-Expires"]) <= max_expires:
        raise Reject("bad_expires", f"X-Amz-Expires={p['X-Amz-Expires'][:20]} (1..{max_expires})")
    expires = int(p["X-Amz-Expires"])
    if now > signed_at + expires:
        raise Reject("expired", f"expired {int(now - signed_at - expires)} s ago")
    if signed_at > now + float(cfg.get("max_skew_seconds", 300)):
        raise Reject("future_date", f"X-Amz-Date {int(signed_at - now)} s in the future")
    if p["X-Amz-SignedHeaders"] != "host":
        raise Reject("bad_signed_headers", p["X-Amz-SignedHeaders"][:40])

    key = lookup_key(cfg, akid)
    want_token = key.get("session_token") or None
    got_token = p.get("X-Amz-Security-Token")
    if want_token is not None and got_token is None:
        raise Reject("security_token_mismatch", "temporary credentials need X-Amz-Security-Token")
    if got_token is not None and (
        want_token is None or not hmac.compare_digest(got_token.encode(), want_token.encode())
    ):
        raise Reject("security_token_mismatch", "X-Amz-Security-Token does not belong to the key")
    exp = expiration_epoch(key.get("expiration"))
    if exp is not None and now > exp:
        raise Reject("credentials_expired", f"credentials expired {int(now - exp)} s ago")

    expected = sign(akid, key["secret"], want_token, p["X-Amz-Date"], expires)
    want_sig = expected.rpartition("&X-Amz-Signature=")[2]
    if not hmac.compare_digest(p["X-Amz-Signature"].encode(), want_sig.encode()):
        raise Reject("bad_signature", "signature does not match the request")
    info["botocore_identical"] = hmac.compare_digest(expected.encode(), token.encode())


def verify(cfg, pam_user, token, now, info):
    host, port, p = parse_token(token)
    info["endpoint"] = f"{host}:{port}"
    info["token_user"] = p["DBUser"]
    if host.lower() != str(cfg["host"]).lower() or port != int(cfg["port"]):
        raise Reject("wrong_endpoint", f"token for {host}:{port}, this is {cfg['host']}:{cfg['port']}")
    if p["Action"] != "connect":
        raise Reject("wrong_action", p["Action"][:40])
    if p["DBUser"] != pam_user:
        raise Reject("wrong_user", f"token for {p['DBUser']!r}, login as {pam_user!r}")
    check_signed(
        cfg,
        p,
        "rds-db",
        MAX_EXPIRES,
        now,
        info,
        token,
        lambda akid, secret, session_token, amz_date, expires: botocore_token(
            host, port, pam_user, cfg["region"], akid, secret, session_token, amz_date, expires
        ),
    )


def main():
    info = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "user": os.environ.get("PAM_USER", ""),
        "token_user": None,
        "akid": None,
        "service": None,
        "endpoint": None,
        "length": None,
        "accepted": False,
        "reason": None,
        "detail": "",
        "botocore_identical": None,
    }
    cfg = {}
    try:
        cfg_path = os.environ.get("STANDIN_VERIFIER_CONFIG")
        if not cfg_path:
            raise Reject("config_error", "STANDIN_VERIFIER_CONFIG is not set")
        try:
            cfg = load_json(cfg_path)
        except (OSError, ValueError) as e:
            raise Reject("config_error", f"{cfg_path}: {e}") from e
        raw = sys.stdin.buffer.read()
        info["length"] = len(raw)
        try:
            token = raw.decode("ascii")
        except UnicodeDecodeError as e:
            raise Reject("malformed", "token is not ASCII") from e
        if not info["user"]:
            raise Reject("config_error", "PAM_USER is not set")
        # When the password reached the server (set by the PAM module), as RDS would judge it.
        received_at = float(os.environ.get("STANDIN_RECEIVED_AT") or time.time())
        verify(cfg, info["user"], token, received_at, info)
        info["accepted"] = True
        info["reason"] = "ok"
    except Reject as r:
        info["reason"] = r.reason
        info["detail"] = r.detail
    except Exception as e:  # noqa: BLE001 - any failure is a rejection, logged with its cause
        info["reason"] = "verifier_error"
        info["detail"] = f"{type(e).__name__}: {e}"
    line = json.dumps(info, sort_keys=True) + "\n"
    log = cfg.get("log")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    else:
        sys.stderr.write(line)
    return 0 if info["accepted"] else 1


if __name__ == "__main__":
    sys.exit(main())
