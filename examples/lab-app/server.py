"""The lab's sample application: a TCP server on port 8080 answering which node serves it.

Each answer also counts the visit in /srv/hvha/web/visits (the module's replicated directory),
written and fsynced before the answer is sent: after a failover or a swap the count goes on from
where it was, because the other node's copy has every acknowledged visit.
"""

import os
import socket

DATA = "/srv/hvha/web/visits"
NODE = os.environ.get("HVHA_NODE", "unknown")


def visit() -> int:
    os.makedirs(os.path.dirname(DATA), exist_ok=True)
    fd = os.open(DATA, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        count = int(os.pread(fd, 32, 0).decode() or "0") + 1
        os.pwrite(fd, f"{count:<31}\n".encode(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 8080))
server.listen(64)
while True:
    conn, _ = server.accept()
    try:
        conn.sendall(f"hello from {NODE} (visit {visit()})\n".encode())
    finally:
        conn.close()
