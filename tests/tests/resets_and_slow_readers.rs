//! Issue 21, findings 6 and 7, against the real `sidecar` binary: HTTP/2 rapid reset
//! (CVE-2023-44487) and slow readers that pin the app's connections. The attacking clients
//! are the `h2` crate and raw TLS over our own CA's certificates; the fake app counts the
//! requests it gets and its open connections. Run `cargo build --workspace --bins` first.

use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_tests::harness::fixtures::TD;
use gatehouse_tests::harness::{
    FakeApp, MONOLITH_ID, MtlsClient, Pki, Proto, REPORT_EXPORT_POLICY, REPORT_SERVICE_ID, Sidecar,
    eventually,
};
use h2::Reason;
use tokio::io::AsyncWriteExt;

const EXPORT: &str = "/api/data/reports";

/// A PKI, the fake app, a monolith sidecar in front of it (with `options` under
/// `[inbound]`) and a report-service client allowed `GET /api/data/reports`.
async fn setup(options: &[&str]) -> (Pki, FakeApp, Sidecar, MtlsClient) {
    let pki = Pki::new(TD);
    let app = FakeApp::start().await;
    let server = pki.issue(MONOLITH_ID);
    let mut b = Sidecar::inbound(&server, app.addr(), REPORT_EXPORT_POLICY);
    for line in options {
        b = b.inbound_option(line);
    }
    let sidecar = b.spawn().await.expect("sidecar starts");
    let client = MtlsClient::new(&pki.issue(REPORT_SERVICE_ID));
    (pki, app, sidecar, client)
}

/// Waits until the app's request count has stopped moving (requests still on their way in
/// when the client stopped), and returns it.
async fn settled_count(app: &FakeApp) -> usize {
    let mut last = app.count();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = app.count();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Waits until the app has received `n` requests, then until every app connection has
/// closed, failing when that takes longer than `send_timeout` plus a margin for a loaded
/// machine. Returns the connections that were open and how long they took to close.
async fn released_within(app: &FakeApp, n: usize, send_timeout: Duration) -> (usize, Duration) {
    let pinned = eventually(
        "the app to get every request",
        Duration::from_secs(10),
        async || (app.count() == n).then(|| app.open_connections()),
    )
    .await
    .expect("the app got every request");
    let t0 = Instant::now();
    eventually(
        "the app connections to close",
        send_timeout + Duration::from_secs(4),
        async || (app.open_connections() == 0).then_some(()),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} of {pinned} app connections still open",
            app.open_connections()
        )
    });
    (pinned, t0.elapsed())
}

fn export_request(port: u16, query: &str) -> http::Request<()> {
    http::Request::get(format!("https://localhost:{port}{EXPORT}{query}"))
        .body(())
        .expect("request")
}

