//! Issue 17, gRPC through both sidecars: a real `grpcio` server (`tests/protocols/grpc_echo.py`)
//! behind an inbound sidecar with `app_protocol = "h2c"`, a real `grpcio` client calling
//! through the report service's outbound sidecar (h2c from the client, mTLS HTTP/2 between
//! the sidecars, h2c to the server), the real `sidecar` binary and certificates from our CA.
//!
//! - `unary_streaming_and_app_errors_pass_through_both_sidecars`: unary (with a trailer the
//!   app sets), server-streaming and bidirectional calls succeed; the app's `NOT_FOUND` and its
//!   message reach the client unchanged; the app saw `x-client-spiffe-id`;
//! - `a_method_outside_the_policy_is_permission_denied_and_never_reaches_the_app`: the client
//!   gets `PERMISSION_DENIED`, the server's record shows no such call, the inbound audit line
//!   is a denial like an HTTP one;
//! - `a_call_past_its_deadline_ends_deadline_exceeded`: the server sleeps 5 s, the deadline
//!   is 1 s: the client sees `DEADLINE_EXCEEDED` within a few seconds, nothing hangs.

use std::time::{Duration, Instant};

use gatehouse_tests::harness::protocols::{PyServer, py_call};
use gatehouse_tests::harness::{MONOLITH_ID, Pki, REPORT_SERVICE_ID, Sidecar};

const POLICY: &str = r#"
version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"

[[route]]
name    = "echo unary"
methods = ["POST"]
path    = "/gatehouse.test.Echo/Unary"
allow   = ["report-service"]

[[route]]
name    = "echo service"
methods = ["POST"]
path    = "/gatehouse.test.Echo/*"
allow   = ["report-service"]
"#;

struct Setup {
    server: PyServer,
    inbound: Sidecar,
    outbound: Sidecar,
}

async fn setup() -> Setup {
    let pki = Pki::new("fintech.internal");
    let server = PyServer::start("grpc_echo.py").await.expect("grpc server");
    let inbound = Sidecar::inbound(&pki.issue(MONOLITH_ID), server.addr, POLICY)
        .inbound_option("app_protocol = \"h2c\"")
        .spawn()
        .await
        .expect("inbound sidecar");
    let outbound = Sidecar::builder(&pki.issue(REPORT_SERVICE_ID))
        .section(&format!(
            "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\nserver_id = \"{MONOLITH_ID}\"\n",
            inbound.inbound_addr()
        ))
        .spawn()
        .await
        .expect("outbound sidecar");
    Setup {
        server,
        inbound,
        outbound,
    }
}

impl Setup {
    async fn call(&self, method: &str, extra: &[&str]) -> serde_json::Value {
        let target = self.outbound.listener("outbound:monolith").to_string();
        let mut args = vec!["--target", target.as_str(), "--method", method];
        args.extend_from_slice(extra);
        py_call("grpc_echo.py", &args, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{e}\ninbound: {}\noutbound: {}\nserver: {}",
                    self.inbound.stderr_text(),
                    self.outbound.stderr_text(),
                    self.server.stderr_text()
                )
            })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_streaming_and_app_errors_pass_through_both_sidecars() {
    let s = setup().await;

    let unary = s.call("unary", &["--payload", "{\"n\": 1}"]).await;
    assert_eq!(unary["code"], "OK", "{unary}");
    assert_eq!(unary["responses"][0], "{\"n\": 1}", "{unary}");
    // A trailer the app set crossed both sidecars (and the h2 hop between them).
    assert_eq!(
        unary["trailing_metadata"]["x-echo-trailer"], "unary",
        "{unary}"
    );

    let stream = s.call("server_stream", &["--count", "5"]).await;
    assert_eq!(stream["code"], "OK", "{stream}");
    let indexes: Vec<_> = stream["responses"]
        .as_array()
        .expect("responses")
        .iter()
        .map(|r| r["index"].as_u64().expect("index"))
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3, 4], "{stream}");

    let bidi = s.call("bidi", &["--count", "4"]).await;
    assert_eq!(bidi["code"], "OK", "{bidi}");
    let echoes: Vec<_> = bidi["responses"]
        .as_array()
        .expect("responses")
        .iter()
        .map(|r| r["echo"].as_str().expect("echo").to_owned())
        .collect();
    assert_eq!(
        echoes,
        ["message-0", "message-1", "message-2", "message-3"],
        "{bidi}"
    );

    let fail = s.call("fail", &[]).await;
    assert_eq!(fail["code"], "NOT_FOUND", "{fail}");
    assert_eq!(fail["details"], "no such report", "{fail}");

    // The app saw each call with the caller's verified identity.
    let seen = s.server.seen();
    for method in ["Unary", "ServerStream", "Bidi", "Fail"] {
        let call = seen
            .iter()
            .find(|c| c["method"] == format!("/gatehouse.test.Echo/{method}"))
            .unwrap_or_else(|| panic!("the app never saw {method}: {seen:?}"));
        assert_eq!(
            call["metadata"]["x-client-spiffe-id"], REPORT_SERVICE_ID,
            "{call}"
        );
    }
    let audit = s.inbound.wait_audit(4).await.expect("inbound audit");
    assert!(
        audit
            .iter()
            .any(|l| l["route"] == "echo unary" && l["decision"] == "allow"),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_outside_the_policy_is_permission_denied_and_never_reaches_the_app() {
    let s = setup().await;
    let denied = s.call("purge", &[]).await;
    assert_eq!(denied["code"], "PERMISSION_DENIED", "{denied}");
    assert_eq!(denied["details"], "access denied", "{denied}");
    // An allowed call after it: the server is up and records what it gets.
    let ok = s.call("unary", &[]).await;
    assert_eq!(ok["code"], "OK", "{ok}");
    let seen = s.server.seen();
    assert!(
        seen.iter()
            .all(|c| c["method"] != "/gatehouse.test.Admin/Purge"),
        "the app saw the denied call: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|c| c["method"] == "/gatehouse.test.Echo/Unary"),
        "{seen:?}"
    );
    // The same audit line as an HTTP denial.
    let audit = s.inbound.wait_audit(2).await.expect("inbound audit");
    let line = audit
        .iter()
        .find(|l| l["path"] == "/gatehouse.test.Admin/Purge")
        .unwrap_or_else(|| panic!("no audit line for the denied call: {audit:?}"));
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(line["caller"], REPORT_SERVICE_ID, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_ends_deadline_exceeded() {
    let s = setup().await;
    let started = Instant::now();
    let late = s.call("slow", &["--sleep", "5", "--deadline", "1"]).await;
    let took = started.elapsed();
    assert_eq!(late["code"], "DEADLINE_EXCEEDED", "{late}");
    assert!(took < Duration::from_secs(5), "the call hung for {took:?}");
    // The sidecars are not stuck on it: the next call goes through.
    let ok = s.call("unary", &[]).await;
    assert_eq!(ok["code"], "OK", "{ok}");
}
