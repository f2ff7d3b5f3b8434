#!/usr/bin/env python3
"""Socket-level probe, run in the node namespace or a pod. Prints one line
per result, flushed, so a test can follow it:

  tcp HOST PORT           connect, print "peer=IP:PORT" (getpeername) and the
                          server's answer line
  sendto HOST PORT        unconnected UDP: sendto, recvfrom, print
                          "from=IP:PORT <answer>" (recvmsg's source address)
  connected HOST PORT S   connected UDP for S seconds: "peer=IP:PORT", then a
                          request every 0.1 s printing the answer, or
                          "error=NAME" and a reconnect of the same socket
  udp_one_port SRC PORT HOST...
                          one UDP socket bound to port SRC sends to each HOST,
                          then to the first again; per datagram
                          "to=IP:PORT from=IP:PORT <answer>" or "to=IP:PORT error=NAME"
  big HOST PORT SIZE      unconnected UDP: a SIZE-byte datagram (fragmented on
                          the way), its answer as large: "from=IP:PORT size=N
                          <first line>"; resent after a second without an
                          answer, three tries (each refusal on the way, a
                          "packet too big", teaches an end its path MTU)
  tcp_one_port SRC PORT HOST...
                          a TCP connection from port SRC (SO_REUSEADDR) to each
                          HOST in turn ("HOLD" mode of server.py): its greeting
                          "to=IP:PORT from=IP:PORT <greeting>", then one echoed
                          line on every connection open so far, "to=IP:PORT <echo>";
                          "to=IP:PORT error=NAME" for what fails
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


def error(e):
    if isinstance(e, socket.timeout):
        return "timeout"
    return errno.errorcode.get(e.errno, str(e))


def wildcard(host):
    return "::" if ":" in host else "0.0.0.0"


def udp_one_port(src, port, hosts):
    s = socket.socket(family(hosts[0]), socket.SOCK_DGRAM)
    s.bind((wildcard(hosts[0]), src))
    s.settimeout(2)
    for host in hosts + hosts[:1]:
        to = name((host, port))
        try:
            s.sendto(b"hello", (host, port))
            data, addr = s.recvfrom(65535)
            out("to=%s from=%s %s" % (to, name(addr), data.decode().strip()))
        except OSError as e:
            out("to=%s error=%s" % (to, error(e)))


def tcp_one_port(src, port, hosts):
    open_ = []
    for host in hosts:
        to = name((host, port))
        try:
            s = socket.socket(family(host), socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((wildcard(host), src))
            s.settimeout(3)
            s.connect((host, port))
            f = s.makefile("r")
            s.sendall(b"HOLD\n")
            greeting = f.readline().strip() or "error=closed"
            out("to=%s from=%s %s" % (to, name(s.getpeername()), greeting))
            open_.append((to, s, f))
        except OSError as e:
            out("to=%s error=%s" % (to, error(e)))
        for i, (to, s, f) in enumerate(open_):
            try:
                s.sendall(b"line%d\n" % i)
                out("to=%s %s" % (to, f.readline().strip() or "error=closed"))
            except OSError as e:
                out("to=%s error=%s" % (to, error(e)))


def big(host, port, size):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(1.0)
    for attempt in range(3):
        s.sendto(b"b" * size, (host, port))
        try:
            data, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        first = data.split(b"\n", 1)[0].decode(errors="replace")
        out("from=%s size=%d %s" % (name(addr), len(data), first))
        return
    out("error=timeout")


def main():
    mode = sys.argv[1]
    if mode in ("udp_one_port", "tcp_one_port"):
        one_port = udp_one_port if mode == "udp_one_port" else tcp_one_port
        one_port(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
        return
    host, port = sys.argv[2], int(sys.argv[3])
    try:
        if mode == "tcp":
            tcp(host, port)
        elif mode == "sendto":
            sendto(host, port)
        elif mode == "big":
            big(host, port, int(sys.argv[4]))
        else:
            connected(host, port, float(sys.argv[4]))
    except OSError as e:
        out("error=%s" % errno.errorcode.get(e.errno, e.errno))
        sys.exit(3)


main()
