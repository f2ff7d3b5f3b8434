//! Faults with traffic flowing: a pod device deleted and re-created, the
//! agent SIGKILLed in the middle of a large sync, a full map.

use std::time::Duration;

use lb_tests::e2e::*;

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

#[test]
fn a_recreated_pod_device_gets_the_program_again() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write("svc.yaml", SVC);
    c.start_agent();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080"],
        Duration::from_secs(5),
    );
    assert!(c.get(&client, "http://10.96.0.10/").is_ok());

    // The client pod's device goes away (pod deleted) and a new one with the
    // same address comes up, on a new device.
    c.topo.delete_device(&client).expect("delete device");
    let _ = c.topo.exec(&c.topo.node_ns, &["true"]);
    std::process::Command::new("ip")
        .args(["netns", "del", &client.ns])
        .status()
        .unwrap();
    let client = c.pod("client2", "10.244.1.2", &[], &[]);
    wait_until(
        "the new device is attached and translates",
        Duration::from_secs(3),
        || c.get(&client, "http://10.96.0.10/").is_ok(),
    );
    assert_eq!(
        field(&c.get(&client, "http://10.96.0.10/").unwrap(), "pod"),
        "web-0"
    );
    // Only live devices keep link pins.
    let pins: Vec<String> = std::fs::read_dir(c.topo.bpffs.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    wait_until(
        "the dead device's pin is removed",
        Duration::from_secs(2),
        || {
            std::fs::read_dir(c.topo.bpffs.join("links"))
                .unwrap()
                .count()
                == 2
        },
    );
    let _ = pins;
}

/// Every frontend's slots 1..=count name existing backends (the kernel's view).
fn assert_map_invariants(c: &Cluster) -> usize {
    let dump = c.dump("services");
    let services = dump["services"].as_array().unwrap();
    for s in services {
        for b in s["backends"].as_array().unwrap() {
            if b["state"] == "missing" {
                let backends = c.dump("backends");
                let ids: Vec<_> = backends["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["id"].as_u64().unwrap())
                    .collect();
                let missing: Vec<_> = s["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|b| b["state"] == "missing")
                    .collect();
                panic!(
                    "slot naming no backend: {missing:?} in {}\n{} backends, max id {:?}, contains? {}",
                    s["frontend"],
                    ids.len(),
                    ids.iter().max(),
                    ids.contains(&b["id"].as_u64().unwrap())
                );
            }
        }
    }
    services.len()
}

#[test]
fn agent_killed_mid_sync_leaves_consistent_maps_and_converges() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    c.pod("web-0", "10.244.1.11", &[8080], &[]);
    c.write("pod.yaml", &pod_yaml("web-0", "10.244.1.11", "web", true));
    c.write("svc.yaml", SVC);
    // 3,000 more Services x 10 endpoints in two files.
    let mut svcs = String::new();
    let mut slices = String::new();
    for i in 0..3000u32 {
        let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 97, 0, 1)) + i);
        svcs += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: {ip}, ports: [{{name: p, port: 80}}]}}\n"
        );
        slices += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {{name: s{i}-a, labels: {{kubernetes.io/service-name: s{i}}}}}\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n"
        );
        for j in 0..10u32 {
            let e = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + i * 10 + j,
            );
            slices += &format!("- {{addresses: [\"{e}\"]}}\n");
        }
    }
    c.write("many-svc.yaml", &svcs);
    c.write("many-slices.yaml", &slices);
    // Kill the agent at growing delays into its first sync; after each kill
    // the pinned maps must be consistent, and traffic to web flows.
    let mut partial = 0;
    for delay_ms in (0..10u64).map(|i| 1700 + i * 60) {
        c.spawn_agent();
        std::thread::sleep(Duration::from_millis(delay_ms));
        c.stop_agent(SIGKILL);
        let n = assert_map_invariants(&c);
        let b = c.dump("backends")["backends"].as_array().unwrap().len();
        println!("kill after {delay_ms} ms: {n} services, {b} backends in the maps");
        if (n > 0 && n < 3001) || (b > 0 && b < 30001) {
            partial += 1;
        }
        // Start the next attempt from empty maps, so it is a first sync again.
        for map in lb_common::map_names::ALL {
            let _ = std::fs::remove_file(c.topo.bpffs.join(map));
        }
    }
    println!("{partial} of 10 kills landed mid-sync");
    c.start_agent();
    // While the agent runs, a dump reads the maps at slightly different
    // moments; check the invariants on a stopped agent's maps only.
    wait_until(
        "the restarted agent converges",
        Duration::from_secs(30),
        || c.dump("services")["services"].as_array().unwrap().len() == 3001,
    );
    c.stop_agent(SIGTERM);
    assert_eq!(assert_map_invariants(&c), 3001);
    c.start_agent();
    assert_eq!(
        field(&c.get(&client, "http://10.96.0.10/").expect("web"), "pod"),
        "web-0"
    );
}
