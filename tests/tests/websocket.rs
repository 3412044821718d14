//! Issue 17, WebSocket through both sidecars: a real `websockets` client
//! (`tests/protocols/ws_echo.py`) → the report service's outbound sidecar (HTTP/1.1 upgrade)
//! → RFC 8441 extended CONNECT over the sidecars' mTLS HTTP/2 connection → the monolith's
//! inbound sidecar → an HTTP/1.1 upgrade to a real `websockets` echo server; the real
//! `sidecar` binary and certificates from our CA.
//!
//! - `messages_echo_both_ways_for_10s_and_the_app_sees_the_caller`: text and binary messages
//!   every 0.1 s for 10 s all come back; the app saw `x-client-spiffe-id` (and the request
//!   id) on the upgrade request; both sidecars write the upgrade's request line (101) and a
//!   close line with the bytes each way;
//! - `an_unauthorized_path_or_caller_gets_403_and_no_upgrade`: a path outside the policy and
//!   a caller the route does not allow both get 403, and the app never sees an upgrade;
//! - `an_idle_tunnel_is_closed_after_websocket_idle_timeout`: with
//!   `websocket_idle_timeout = "1s"`, a client that waits 2.5 s between messages loses its
//!   tunnel, and the close line says `idle_timeout`;
//! - `a_caller_over_its_concurrency_limit_gets_no_second_tunnel_until_the_first_closes`: an
//!   open tunnel holds its caller's `[[limit]]` concurrency;
//! - `an_open_tunnel_drains_when_the_outbound_sidecar_is_stopped`: SIGTERM drains open tunnels.

use std::time::Duration;

use gatehouse_tests::harness::protocols::{PyServer, py_call};
use gatehouse_tests::harness::{CertDir, MONOLITH_ID, Pki, REPORT_SERVICE_ID, Sidecar, eventually};

const GATEWAY_ID: &str = "spiffe://fintech.internal/api-gateway";

const POLICY: &str = r#"
version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"
api-gateway    = "spiffe://fintech.internal/api-gateway"

[[route]]
name    = "report stream"
methods = ["GET"]
path    = "/ws/reports"
allow   = ["report-service"]
"#;

async fn inbound(pki: &Pki, app: &PyServer, extra: &str) -> Sidecar {
    Sidecar::inbound(&pki.issue(MONOLITH_ID), app.addr, POLICY)
        .inbound_option(extra)
        .spawn()
        .await
        .expect("inbound sidecar")
}

async fn outbound(cert: &CertDir, inbound: &Sidecar) -> Sidecar {
    Sidecar::builder(cert)
        .section(&format!(
            "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\nserver_id = \"{MONOLITH_ID}\"\n",
            inbound.inbound_addr()
        ))
        .spawn()
        .await
        .expect("outbound sidecar")
}

async fn ws(out: &Sidecar, path: &str, extra: &[&str]) -> serde_json::Value {
    let url = format!("ws://{}{path}", out.listener("outbound:monolith"));
    let mut args = vec!["--url", url.as_str()];
    args.extend_from_slice(extra);
    py_call("ws_echo.py", &args, Duration::from_secs(40))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", out.stderr_text()))
}

/// Starts a `ws_echo.py` session through `out` in the background (the sidecar stays free to be
/// signalled or called again meanwhile).
fn spawn_ws(
    out: &Sidecar,
    path: &str,
    extra: &'static [&'static str],
) -> tokio::task::JoinHandle<anyhow::Result<serde_json::Value>> {
    let url = format!("ws://{}{path}", out.listener("outbound:monolith"));
    tokio::spawn(async move {
        let mut args = vec!["--url", url.as_str()];
        args.extend_from_slice(extra);
        py_call("ws_echo.py", &args, Duration::from_secs(40)).await
    })
}

