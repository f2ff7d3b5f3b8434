//! The sync step against real BPF maps: make-before-break invariants, map
//! full errors that name the Service and keep everything else, stable ids
//! and pruning across an agent restart (maps reopened from their pins).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use aya::EbpfLoader;
use lb_agent::{
    datapath::{maps::Maps, sync::Syncer},
    model::{
        Backend, BackendSet, BackendSetKey, DesiredState, Frontend, FrontendKey, FrontendKind,
        Protocol, Scope, Selection,
    },
};
use lb_common::{map_names, map_sizes};
use lb_tests::maps::{Bpffs, load};

/// The backend set of Service port `default/name`.
fn set(name: &str, v6: bool, backends: Vec<Backend>) -> Arc<BackendSet> {
    Arc::new(BackendSet {
        key: BackendSetKey {
            service_port: format!("default/{name}").into(),
            proto: Protocol::Tcp,
            v6,
            selection: Selection::Cluster,
        },
        backends,
        standby: Vec::new(),
        maglev: false,
    })
}

fn frontend(name: &str, ip: [u8; 4], backends: &[[u8; 4]]) -> (FrontendKey, Frontend) {
    let backends = backends
        .iter()
        .map(|b| Backend {
            addr: Ipv4Addr::from(*b).into(),
            port: 8080,
            terminating: false,
            remote: false,
            on_node: false,
        })
        .collect();
    (
        FrontendKey {
            addr: Ipv4Addr::from(ip).into(),
            port: 80,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        },
        Frontend {
            service_port: format!("default/{name}").into(),
            kind: FrontendKind::ClusterIP,
            set: set(name, false, backends),
            drop_if_empty: false,
            internal_local: false,
            affinity_timeout_s: None,
            source_ranges: false,
            masquerade: false,
            dsr: false,
        },
    )
}

fn desired(frontends: Vec<(FrontendKey, Frontend)>) -> DesiredState {
    // No address entries: the capacity tests count frontend slots only.
    DesiredState {
        frontends: frontends.into_iter().collect(),
        ..Default::default()
    }
}

/// Frontend -> backend addresses, read back from the maps the way the kernel would.
fn programmed(maps: &Maps) -> Vec<(String, Vec<String>)> {
    let dump = lb_agent::dump::services(maps).expect("dump");
    dump.services
        .iter()
        .map(|s| {
            for b in &s.backends {
                assert_ne!(
                    b.state, "missing",
                    "slot names a missing backend: {}",
                    s.frontend.address
                );
            }
            (
                s.frontend.address.to_string(),
                s.backends.iter().map(|b| b.address.to_string()).collect(),
            )
        })
        .collect()
}

#[test]
fn full_services_map_names_the_service_and_keeps_the_others() {
    let fs = Bpffs::new("full");
    // Room for 5 backend slots: a and b (2 each) fit, c does not.
    let mut syncer = Syncer::new(load(&fs, 5)).expect("syncer");
    let want = desired(vec![
        frontend("a", [10, 96, 0, 1], &[[10, 0, 0, 1], [10, 0, 0, 2]]),
        frontend("b", [10, 96, 0, 2], &[[10, 0, 0, 3], [10, 0, 0, 4]]),
        frontend("c", [10, 96, 0, 3], &[[10, 0, 0, 5], [10, 0, 0, 6]]),
    ]);
    let report = syncer.sync(&want);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(report.errors[0].object, "default/c");
    assert!(report.errors[0].full, "{:?}", report.errors[0]);
    assert_eq!(
        programmed(syncer.maps()),
        vec![
            (
                "10.96.0.1".into(),
                vec!["10.0.0.1".into(), "10.0.0.2".into()]
            ),
            (
                "10.96.0.2".into(),
                vec!["10.0.0.3".into(), "10.0.0.4".into()]
            ),
        ]
    );

    // Once a goes away, c fits: removal frees its slots first.
    let want = desired(vec![
        frontend("b", [10, 96, 0, 2], &[[10, 0, 0, 3], [10, 0, 0, 4]]),
        frontend("c", [10, 96, 0, 3], &[[10, 0, 0, 5], [10, 0, 0, 6]]),
    ]);
    let report = syncer.sync(&want);
    // Writes happen before removals (make before break), so c may need one more pass.
    if !report.errors.is_empty() {
        let again = syncer.sync(&want);
        assert!(again.errors.is_empty(), "{:?}", again.errors);
    }
    assert_eq!(programmed(syncer.maps()).len(), 2);
}

#[test]
fn restart_adopts_ids_and_prunes_what_is_gone() {
    let fs = Bpffs::new("restart");
    let first = desired(vec![
        frontend("a", [10, 96, 0, 1], &[[10, 0, 0, 1], [10, 0, 0, 2]]),
        frontend("b", [10, 96, 0, 2], &[[10, 0, 0, 2], [10, 0, 0, 3]]),
    ]);
    let ids_before = {
        let mut syncer = Syncer::new(load(&fs, map_sizes::SERVICES)).expect("syncer");
        assert!(syncer.sync(&first).errors.is_empty());
        lb_agent::dump::backends(syncer.maps())
            .unwrap()
            .backends
            .iter()
            .map(|b| (b.id, b.address))
            .collect::<Vec<_>>()
    };
    // The agent restarts: maps come back from their pins.
    let mut syncer = Syncer::new(Maps::open_pinned(&fs.0).expect("pinned maps")).expect("adopt");
    let report = syncer.sync(&first);
    assert_eq!(
        (report.frontends_written, report.backends_written),
        (0, 0),
        "nothing to rewrite after a restart"
    );
    let ids_after: Vec<_> = lb_agent::dump::backends(syncer.maps())
        .unwrap()
        .backends
        .iter()
        .map(|b| (b.id, b.address))
        .collect();
    assert_eq!(ids_before, ids_after, "backend ids survive the restart");

    // b was deleted while the agent was down: the first sync prunes it and
    // the backend only it used.
    let report = syncer.sync(&desired(vec![frontend(
        "a",
        [10, 96, 0, 1],
        &[[10, 0, 0, 1], [10, 0, 0, 2]],
    )]));
    assert_eq!((report.frontends_removed, report.backends_removed), (1, 1));
    assert_eq!(
        programmed(syncer.maps()),
        vec![(
            "10.96.0.1".into(),
            vec!["10.0.0.1".into(), "10.0.0.2".into()]
        )]
    );
}

