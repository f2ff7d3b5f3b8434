//! Load and churn: many Services, a steady stream of endpoint changes, and a
//! client opening connections continuously to a Service whose endpoints stay
//! ready. Shared by `cargo xtask soak` (long) and the test suite (short).

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::Topology;

#[derive(Clone, Debug)]
pub struct SoakParams {
    pub services: u32,
    pub endpoints_per_service: u32,
    pub changes_per_second: u32,
    pub duration: Duration,
    /// The lb-agent binary.
    pub agent: PathBuf,
}

#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    pub connections_ok: u64,
    pub connections_failed: u64,
    pub changes_made: u64,
    /// Agent RSS (MB) after programming, and at the end; the peak.
    pub rss_start_mb: f64,
    pub rss_end_mb: f64,
    pub rss_peak_mb: f64,
    pub program_seconds: f64,
}

impl SoakReport {
    pub fn markdown(&self, p: &SoakParams) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# lb soak report\n");
        let _ = writeln!(
            s,
            "{} Services x {} endpoints; {} endpoint changes/s for {} s; a client connecting continuously to a Service whose endpoints stay ready.\n",
            p.services,
            p.endpoints_per_service,
            p.changes_per_second,
            p.duration.as_secs()
        );
        let _ = writeln!(s, "| measure | value |\n|---|---:|");
        let _ = writeln!(
            s,
            "| programmed from empty | {:.1} s |",
            self.program_seconds
        );
        let _ = writeln!(s, "| endpoint changes made | {} |", self.changes_made);
        let _ = writeln!(s, "| connections ok | {} |", self.connections_ok);
        let _ = writeln!(s, "| connections failed | {} |", self.connections_failed);
        let _ = writeln!(
            s,
            "| agent RSS after programming | {:.0} MB |",
            self.rss_start_mb
        );
        let _ = writeln!(s, "| agent RSS at the end | {:.0} MB |", self.rss_end_mb);
        let _ = writeln!(s, "| agent RSS peak | {:.0} MB |", self.rss_peak_mb);
        s
    }
}

fn rss_mb(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn nth(base: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n)
}

fn churn_slice(i: u32, endpoints: u32, flip: u64) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {{name: s{i}-a, labels: {{kubernetes.io/service-name: s{i}}}}}\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for j in 0..endpoints {
        let ip = nth(Ipv4Addr::new(10, 128, 0, 1), i * endpoints + j);
        // One endpoint's readiness flips with every change.
        let ready = !(j == 0 && flip % 2 == 1);
        let _ = writeln!(
            s,
            "- {{addresses: [\"{ip}\"], conditions: {{ready: {ready}}}}}"
        );
    }
    s
}

fn write_atomic(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(tmp, dir.join(name))
}

/// Run the soak; errors are setup failures, not measured failures.
pub fn run(p: &SoakParams) -> Result<SoakReport, String> {
    let mut topo = Topology::new()?;
    let manifests = topo.dir.join("manifests");
    fs::create_dir_all(&manifests).map_err(|e| e.to_string())?;
    let client = topo.add_pod("client", Ipv4Addr::new(10, 244, 1, 2))?;
    let mut pods = String::new();
    for i in 0..3u8 {
        let ip = Ipv4Addr::new(10, 244, 1, 11 + i);
        let pod = topo.add_pod(&format!("web-{i}"), ip)?;
        topo.start_server(&pod, &[8080], &[])?;
        let _ = write!(
            pods,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, labels: {{app: web}}}}\nspec: {{nodeName: node-a, containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        );
    }
    write_atomic(&manifests, "web.yaml", &format!("{pods}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n"))
        .map_err(|e| e.to_string())?;
    // Services in one file, slices one file per Service (what churns).
    let mut svcs = String::new();
    for i in 0..p.services {
        let ip = nth(Ipv4Addr::new(10, 97, 0, 1), i);
        let _ = write!(
            svcs,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80}}]}}\n"
        );
    }
    write_atomic(&manifests, "services.yaml", &svcs).map_err(|e| e.to_string())?;
    let slices_dir = manifests.clone();
    for i in 0..p.services {
        write_atomic(
            &slices_dir,
            &format!("slice-{i}.yaml"),
            &churn_slice(i, p.endpoints_per_service, 0),
        )
        .map_err(|e| e.to_string())?;
    }

    let args: Vec<String> = vec![
        "run".into(),
        "--manifests".into(),
        manifests.display().to_string(),
        "--bpffs".into(),
        topo.bpffs.display().to_string(),
        "--pod-devices".into(),
        topo.pod_device_glob(),
        "--node-name".into(),
        "node-a".into(),
        "--healthz-bind".into(),
        "".into(),
        "--metrics-bind".into(),
        "".into(),
        "--log-format".into(),
        "json".into(),
    ];
    let started = Instant::now();
    let log = topo.dir.join("agent.log");
    let pid = topo.spawn_in_node_logged("agent", &p.agent, &args, &log)?;
    // Programmed when the stable Service answers and the agent logged a
    // sync of every frontend.
    let want = format!("\"frontends\":{}", p.services + 1);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&want) && topo.curl(&client, "http://10.96.0.10/", 2.0).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not programmed within 600 s; agent log:\n{}",
                text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut report = SoakReport {
        program_seconds: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    report.rss_start_mb = rss_mb(pid);
    report.rss_peak_mb = report.rss_start_mb;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client_thread = {
        let (stop, ok, failed, ns) = (stop.clone(), ok.clone(), failed.clone(), client.ns.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let good = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "--max-time",
                        "3",
                        "http://10.96.0.10/",
                    ])
                    .stdin(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if good { &ok } else { &failed }.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let end = Instant::now() + p.duration;
    let interval = Duration::from_secs_f64(1.0 / p.changes_per_second.max(1) as f64);
    let mut next = Instant::now();
    let mut n: u64 = 0;
    let mut last_sample = Instant::now();
    while Instant::now() < end {
        let i = (n % p.services as u64) as u32;
        let flip = n / p.services as u64 + 1;
        write_atomic(
            &slices_dir,
            &format!("slice-{i}.yaml"),
            &churn_slice(i, p.endpoints_per_service, flip),
        )
        .map_err(|e| e.to_string())?;
        n += 1;
        if last_sample.elapsed() > Duration::from_secs(1) {
            report.rss_peak_mb = report.rss_peak_mb.max(rss_mb(pid));
            last_sample = Instant::now();
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = client_thread.join();
    report.changes_made = n;
    report.connections_ok = ok.load(Ordering::SeqCst);
    report.connections_failed = failed.load(Ordering::SeqCst);
    report.rss_end_mb = rss_mb(pid);
    report.rss_peak_mb = report.rss_peak_mb.max(report.rss_end_mb);
    Ok(report)
}
