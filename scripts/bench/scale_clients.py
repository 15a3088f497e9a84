#!/usr/bin/env python3
"""The client load of scripts/bench/scale.sh: every (database, user) pair an application.

Each pair gets one long-lived client (an application's pool) that runs `SELECT 1` every
--query-interval seconds, and a fresh login (log in, `SELECT 1`, log out) every
--login-interval seconds, both with random phases. Logins are PgBouncer's loopback trust
logins without a password, as the daemon renders them. The long-lived clients log in first,
at most --ramp-concurrency at a time (each one's first login opens a server connection);
then the file --ready is written and the load runs until the file --stop exists.

Standard library only. Prints one JSON object: logins, failed logins, queries, failed
queries, dropped long-lived clients, ramp-up seconds and the first few error texts.

  scale_clients.py --host H --port P --pairs FILE --ready FILE --stop FILE
      [--query-interval 10] [--login-interval 60] [--ramp-concurrency 16]
"""
import argparse
import asyncio
import json
import os
import random
import struct
import time

counts = {"logins": 0, "failed_logins": 0, "queries": 0, "failed_queries": 0, "dropped": 0}
errors = []


def note(kind, text):
    counts[kind] += 1
    if len(errors) < 10:
        errors.append(f"{kind}: {text}")


def error_text(body):
    fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
    return f"{fields.get(b'C', b'?').decode()} {fields.get(b'M', b'').decode()}"


async def read_message(reader):
    head = await reader.readexactly(5)
    tag, length = head[:1], struct.unpack("!I", head[1:])[0]
    return tag, await reader.readexactly(length - 4)


async def until_ready(reader):
    """Reads up to ReadyForQuery; returns the first error's text, or None."""
    failure = None
    while True:
        tag, body = await read_message(reader)
        if tag == b"E" and failure is None:
            failure = error_text(body)
        elif tag == b"R" and struct.unpack("!I", body[:4])[0] != 0:
            return "server asked for a password"
        elif tag == b"Z":
            return failure


async def login(args, database, user):
    """A logged-in connection, or raises LoginFailed."""
    reader, writer = await asyncio.open_connection(args.host, args.port)
    params = b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (("user", user), ("database", database), ("application_name", "scale"))
    )
    body = struct.pack("!I", 196608) + params + b"\0"
    writer.write(struct.pack("!I", len(body) + 4) + body)
    try:
        failure = await until_ready(reader)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        failure = f"connection lost during login: {e!r}"
    if failure is not None:
        writer.close()
        raise LoginFailed(f"{user}@{database}: {failure}")
    return reader, writer


class LoginFailed(Exception):
    pass


async def select_one(reader, writer):
    body = b"SELECT 1\0"
    writer.write(b"Q" + struct.pack("!I", len(body) + 4) + body)
    return await until_ready(reader)


async def long_lived(args, database, user, ramp, stop):
    async with ramp:
        conn = await connect_counted(args, database, user)
    while not stop.is_set():
        await sleep_or_stop(stop, args.query_interval * random.uniform(0.5, 1.5))
        if stop.is_set():
            break
        if conn is None:
            conn = await connect_counted(args, database, user)
            continue
        try:
            failure = await select_one(*conn)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            note("dropped", f"{user}@{database}: {e!r}")
            conn = None
            continue
        if failure is None:
            counts["queries"] += 1
        else:
            note("failed_queries", f"{user}@{database}: {failure}")
    if conn is not None:
        conn[1].close()


async def connect_counted(args, database, user):
    try:
        conn = await login(args, database, user)
    except (LoginFailed, OSError) as e:
        note("failed_logins", str(e))
        return None
    counts["logins"] += 1
    return conn


async def fresh_logins(args, database, user, stop):
    await sleep_or_stop(stop, random.uniform(0, args.login_interval))
    while not stop.is_set():
        conn = await connect_counted(args, database, user)
        if conn is not None:
            try:
                failure = await select_one(*conn)
                if failure is None:
                    counts["queries"] += 1
                else:
                    note("failed_queries", f"{user}@{database}: {failure}")
                conn[1].write(b"X\0\0\0\4")
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                note("failed_queries", f"{user}@{database}: {e!r}")
            conn[1].close()
        await sleep_or_stop(stop, args.login_interval)


async def sleep_or_stop(stop, seconds):
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pairs", required=True, help="lines of 'database user'")
    parser.add_argument("--stop", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--query-interval", type=float, default=10)
    parser.add_argument("--login-interval", type=float, default=60)
    parser.add_argument("--ramp-concurrency", type=int, default=16)
    args = parser.parse_args()
    pairs = [line.split() for line in open(args.pairs) if line.strip()]

    started = time.monotonic()
    stop = asyncio.Event()
    ramp = asyncio.Semaphore(args.ramp_concurrency)
    clients = [asyncio.create_task(long_lived(args, d, u, ramp, stop)) for d, u in pairs]
    while counts["logins"] + counts["failed_logins"] < len(pairs):
        await asyncio.sleep(0.1)
    ramp_seconds = time.monotonic() - started
    open(args.ready, "w").write(f"{ramp_seconds:.1f}\n")
    clients += [asyncio.create_task(fresh_logins(args, d, u, stop)) for d, u in pairs]
    while not os.path.exists(args.stop):
        await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*clients)
    print(json.dumps({**counts, "pairs": len(pairs), "ramp_seconds": round(ramp_seconds, 1),
                      "errors": errors}))


asyncio.run(main())