#[test]
fn shrinking_a_frontend_never_exposes_a_missing_slot() {
    let fs = Bpffs::new("shrink");
    let mut syncer = Syncer::new(load(&fs, 1024)).expect("syncer");
    let big: Vec<[u8; 4]> = (1..=20).map(|i| [10, 0, 1, i]).collect();
    assert!(
        syncer
            .sync(&desired(vec![frontend("a", [10, 96, 0, 1], &big)]))
            .errors
            .is_empty()
    );
    assert!(
        syncer
            .sync(&desired(vec![frontend("a", [10, 96, 0, 1], &big[..3])]))
            .errors
            .is_empty()
    );
    assert_eq!(programmed(syncer.maps())[0].1.len(), 3);
    // No slot past the count is left behind.
    let slots = syncer
        .maps()
        .backend_slots
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.slot >= 3)
        .count();
    assert_eq!(slots, 0);
}

#[test]
fn pins_of_another_shape_are_replaced_not_misread() {
    let fs = Bpffs::new("shape");
    {
        // An older layout: LB_SERVICES with another capacity, holding an entry.
        let mut syncer = Syncer::new(load(&fs, 8)).expect("syncer");
        assert!(
            syncer
                .sync(&desired(vec![frontend(
                    "a",
                    [10, 96, 0, 1],
                    &[[10, 0, 0, 1]]
                )]))
                .errors
                .is_empty()
        );
    }
    let (_dp, maps) =
        lb_agent::datapath::loader::Datapath::load(&fs.0, lb_common::ConfigValue::default())
            .expect("the agent starts over an incompatible pin");
    let shapes = lb_agent::datapath::maps::expected_shapes();
    for shape in &shapes {
        lb_agent::datapath::maps::check_pin(&fs.0.join(shape.name), shape)
            .expect("every pin has our shape now");
    }
    assert_eq!(
        maps.services.keys().count(),
        0,
        "the old map's entries were not read as ours"
    );
    assert_eq!(
        maps.backends.keys().count(),
        1,
        "compatible maps are adopted"
    );
}

#[test]
fn another_layout_version_replaces_every_pin() {
    let fs = Bpffs::new("version");
    {
        let mut maps = load(&fs, map_sizes::SERVICES);
        let config = lb_common::ConfigValue {
            layout_version: lb_common::LAYOUT_VERSION + 1,
            ..Default::default()
        };
        maps.config.set(0, config, 0).unwrap();
        let mut syncer = Syncer::new(maps).expect("syncer");
        assert!(
            syncer
                .sync(&desired(vec![frontend(
                    "a",
                    [10, 96, 0, 1],
                    &[[10, 0, 0, 1]]
                )]))
                .errors
                .is_empty()
        );
    }
    let (_dp, maps) =
        lb_agent::datapath::loader::Datapath::load(&fs.0, lb_common::ConfigValue::default())
            .expect("the agent starts over pins of another layout version");
    assert_eq!(
        maps.backends.keys().count(),
        0,
        "nothing of the other layout is read"
    );
    assert_eq!(
        maps.config.get(&0, 0).unwrap().layout_version,
        lb_common::LAYOUT_VERSION
    );
}

