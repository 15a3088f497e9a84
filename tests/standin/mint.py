"""Mint an RDS IAM auth token with botocore, for tests (run with the test bed's venv python).

usage: mint.py HOST PORT USER REGION AKID SECRET [SESSION_TOKEN] [EPOCH] [EXPIRES_IN]

SESSION_TOKEN may be "" or "-" for none. EPOCH (seconds since 1970, UTC) freezes the
signing clock; "" or "-" means now. EXPIRES_IN defaults to 900, the value botocore's
generate_db_auth_token always uses; with another value the same request goes through
botocore's request signer with that expiry (RDS accepts at most 900).
Prints the token, nothing else.
"""

import datetime
import sys


def main(argv):
    if not 7 <= len(argv) <= 10:
        sys.stderr.write(__doc__)
        return 2
    host, port, user, region, akid, secret = argv[1:7]
    rest = [a if a not in ("", "-") else None for a in argv[7:]] + [None] * 3
    session_token, epoch, expires_in = rest[:3]

    import botocore.auth
    import botocore.session

    if epoch is not None:
        frozen = datetime.datetime.fromtimestamp(float(epoch), datetime.timezone.utc).replace(
            tzinfo=None
        )
        botocore.auth.get_current_datetime = lambda *a, **k: frozen

    session = botocore.session.Session()
    client = session.create_client(
        "rds",
        region_name=region,
        aws_access_key_id=akid,
        aws_secret_access_key=secret,
        aws_session_token=session_token,
    )
    if expires_in is None or int(expires_in) == 900:
        token = client.generate_db_auth_token(host, int(port), user, Region=region)
    else:
        # The body of generate_db_auth_token, with another expiry.
        from botocore.awsrequest import prepare_request_dict

        request_dict = {
            "url_path": "/",
            "query_string": "",
            "headers": {},
            "body": {"Action": "connect", "DBUser": user},
            "method": "GET",
        }
        prepare_request_dict(request_dict, f"https://{host}:{port}")
        url = client._request_signer.generate_presigned_url(
            operation_name="connect",
            request_dict=request_dict,
            region_name=region,
            expires_in=int(expires_in),
            signing_name="rds-db",
        )
        token = url[len("https://") :]
    sys.stdout.write(token + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
