# A local connection flood, run as another uid by tests/support/flood.rs.
# Usage: flood.py unix:PATH|tcp:HOST:PORT HELD SECONDS idle|slowloris
# Holds up to HELD connections for SECONDS, replacing each one the server closes (at most 10
# new ones per 10 ms tick). "idle" connections send nothing; "slowloris" ones send the start
# of an HTTP request, then one header byte per second. Prints "opened N" as it goes.
import select, socket, sys, time

target, held, seconds, kind = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
family, _, address = target.partition(":")


def connect():
    if family == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(address)
    else:
        host, _, port = address.rpartition(":")
        s = socket.create_connection((host, int(port)))
    if kind == "slowloris":
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    return s


conns, opened, said, end, last_drip = [], 0, 0, time.time() + seconds, time.time()
while time.time() < end:
    if conns:
        readable, _, _ = select.select(conns, [], [], 0)
        for s in readable:
            conns.remove(s)
            s.close()
    for _ in range(min(10, held - len(conns))):
        try:
            conns.append(connect())
        except OSError as e:
            sys.exit("connect: %s" % e)
        opened += 1
    if kind == "slowloris" and time.time() - last_drip >= 1:
        last_drip = time.time()
        for s in list(conns):
            try:
                s.send(b"X")
            except OSError:
                conns.remove(s)
                s.close()
    if opened - said >= 100:
        print("opened", opened, flush=True)
        said = opened
    time.sleep(0.01)
print("opened", opened, flush=True)