/// Both families in the same maps: an IPv6 frontend beside an IPv4 one, each
/// with loadBalancerSourceRanges of its family. After a restart the adopted
/// state is read back exactly (IPv4-mapped keys and LPM prefixes included):
/// nothing is rewritten, and removing the ranges removes exactly their keys.
#[test]
fn dual_stack_state_survives_a_restart_exactly() {
    let fs = Bpffs::new("dual");
    let (mut v4, mut v4_frontend) = frontend("lb4", [198, 51, 100, 10], &[[10, 0, 0, 1]]);
    let (mut v6, mut v6_frontend) = frontend("lb6", [0, 0, 0, 0], &[]);
    v6.addr = "2001:db8:1::10".parse().unwrap();
    v6_frontend.set = set(
        "lb6",
        true,
        vec![Backend {
            addr: "fd00:1::1".parse().unwrap(),
            port: 8080,
            terminating: false,
            remote: false,
            on_node: false,
        }],
    );
    for (key, f) in [(&mut v4, &mut v4_frontend), (&mut v6, &mut v6_frontend)] {
        key.scope = Scope::External;
        f.kind = FrontendKind::LoadBalancer;
        f.source_ranges = true;
    }
    let mut with_ranges = desired(vec![(v4, v4_frontend.clone()), (v6, v6_frontend.clone())]);
    with_ranges.derive_addresses();
    with_ranges.source_ranges.insert(
        v4.addr,
        ["203.0.113.0/24".parse().unwrap()].into_iter().collect(),
    );
    with_ranges.source_ranges.insert(
        v6.addr,
        ["2001:db8:f::/48".parse().unwrap()].into_iter().collect(),
    );
    let trie_prefixes = |maps: &Maps| -> Vec<u32> {
        let mut p: Vec<u32> = maps
            .source_ranges
            .keys()
            .map(|k| k.expect("read trie").prefix_len())
            .collect();
        p.sort();
        p
    };
    {
        let mut syncer = Syncer::new(load(&fs, map_sizes::SERVICES)).expect("syncer");
        let report = syncer.sync(&with_ranges);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        // 128 (the LB IP) + the client prefix; IPv4's counts its 96 mapped bits.
        assert_eq!(trie_prefixes(syncer.maps()), vec![128 + 48, 128 + 96 + 24]);
        let mut addresses: Vec<String> = programmed(syncer.maps())
            .into_iter()
            .map(|(frontend, backends)| format!("{frontend} -> {}", backends.join(",")))
            .collect();
        addresses.sort();
        assert_eq!(
            addresses,
            vec!["198.51.100.10 -> 10.0.0.1", "2001:db8:1::10 -> fd00:1::1"]
        );
    }
    let mut syncer = Syncer::new(Maps::open_pinned(&fs.0).expect("pinned maps")).expect("adopt");
    let report = syncer.sync(&with_ranges);
    assert_eq!(
        (report.frontends_written, report.backends_written),
        (0, 0),
        "nothing to rewrite after a restart"
    );
    let mut without_ranges = with_ranges.clone();
    without_ranges.source_ranges.clear();
    let report = syncer.sync(&without_ranges);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(trie_prefixes(syncer.maps()), Vec::<u32>::new());
}

/// Conntrack maps are created at the size asked for (--ct-max-tcp /
/// --ct-max-other, in entries here), and a restart with the same sizes
/// adopts them with their flows; an earlier version's LB_CT pin is removed.
#[test]
fn conntrack_is_sized_as_asked_and_kept_across_a_restart() {
    use lb_agent::datapath::{loader::Datapath, maps::Capacities};
    use lb_common::{Addr, CT_DIR_FORWARD, CtKey, CtValue, IPPROTO_TCP};
    let fs = Bpffs::new("ctsize");
    // A pin an earlier version left behind.
    {
        let mut loader = EbpfLoader::new();
        loader.map_pin_path(map_names::CT_TCP, fs.0.join("LB_CT"));
        let _ebpf = loader.load(lb_agent::EBPF_OBJECT).expect("load object");
    }
    assert!(fs.0.join("LB_CT").exists());
    let capacities = Capacities {
        ct_tcp: 2 * 5000,
        ct_other: 2 * 3000,
        ..Capacities::default()
    };
    let key = CtKey {
        src_addr_be: Addr::v4(u32::from_ne_bytes([10, 0, 0, 5])),
        dst_addr_be: Addr::v4(u32::from_ne_bytes([10, 96, 0, 10])),
        src_port_be: 40000u16.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: IPPROTO_TCP,
        dir: CT_DIR_FORWARD,
        _pad: [0; 2],
    };
    {
        let (_dp, mut maps) =
            Datapath::load_sized(&fs.0, lb_common::ConfigValue::default(), capacities)
                .expect("load");
        maps.ct_tcp
            .insert(key, CtValue::default(), 0)
            .expect("a flow");
    }
    assert!(!fs.0.join("LB_CT").exists(), "the retired pin is removed");
    for (name, want) in [(map_names::CT_TCP, 10_000), (map_names::CT_OTHER, 6_000)] {
        let info = aya::maps::MapInfo::from_pin(fs.0.join(name)).expect("pinned");
        assert_eq!(info.max_entries(), want, "{name} capacity");
    }
    let (_dp, maps) = Datapath::load_sized(&fs.0, lb_common::ConfigValue::default(), capacities)
        .expect("restart");
    assert!(
        maps.ct_tcp.get(&key, 0).is_ok(),
        "the tracked flow survives a restart with the same sizes"
    );
}

