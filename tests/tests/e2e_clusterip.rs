//! ClusterIP end to end: the real agent on a manifests directory in a node
//! namespace, pods with real servers, curl and a UDP client.

use std::time::Duration;

use lb_tests::e2e::*;

const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"#;

#[test]
fn clusterip_tcp_reaches_every_ready_endpoint_and_keeps_client_ip() {
    let mut c = Cluster::new();
    let client = c.pod("client", "10.244.1.2", &[], &[]);
    for (i, ip) in ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
        .iter()
        .enumerate()
    {
        c.pod(&format!("web-{i}"), ip, &[8080], &[]);
        c.write(
            &format!("pod-web-{i}.yaml"),
            &pod_yaml(&format!("web-{i}"), ip, "web", true),
        );
    }
    c.write("svc.yaml", SVC);
    c.start_agent();
    c.wait_backends(
        "10.96.0.10:80/TCP",
        &["10.244.1.11:8080", "10.244.1.12:8080", "10.244.1.13:8080"],
        Duration::from_secs(5),
    );

    let pods = c.answering_pods(&client, "http://10.96.0.10:80/", 40);
    assert_eq!(pods.len(), 3, "every ready endpoint answers: {pods:?}");
    let body = c.get(&client, "http://10.96.0.10/").expect("request");
    assert!(
        field(&body, "client").starts_with("10.244.1.2:"),
        "client IP preserved: {body}"
    );
}
