//! The directory source's incremental assembly equals assembling from
//! scratch: random file writes and deletions (Services with and without
//! selectors, EndpointSlices, Endpoints, Pods, Nodes, objects defined twice)
//! are polled, their `changes()` applied to a change tracker, and after
//! every step the tracker's state and the duplicate problems must equal
//! `cluster_state()`.

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use lb_agent::{model::ChangeTracker, source::manifests::ManifestDir};
use proptest::prelude::*;

fn object(i: usize, variant: usize) -> String {
    let n = i % 3;
    match i / 3 {
        0 => format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{n}, namespace: ns}}\nspec:\n  clusterIP: 10.96.0.{}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n{}",
            n + 1,
            if variant.is_multiple_of(2) {
                "  selector: {app: a}\n"
            } else {
                ""
            }
        ),
        1 => format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata:\n  name: slice-{n}\n  namespace: ns\n  labels: {{kubernetes.io/service-name: svc-{}}}\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: [\"10.0.0.{}\"]}}]\n",
            variant % 3,
            variant + 1
        ),
        2 => format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: svc-{n}, namespace: ns}}\nsubsets: [{{addresses: [{{ip: 10.1.0.{}}}], ports: [{{name: http, port: 8080}}]}}]\n",
            variant + 1
        ),
        3 => format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{n}, namespace: ns, labels: {{app: a}}}}\nspec: {{nodeName: node-{}, containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}\nstatus:\n  podIP: 10.2.0.{}\n  podIPs: [{{ip: 10.2.0.{}}}]\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
            variant % 2,
            n + 1,
            n + 1,
            if variant.is_multiple_of(2) {
                "True"
            } else {
                "False"
            }
        ),
        _ => format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-{n}, labels: {{topology.kubernetes.io/zone: z{}}}}}\n",
            variant % 2
        ),
    }
}

#[derive(Clone, Debug)]
enum FileOp {
    Write(usize, Vec<(usize, usize)>),
    Delete(usize),
    Garbage(usize),
}

fn file_op() -> impl Strategy<Value = FileOp> {
    prop_oneof![
        6 => (0usize..4, prop::collection::vec((0usize..15, 0usize..4), 0..6))
            .prop_map(|(f, objs)| FileOp::Write(f, objs)),
        2 => (0usize..4).prop_map(FileOp::Delete),
        1 => (0usize..4).prop_map(FileOp::Garbage),
    ]
}

static RUN: AtomicUsize = AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn incremental_assembly_equals_assembly_from_scratch(
        ops in prop::collection::vec(file_op(), 1..20)
    ) {
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "lb-manifests-{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        let mut source = ManifestDir::new(&dir);
        let mut tracker = ChangeTracker::default();
        for (step, op) in ops.iter().enumerate() {
            match op {
                FileOp::Write(f, objs) => {
                    let text: Vec<String> = objs.iter().map(|(i, v)| object(*i, *v)).collect();
                    // A new length every step, so the signature always changes.
                    let pad = "#".repeat(step);
                    fs::write(dir.join(format!("f{f}.yaml")), format!("{pad}\n{}", text.join("---\n"))).unwrap();
                }
                FileOp::Delete(f) => {
                    let _ = fs::remove_file(dir.join(format!("f{f}.yaml")));
                }
                FileOp::Garbage(f) => {
                    let pad = "#".repeat(step);
                    fs::write(dir.join(format!("f{f}.yaml")), format!("{pad}\nkind: [unclosed")).unwrap();
                }
            }
            source.poll().unwrap();
            let (changes, mut problems) = source.changes();
            for c in changes {
                tracker.apply(c);
            }
            let (scratch, mut scratch_problems) = source.cluster_state();
            let state = tracker.state();
            prop_assert_eq!(&state.services, &scratch.services, "step {}: {:?}", step, op);
            prop_assert_eq!(&state.endpoint_slices, &scratch.endpoint_slices, "step {}: {:?}", step, op);
            prop_assert_eq!(&state.nodes, &scratch.nodes, "step {}: {:?}", step, op);
            problems.sort();
            scratch_problems.sort();
            prop_assert_eq!(problems, scratch_problems, "step {}: {:?}", step, op);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
