//! The short version of `cargo xtask soak`: Services under endpoint churn
//! while a client connects continuously to a stable Service.

use std::time::Duration;

use lb_testnet::soak::{SoakParams, run};

#[test]
fn churn_never_fails_a_connection_to_a_stable_service() {
    lb_tests::require_root();
    let params = SoakParams {
        services: 300,
        endpoints_per_service: 10,
        changes_per_second: 50,
        duration: Duration::from_secs(10),
        agent: lb_tests::e2e::agent_bin(),
    };
    let report = run(&params).unwrap_or_else(|e| panic!("soak setup: {e}"));
    print!("{}", report.markdown(&params));
    assert!(report.changes_made >= 400, "{report:?}");
    assert!(report.connections_ok > 50, "{report:?}");
    assert_eq!(report.connections_failed, 0, "{report:?}");
    assert!(
        report.rss_end_mb < report.rss_start_mb + 30.0,
        "agent memory grows: {report:?}"
    );
}
