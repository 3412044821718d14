//! Issue 23: the fleet demo as a test. Runs the real `fleet-demo` binary (dnsmasq, `ca serve`,
//! the gateway, 2 report-service and 2 → 8 monolith replicas (the largest fleet the platform
//! runs), each behind its own enrolled sidecar) through the whole peak with short windows and
//! short SVIDs, and asserts exit 0 and every step's ✔ line.
//!
//! Needs `target/debug/{fleet-demo,ca,sidecar,monolith,report-service,api-gateway}` (run
//! `cargo build --workspace --bins` first) and Debian's `dnsmasq`.

use std::process::Command;
use std::time::Instant;

use gatehouse_tests::harness::binary;

/// Every check the demo prints, in order.
const STEPS: [&str; 11] = [
    "fleet started",
    "peak: 2 monolith, 2 report-service replicas",
    "monolith scaled out (DNS records added, each replica enrolled)",
    "load spread over every monolith replica",
    "one monolith replica killed",
    "ca serve restarted",
    "root rotated with overlap and retired",
    "compromised report-service replica revoked",
    "monolith scaled back to 2",
    "gateway → monolith data export denied throughout",
    "one report's path through the fleet, joined on its trace id",
];

#[test]
fn fleet_demo_holds_every_step_with_no_failed_request() {
    let t = Instant::now();
    let out = Command::new(binary("fleet-demo"))
        .args(["--peak", "8", "--window-secs", "2", "--svid-ttl-secs", "12"])
        .output()
        .expect("run fleet-demo");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}\nfleet-demo took {:?}", t.elapsed());
    assert!(
        out.status.success(),
        "fleet-demo failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for step in STEPS {
        let ok = text
            .lines()
            .any(|l| l.starts_with("✔ ") && l.contains(step));
        assert!(ok, "no ✔ line for `{step}`:\n{text}");
    }
    // Zero failed report requests in every row of the summary table (`| step | secs |
    // reports | failed | …`), one row per step.
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| step "))
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 8, "{text}");
    for row in rows {
        assert_eq!(row[4], "0", "failed report requests in {row:?}");
    }
}
