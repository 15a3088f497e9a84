"""Oracle for the token tests (tests/oracle/mod.rs): botocore's own token functions, clock frozen.

Reads JSON lines on stdin, one input each:
  {"kind": "rds" (the default) or "dsql", "access_key_id", "secret_access_key",
   "session_token" (or null), "region", "host", "epoch" (seconds), "expires_in" (seconds),
   for "rds": "port", "user"; for "dsql": "admin" (true or false)}
and writes one JSON line per input, in order: {"token": "..."}.

Each token comes from the function users call, run unchanged on a client made for the input's
region: the rds client's generate_db_auth_token, the dsql client's
generate_db_connect_auth_token or generate_db_connect_admin_auth_token (these take ExpiresIn).
Pinned per input:
  - the clock SigV4 reads (botocore.auth.get_current_datetime), so tokens are reproducible;
  - for rds only, expires_in, which generate_db_auth_token fixes at 900: its call to the
    request signer's generate_presigned_url is given the input's value instead. With 900
    nothing is overridden.
"""

import datetime
import json
import sys

import botocore
import botocore.auth
import botocore.session


def main():
    sys.stderr.write(f"botocore {botocore.__version__}\n")
    session = botocore.session.get_session()
    clients = {}
    frozen = {}
    botocore.auth.get_current_datetime = lambda remove_tzinfo=True: frozen["now"]

    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        kind = case.get("kind", "rds")
        creds = (case["access_key_id"], case["secret_access_key"], case["session_token"])
        client_key = (kind, case["region"], creds)
        client = clients.get(client_key)
        if client is None:
            client = session.create_client(
                kind,
                region_name=case["region"],
                aws_access_key_id=creds[0],
                aws_secret_access_key=creds[1],
                aws_session_token=creds[2],
            )
            clients[client_key] = client
        frozen["now"] = datetime.datetime.fromtimestamp(
            case["epoch"], datetime.timezone.utc
        ).replace(tzinfo=None)
        if kind == "dsql":
            generate = (
                client.generate_db_connect_admin_auth_token
                if case["admin"]
                else client.generate_db_connect_auth_token
            )
            token = generate(case["host"], case["region"], case["expires_in"])
        else:
            signer = client._request_signer
            presign = type(signer).generate_presigned_url.__get__(signer)
            expires_in = case["expires_in"]
            signer.generate_presigned_url = lambda **kw: presign(
                **{**kw, "expires_in": expires_in}
            )
            token = client.generate_db_auth_token(
                DBHostname=case["host"],
                Port=case["port"],
                DBUsername=case["user"],
                Region=case["region"],
            )
        sys.stdout.write(json.dumps({"token": token}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
