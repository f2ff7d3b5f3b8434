//! The server and client `cargo xtask perf` runs inside pod namespaces (as
//! hidden `xtask net-server` / `net-latency` / `net-rate` commands of this
//! binary), so the load balancer, not the tools, is what is measured: a TCP
//! server that accepts and closes, and a client that times connect() or
//! counts connections per second. The client ends each connection with an
//! RST (SO_LINGER 0): no TIME_WAIT on either side, so neither ephemeral
//! ports nor the netfilter contenders' conntrack table fill up.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

/// Close with an RST instead of a FIN: no TIME_WAIT.
fn linger_zero(fd: &impl AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Accept on `port` with `threads` acceptors; every connection is closed at
/// once. Prints "ready" when listening; runs until killed.
pub fn server(port: u16, threads: usize) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind :{port}"))?;
    // std listens with a backlog of 128: a burst overflows it and the SYN
    // waits a second for its retransmit. Listening again raises it.
    // SAFETY: a listening socket's fd.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        bail!("listen(4096): {}", std::io::Error::last_os_error());
    }
    println!("ready");
    let listener = Arc::new(listener);
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let listener = listener.clone();
            std::thread::spawn(move || {
                loop {
                    // Dropped at once: a FIN, which (unlike an RST) never
                    // fails the client's connect(); the client's RST then
                    // ends the connection without TIME_WAIT on this side.
                    let _ = listener.accept();
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// One connection: the time connect() took; then reset by the client.
fn connect_once(target: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok()?;
    let took = started.elapsed();
    linger_zero(&stream);
    Some(took)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Sequential connect() latency to each target in alternating rounds
/// (`per_round` connects to one, then the other, order swapped every
/// round), so drift on a busy machine hits both alike. Prints JSON with
/// p50/p99 in microseconds per target.
pub fn latency(targets: &[SocketAddr], rounds: usize, per_round: usize) -> Result<()> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut failures = vec![0u64; targets.len()];
    // Warm up (ARP, caches).
    for t in targets {
        let _ = connect_once(*t);
    }
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = if round % 2 == 0 {
                k
            } else {
                targets.len() - 1 - k
            };
            for _ in 0..per_round {
                match connect_once(targets[i]) {
                    Some(d) => samples[i].push(d.as_secs_f64() * 1e6),
                    None => failures[i] += 1,
                }
            }
        }
    }
    let out: Vec<_> = targets
        .iter()
        .zip(samples.iter_mut())
        .zip(&failures)
        .map(|((t, s), f)| {
            s.sort_by(f64::total_cmp);
            json!({
                "target": t.to_string(),
                "p50_us": percentile(s, 0.5),
                "p99_us": percentile(s, 0.99),
                "samples": s.len(),
                "failures": f,
            })
        })
        .collect();
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// New connections per second to `target` from `threads` connecting loops
/// for `duration`. Prints JSON.
pub fn rate(target: SocketAddr, duration: Duration, threads: usize) -> Result<()> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match connect_once(target) {
                        Some(_) => ok.fetch_add(1, Ordering::Relaxed),
                        None => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let secs = started.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    if n == 0 {
        bail!("no connection to {target} succeeded");
    }
    println!(
        "{}",
        json!({
            "target": target.to_string(),
            "conns_per_s": n as f64 / secs,
            "failures": failed.load(Ordering::Relaxed),
        })
    );
    Ok(())
}