/// Waits until the app has seen `n` upgrade requests.
async fn wait_upgrades(app: &PyServer, n: usize) {
    eventually(
        "the upgrades at the app",
        Duration::from_secs(15),
        async || (upgrades_seen(app).len() == n).then_some(()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", upgrades_seen(app)));
}

fn upgrades_seen(app: &PyServer) -> Vec<serde_json::Value> {
    app.seen()
        .into_iter()
        .filter(|l| l.get("path").is_some())
        .collect()
}

/// Waits for `sc`'s close line of a tunnel (`direction`).
async fn close_line(sc: &Sidecar, direction: &str) -> serde_json::Value {
    sc.wait_audit_line("the tunnel's close line", |l| l["direction"] == direction)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_echo_both_ways_for_10s_and_the_app_sees_the_caller() {
    let pki = Pki::new("fintech.internal");
    let app = PyServer::start("ws_echo.py").await.expect("echo server");
    let inb = inbound(&pki, &app, "").await;
    let out = outbound(&pki.issue(REPORT_SERVICE_ID), &inb).await;

    // Each side counts the open tunnel while it is open, and not after.
    let tunnels = async |sc: &Sidecar, side: &str| {
        sc.metric("gatehouse_websocket_active_tunnels", &[("side", side)])
            .await
            .expect("metrics")
    };
    let both_open = async || {
        eventually(
            "the tunnel counted on both sides",
            Duration::from_secs(8),
            async || {
                let open = (
                    tunnels(&inb, "inbound").await,
                    tunnels(&out, "outbound").await,
                );
                (open == (1.0, 1.0)).then_some(())
            },
        )
        .await
    };
    let (r, counted) = tokio::join!(ws(&out, "/ws/reports", &["--seconds", "10"]), both_open());
    counted.expect("both sides count the open tunnel");
    assert_eq!(r["status"], 101, "{r}");
    assert_eq!(
        r["ok"],
        true,
        "{r}\n{}\n{}",
        inb.stderr_text(),
        out.stderr_text()
    );
    let sent = r["sent"].as_u64().expect("sent");
    assert!(sent >= 50, "a message every 0.1 s for 10 s: {r}");
    assert_eq!(r["echoed"], sent, "{r}");
    assert_eq!(r["mismatched"], 0, "{r}");
    assert!(r["seconds"].as_f64() >= Some(10.0), "{r}");

    let seen = upgrades_seen(&app);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let headers = &seen[0]["headers"];
    assert_eq!(headers["x-client-spiffe-id"], REPORT_SERVICE_ID, "{seen:?}");
    assert_eq!(seen[0]["path"], "/ws/reports");
    let request_id = headers["x-request-id"]
        .as_str()
        .expect("x-request-id")
        .to_owned();

    // The upgrade's request line (101) and the close line, on both sides, joined by the id.
    let line = close_line(&inb, "websocket_inbound").await;
    assert_eq!(line["peer"], REPORT_SERVICE_ID, "{line}");
    assert_eq!(line["request_id"], request_id.as_str(), "{line}");
    assert_eq!(line["reason"], "closed", "{line}");
    // Every message is a frame of at least 2 bytes each way (permessage-deflate, which
    // `websockets` negotiates, makes them small: the app's choice of extension came through).
    assert!(
        line["bytes_client_to_server"].as_u64() > Some(sent * 2),
        "{line}"
    );
    assert!(
        line["bytes_server_to_client"].as_u64() > Some(sent * 2),
        "{line}"
    );
    assert!(line["duration_ms"].as_f64() >= Some(10_000.0), "{line}");
    let audit = inb.audit();
    let upgrade = audit
        .iter()
        .find(|l| l["direction"] == "inbound" && l["path"] == "/ws/reports")
        .unwrap_or_else(|| panic!("no request line for the upgrade: {audit:?}"));
    assert_eq!(upgrade["status"], 101, "{upgrade}");
    assert_eq!(upgrade["decision"], "allow", "{upgrade}");
    assert_eq!(upgrade["route"], "report stream", "{upgrade}");
    let out_line = close_line(&out, "websocket_outbound").await;
    assert_eq!(out_line["peer"], MONOLITH_ID, "{out_line}");
    assert_eq!(out_line["request_id"], request_id.as_str(), "{out_line}");
    assert_eq!(
        out_line["bytes_client_to_server"], line["bytes_client_to_server"],
        "both sidecars count the same bytes: {out_line}"
    );
    let metric = inb
        .metric(
            "gatehouse_websocket_upgrades_total",
            &[("side", "inbound"), ("result", "upgraded")],
        )
        .await
        .expect("metrics");
    assert_eq!(metric, 1.0);
    assert_eq!(tunnels(&inb, "inbound").await, 0.0, "closed: not counted");
    assert_eq!(tunnels(&out, "outbound").await, 0.0, "closed: not counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorized_path_or_caller_gets_403_and_no_upgrade() {
    let pki = Pki::new("fintech.internal");
    let app = PyServer::start("ws_echo.py").await.expect("echo server");
    let inb = inbound(&pki, &app, "").await;
    let report = outbound(&pki.issue(REPORT_SERVICE_ID), &inb).await;
    let gateway = outbound(&pki.issue(GATEWAY_ID), &inb).await;

    let path = ws(&report, "/ws/admin", &["--seconds", "1"]).await;
    assert_eq!(path["status"], 403, "{path}");
    assert_eq!(path["ok"], false, "{path}");
    let caller = ws(&gateway, "/ws/reports", &["--seconds", "1"]).await;
    assert_eq!(caller["status"], 403, "{caller}");
    // The allowed pair still works: the app is up and records what reaches it.
    let ok = ws(&report, "/ws/reports", &["--seconds", "0.5"]).await;
    assert_eq!(ok["ok"], true, "{ok}");
    let seen = upgrades_seen(&app);
    assert_eq!(
        seen.len(),
        1,
        "only the allowed upgrade reached the app: {seen:?}"
    );
    assert_eq!(seen[0]["headers"]["x-client-spiffe-id"], REPORT_SERVICE_ID);
    let audit = inb.audit();
    for (path, caller) in [
        ("/ws/admin", REPORT_SERVICE_ID),
        ("/ws/reports", GATEWAY_ID),
    ] {
        let line = audit
            .iter()
            .find(|l| l["path"] == path && l["caller"] == caller)
            .unwrap_or_else(|| panic!("no audit line for {caller} {path}: {audit:?}"));
        assert_eq!(line["decision"], "deny", "{line}");
        assert_eq!(line["status"], 403, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_websocket_idle_timeout() {
    let pki = Pki::new("fintech.internal");
    let app = PyServer::start("ws_echo.py").await.expect("echo server");
    let inb = inbound(&pki, &app, "websocket_idle_timeout = \"1s\"").await;
    let out = outbound(&pki.issue(REPORT_SERVICE_ID), &inb).await;
    let r = ws(
        &out,
        "/ws/reports",
        &["--seconds", "6", "--interval", "2.5"],
    )
    .await;
    assert_eq!(r["status"], 101, "{r}");
    assert_eq!(
        r["ok"], false,
        "the tunnel must not survive 2.5 s of silence: {r}"
    );
    let line = close_line(&inb, "websocket_inbound").await;
    assert_eq!(line["reason"], "idle_timeout", "{line}");
}

/// A `[[limit]]` with `concurrency = 1` for the caller on the tunnel's route: while one tunnel
/// is open a second upgrade gets 503 with `retry-after` and never reaches the app (an open
/// tunnel holds its concurrency budget), the refusal is audited as `overloaded`, and once the
/// first tunnel closed the next upgrade goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_concurrency_limit_gets_no_second_tunnel_until_the_first_closes() {
    let pki = Pki::new("fintech.internal");
    let app = PyServer::start("ws_echo.py").await.expect("echo server");
    let policy = format!(
        "{POLICY}\n[[limit]]\ncaller      = \"report-service\"\nroute       = \"report stream\"\nconcurrency = 1\n"
    );
    let inb = Sidecar::inbound(&pki.issue(MONOLITH_ID), app.addr, &policy)
        .spawn()
        .await
        .expect("inbound sidecar");
    let out = outbound(&pki.issue(REPORT_SERVICE_ID), &inb).await;
    let first = spawn_ws(&out, "/ws/reports", &["--seconds", "3"]);
    wait_upgrades(&app, 1).await;
    let second = ws(&out, "/ws/reports", &["--seconds", "0.5"]).await;
    assert_eq!(second["status"], 503, "{second}");
    assert_eq!(
        upgrades_seen(&app).len(),
        1,
        "the refused upgrade never reached the app"
    );
    let line = inb
        .wait_audit_line("the refusal's audit line", |l| l["reason"] == "overloaded")
        .await;
    assert_eq!(line["path"], "/ws/reports", "{line}");
    let first = first
        .await
        .expect("first tunnel task")
        .expect("ws_echo result");
    assert_eq!(
        first["ok"], true,
        "the open tunnel was not disturbed: {first}"
    );
    let third = ws(&out, "/ws/reports", &["--seconds", "0.5"]).await;
    assert_eq!(
        third["ok"], true,
        "the budget came back with the closed tunnel: {third}"
    );
    assert_eq!(upgrades_seen(&app).len(), 2);
}

/// SIGTERM to the outbound sidecar while a tunnel is open: the tunnel is drained like a
/// request (it keeps echoing until the client ends it) and the sidecar then exits 0. (The
/// tunnel's task outlives its app connection's task; untracked, it was cut at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_drains_when_the_outbound_sidecar_is_stopped() {
    let pki = Pki::new("fintech.internal");
    let app = PyServer::start("ws_echo.py").await.expect("echo server");
    let inb = inbound(&pki, &app, "").await;
    let mut out = outbound(&pki.issue(REPORT_SERVICE_ID), &inb).await;
    let tunnel = spawn_ws(&out, "/ws/reports", &["--seconds", "3"]);
    wait_upgrades(&app, 1).await;
    out.sigterm();
    let r = tunnel.await.expect("tunnel task").expect("ws_echo result");
    assert_eq!(r["ok"], true, "the tunnel was cut at SIGTERM: {r}");
    let status = out
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the outbound exits after the drain");
    assert!(status.success(), "{status}");
}
