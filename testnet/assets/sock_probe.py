#!/usr/bin/env python3
"""Socket-level LB probe, run in the node namespace. Prints one line per
result, flushed, so a test can follow it:

  tcp HOST PORT           connect, print "peer=IP:PORT" (getpeername) and the
                          server's answer line
  sendto HOST PORT        unconnected UDP: sendto, recvfrom, print
                          "from=IP:PORT <answer>" (recvmsg's source address)
  connected HOST PORT S   connected UDP for S seconds: "peer=IP:PORT", then a
                          request every 0.1 s printing the answer, or
                          "error=NAME" and a reconnect of the same socket
"""
import errno
import socket
import sys
import time


def out(line):
    print(line, flush=True)


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def name(addr):
    """ip:port, [ip6]:port."""
    return ("[%s]:%d" if ":" in addr[0] else "%s:%d") % (addr[0], addr[1])


def tcp(host, port):
    s = socket.create_connection((host, port), timeout=3)
    out("peer=" + name(s.getpeername()))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    out(data.decode().strip().splitlines()[-1])


def sendto(host, port):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"hello", (host, port))
    data, addr = s.recvfrom(65535)
    out("from=%s %s" % (name(addr), data.decode().strip()))


def connected(host, port, seconds):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(1)
    s.connect((host, port))
    out("peer=" + name(s.getpeername()))
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            s.send(b"hello")
            out(s.recv(65535).decode().strip())
        except socket.timeout:
            out("timeout")
        except OSError as e:
            out("error=%s" % errno.errorcode.get(e.errno, e.errno))
            s.connect((host, port))
            out("reconnected peer=" + name(s.getpeername()))
        time.sleep(0.1)


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        if mode == "tcp":
            tcp(host, port)
        elif mode == "sendto":
            sendto(host, port)
        else:
            connected(host, port, float(sys.argv[4]))
    except OSError as e:
        out("error=%s" % errno.errorcode.get(e.errno, e.errno))
        sys.exit(3)


main()