/// 4,000 HEADERS + RST_STREAM(CANCEL) in 2 s on one connection, paced (two a millisecond,
/// each reset a moment after its request was passed on, so `h2`'s own accept-queue limit
/// never sees them): the connection gets GOAWAY(ENHANCE_YOUR_CALM) within the first second
/// and the app sees at most a few hundred of the requests. Before the fix every one reached
/// the app and the connection stayed.
#[tokio::test]
async fn issue_21_rapid_reset_gets_goaway_within_a_second_and_spares_the_app() {
    let (_pki, app, sidecar, client) = setup(&[]).await;
    let addr = sidecar.inbound_addr();
    let tls = client.connect(addr, Proto::H2).await.expect("connect");
    let (send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let res = conn.await;
        (Instant::now(), res)
    });
    // One answered request first: the connection is up and served (a burst sent before the
    // server reads at all is caught by `h2`'s own accept-queue limit, base or not).
    let mut tx = send.clone().ready().await.expect("ready");
    let (resp, _) = tx
        .send_request(export_request(addr.port(), ""), true)
        .expect("send");
    assert_eq!(resp.await.expect("warm-up response").status(), 200);
    let warm = app.count();
    const PAIRS: u32 = 4000;
    const SPAN: Duration = Duration::from_secs(2);
    // Each stream is reset about 2 ms after its HEADERS, in a write of its own: long enough
    // for the sidecar to have passed the request on (as an attacker over a real network
    // would have it), short enough to keep only a few streams open at a time.
    const RESET_AFTER: Duration = Duration::from_millis(2);
    let started = Instant::now();
    let mut sent = 0;
    let mut open = std::collections::VecDeque::new();
    let mut refused: Option<(Instant, h2::Error)> = None;
    while sent < PAIRS || !open.is_empty() {
        // Stream i leaves at started + i * SPAN / PAIRS.
        let due = started + SPAN * sent / PAIRS;
        tokio::time::sleep_until(due.into()).await;
        while let Some((at, _)) = open.front()
            && (sent == PAIRS || *at + RESET_AFTER <= Instant::now())
        {
            let (_, mut stream): (Instant, h2::SendStream<Bytes>) =
                open.pop_front().expect("a stream");
            stream.send_reset(Reason::CANCEL);
        }
        if sent == PAIRS {
            continue;
        }
        let attempt = async {
            let mut tx = send.clone().ready().await?;
            // The app takes 100 ms: the reset comes while the request is in its hands, the
            // moment a stream's slot under `max_h2_streams` is freed for the next one.
            let req = export_request(addr.port(), "?sleep_ms=100");
            let (_resp, stream) = tx.send_request(req, true)?;
            Ok::<_, h2::Error>(stream)
        };
        match attempt.await {
            Ok(stream) => open.push_back((Instant::now(), stream)),
            Err(e) => {
                refused = Some((Instant::now(), e));
                break;
            }
        }
        sent += 1;
    }
    let ended = tokio::time::timeout(Duration::from_secs(3), conn).await;
    let (closed_at, res) = match ended {
        Ok(joined) => {
            let (at, res) = joined.expect("join");
            (Some(at), Some(res))
        }
        Err(_) => (None, None),
    };
    let goaway_at = [refused.as_ref().map(|(at, _)| *at), closed_at]
        .into_iter()
        .flatten()
        .min();
    let seen = settled_count(&app).await - warm;
    // `too_many_resets` (the budget), or `excessive_load` when a stall of the sidecar let a
    // burst of more than the budget pile up in `h2`'s accept queue.
    let goaways = sidecar
        .metric("gatehouse_inbound_h2_goaways_total", &[])
        .await
        .expect("metrics");
    let resets = sidecar
        .metric("gatehouse_inbound_h2_client_resets_total", &[])
        .await
        .expect("metrics");
    let since = |at: Option<Instant>| at.map(|at| at - started);
    eprintln!(
        "rapid reset: {sent} streams opened and reset; GOAWAY seen after {:?} ({:?}), \
         connection ended after {:?} ({res:?}); app saw {seen} of {PAIRS}; resets counted \
         {resets}, GOAWAYs {goaways}",
        since(goaway_at),
        refused.as_ref().map(|(_, e)| e),
        since(closed_at),
    );
    assert!(
        sent < PAIRS,
        "all {PAIRS} HEADERS + RST_STREAM pairs went through on one connection"
    );
    let goaway_after = since(goaway_at).expect("the connection was refused or closed");
    assert!(
        goaway_after < Duration::from_secs(1),
        "GOAWAY after {goaway_after:?}"
    );
    let reason = refused
        .as_ref()
        .and_then(|(_, e)| e.reason())
        .or_else(|| res.as_ref()?.as_ref().err().and_then(h2::Error::reason));
    assert_eq!(
        reason,
        Some(Reason::ENHANCE_YOUR_CALM),
        "{refused:?} / {res:?}"
    );
    assert_eq!(goaways, 1.0);
    assert!(
        seen <= 300,
        "the app saw {seen} of the {PAIRS} cancelled requests"
    );
    // The sidecar serves a well-behaved client as before.
    let ok = client
        .get(addr, Proto::H2, EXPORT)
        .await
        .expect("a new connection");
    assert_eq!(ok.status, 200);
}

