//! Socket-level programs against real sockets: BPF_PROG_TEST_RUN does not
//! run cgroup sock_addr programs, so each case connects, sends and receives
//! with real sockets in a private network namespace (backends are addresses
//! of its loopback), with the programs attached to the root cgroup and told
//! (by netns cookie) to act on that namespace only. The links belong to the
//! loaded object and go when a test ends, also when it fails.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::Command,
    time::Duration,
};

use lb_agent::datapath::{loader::default_cgroup_root, sockets::netns_cookie};
use lb_common::{
    BACKEND_STANDBY, IPPROTO_TCP, IPPROTO_UDP, config_flags, frontend_kind, service_flags, stat,
};
use lb_tests::packet::{Datapath, ep};

const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 0, 1), Ipv4Addr::new(10, 244, 0, 2)];

/// Run `f` on a thread in a fresh network namespace whose loopback holds
/// 10.244.0.0/24 and fd00:244::1, ::2 (the backends), with the socket
/// programs attached and acting on that namespace.
fn lab<T: Send>(f: impl FnOnce(&mut Datapath) -> T + Send) -> T {
    lb_tests::require_root();
    let cgroup = default_cgroup_root().expect("a cgroup v2 mount");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                assert_eq!(
                    unsafe { libc::unshare(libc::CLONE_NEWNET) },
                    0,
                    "unshare: {}",
                    std::io::Error::last_os_error()
                );
                // Children inherit this thread's namespace.
                for args in [
                    &["link", "set", "lo", "up"][..],
                    &["addr", "add", "10.244.0.0/24", "dev", "lo"],
                    &["-6", "addr", "add", "fd00:244::1/128", "dev", "lo", "nodad"],
                    &["-6", "addr", "add", "fd00:244::2/128", "dev", "lo", "nodad"],
                ] {
                    let ok = Command::new("ip").args(args).status().expect("ip");
                    assert!(ok.success(), "ip {args:?}");
                }
                let mut dp = Datapath::load();
                let cookie = netns_cookie().expect("netns cookie");
                dp.set_config(|c| {
                    c.flags = config_flags::SOCKET_LB;
                    c.netns_cookie = cookie;
                });
                dp.attach_sockets(&cgroup);
                f(&mut dp)
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Frontend 10.96.0.10:80/TCP and :53/UDP over both backends (ids 1, 2 TCP
/// on 8080; 11, 12 UDP on 5353), rev-NAT ids 1 and 2.
fn program_web(dp: &mut Datapath, flags: u32) {
    for (i, addr) in BACKENDS.iter().enumerate() {
        dp.backend(i as u32 + 1, ep(&format!("{addr}:8080")), IPPROTO_TCP);
        dp.backend(i as u32 + 11, ep(&format!("{addr}:5353")), IPPROTO_UDP);
    }
    dp.frontend_with_flags(ep("10.96.0.10:80"), IPPROTO_TCP, 1, &[1, 2], flags);
    dp.frontend_with_flags(ep("10.96.0.10:53"), IPPROTO_UDP, 2, &[11, 12], flags);
}

/// A UDP server on 5353 of each backend (reads time out after `wait`) and
/// an unbound client.
fn udp_sockets(wait: Duration) -> (Vec<UdpSocket>, UdpSocket) {
    let servers = BACKENDS
        .iter()
        .map(|a| {
            let s = UdpSocket::bind((*a, 5353)).expect("bind");
            s.set_read_timeout(Some(wait)).unwrap();
            s
        })
        .collect();
    let client = UdpSocket::bind("0.0.0.0:0").expect("client");
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    (servers, client)
}

fn listeners() -> Vec<TcpListener> {
    BACKENDS
        .iter()
        .map(|a| {
            let l = TcpListener::bind((*a, 8080)).expect("listen");
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
        .collect()
}

/// Which listener accepted the last connection (its backend address).
fn accepted_by(listeners: &[TcpListener]) -> Option<Ipv4Addr> {
    for _ in 0..100 {
        for (l, addr) in listeners.iter().zip(BACKENDS) {
            if l.accept().is_ok() {
                return Some(addr);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn connect(to: &str) -> Result<TcpStream, i32> {
    let to: SocketAddr = to.parse().expect("address");
    TcpStream::connect_timeout(&to, Duration::from_secs(1)).map_err(|e| {
        e.raw_os_error()
            .unwrap_or(if e.kind() == ErrorKind::TimedOut {
                libc::ETIMEDOUT
            } else {
                -1
            })
    })
}

fn count(dp: &Datapath, index: u32) -> u64 {
    dp.stats()[index as usize]
}

/// What a connect() should come to.
#[derive(Debug)]
enum Connect {
    /// Connected to this backend; getpeername() shows `peer`.
    Backend {
        backend: Ipv4Addr,
        peer: &'static str,
    },
    /// Connected to one of the backends.
    AnyBackend,
    /// Failed with this errno.
    Errno(i32),
    /// Left alone: connected to the address asked for.
    Untouched,
}

#[test]
fn connect_table() {
    type Setup = fn(&mut Datapath);
    let cases: &[(&str, Setup, &str, Connect)] = &[
        (
            "ClusterIP: a backend, the Service shown as peer",
            |dp| program_web(dp, 0),
            "10.96.0.10:80",
            Connect::AnyBackend,
        ),
        (
            "one backend",
            |dp| {
                program_web(dp, 0);
                dp.frontend(ep("10.96.0.10:80"), IPPROTO_TCP, 1, &[2]);
            },
            "10.96.0.10:80",
            Connect::Backend {
                backend: BACKENDS[1],
                peer: "10.96.0.10:80",
            },
        ),
        (
            "no endpoints: refused",
            |dp| dp.frontend(ep("10.96.0.10:80"), IPPROTO_TCP, 1, &[]),
            "10.96.0.10:80",
            Connect::Errno(libc::ECONNREFUSED),
        ),
        (
            "traffic policy Local, endpoints elsewhere: unreachable",
            |dp| {
                dp.frontend_with_flags(
                    ep("10.96.0.10:80"),
                    IPPROTO_TCP,
                    1,
                    &[],
                    service_flags::DROP_IF_EMPTY,
                )
            },
            "10.96.0.10:80",
            Connect::Errno(libc::EHOSTUNREACH),
        ),
        (
            "undeclared port of a Service IP: refused",
            |dp| {
                program_web(dp, 0);
                dp.address_only("10.96.0.10".parse::<Ipv4Addr>().unwrap());
            },
            "10.96.0.10:81",
            Connect::Errno(libc::ECONNREFUSED),
        ),
        (
            "a backend address itself: untouched",
            |dp| program_web(dp, 0),
            "10.244.0.1:8080",
            Connect::Untouched,
        ),
        (
            "UDP frontend only: TCP untouched (nothing listens there)",
            |dp| {
                dp.backend(11, ep("10.244.0.1:8080"), IPPROTO_UDP);
                dp.frontend(ep("10.244.0.9:8080"), IPPROTO_UDP, 2, &[11]);
            },
            "10.244.0.9:8080",
            Connect::Errno(libc::ECONNREFUSED),
        ),
        (
            "external scope only (from outside the node): untouched",
            |dp| {
                dp.backend(1, ep("10.244.0.1:8080"), IPPROTO_TCP);
                dp.external_frontend(
                    ep("10.244.0.9:8080"),
                    IPPROTO_TCP,
                    1,
                    &[1],
                    frontend_kind::LOAD_BALANCER,
                );
            },
            "10.244.0.9:8080",
            Connect::Errno(libc::ECONNREFUSED),
        ),
        (
            "socket LB switched off in the config: untouched",
            |dp| {
                program_web(dp, 0);
                dp.set_config(|c| c.flags = 0);
            },
            "10.96.0.10:80",
            Connect::Errno(libc::ENETUNREACH),
        ),
        (
            "another network namespace's cookie: untouched",
            |dp| {
                program_web(dp, 0);
                dp.set_config(|c| c.netns_cookie ^= 1);
            },
            "10.96.0.10:80",
            Connect::Errno(libc::ENETUNREACH),
        ),
        (
            "all namespaces: translated whatever the cookie",
            |dp| {
                program_web(dp, 0);
                dp.set_config(|c| {
                    c.netns_cookie ^= 1;
                    c.flags |= config_flags::SOCKET_LB_ALL_NETNS;
                });
            },
            "10.96.0.10:80",
            Connect::AnyBackend,
        ),
    ];
    for (name, setup, to, want) in cases {
        lab(|dp| {
            setup(dp);
            let listeners = listeners();
            let translated = count(dp, stat::SOCK_TRANSLATED);
            let result = connect(to);
            match (want, result) {
                (Connect::Errno(errno), Err(got)) => {
                    assert_eq!(got, *errno, "{name}: errno");
                }
                (Connect::Untouched, Ok(stream)) => {
                    assert_eq!(stream.peer_addr().unwrap().to_string(), *to, "{name}");
                    assert_eq!(count(dp, stat::SOCK_TRANSLATED), translated, "{name}");
                }
                (Connect::AnyBackend, Ok(stream)) => {
                    assert!(
                        accepted_by(&listeners).is_some(),
                        "{name}: a backend accepted"
                    );
                    assert_eq!(stream.peer_addr().unwrap().to_string(), *to, "{name}: peer");
                    assert_eq!(count(dp, stat::SOCK_TRANSLATED), translated + 1, "{name}");
                }
                (Connect::Backend { backend, peer }, Ok(stream)) => {
                    assert_eq!(accepted_by(&listeners), Some(*backend), "{name}: backend");
                    assert_eq!(
                        stream.peer_addr().unwrap().to_string(),
                        *peer,
                        "{name}: peer"
                    );
                }
                (want, got) => panic!("{name}: want {want:?}, got {got:?}"),
            }
        });
    }
}

#[test]
fn unconnected_udp_keeps_its_backend_and_sees_the_service_as_source() {
    lab(|dp| {
        program_web(dp, 0);
        let (servers, client) = udp_sockets(Duration::from_millis(200));
        // One request: which server got it, and where the answer seems to come from.
        let exchange = |client: &UdpSocket| -> (usize, SocketAddr) {
            client.send_to(b"q", "10.96.0.10:53").expect("send");
            let mut buf = [0u8; 16];
            let (server, peer) = servers
                .iter()
                .enumerate()
                .find_map(|(i, s)| s.recv_from(&mut buf).ok().map(|(_, p)| (i, p)))
                .expect("a backend got the datagram");
            servers[server].send_to(b"a", peer).expect("answer");
            let (_, from) = client.recv_from(&mut buf).expect("answer arrives");
            (server, from)
        };
        let (first, from) = exchange(&client);
        assert_eq!(
            from.to_string(),
            "10.96.0.10:53",
            "recvmsg shows the Service"
        );
        for i in 0..10 {
            assert_eq!(exchange(&client).0, first, "datagram {i}: same backend");
        }
        assert!(count(dp, stat::SOCK_REV_TRANSLATED) >= 11);

        // Its backend stops taking flows: the next datagram moves.
        dp.set_backend_state(first as u32 + 11, BACKEND_STANDBY, 0);
        dp.frontend(ep("10.96.0.10:53"), IPPROTO_UDP, 2, &[12 - first as u32]);
        let (moved, from) = exchange(&client);
        assert_ne!(moved, first, "moved off the standby backend");
        assert_eq!(from.to_string(), "10.96.0.10:53");

        // The Service is gone: answers show their real source again.
        dp.remove_rev_nat(2);
        let (_, from) = exchange(&client);
        assert_eq!(from.ip().to_string(), BACKENDS[moved].to_string());
    });
}

#[test]
fn affinity_keeps_the_namespace_on_one_backend() {
    for (affinity, want_backends) in [(true, 1), (false, 2)] {
        lab(|dp| {
            let flags = if affinity { service_flags::AFFINITY } else { 0 };
            program_web(dp, flags);
            dp.set_head(ep("10.96.0.10:80"), IPPROTO_TCP, |h| {
                h.affinity_timeout_s = 60
            });
            let listeners = listeners();
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..30 {
                let _stream = connect("10.96.0.10:80").expect("connect");
                seen.insert(accepted_by(&listeners).expect("accepted"));
            }
            assert_eq!(seen.len(), want_backends, "affinity {affinity}: {seen:?}");
            if affinity {
                assert!(count(dp, stat::AFFINITY_HIT) >= 29);
            }
        });
    }
}

#[test]
fn getpeername_of_a_deleted_service_shows_the_backend() {
    lab(|dp| {
        program_web(dp, 0);
        dp.frontend(ep("10.96.0.10:80"), IPPROTO_TCP, 1, &[1]);
        let _listeners = listeners();
        let stream = connect("10.96.0.10:80").expect("connect");
        assert_eq!(stream.peer_addr().unwrap().to_string(), "10.96.0.10:80");
        dp.remove_rev_nat(1);
        assert_eq!(
            stream.peer_addr().unwrap(),
            SocketAddr::V4(SocketAddrV4::new(BACKENDS[0], 8080)),
            "no stale Service address once the Service is gone"
        );
    });
}

#[test]
fn ipv6_sockets_reach_ipv6_services_and_ipv4_ones_by_mapped_address() {
    lab(|dp| {
        program_web(dp, 0);
        dp.backend(21, ep("[fd00:244::2]:8080"), IPPROTO_TCP);
        dp.frontend(ep("[fd00:96::10]:80"), IPPROTO_TCP, 21, &[21]);
        let listener6 = TcpListener::bind("[fd00:244::2]:8080").expect("listen v6");
        listener6.set_nonblocking(true).unwrap();
        let listeners = listeners();

        // connect6 to an IPv6 Service: its IPv6 backend; the peer shown is the Service.
        let stream = connect("[fd00:96::10]:80").expect("IPv6 Service");
        assert_eq!(stream.peer_addr().unwrap().to_string(), "[fd00:96::10]:80");
        let mut accepted = None;
        for _ in 0..100 {
            if let Ok((_, from)) = listener6.accept() {
                accepted = Some(from);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(accepted.is_some(), "the IPv6 backend accepted");

        // An IPv6 socket to the IPv4-mapped ClusterIP reaches the IPv4 frontend.
        let stream = connect("[::ffff:10.96.0.10]:80").expect("mapped IPv4 Service");
        assert!(
            accepted_by(&listeners).is_some(),
            "an IPv4 backend accepted"
        );
        assert_eq!(
            stream.peer_addr().unwrap().to_string(),
            "[::ffff:10.96.0.10]:80"
        );

        // An IPv6 frontend without endpoints is refused like an IPv4 one.
        dp.frontend(ep("[fd00:96::20]:80"), IPPROTO_TCP, 22, &[]);
        assert_eq!(connect("[fd00:96::20]:80").err(), Some(libc::ECONNREFUSED));
        assert!(count(dp, stat::SOCK_TRANSLATED) >= 2);
    });
}

#[test]
fn a_reused_backend_id_is_not_mistaken_for_the_old_backend() {
    lab(|dp| {
        dp.backend(11, ep("10.244.0.1:5353"), IPPROTO_UDP);
        dp.frontend(ep("10.96.0.10:53"), IPPROTO_UDP, 2, &[11]);
        let (servers, client) = udp_sockets(Duration::from_millis(500));
        let exchange = |server: usize| -> SocketAddr {
            client.send_to(b"q", "10.96.0.10:53").expect("send");
            let mut buf = [0u8; 16];
            let (_, peer) = servers[server].recv_from(&mut buf).expect("datagram");
            servers[server].send_to(b"a", peer).expect("answer");
            client.recv_from(&mut buf).expect("answer arrives").1
        };
        assert_eq!(exchange(0).to_string(), "10.96.0.10:53");
        // The backend goes and its id comes back for another address.
        dp.remove_backend(11);
        dp.backend(11, ep("10.244.0.2:5353"), IPPROTO_UDP);
        assert_eq!(
            exchange(1).to_string(),
            "10.96.0.10:53",
            "the new backend's answers show the Service too"
        );
    });
}
