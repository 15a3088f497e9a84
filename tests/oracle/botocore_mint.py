"""Oracle for tests/token_botocore_random.rs: botocore's generate_db_auth_token, clock frozen.

Reads JSON lines on stdin, one input each:
  {"access_key_id", "secret_access_key", "session_token" (or null), "region", "host", "port",
   "user", "epoch" (seconds), "expires_in" (seconds)}
and writes one JSON line per input, in order: {"token": "..."}.

The whole of generate_db_auth_token runs unchanged. Two things are pinned per input:
  - the clock SigV4 reads (botocore.auth.get_current_datetime), so tokens are reproducible;
  - expires_in, which generate_db_auth_token fixes at 900: its call to the request signer's
    generate_presigned_url is given the input's value instead. With 900 nothing is overridden.
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
        creds = (case["access_key_id"], case["secret_access_key"], case["session_token"])
        client = clients.get(creds)
        if client is None:
            client = session.create_client(
                "rds",
                region_name="us-east-1",
                aws_access_key_id=creds[0],
                aws_secret_access_key=creds[1],
                aws_session_token=creds[2],
            )
            clients[creds] = client
        signer = client._request_signer
        presign = type(signer).generate_presigned_url.__get__(signer)
        expires_in = case["expires_in"]
        signer.generate_presigned_url = lambda **kw: presign(**{**kw, "expires_in": expires_in})
        frozen["now"] = datetime.datetime.fromtimestamp(
            case["epoch"], datetime.timezone.utc
        ).replace(tzinfo=None)
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