/// Flows of a backend that is gone, and affinity entries naming a backend
/// that left its frontend (or of a frontend that lost affinity), are
/// removed; others stay. Inline (no cleaner) and on the cleanup thread.
#[test]
fn stale_flows_and_affinity_are_cleaned_off_the_sync_path() {
    use lb_agent::datapath::cleanup::Cleaner;
    use lb_common::{Addr, AffinityKey, AffinityValue, CtKey, CtValue, IPPROTO_TCP};

    for threaded in [false, true] {
        let fs = Bpffs::new(if threaded { "clt" } else { "cli" });
        let mut syncer = Syncer::new(load(&fs, 64)).expect("syncer");
        if threaded {
            let maps = Maps::open_pinned(&fs.0).expect("pinned maps");
            syncer.set_cleaner(Cleaner::spawn(maps).expect("cleaner"));
        }
        let (fk, mut web) = frontend("web", [10, 96, 0, 1], &[[10, 0, 0, 1], [10, 0, 0, 2]]);
        web.affinity_timeout_s = Some(60);
        let report = syncer.sync(&desired(vec![(fk, web.clone())]));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let ids: Vec<(String, u32)> = lb_agent::dump::backends(syncer.maps())
            .expect("backends")
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.id))
            .collect();
        let id_of = |a: &str| ids.iter().find(|(x, _)| x == a).expect(a).1;
        let (one, two) = (id_of("10.0.0.1"), id_of("10.0.0.2"));
        let rev_nat = lb_agent::dump::services(syncer.maps())
            .expect("dump")
            .services[0]
            .rev_nat_id;

        // A flow and an affinity entry per backend, as the datapath writes them.
        let maps = syncer.maps_mut();
        for (client, backend) in [(1u8, one), (2, two)] {
            let key = CtKey {
                src_addr_be: Addr::from(std::net::IpAddr::from([10, 1, 0, client])),
                dst_addr_be: Addr::from(std::net::IpAddr::from([10, 96, 0, 1])),
                src_port_be: 40000u16.to_be(),
                dst_port_be: 80u16.to_be(),
                proto: IPPROTO_TCP,
                dir: 0,
                _pad: [0; 2],
            };
            let value = CtValue {
                backend_id: backend,
                rev_nat_id: rev_nat,
                ..Default::default()
            };
            maps.ct_tcp.insert(key, value, 0).expect("ct entry");
            let key = AffinityKey {
                client_addr_be: Addr::from(std::net::IpAddr::from([10, 1, 0, client])),
                rev_nat_id: rev_nat,
            };
            let value = AffinityValue {
                backend_id: backend,
                ..Default::default()
            };
            maps.affinity.insert(key, value, 0).expect("affinity entry");
        }
        let flows_to = |maps: &Maps, id: u32| {
            maps.ct_tcp
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| v.backend_id == id)
                .count()
        };
        let affinity_to = |maps: &Maps, id: u32| {
            maps.affinity
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| v.backend_id == id)
                .count()
        };

        // 10.0.0.2 leaves: its flow and affinity go, 10.0.0.1's stay.
        let (_, mut smaller) = frontend("web", [10, 96, 0, 1], &[[10, 0, 0, 1]]);
        smaller.affinity_timeout_s = Some(60);
        let report = syncer.sync_changes(
            &desired(vec![(fk, smaller.clone())]),
            &[fk].into(),
            &Default::default(),
            &Default::default(),
        );
        assert_eq!(report.backends_removed, 1);
        lb_tests::e2e::wait_until(
            "stale entries removed",
            std::time::Duration::from_secs(2),
            || flows_to(syncer.maps(), two) == 0 && affinity_to(syncer.maps(), two) == 0,
        );
        assert_eq!(flows_to(syncer.maps(), one), 1, "threaded {threaded}");
        assert_eq!(affinity_to(syncer.maps(), one), 1, "threaded {threaded}");

        // Affinity off: the remaining entry goes, the flow stays.
        smaller.affinity_timeout_s = None;
        syncer.sync_changes(
            &desired(vec![(fk, smaller)]),
            &[fk].into(),
            &Default::default(),
            &Default::default(),
        );
        lb_tests::e2e::wait_until(
            "affinity of a frontend without it removed",
            std::time::Duration::from_secs(2),
            || affinity_to(syncer.maps(), one) == 0,
        );
        assert_eq!(flows_to(syncer.maps(), one), 1, "threaded {threaded}");
    }
}

/// A LoadBalancer Service's frontends (ClusterIP, LoadBalancer IP and a
/// NodePort on each of two node addresses, in both scopes) share one backend
/// set: its slots are stored once, and an endpoint change rewrites that set
/// alone, not the seven frontends.
#[test]
fn a_shared_backend_set_is_stored_once_and_written_once_per_change() {
    let fs = Bpffs::new("shared");
    let mut syncer = Syncer::new(load(&fs, 1024)).expect("syncer");
    let ten: Vec<[u8; 4]> = (1..=10).map(|i| [10, 0, 2, i]).collect();
    let lb = |backends: &[[u8; 4]]| -> Vec<(FrontendKey, Frontend)> {
        let (_, base) = frontend("lb", [10, 96, 0, 1], backends);
        let at = |ip: [u8; 4], port: u16, scope: Scope, kind: FrontendKind| {
            (
                FrontendKey {
                    addr: Ipv4Addr::from(ip).into(),
                    port,
                    proto: Protocol::Tcp,
                    scope,
                },
                Frontend {
                    kind,
                    ..base.clone()
                },
            )
        };
        let mut all = vec![at(
            [10, 96, 0, 1],
            80,
            Scope::Internal,
            FrontendKind::ClusterIP,
        )];
        for scope in [Scope::Internal, Scope::External] {
            all.push(at([198, 51, 100, 1], 80, scope, FrontendKind::LoadBalancer));
            for node in [[192, 168, 0, 1], [192, 168, 0, 2]] {
                all.push(at(node, 30080, scope, FrontendKind::NodePort));
            }
        }
        all
    };
    let count = |maps: &Maps| {
        (
            maps.services.keys().count(),
            maps.backend_sets.keys().count(),
            maps.backend_slots.keys().count(),
            maps.backends.keys().count(),
        )
    };
    let report = syncer.sync(&desired(lb(&ten)));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.frontends_written, report.sets_written), (7, 1));
    assert_eq!(
        count(syncer.maps()),
        (7, 1, 10, 10),
        "7 frontends, one set of 10 slots (the per-frontend layout took 77 entries)"
    );
    let dump = lb_agent::dump::services(syncer.maps()).expect("dump");
    let set_ids: BTreeSet<u32> = dump.services.iter().map(|s| s.backend_set_id).collect();
    assert_eq!(set_ids.len(), 1, "one set for all seven");
    assert!(dump.services.iter().all(|s| s.backends.len() == 10));

    // One endpoint leaves: the set is rewritten, no frontend is.
    let nine = desired(lb(&ten[..9]));
    let keys: BTreeSet<FrontendKey> = nine.frontends.keys().copied().collect();
    let report = syncer.sync_changes(&nine, &keys, &Default::default(), &Default::default());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        (
            report.frontends_written,
            report.sets_written,
            report.backends_removed
        ),
        (0, 1, 1)
    );
    assert_eq!(count(syncer.maps()), (7, 1, 9, 9));
    assert_eq!(programmed(syncer.maps()).len(), 7);

    // The Service goes: nothing is left.
    let report = syncer.sync_changes(
        &desired(vec![]),
        &keys,
        &Default::default(),
        &Default::default(),
    );
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.frontends_removed, report.sets_removed), (7, 1));
    assert_eq!(count(syncer.maps()), (0, 0, 0, 0));
}

