#!/usr/bin/env python3
"""Test/demo server for a pod: answers on TCP ports with an HTTP response and
on UDP ports with a datagram, both naming the pod and the client address it
saw ("pod=NAME client=IP:PORT port=N", and "bytes=N" after a request body
with a Content-Length), over IPv4 and IPv6. Runs until killed."""
import argparse
import socket
import threading


def bound(family, kind, port):
    """A socket on the wildcard address of one family (IPv6 only for IPv6,
    so IPv4 clients keep showing as IPv4 addresses)."""
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::", port))
    else:
        s.bind(("0.0.0.0", port))
    return s


def tcp_server(name, port, family):
    s = bound(family, socket.SOCK_STREAM, port)
    s.listen(128)
    while True:
        conn, addr = s.accept()
        threading.Thread(target=serve_tcp, args=(conn, addr, name, port), daemon=True).start()


def serve_tcp(conn, addr, name, port):
    try:
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"HOLD"):
                # Long-lived connection test: echo lines until the client closes.
                conn.sendall(f"pod={name} client={addr[0]}:{addr[1]} port={port}\n".encode())
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    conn.sendall(f"pod={name} echo={chunk.decode().strip()}\n".encode())
        # addr=: the local address the client reached (which endpoint IP, for
        # pods answering on several).
        answer = f"pod={name} client={addr[0]}:{addr[1]} port={port} addr={conn.getsockname()[0]}"
        body = request_body(conn, data)
        if body is not None:
            answer += f" bytes={len(body)}"
        body = (answer + "\n").encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        conn.sendall(head + body)
    except OSError:
        pass
    finally:
        conn.close()


def request_body(conn, data):
    """The body of a request whose head (and maybe some of the body) is in
    `data`, read up to its Content-Length; None if it has none."""
    head, _, body = data.partition(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        return None
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return body


def udp_server(name, port, family):
    s = bound(family, socket.SOCK_DGRAM, port)
    while True:
        data, addr = s.recvfrom(65535)
        answer = f"pod={name} client={addr[0]}:{addr[1]} port={port} bytes={len(data)}\n".encode()
        # A large request gets an answer as large (fragmented both ways).
        if len(data) > 1000:
            answer += b"." * (len(data) - len(answer))
        s.sendto(answer, addr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--tcp", default="")
    p.add_argument("--udp", default="")
    a = p.parse_args()
    threads = []
    servers = []
    for family in (socket.AF_INET, socket.AF_INET6):
        servers += [(tcp_server, int(p), family) for p in filter(None, a.tcp.split(","))]
        servers += [(udp_server, int(p), family) for p in filter(None, a.udp.split(","))]
    for serve, port, family in servers:
        threads.append(threading.Thread(target=serve, args=(a.name, port, family), daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
