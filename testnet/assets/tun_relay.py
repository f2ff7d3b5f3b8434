#!/usr/bin/env python3
"""An L3 tunnel for tests: a TUN device (IFF_TUN | IFF_NO_PI, so bare IP
packets with no Ethernet header, like ipip, gre or wireguard) whose packets
are relayed over UDP to a peer running the same script, which writes them
into its own TUN device. Prints "ready" once the device exists; the device
goes with the process. Runs until killed."""
import argparse
import fcntl
import os
import select
import socket
import struct

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def endpoint(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dev", required=True)
    p.add_argument("--local", required=True, help="ADDR:PORT to receive the peer's packets on")
    p.add_argument("--remote", required=True, help="ADDR:PORT of the peer")
    a = p.parse_args()
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", a.dev.encode(), IFF_TUN | IFF_NO_PI))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(endpoint(a.local))
    remote = endpoint(a.remote)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([tun, sock], [], [])
        try:
            if tun in ready:
                sock.sendto(os.read(tun, 65535), remote)
            if sock in ready:
                os.write(tun, sock.recv(65535))
        except OSError:
            # The peer not there yet (ICMP refused) or the device down: a lost packet.
            pass


if __name__ == "__main__":
    main()
