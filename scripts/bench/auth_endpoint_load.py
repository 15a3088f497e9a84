#!/usr/bin/env python3
"""Drives an auth_query endpoint the way PgBouncer does, from several connections at once.

Each worker process logs in as the auth user (SCRAM-SHA-256; TLS first when --tls-ca is
given), then sends PgBouncer's auth query again and again in a closed loop: Parse, Bind
(one text parameter, the user name), Describe portal, Execute, Sync in one write, as
PgBouncer 1.24's pktbuf_write_ExtQuery does, and waits for ReadyForQuery. It times each
round trip and checks that the answer is one row (user, non-empty password).

Works against the aws-pgbouncer endpoint and against PostgreSQL itself. Standard library
only. Prints one JSON object: requests, errors, rate, latency percentiles in microseconds.

  auth_endpoint_load.py --host DIR_OR_ADDR --port P --user U --password-file F
      --dbname D --query SQL --lookup USER [--connections N] [--duration S] [--tls-ca CA]
"""
import argparse
import base64
import hashlib
import hmac
import json
import multiprocessing
import os
import socket
import ssl
import struct
import time


def msg(tag, body):
    return tag + struct.pack("!I", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


class Conn:
    def __init__(self, args):
        if args.host.startswith("/"):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(os.path.join(args.host, f".s.PGSQL.{args.port}"))
        else:
            sock = socket.create_connection((args.host, args.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if args.tls_ca:
                sock.sendall(struct.pack("!II", 8, 80877103))
                if sock.recv(1) != b"S":
                    raise RuntimeError("server refused TLS")
                ctx = ssl.create_default_context(cafile=args.tls_ca)
                sock = ctx.wrap_socket(sock, server_hostname=args.host)
        self.sock = sock
        self.buf = b""

    def read(self):
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack("!I", self.buf[1:5])
                if len(self.buf) >= length + 1:
                    tag, body = self.buf[:1], self.buf[5 : length + 1]
                    self.buf = self.buf[length + 1 :]
                    return tag, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk

    def login(self, user, password, dbname):
        params = cstr("user") + cstr(user) + cstr("database") + cstr(dbname) + b"\0"
        self.sock.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n=,r={nonce}"
        server_sig = None
        while True:
            tag, body = self.read()
            if tag == b"E":
                raise RuntimeError(f"login refused: {body!r}")
            if tag == b"Z":
                return
            if tag != b"R":
                continue
            (code,) = struct.unpack("!I", body[:4])
            if code == 10:  # SASL: client-first
                first = ("n,," + first_bare).encode()
                self.sock.sendall(msg(b"p", cstr("SCRAM-SHA-256") + struct.pack("!I", len(first)) + first))
            elif code == 11:  # server-first: client-final
                server_first = body[4:].decode()
                attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
                client_key = hmac.new(salted, b"Client Key", "sha256").digest()
                final_bare = f"c=biws,r={attrs['r']}"
                auth_msg = f"{first_bare},{server_first},{final_bare}".encode()
                sig = hmac.new(hashlib.sha256(client_key).digest(), auth_msg, "sha256").digest()
                proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig))).decode()
                server_key = hmac.new(salted, b"Server Key", "sha256").digest()
                server_sig = base64.b64encode(hmac.new(server_key, auth_msg, "sha256").digest()).decode()
                self.sock.sendall(msg(b"p", f"{final_bare},p={proof}".encode()))
            elif code == 12:  # server-final
                if body[4:].decode() != f"v={server_sig}":
                    raise RuntimeError("server signature mismatch")
            elif code != 0:
                raise RuntimeError(f"unsupported authentication request {code}")

    def auth_query(self, query, user):
        value = user.encode()
        self.sock.sendall(
            msg(b"P", cstr("") + cstr(query) + struct.pack("!H", 0))
            + msg(b"B", cstr("") + cstr("") + struct.pack("!HH", 0, 1) + struct.pack("!I", len(value)) + value + struct.pack("!H", 0))
            + msg(b"D", b"P" + cstr(""))
            + msg(b"E", cstr("") + struct.pack("!I", 0))
            + msg(b"S", b"")
        )
        rows, error = [], None
        while True:
            tag, body = self.read()
            if tag == b"D":
                rows.append(body)
            elif tag == b"E":
                error = body
            elif tag == b"Z":
                break
        if error is not None or len(rows) != 1:
            return False
        (ncols,) = struct.unpack("!H", rows[0][:2])
        (l1,) = struct.unpack("!i", rows[0][2:6])
        (l2,) = struct.unpack("!i", rows[0][6 + l1 : 10 + l1])
        return ncols == 2 and l2 > 0


def worker(args, start_at, out):
    conn = Conn(args)
    with open(args.password_file) as f:
        password = f.read().strip()
    conn.login(args.user, password, args.dbname)
    while time.time() < start_at:
        time.sleep(0.001)
    lat, errors = [], 0
    end = time.perf_counter() + args.duration
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        ok = conn.auth_query(args.query, args.lookup)
        lat.append(time.perf_counter() - t0)
        errors += 0 if ok else 1
    conn.sock.close()
    out.put((lat, errors))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", required=True)
    p.add_argument("--dbname", required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--lookup", required=True)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--tls-ca")
    args = p.parse_args()
    out = multiprocessing.Queue()
    start_at = time.time() + 1.0
    procs = [multiprocessing.Process(target=worker, args=(args, start_at, out)) for _ in range(args.connections)]
    for proc in procs:
        proc.start()
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    lat = sorted(x for r in results for x in r[0])
    errors = sum(r[1] for r in results)

    def pct(q):
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6, 1) if lat else None

    print(json.dumps({
        "connections": args.connections, "duration_s": args.duration, "requests": len(lat),
        "errors": errors, "rate_per_s": round(len(lat) / args.duration, 1),
        "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99), "max_us": pct(1.0),
    }))


if __name__ == "__main__":
    main()
