"""The lab's sample application: a TCP server on port 8080 answering which node serves it."""

import os
import socket

NAME = f"hello from {os.environ.get('HVHA_NODE', 'unknown')}\n".encode()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 8080))
server.listen(64)
while True:
    conn, _ = server.accept()
    try:
        conn.sendall(NAME)
    finally:
        conn.close()
