//! The incremental path equals the from-scratch one. Random sequences of
//! changes (`lb_tests::changes`: Services of every type, slices, Nodes,
//! node addresses; conflicting ClusterIPs, externalIPs, LoadBalancer IPs,
//! nodePorts and health-check ports; type changes; deletions) go through
//! `Translator::update`; after every step its state must equal
//! `translate_with` on the same objects, its `Delta` must name exactly what
//! differs from the step before, and maps synced with `sync_changes` from
//! those deltas must hold what a fresh agent's full sync of the same state
//! writes into fresh maps.

use lb_agent::model::{ChangeTracker, DesiredState, Translator, translate_with};
use lb_tests::changes::{Op, change, node_config, op};
use proptest::prelude::*;

/// The delta names every difference between two desired states, and only those.
fn check_delta(before: &DesiredState, after: &DesiredState, delta: &lb_agent::model::Delta) {
    for (fk, old) in &delta.frontends {
        assert_eq!(
            before.frontends.get(fk),
            old.as_ref(),
            "{fk}: wrong prior value"
        );
        assert_ne!(
            after.frontends.get(fk),
            old.as_ref(),
            "{fk}: named but unchanged"
        );
    }
    let keys: std::collections::BTreeSet<_> = before
        .frontends
        .keys()
        .chain(after.frontends.keys())
        .collect();
    for fk in keys {
        if before.frontends.get(fk) != after.frontends.get(fk) {
            assert!(
                delta.frontends.contains_key(fk),
                "{fk} changed but is not in the delta"
            );
        }
    }
    let addrs: std::collections::BTreeSet<_> = before
        .addresses
        .keys()
        .chain(after.addresses.keys())
        .collect();
    for a in addrs {
        if before.addresses.get(a) != after.addresses.get(a) {
            assert!(
                delta.addresses.contains(a),
                "address {a:?} changed but is not in the delta"
            );
        }
    }
    let ranges: std::collections::BTreeSet<_> = before
        .source_ranges
        .keys()
        .chain(after.source_ranges.keys())
        .collect();
    for ip in ranges {
        if before.source_ranges.get(ip) != after.source_ranges.get(ip) {
            assert!(
                delta.source_ranges.contains(ip),
                "source ranges of {ip} not in the delta"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_translation_equals_translation_from_scratch(
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let mut tracker = ChangeTracker::default();
        let mut node = node_config(0);
        let mut translator = Translator::new(node.clone());
        let mut owners = lb_agent::model::Owners::new();
        for (step, op) in ops.iter().enumerate() {
            match change(op) {
                Some(c) => tracker.apply(c),
                None => if let Op::NodeAddresses(v) = op { node = node_config(*v) },
            }
            let before = translator.desired().clone();
            let old_problems = translator.problems();
            let dirty = tracker.take_dirty();
            let delta = translator.update(&tracker, &node, &dirty);
            let scratch = translate_with(tracker.state(), &node, &owners);
            let got = translator.translation();
            prop_assert_eq!(&got.desired, &scratch.desired, "step {}: {:?}", step, op);
            prop_assert_eq!(&got.problems, &scratch.problems, "step {}: {:?}", step, op);
            prop_assert_eq!(&got.ip_owners, &scratch.ip_owners, "step {}: {:?}", step, op);
            prop_assert_eq!(&got.owners, &scratch.owners, "step {}: {:?}", step, op);
            prop_assert_eq!(&got.no_local_endpoints, &scratch.no_local_endpoints, "step {}", step);
            prop_assert_eq!(
                translator.no_local_endpoint_counts(),
                (
                    scratch.no_local_endpoints.internal.len(),
                    scratch.no_local_endpoints.external.len()
                ),
                "step {}: the running counts",
                step
            );
            check_delta(&before, &got.desired, &delta);
            for p in &delta.new_problems {
                prop_assert!(!old_problems.contains(p) && got.problems.contains(p));
            }
            for p in &delta.resolved_problems {
                prop_assert!(old_problems.contains(p) && !got.problems.contains(p));
            }
            owners = scratch.owners;
        }
    }
}

/// What the maps hold, with ids replaced by what they name (a fresh agent
/// hands out other ids): one sorted line per entry.
fn canonical(maps: &lb_agent::datapath::maps::Maps) -> Vec<String> {
    use std::collections::BTreeMap;
    let backends: BTreeMap<u32, String> = maps
        .backends
        .iter()
        .map(|e| {
            let (id, v) = e.expect("backend");
            let desc = format!(
                "{}:{}/{} state {} flags {:#x}",
                v.addr_be.ip(),
                u16::from_be(v.port_be),
                v.proto,
                v.state,
                v.flags
            );
            (id, desc)
        })
        .collect();
    let rev_nat: BTreeMap<u32, String> = maps
        .rev_nat
        .iter()
        .map(|e| {
            let (id, v) = e.expect("rev-NAT");
            let desc = format!(
                "{}:{}/{} scope {}",
                v.addr_be.ip(),
                u16::from_be(v.port_be),
                v.proto,
                v.scope
            );
            (id, desc)
        })
        .collect();
    let backend = |id: u32| {
        backends
            .get(&id)
            .cloned()
            .unwrap_or(format!("missing {id}"))
    };
    let frontend = |id: u32| rev_nat.get(&id).cloned().unwrap_or(format!("missing {id}"));
    // Set ids depend on the order sets were made: sets are described by
    // their content, which must be the same.
    let mut slots: BTreeMap<u32, BTreeMap<u32, String>> = BTreeMap::new();
    for e in maps.backend_slots.iter() {
        let (k, id) = e.expect("slot");
        slots
            .entry(k.set_id)
            .or_default()
            .insert(k.slot, backend(id));
    }
    let sets: BTreeMap<u32, String> = maps
        .backend_sets
        .iter()
        .map(|e| {
            let (id, v) = e.expect("backend set");
            let listed = slots.remove(&id).unwrap_or_default();
            let desc = format!(
                "count {} maglev {} slots {:?}",
                v.count,
                v.maglev_size,
                listed.into_iter().collect::<Vec<_>>()
            );
            (id, desc)
        })
        .collect();
    let set = |id: u32| sets.get(&id).cloned().unwrap_or(format!("missing {id}"));
    let mut lines: Vec<String> = backends.values().map(|b| format!("backend {b}")).collect();
    lines.extend(rev_nat.values().map(|r| format!("rev-NAT {r}")));
    lines.extend(sets.values().map(|s| format!("set {s}")));
    lines.extend(
        slots
            .iter()
            .map(|(id, orphan)| format!("slots of no set {id}: {orphan:?}")),
    );
    for e in maps.services.iter() {
        let (k, v) = e.expect("service");
        let at = format!(
            "{}:{}/{} scope {}",
            k.addr_be.ip(),
            u16::from_be(k.port_be),
            k.proto,
            k.scope,
        );
        lines.push(if k.port_be == 0 && k.proto == 0 {
            format!("address {at} flags {:#x}", v.flags)
        } else {
            format!(
                "frontend {at} flags {:#x} affinity {} rev-NAT {} set {}",
                v.flags,
                v.affinity_timeout_s,
                frontend(v.rev_nat_id),
                set(v.backend_set_id)
            )
        });
    }
    for e in maps.set_members.iter() {
        let (k, _) = e.expect("set member");
        lines.push(format!(
            "member of {} -> {}",
            set(k.set_id),
            backend(k.backend_id)
        ));
    }
    for e in maps.maglev.iter() {
        let (k, id) = e.expect("maglev");
        lines.push(format!(
            "maglev {} [{}] -> {}",
            set(k.set_id),
            k.index,
            backend(id)
        ));
    }
    for e in maps.source_ranges.iter() {
        let (k, _) = e.expect("source range");
        let d = k.data();
        lines.push(format!(
            "range {} {}/{}",
            d.frontend_addr_be.ip(),
            d.client_addr_be.ip(),
            k.prefix_len()
        ));
    }
    lines.sort();
    lines
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn maps_synced_change_by_change_equal_a_fresh_agents(
        ops in prop::collection::vec(op(), 1..30)
    ) {
        use lb_agent::datapath::sync::Syncer;
        use lb_tests::maps::{Bpffs, load};
        let incremental_fs = Bpffs::new("inc");
        let mut syncer = Syncer::new(load(&incremental_fs, 4096)).expect("syncer");
        let mut tracker = ChangeTracker::default();
        let mut node = node_config(0);
        let mut translator = Translator::new(node.clone());
        for op in &ops {
            match change(op) {
                Some(c) => tracker.apply(c),
                None => if let Op::NodeAddresses(v) = op { node = node_config(*v) },
            }
            let dirty = tracker.take_dirty();
            let delta = translator.update(&tracker, &node, &dirty);
            let frontends = delta.frontends.keys().copied().collect();
            let report = syncer.sync_changes(
                translator.desired(),
                &frontends,
                &delta.addresses,
                &delta.source_ranges,
            );
            prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
        }
        let fresh_fs = Bpffs::new("fresh");
        let mut fresh = Syncer::new(load(&fresh_fs, 4096)).expect("syncer");
        let report = fresh.sync(translator.desired());
        prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
        prop_assert_eq!(canonical(syncer.maps()), canonical(fresh.maps()));
    }
}