/// 100 HTTP/2 streams whose client gives them no flow-control window (initial window 0)
/// pin 100 app connections; with `send_timeout = "1s"` (idle and app timeouts far away) the
/// streams are reset and every app connection is closed within the send timeout, plus
/// margin. Before the fix they stayed as long as the client did.
#[tokio::test]
async fn issue_21_h2_streams_without_window_release_their_app_connections() {
    const STREAMS: usize = 100;
    let send_timeout = Duration::from_secs(1);
    let (_pki, app, sidecar, client) = setup(&[
        "send_timeout = \"1s\"",
        "idle_timeout = \"60s\"",
        "app_timeout = \"60s\"",
    ])
    .await;
    let addr = sidecar.inbound_addr();
    let tls = client.connect(addr, Proto::H2).await.expect("connect");
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tls)
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let mut heads = Vec::new();
    for _ in 0..STREAMS {
        let mut tx = send.clone().ready().await.expect("ready");
        let req = export_request(addr.port(), "?download=1048576");
        let (resp, _) = tx.send_request(req, true).expect("send");
        heads.push(tokio::spawn(resp));
    }
    let mut bodies = Vec::new();
    for head in heads {
        let resp = head.await.expect("join").expect("response head");
        assert_eq!(resp.status(), 200);
        bodies.push(resp.into_body());
    }
    // Every stream has its response head, and its app connection.
    let (pinned, released) = released_within(&app, STREAMS, send_timeout).await;
    eprintln!(
        "h2 zero window: {pinned} app connections pinned; all closed {released:?} after the \
         last response head (send_timeout {send_timeout:?})"
    );
    // The client learns of it: its streams are reset (CANCEL).
    let mut body = bodies.pop().expect("a body");
    let e = body.data().await.expect("an end").expect_err("reset");
    assert_eq!(e.reason(), Some(Reason::CANCEL), "{e}");
    let timeouts = sidecar
        .metric(
            "gatehouse_inbound_send_timeouts_total",
            &[("protocol", "h2")],
        )
        .await
        .expect("metrics");
    assert_eq!(timeouts, STREAMS as f64);
}

/// 20 HTTP/1.1 clients ask for 50 MB each and never read: once their sockets are full the
/// sidecar drops each connection after `send_timeout = "1s"` of no progress, and the app's
/// connections close with it. Before the fix they stayed as long as the clients did.
#[tokio::test]
async fn issue_21_http1_clients_that_never_read_release_their_app_connections() {
    const CLIENTS: usize = 20;
    let send_timeout = Duration::from_secs(1);
    let (_pki, app, sidecar, client) = setup(&[
        "send_timeout = \"1s\"",
        "idle_timeout = \"60s\"",
        "app_timeout = \"60s\"",
    ])
    .await;
    let addr = sidecar.inbound_addr();
    let mut idle_readers = Vec::new();
    for _ in 0..CLIENTS {
        let mut tls = client.connect(addr, Proto::H1).await.expect("connect");
        let head = format!("GET {EXPORT}?download=52428800 HTTP/1.1\r\nhost: localhost\r\n\r\n");
        tls.write_all(head.as_bytes()).await.expect("request");
        tls.flush().await.expect("flush");
        // Kept open, never read.
        idle_readers.push(tls);
    }
    let (pinned, released) = released_within(&app, CLIENTS, send_timeout).await;
    eprintln!(
        "http1 never-reading clients: {pinned} app connections pinned; all closed {released:?} \
         after the last request reached the app (send_timeout {send_timeout:?})"
    );
    let timeouts = sidecar
        .metric(
            "gatehouse_inbound_send_timeouts_total",
            &[("protocol", "http1")],
        )
        .await
        .expect("metrics");
    assert_eq!(timeouts, CLIENTS as f64);
    drop(idle_readers);
}
