//! The audit log of both sidecar sides, end to end over the real `sidecar` binary: app →
//! outbound sidecar → inbound sidecar → fake app, with `[audit]` set on both.
//! - `enabled = false` writes no line on either side and says so at startup;
//! - buffered lines (`flush_interval`) are not written per request, and appear within the
//!   interval;
//! - lines still buffered are written on SIGTERM, before the process exits 0.
//!
//! Run `cargo build --workspace --bins` first.

use std::time::{Duration, Instant};

use gatehouse_tests::harness::{
    FINTECH_TD, FakeApp, MONOLITH_ID, Pki, REPORT_EXPORT_POLICY, REPORT_SERVICE_ID, Sidecar,
    eventually, http_get,
};
use http::StatusCode;

struct Pair {
    _pki: Pki,
    _app: FakeApp,
    inbound: Sidecar,
    outbound: Sidecar,
}

/// Both sidecars with `audit` (lines under `[audit]`).
async fn pair(audit: &str) -> Pair {
    let pki = Pki::new(FINTECH_TD);
    let app = FakeApp::start().await;
    let section = format!("[audit]\n{audit}\n");
    let inbound = Sidecar::inbound(&pki.issue(MONOLITH_ID), app.addr(), REPORT_EXPORT_POLICY)
        .section(&section)
        .spawn()
        .await
        .expect("inbound sidecar starts");
    let entry = format!(
        "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\nserver_id = \"{MONOLITH_ID}\"\n",
        inbound.inbound_addr()
    );
    let outbound = Sidecar::builder(&pki.issue(REPORT_SERVICE_ID))
        .section(&entry)
        .section(&section)
        .spawn()
        .await
        .expect("outbound sidecar starts");
    Pair {
        _pki: pki,
        _app: app,
        inbound,
        outbound,
    }
}

/// One allowed and one denied request through the pair.
async fn two_requests(p: &Pair) {
    let out = p.outbound.listener("outbound:monolith");
    let (status, _) = http_get(out, "/api/data/reports?x=1")
        .await
        .expect("allowed request");
    assert_eq!(status, StatusCode::OK);
    let (status, _) = http_get(out, "/api/secret").await.expect("denied request");
    assert_eq!(status, StatusCode::FORBIDDEN);
}

async fn wait_lines(s: &Sidecar, n: usize, within: Duration) -> Vec<serde_json::Value> {
    eventually("audit lines", within, async || {
        let a = s.audit();
        (a.len() >= n).then_some(a)
    })
    .await
    .unwrap_or_else(|_| panic!("{n} audit lines within {within:?}: {:?}", s.stdout_lines()))
}

#[tokio::test]
async fn disabled_audit_writes_no_line_on_either_side_and_warns() {
    let p = pair("enabled = false").await;
    two_requests(&p).await;
    // The requests were decided and counted...
    let counted = p
        .inbound
        .metric("gatehouse_inbound_requests_total", &[])
        .await
        .expect("metrics");
    assert_eq!(counted, 2.0);
    // ...and, well past the default flush interval, nothing was written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in [&p.inbound, &p.outbound] {
        assert!(s.stdout_lines().is_empty(), "{:?}", s.stdout_lines());
        let err = s.stderr_text();
        assert!(
            err.contains("audit log OFF") && err.contains("decisions are not recorded"),
            "startup warning: {err}"
        );
    }
}

#[tokio::test]
async fn buffered_lines_are_written_together_within_the_flush_interval() {
    let p = pair("flush_interval = \"2s\"").await;
    let started = Instant::now();
    two_requests(&p).await;
    if started.elapsed() < Duration::from_millis(1500) {
        for s in [&p.inbound, &p.outbound] {
            assert!(
                s.stdout_lines().is_empty(),
                "lines are buffered, not written per request: {:?}",
                s.stdout_lines()
            );
        }
    }
    for s in [&p.inbound, &p.outbound] {
        let lines = wait_lines(s, 2, Duration::from_secs(8)).await;
        assert_eq!(lines.len(), 2, "{lines:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "2 s interval, written after {waited:?}"
    );
    let inbound = p.inbound.audit();
    assert_eq!(inbound[0]["decision"], "allow");
    assert_eq!(inbound[1]["decision"], "deny");
    let outbound = p.outbound.audit();
    assert_eq!(outbound[0]["direction"], "outbound");
    assert_eq!(outbound[1]["status"], 403);
    assert_eq!(outbound[0]["request_id"], inbound[0]["request_id"]);
}

#[tokio::test]
async fn sigterm_writes_every_buffered_line_before_exiting() {
    let mut p = pair("flush_interval = \"10s\"").await;
    let started = Instant::now();
    two_requests(&p).await;
    for s in [&p.inbound, &p.outbound] {
        assert!(s.stdout_lines().is_empty(), "{:?}", s.stdout_lines());
    }
    p.outbound.sigterm();
    p.inbound.sigterm();
    for s in [&mut p.outbound, &mut p.inbound] {
        let exit = s.wait_exit(Duration::from_secs(8)).await.expect("exits");
        assert!(exit.success(), "exit status {exit}");
        let lines = wait_lines(s, 2, Duration::from_secs(2)).await;
        assert_eq!(lines.len(), 2, "{lines:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "written by the shutdown, not by the 10 s interval: {waited:?}"
    );
}
