#!/usr/bin/env python3
"""Test/demo server for a pod: answers on TCP ports with an HTTP response and
on UDP ports with a datagram, both naming the pod and the client address it
saw ("pod=NAME client=IP:PORT port=N"). Runs until killed."""
import argparse
import socket
import threading


def tcp_server(name, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
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
        body = f"pod={name} client={addr[0]}:{addr[1]} port={port}\n".encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        conn.sendall(head + body)
    except OSError:
        pass
    finally:
        conn.close()


def udp_server(name, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        _, addr = s.recvfrom(65535)
        s.sendto(f"pod={name} client={addr[0]}:{addr[1]} port={port}\n".encode(), addr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--tcp", default="")
    p.add_argument("--udp", default="")
    a = p.parse_args()
    threads = []
    for port in filter(None, a.tcp.split(",")):
        threads.append(threading.Thread(target=tcp_server, args=(a.name, int(port)), daemon=True))
    for port in filter(None, a.udp.split(",")):
        threads.append(threading.Thread(target=udp_server, args=(a.name, int(port)), daemon=True))
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