/// A backend that did not fit is written once there is room, by the next
/// sync, although its set did not change: no slot ever names a backend
/// that is not in the map.
#[test]
fn a_backend_that_did_not_fit_is_written_when_room_is_made() {
    let fs = Bpffs::new("bfull");
    // Room for three backends: a's two fit, b's second does not.
    let mut syncer = Syncer::new(lb_tests::maps::load_with(&fs, 1024, 3)).expect("syncer");
    let a = frontend("a", [10, 96, 0, 1], &[[10, 0, 0, 1], [10, 0, 0, 2]]);
    let b = frontend("b", [10, 96, 0, 2], &[[10, 0, 0, 3], [10, 0, 0, 4]]);
    let report = syncer.sync(&desired(vec![a, b.clone()]));
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.object == "default/b" && e.full),
        "{:?}",
        report.errors
    );
    // programmed() fails on a slot naming a missing backend.
    assert_eq!(programmed(syncer.maps()).len(), 1, "only a is programmed");

    // a goes: its backends make room, and b's set (unchanged) is completed.
    let only_b = desired(vec![b]);
    let mut report = syncer.sync(&only_b);
    if !report.errors.is_empty() {
        // Writes come before removals (make before break): one more pass.
        report = syncer.sync(&only_b);
    }
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        programmed(syncer.maps()),
        vec![(
            "10.96.0.2".into(),
            vec!["10.0.0.3".into(), "10.0.0.4".into()]
        )]
    );
}

/// After a restart each Service port takes back its own backend set, even
/// when two have identical sets (the same endpoints): nothing is rewritten,
/// and every frontend keeps its set id.
#[test]
fn restart_keeps_each_frontends_set_even_when_sets_are_identical() {
    let fs = Bpffs::new("twins");
    let same = [[10, 0, 0, 1], [10, 0, 0, 2]];
    let want = desired(vec![
        frontend("a", [10, 96, 0, 1], &same),
        frontend("b", [10, 96, 0, 2], &same),
    ]);
    let set_ids = |maps: &Maps| -> Vec<(String, u32)> {
        lb_agent::dump::services(maps)
            .expect("dump")
            .services
            .iter()
            .map(|s| (s.frontend.address.to_string(), s.backend_set_id))
            .collect()
    };
    let before = {
        let mut syncer = Syncer::new(load(&fs, 1024)).expect("syncer");
        let report = syncer.sync(&want);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.sets_written, 2, "one set per Service port");
        set_ids(syncer.maps())
    };
    let mut syncer = Syncer::new(Maps::open_pinned(&fs.0).expect("pinned maps")).expect("adopt");
    let report = syncer.sync(&want);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(
        (
            report.frontends_written,
            report.sets_written,
            report.sets_removed
        ),
        (0, 0, 0),
        "nothing to rewrite after a restart"
    );
    assert_eq!(set_ids(syncer.maps()), before);
    // Each set is its Service's own: changing a's leaves b's alone.
    let changed = desired(vec![
        frontend("a", [10, 96, 0, 1], &same[..1]),
        frontend("b", [10, 96, 0, 2], &same),
    ]);
    let report = syncer.sync(&changed);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.sets_written, report.frontends_written), (1, 0));
    assert_eq!(programmed(syncer.maps())[1].1.len(), 2);
}

