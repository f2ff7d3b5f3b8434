#!/usr/bin/env python3
"""UDP client: sends one datagram per try and prints the reply, "refused"
(ICMP port unreachable -> ECONNREFUSED) or "timeout". Exit 0 on a reply."""
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
src_port = int(sys.argv[4]) if len(sys.argv) > 4 else 0
v6 = ":" in host
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("::" if v6 else "0.0.0.0", src_port))
s.settimeout(timeout)
s.connect((host, port))
try:
    s.send(b"hello")
    print(s.recv(65535).decode().strip())
    sys.exit(0)
except ConnectionRefusedError:
    print("refused")
    sys.exit(3)
except socket.timeout:
    print("timeout")
    sys.exit(4)
