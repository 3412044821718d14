//! `[runtime] worker_threads`: a sidecar with several event loops, over the real binary and
//! real mTLS. Connections are spread round-robin over the loops, each loop has its own
//! outbound pool (so its own connection to the peer), every loop serves correctly, a policy
//! edit and a trust change reach every loop, and SIGTERM still drains and exits.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use gatehouse_tests::harness::{FakeApp, Pki, Sidecar, eventually};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const TD: &str = "loops.internal";
const SERVER_ID: &str = "spiffe://loops.internal/server";
const CLIENT_ID: &str = "spiffe://loops.internal/client";
const LOOPS: usize = 3;
const CONNECTIONS: usize = 4 * LOOPS;
const REQUESTS_PER_CONNECTION: usize = 25;

const POLICY: &str = r#"
version = 1
trust_domain = "loops.internal"

[[route]]
name    = "reports"
methods = ["GET"]
path    = "/api/data/reports"
allow   = ["spiffe://loops.internal/client"]
"#;

fn runtime_section() -> String {
    format!("[runtime]\nworker_threads = {LOOPS}\n")
}

/// One plaintext keep-alive HTTP/1.1 connection to the outbound listener.
async fn connect(addr: SocketAddr) -> http1::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

async fn get(send: &mut http1::SendRequest<Empty<Bytes>>) -> StatusCode {
    let req = Request::get("/api/data/reports")
        .header("host", "monolith")
        .body(Empty::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), send.send_request(req))
        .await
        .expect("response within 20 s")
        .expect("response");
    let status = resp.status();
    resp.into_body().collect().await.expect("body");
    status
}

/// Voluntary context switches of each of `pid`'s threads named `gatehouse-loop*` (loop 0 is
/// the main thread and is busy anyway: it accepts and hands out every connection).
fn loop_switches(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("gatehouse-loop") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).expect("status");
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches");
        out.push((comm.trim().to_owned(), switches));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_event_loops_spread_connections_and_each_has_its_own_pool() {
    let pki = Pki::new(TD);
    let server = pki.issue(SERVER_ID);
    let client = pki.issue(CLIENT_ID);
    let app = FakeApp::start().await;
    let inbound = Sidecar::inbound(&server, app.addr(), POLICY)
        .section(&runtime_section())
        .spawn()
        .await
        .expect("inbound sidecar starts");
    let mut outbound = Sidecar::builder(&client)
        .section(&format!(
            "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\nserver_id = \"{SERVER_ID}\"\n\n{}",
            inbound.inbound_addr(),
            runtime_section()
        ))
        .spawn()
        .await
        .expect("outbound sidecar starts");
    let addr = outbound.listener("outbound:monolith");
    let handshakes = async || {
        inbound
            .metric("gatehouse_tls_handshakes_total", &[("result", "ok")])
            .await
            .expect("metrics")
    };
    let before = loop_switches(inbound.pid());
    assert_eq!(
        before.len(),
        LOOPS - 1,
        "threads besides the main one: {before:?}"
    );

    // One request per connection, one connection after the other: each outbound loop opens
    // its pool's HTTP/2 connection when its first app connection arrives, and the HTTP/1.1
    // lane for the next one (requests one at a time), and only then.
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut send = connect(addr).await;
        assert_eq!(get(&mut send).await, StatusCode::OK);
        conns.push(send);
    }
    assert_eq!(
        handshakes().await,
        2.0 * LOOPS as f64,
        "two mTLS connections per outbound event loop (connections spread round-robin)"
    );

    // Then every connection at once, many requests each: all served, all with the caller's
    // identity, on every loop of the inbound side.
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut send| {
            tokio::spawn(async move {
                for _ in 0..REQUESTS_PER_CONNECTION {
                    assert_eq!(get(&mut send).await, StatusCode::OK);
                }
                send
            })
        })
        .collect();
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.expect("client task"));
    }
    let total = CONNECTIONS * (1 + REQUESTS_PER_CONNECTION);
    assert_eq!(app.count(), total);
    assert!(
        app.requests()
            .iter()
            .all(|s| s.headers["x-client-spiffe-id"] == CLIENT_ID)
    );
    let after = loop_switches(inbound.pid());
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        assert!(
            a - b >= 20,
            "inbound {name} woke {} times for {total} requests: its connection went elsewhere",
            a - b
        );
    }

    // A policy edit reaches every loop: the route is revoked, and every open connection (so
    // every outbound loop's h2 connection, spread over the inbound loops) gets 403.
    let policy = inbound.policy_path();
    let revoked = POLICY.replace(
        "path    = \"/api/data/reports\"",
        "path    = \"/api/data/other\"",
    );
    assert_ne!(revoked, POLICY);
    std::fs::write(policy.with_extension("tmp"), &revoked).expect("write policy");
    std::fs::rename(policy.with_extension("tmp"), &policy).expect("rename policy");
    for (i, send) in conns.iter_mut().enumerate() {
        let denied = eventually(
            "the policy edit to reach the connection",
            Duration::from_secs(10),
            async || (get(send).await == StatusCode::FORBIDDEN).then_some(()),
        )
        .await;
        assert!(
            denied.is_ok(),
            "connection {i} still allowed after the edit"
        );
    }
    std::fs::write(policy.with_extension("tmp"), POLICY).expect("write policy");
    std::fs::rename(policy.with_extension("tmp"), &policy).expect("rename policy");
    for send in &mut conns {
        let allowed = eventually("the restored policy", Duration::from_secs(10), async || {
            (get(send).await == StatusCode::OK).then_some(())
        })
        .await;
        assert!(allowed.is_ok(), "route restored");
    }
    drop(conns);

    // The concurrent requests shared each loop's HTTP/2 connection: no new one.
    assert_eq!(
        handshakes().await,
        2.0 * LOOPS as f64,
        "still one lane and one HTTP/2 connection per outbound loop"
    );

    // A trust change (the bundle rewritten) retires the pools of every loop: the next
    // request on each loop connects anew.
    let bundle = std::fs::read(client.bundle()).expect("bundle");
    std::fs::write(client.bundle(), [bundle.as_slice(), b"\n"].concat()).expect("rewrite");
    eventually(
        "the outbound sidecar to reload its bundle",
        Duration::from_secs(10),
        async || {
            let ok = outbound
                .metric(
                    "gatehouse_reloads_total",
                    &[("what", "bundle"), ("result", "ok")],
                )
                .await
                .ok()?;
            (ok >= 1.0).then_some(())
        },
    )
    .await
    .expect("bundle reload");
    for _ in 0..LOOPS {
        let mut send = connect(addr).await;
        assert_eq!(get(&mut send).await, StatusCode::OK);
    }
    assert_eq!(
        handshakes().await,
        3.0 * LOOPS as f64,
        "every loop's pool reconnected after the trust change"
    );

    // SIGTERM: every loop drains and the process exits cleanly.
    outbound.sigterm();
    let status = outbound
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exit");
    assert!(status.success(), "{status:?}");
}