/// An upgrade from layout 4: its pinned conntrack, affinity and socket maps
/// (16-bit rev-NAT ids, another conntrack value order) are converted into
/// the new maps, the backend and rev-NAT ids they name are adopted (the
/// first sync keeps them), and a catch-up pass copies what the old programs
/// added after the first copy, refreshing entries they used more recently.
#[test]
fn layout_4_pins_are_carried_over() {
    use aya::maps::{Array, HashMap, Map, MapData};
    use lb_agent::datapath::migrate::{Pass, v4};
    use lb_common::{Addr, AffinityValue, BackendValue, CtKey, RevNatValue, SockNatKey, ct_flags};

    let fs = Bpffs::new("upgrade4");
    let addr = |a: [u8; 4]| Addr::v4(u32::from_ne_bytes(a));
    let pin = |name: &str| fs.0.join(name);
    let mut config: Array<MapData, lb_common::ConfigValue> = Array::create(1, 0).unwrap();
    config
        .set(
            0,
            lb_common::ConfigValue {
                layout_version: 4,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    config.pin(pin(map_names::CONFIG)).unwrap();
    let mut backends: HashMap<MapData, u32, BackendValue> = HashMap::create(16, 0).unwrap();
    backends
        .insert(
            7,
            BackendValue {
                addr_be: addr([10, 0, 0, 1]),
                port_be: 8080u16.to_be(),
                proto: 6,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    backends.pin(pin(map_names::BACKENDS)).unwrap();
    let mut rev_nat: HashMap<MapData, u16, RevNatValue> = HashMap::create(16, 0).unwrap();
    rev_nat
        .insert(
            3,
            RevNatValue {
                addr_be: addr([10, 96, 0, 1]),
                port_be: 80u16.to_be(),
                proto: 6,
                scope: 0,
            },
            0,
        )
        .unwrap();
    rev_nat.pin(pin(map_names::REV_NAT)).unwrap();
    let flow = |client_port: u16| CtKey {
        src_addr_be: addr([10, 244, 1, 2]),
        dst_addr_be: addr([10, 96, 0, 1]),
        src_port_be: client_port.to_be(),
        dst_port_be: 80u16.to_be(),
        proto: 6,
        ..Default::default()
    };
    let entry = |last_seen_ns: u64| v4::CtValue {
        backend_id: 7,
        rev_nat_id: 3,
        flags: ct_flags::SYN_SEEN | ct_flags::REPLY_SEEN,
        nat_addr_be: addr([10, 0, 0, 1]),
        nat_port_be: 8080u16.to_be(),
        lifetime_s: 86_400,
        last_seen_ns,
        snat_port_be: 40_000u16.to_be(),
        ..Default::default()
    };
    let mut ct: HashMap<MapData, CtKey, v4::CtValue> = HashMap::create(64, 0).unwrap();
    ct.insert(flow(40_000), entry(100), 0).unwrap();
    ct.pin(pin(map_names::CT_TCP)).unwrap();
    let mut affinity: HashMap<MapData, v4::AffinityKeyV4, AffinityValue> =
        HashMap::create(16, 0).unwrap();
    let client = v4::AffinityKeyV4 {
        client_addr_be: addr([10, 244, 1, 2]),
        rev_nat_id: 3,
        _pad: 0,
    };
    let used = AffinityValue {
        backend_id: 7,
        _pad: 0,
        last_used_ns: 5,
    };
    affinity.insert(client, used, 0).unwrap();
    affinity.pin(pin(map_names::AFFINITY)).unwrap();
    let mut sock_nat: HashMap<MapData, SockNatKey, v4::SockNatValue> =
        HashMap::create(16, 0).unwrap();
    let socket = SockNatKey {
        socket_cookie: 99,
        addr_be: addr([10, 96, 0, 1]),
        port_be: 80u16.to_be(),
        proto: 17,
        ..Default::default()
    };
    sock_nat
        .insert(
            socket,
            v4::SockNatValue {
                addr_be: addr([10, 0, 0, 1]),
                port_be: 8080u16.to_be(),
                rev_nat_id: 3,
                backend_id: 7,
            },
            0,
        )
        .unwrap();
    sock_nat.pin(pin(map_names::SOCK_NAT)).unwrap();
    // The old programs' handle: they go on writing after the first copy.
    let mut old_ct: HashMap<MapData, CtKey, v4::CtValue> = HashMap::try_from(
        Map::from_map_data(MapData::from_pin(pin(map_names::CT_TCP)).unwrap()).unwrap(),
    )
    .unwrap();

    let (mut dp, maps) =
        lb_agent::datapath::loader::Datapath::load(&fs.0, lb_common::ConfigValue::default())
            .expect("the agent starts over layout-4 pins");
    let migration = dp.take_migration().expect("layout 4 is carried over");
    assert_eq!(migration.from_version(), 4);
    let carried = maps
        .ct_tcp
        .get(&flow(40_000), 0)
        .expect("the flow is carried over");
    assert_eq!(
        (carried.backend_id, carried.rev_nat_id, carried.last_seen_ns),
        (7, 3, 100)
    );
    assert_eq!(carried.nat_addr_be, addr([10, 0, 0, 1]));
    assert_eq!(carried.snat_port_be, 40_000u16.to_be());
    assert_eq!(carried.flags, ct_flags::SYN_SEEN | ct_flags::REPLY_SEEN);
    let key = lb_common::AffinityKey {
        client_addr_be: addr([10, 244, 1, 2]),
        rev_nat_id: 3,
    };
    assert_eq!(maps.affinity.get(&key, 0).unwrap(), used);
    let nat = maps.sock_nat.get(&socket, 0).unwrap();
    assert_eq!((nat.rev_nat_id, nat.backend_id), (3, 7));

    // The ids the flows name are the ones the first sync keeps.
    let mut syncer = Syncer::new(maps).expect("syncer");
    let report = syncer.sync(&desired(vec![frontend(
        "a",
        [10, 96, 0, 1],
        &[[10, 0, 0, 1]],
    )]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let backend_ids: Vec<u32> = syncer.maps().backends.keys().map(Result::unwrap).collect();
    assert_eq!(backend_ids, vec![7], "the flow's backend keeps its id");
    let rev_nat_ids: Vec<u32> = syncer.maps().rev_nat.keys().map(Result::unwrap).collect();
    assert_eq!(rev_nat_ids, vec![3], "the frontend keeps its rev-NAT id");

    // The old programs opened a flow and used the first one again.
    old_ct.insert(flow(40_001), entry(300), 0).unwrap();
    old_ct.insert(flow(40_000), entry(200), 0).unwrap();
    let mut pinned = Maps::open_pinned(&fs.0).unwrap();
    // ... while the new programs used the first one later still: theirs stays.
    let mut newer = pinned.ct_tcp.get(&flow(40_000), 0).unwrap();
    newer.last_seen_ns = 250;
    pinned.ct_tcp.insert(flow(40_000), newer, 0).unwrap();
    let copied = migration.copy(&mut pinned, Pass::CatchUp);
    assert_eq!(copied.maps[map_names::CT_TCP], (1, 0), "{copied:?}");
    assert_eq!(
        pinned.ct_tcp.get(&flow(40_001), 0).unwrap().last_seen_ns,
        300
    );
    assert_eq!(
        pinned.ct_tcp.get(&flow(40_000), 0).unwrap().last_seen_ns,
        250
    );
    // Older there, newer here: the old programs' state wins.
    old_ct.insert(flow(40_000), entry(400), 0).unwrap();
    let copied = migration.copy(&mut pinned, Pass::CatchUp);
    assert_eq!(copied.maps[map_names::CT_TCP], (1, 0), "{copied:?}");
    assert_eq!(
        pinned.ct_tcp.get(&flow(40_000), 0).unwrap().last_seen_ns,
        400
    );

    // The agent stops before its hand-over: the replaced maps wait under
    // previous-layout/, and the next start resumes from them, carrying what
    // the old programs added meanwhile without touching the ids in use.
    let previous = fs.0.join(lb_agent::datapath::migrate::PREVIOUS_DIR);
    assert!(previous.join(map_names::CT_TCP).exists());
    drop((pinned, syncer, migration, dp));
    old_ct.insert(flow(40_002), entry(500), 0).unwrap();
    let (mut dp, maps) =
        lb_agent::datapath::loader::Datapath::load(&fs.0, lb_common::ConfigValue::default())
            .expect("restart mid-hand-over");
    let migration = dp.take_migration().expect("the hand-over resumes");
    assert_eq!(migration.from_version(), 4);
    assert_eq!(maps.ct_tcp.get(&flow(40_002), 0).unwrap().last_seen_ns, 500);
    assert_eq!(maps.ct_tcp.get(&flow(40_000), 0).unwrap().last_seen_ns, 400);
    migration.finish(&fs.0);
    assert!(!previous.exists(), "the hand-over done, the old maps go");
    drop((maps, dp));
    let (mut dp, _maps) =
        lb_agent::datapath::loader::Datapath::load(&fs.0, lb_common::ConfigValue::default())
            .unwrap();
    assert!(dp.take_migration().is_none(), "nothing left to carry");
}

/// A conntrack map resized by a flag (same layout): its flows move into
/// the new map instead of being dropped.
#[test]
fn resized_conntrack_keeps_its_flows() {
    use aya::maps::IterableMap as _;
    let fs = Bpffs::new("resize");
    let key = lb_common::CtKey {
        src_port_be: 1234u16.to_be(),
        proto: 6,
        ..Default::default()
    };
    {
        let (_dp, mut maps) =
            lb_agent::datapath::loader::Datapath::load(&fs.0, lb_common::ConfigValue::default())
                .unwrap();
        maps.ct_tcp
            .insert(
                key,
                lb_common::CtValue {
                    backend_id: 5,
                    last_seen_ns: 1,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
    }
    let capacities = lb_agent::datapath::maps::Capacities {
        ct_tcp: 2 * map_sizes::CT_TCP,
        ..Default::default()
    };
    let (mut dp, maps) = lb_agent::datapath::loader::Datapath::load_sized(
        &fs.0,
        lb_common::ConfigValue::default(),
        capacities,
    )
    .unwrap();
    assert_eq!(
        maps.ct_tcp.map().info().unwrap().max_entries(),
        2 * map_sizes::CT_TCP
    );
    assert_eq!(maps.ct_tcp.get(&key, 0).unwrap().backend_id, 5);
    assert!(dp.take_migration().is_some());
}

/// The IPv4 prefilter's addresses, read back from the map.
fn prefilter4(maps: &Maps) -> BTreeSet<Ipv4Addr> {
    maps.prefilter4
        .keys()
        .map(|k| Ipv4Addr::from(k.expect("prefilter key").to_ne_bytes()))
        .collect()
}

#[test]
fn prefilter_holds_every_frontend_and_backend_address_while_it_is_used() {
    let fs = Bpffs::new("prefilter");
    let addrs = |list: &[[u8; 4]]| -> BTreeSet<Ipv4Addr> {
        list.iter().map(|a| Ipv4Addr::from(*a)).collect()
    };
    // 10.0.0.2 is a backend of both Services; 10.96.0.2 is b's frontend
    // and, as a backend of a, also a backend address.
    let both = desired(vec![
        frontend(
            "a",
            [10, 96, 0, 1],
            &[[10, 0, 0, 1], [10, 0, 0, 2], [10, 96, 0, 2]],
        ),
        frontend("b", [10, 96, 0, 2], &[[10, 0, 0, 2], [10, 0, 0, 3]]),
    ]);
    let every_address = addrs(&[
        [10, 96, 0, 1],
        [10, 96, 0, 2],
        [10, 0, 0, 1],
        [10, 0, 0, 2],
        [10, 0, 0, 3],
    ]);
    {
        let mut syncer = Syncer::new(load(&fs, map_sizes::SERVICES)).expect("syncer");
        assert!(syncer.sync(&both).errors.is_empty());
        assert_eq!(
            prefilter4(syncer.maps()),
            every_address.clone(),
            "every frontend and backend address"
        );
        // b goes: its frontend address stays (a's backend), and so does
        // the backend it shared with a; 10.0.0.3 only b used.
        let only_a = desired(vec![frontend(
            "a",
            [10, 96, 0, 1],
            &[[10, 0, 0, 1], [10, 0, 0, 2], [10, 96, 0, 2]],
        )]);
        assert!(syncer.sync(&only_a).errors.is_empty());
        assert_eq!(
            prefilter4(syncer.maps()),
            addrs(&[[10, 96, 0, 1], [10, 96, 0, 2], [10, 0, 0, 1], [10, 0, 0, 2]]),
        );
        assert!(syncer.sync(&both).errors.is_empty());
    }
    // An address left in the pin by an agent that stopped before removing
    // it: the restarted agent's adoption removes it, and keeps the rest.
    {
        let mut maps = Maps::open_pinned(&fs.0).expect("pinned maps");
        maps.prefilter4
            .insert(u32::from_ne_bytes([192, 0, 2, 9]), 1, 0)
            .expect("stray address");
    }
    let mut syncer = Syncer::new(Maps::open_pinned(&fs.0).expect("pinned maps")).expect("adopt");
    assert_eq!(
        prefilter4(syncer.maps()),
        every_address,
        "adoption keeps what the pinned entries use and only that"
    );
    assert!(syncer.sync(&desired(Vec::new())).errors.is_empty());
    assert!(
        prefilter4(syncer.maps()).is_empty(),
        "nothing programmed, nothing in the prefilter"
    );
}

/// Addresses Services hold inside a Service CIDR are held in
/// `LB_ALLOCATED` (another proxy's, unusable ones; outside the CIDRs none
/// is), follow the CIDRs when they change, and survive a restart.
#[test]
fn held_addresses_follow_the_service_cidrs_and_survive_a_restart() {
    let fs = Bpffs::new("cidrs");
    let inside: IpAddr = "10.96.0.3".parse().unwrap();
    let outside: IpAddr = "192.0.2.3".parse().unwrap();
    let with = |cidrs: &[&str], allocated: &[IpAddr]| {
        let mut d = desired(vec![frontend("a", [10, 96, 0, 1], &[[10, 0, 0, 1]])]);
        d.service_cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        d.allocated = allocated.iter().map(|a| (*a, 1)).collect();
        d
    };
    let held = |maps: &Maps| -> BTreeSet<IpAddr> {
        maps.allocated
            .keys()
            .map(|k| k.expect("allocated key").ip())
            .collect()
    };
    let cidrs = |maps: &Maps| maps.service_cidrs.get(&0, 0).expect("LB_SERVICE_CIDRS");
    {
        let mut syncer = Syncer::new(load(&fs, map_sizes::SERVICES)).expect("syncer");
        // No CIDR yet: nothing held.
        let report = syncer.sync(&with(&[], &[inside, outside]));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(held(syncer.maps()).is_empty());
        // A CIDR arrives: what lies inside is held before it is written.
        let report = syncer.sync(&with(&["10.96.0.0/16"], &[inside, outside]));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(held(syncer.maps()), BTreeSet::from([inside]));
        assert_eq!(cidrs(syncer.maps()).v4_count, 1);
        assert!(
            !prefilter4(syncer.maps()).contains(&"10.96.0.3".parse().unwrap()),
            "held apart, not in the prefilter every packet reads"
        );
        // No longer held by any Service: released (the delta names it).
        let keys: BTreeSet<FrontendKey> = BTreeSet::new();
        let report = syncer.sync_changes(
            &with(&["10.96.0.0/16"], &[outside]),
            &keys,
            &BTreeSet::from([(inside, Scope::Internal)]),
            &Default::default(),
        );
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(held(syncer.maps()).is_empty());
        let report = syncer.sync(&with(&["10.96.0.0/16"], &[inside]));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }
    // Restarted: the pins keep holding it; the first sync finds it done.
    let mut syncer = Syncer::new(Maps::open_pinned(&fs.0).expect("pinned")).expect("adopt");
    assert_eq!(held(syncer.maps()), BTreeSet::from([inside]));
    assert_eq!(cidrs(syncer.maps()).v4_count, 1);
    let report = syncer.sync(&with(&["10.96.0.0/16"], &[inside]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // The CIDRs go: every hold is released.
    let report = syncer.sync(&with(&[], &[inside]));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(held(syncer.maps()).is_empty());
    assert_eq!(cidrs(syncer.maps()).v4_count, 0);
}

/// When a held address cannot be written (`LB_ALLOCATED` full), nothing
/// is dropped: the CIDRs stay unwritten until every address is held. A
/// failure elsewhere (a backend that does not fit) does not turn it off.
#[test]
fn an_address_that_cannot_be_held_keeps_the_drop_off() {
    let fs = Bpffs::new("cidrfull");
    // Room for 4 held addresses and one backend.
    let mut syncer = Syncer::new(lb_tests::maps::load_with(&fs, 4, 1)).expect("syncer");
    let mut d = desired(vec![frontend("a", [10, 96, 0, 1], &[[10, 0, 0, 1]])]);
    d.service_cidrs = ["10.96.0.0/16".parse().unwrap()].into_iter().collect();
    d.allocated = (1..=5u8)
        .map(|i| (IpAddr::V4(Ipv4Addr::new(10, 96, 1, i)), 1))
        .collect();
    let report = syncer.sync(&d);
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.reason.contains("LB_ALLOCATED")),
        "{:?}",
        report.errors
    );
    assert_eq!(
        syncer.maps().service_cidrs.get(&0, 0).unwrap().v4_count,
        0,
        "no drop while an address is not held"
    );
    // One Service less: everything fits, the drop is on.
    d.allocated.remove(&IpAddr::V4(Ipv4Addr::new(10, 96, 1, 5)));
    let report = syncer.sync(&d);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(syncer.maps().service_cidrs.get(&0, 0).unwrap().v4_count, 1);
    // A backend that does not fit is an error, not a reason to stop dropping.
    d.frontends
        .extend([frontend("b", [10, 96, 0, 2], &[[10, 0, 0, 2]])]);
    let report = syncer.sync(&d);
    assert!(!report.errors.is_empty());
    assert_eq!(syncer.maps().service_cidrs.get(&0, 0).unwrap().v4_count, 1);
}
