//! Issue 15: one outbound balanced over every endpoint a DNS name returns (a real dnsmasq on
//! loopback, three real monolith inbound sidecars on 127.0.0.1, .2 and .3 with one port): the
//! spread, an endpoint killed mid-load (ejected, no request fails, used again once back), a
//! fourth A record (warming, then traffic), a slow endpoint (few requests, p99 kept), an
//! impostor endpoint, and `retry_idempotent` (GETs retried on a 503 within the budget, POSTs
//! never).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_tests::dns::Dnsmasq;
use gatehouse_tests::harness::app::FakeApp;
use gatehouse_tests::harness::fixtures::{GATEWAY, REPORT_EXPORT_POLICY};
use gatehouse_tests::harness::pki::{CertDir, Pki};
use gatehouse_tests::harness::sidecar::Sidecar;
use gatehouse_tests::harness::{FINTECH_TD, MONOLITH_ID, REPORT_SERVICE_ID};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const NAME: &str = "monolith.fleet.test";
/// The report export and `POST /bulk` (for the test that shows POSTs are never retried).
const BULK_POLICY: &str = concat!(
    gatehouse_tests::fintech_policy_head!(),
    gatehouse_tests::report_export_route!(),
    gatehouse_tests::bulk_transfer_route!()
);
const QUERY: &str = "/api/data/reports?startDate=2024-01-01&endDate=2024-12-31";

type Http = Client<HttpConnector, Full<Bytes>>;

async fn get(http: &Http, url: &str) -> StatusCode {
    send(http, Request::get(url), StatusCode::SERVICE_UNAVAILABLE).await
}

/// Sends `req` with an empty body; its status once the body is read, or `failed` when there
/// was no response.
async fn send(http: &Http, req: http::request::Builder, failed: StatusCode) -> StatusCode {
    let req = req.body(Full::default()).expect("request");
    match http.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            status
        }
        Err(_) => failed,
    }
}

/// `n` requests at concurrency `c`; the count of those not answered 200.
async fn load(http: &Http, url: &str, n: usize, c: usize) -> usize {
    let left = Arc::new(AtomicUsize::new(n));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..c {
        let (http, url, left, failed) =
            (http.clone(), url.to_owned(), left.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
                .is_ok()
            {
                if get(&http, &url).await != StatusCode::OK {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    failed.load(Ordering::Relaxed)
}

/// Three monolith tasks on 127.0.0.1, .2 and .3 with one port (an app and an inbound sidecar
/// each, with the given certificates), the DNS server with their A records, and the report
/// service's outbound sidecar: the apps, the sidecars, the port, the DNS server, the outbound.
async fn fleet(
    certs: [&CertDir; 3],
    reports: &CertDir,
) -> (Vec<FakeApp>, Vec<Sidecar>, u16, Dnsmasq, Sidecar) {
    fleet_with(
        certs,
        reports,
        "slow_start = \"0s\"\n",
        REPORT_EXPORT_POLICY,
    )
    .await
}

/// [`fleet`] with `keys` (TOML lines) in the outbound entry and `policy` on the monolith's
/// sidecars.
async fn fleet_with(
    certs: [&CertDir; 3],
    reports: &CertDir,
    keys: &str,
    policy: &str,
) -> (Vec<FakeApp>, Vec<Sidecar>, u16, Dnsmasq, Sidecar) {
    let mut apps = Vec::new();
    let mut sidecars = Vec::new();
    let mut port = 0;
    for (i, cert) in certs.into_iter().enumerate() {
        let app = FakeApp::start().await;
        let listen = SocketAddr::new(ip(&format!("127.0.0.{}", i + 1)), port);
        let sc = Sidecar::inbound(cert, app.addr(), policy)
            .inbound_listen(listen)
            .spawn()
            .await
            .expect("monolith-side sidecar starts");
        port = sc.inbound_addr().port();
        apps.push(app);
        sidecars.push(sc);
    }
    let dns = Dnsmasq::start(
        &[
            (NAME, ip("127.0.0.1")),
            (NAME, ip("127.0.0.2")),
            (NAME, ip("127.0.0.3")),
        ],
        1,
    );
    let outbound = outbound_sidecar(reports, &dns, port, keys).await;
    (apps, sidecars, port, dns, outbound)
}

/// A fresh PKI, the monolith's certificate, and [`fleet_with`] three monolith tasks (`keys` in
/// the outbound entry, `policy` on the monolith's sidecars).
async fn monolith_fleet(
    keys: &str,
    policy: &str,
) -> (
    Pki,
    CertDir,
    (Vec<FakeApp>, Vec<Sidecar>, u16, Dnsmasq, Sidecar),
) {
    let pki = Pki::new(FINTECH_TD);
    let monolith = pki.issue(MONOLITH_ID);
    let reports = pki.issue(REPORT_SERVICE_ID);
    let fleet = fleet_with([&monolith, &monolith, &monolith], &reports, keys, policy).await;
    (pki, monolith, fleet)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

/// The report service's sidecar: one outbound to every A record of [`NAME`] at `port`, with
/// `keys` (TOML lines) added to the entry.
async fn outbound_sidecar(cert: &CertDir, dns: &Dnsmasq, port: u16, keys: &str) -> Sidecar {
    Sidecar::builder(cert)
        .section(&format!(
            "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{NAME}:{port}\"\n\
             server_id = \"{MONOLITH_ID}\"\nresolver = \"{}\"\ndns_min_ttl = \"1s\"\n{keys}",
            dns.addr()
        ))
        .spawn()
        .await
        .expect("outbound sidecar starts")
}

fn endpoint_state(status: &serde_json::Value, addr: SocketAddr) -> Option<String> {
    status["upstreams"]["monolith"]["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["addr"] == addr.to_string().as_str())
        .and_then(|e| e["state"].as_str().map(str::to_owned))
}

/// The two tests run one at a time: each starts four sidecars, and on two cores the other
/// test's load skews the latencies the balancer weighs, and so the measured spread.
static ONE_FLEET_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_every_a_record_and_a_killed_endpoint_is_ejected() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let pki = Pki::new(FINTECH_TD);
    let monolith = pki.issue(MONOLITH_ID);
    let reports = pki.issue(REPORT_SERVICE_ID);

    let (apps, mut sidecars, port, dns, outbound) =
        fleet([&monolith, &monolith, &monolith], &reports).await;
    let url = format!("http://{}{QUERY}", outbound.listener("outbound:monolith"));
    let http: Http = Client::builder(TokioExecutor::new()).build_http();

    // 3,000 requests at concurrency 8: each endpoint gets 25–42 % of them. Each app takes 3 ms,
    // as a service does: the endpoints are then equal, as the test means them to be. With apps
    // that answer in microseconds the latency is only the three sidecars' turns on two shared
    // CPUs, which differ for seconds at a time under a loaded CI machine, and a latency-aware
    // balancer rightly follows that (24.4 % and 43.9 % seen; see DESIGN-NOTES).
    for app in &apps {
        app.set_delay(Duration::from_millis(3));
    }
    let failed = load(&http, &url, 3000, 8).await;
    for app in &apps {
        app.set_delay(Duration::ZERO);
    }
    assert_eq!(failed, 0, "no request fails while every endpoint is up");
    let counts: Vec<usize> = apps.iter().map(FakeApp::count).collect();
    eprintln!("requests per endpoint (127.0.0.1, .2, .3): {counts:?}");
    let total: usize = counts.iter().sum();
    assert_eq!(total, 3000, "{counts:?}");
    for (i, c) in counts.iter().enumerate() {
        let share = *c as f64 / total as f64;
        assert!(
            (0.25..=0.42).contains(&share),
            "endpoint 127.0.0.{} got {:.1} % of the requests ({counts:?})",
            i + 1,
            share * 100.0
        );
    }

    // Kill the third endpoint's sidecar mid-load: once 2 s have passed, no request fails, and
    // /status shows it ejected.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let mut background = Vec::new();
    for _ in 0..8 {
        let (http, url, stop, failures) =
            (http.clone(), url.clone(), stop.clone(), failures.clone());
        background.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                if get(&http, &url).await != StatusCode::OK {
                    failures.lock().unwrap().push(Instant::now());
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_addr = sidecars[2].inbound_addr();
    drop(sidecars.pop()); // SIGKILL
    let killed = Instant::now();
    outbound
        .wait_status("the killed endpoint ejected", |s| {
            endpoint_state(s, killed_addr).as_deref() == Some("ejected")
        })
        .await;
    // Keep the load on well past the 2 s mark.
    tokio::time::sleep_until((killed + Duration::from_secs(4)).into()).await;
    stop.store(true, Ordering::Release);
    for t in background {
        t.await.expect("load task");
    }
    let failures = failures.lock().unwrap().clone();
    let late = failures
        .iter()
        .filter(|t| t.saturating_duration_since(killed) > Duration::from_secs(2))
        .count();
    assert_eq!(
        late,
        0,
        "{late} requests failed more than 2 s after the endpoint was killed ({} in all)",
        failures.len()
    );
    let status = outbound.status_json().await.expect("/status");
    assert_eq!(status["upstreams"]["monolith"]["panic"], false, "{status}");

    // The task comes back on the same address: it gets requests again within 30 s (its
    // ejection back-off grows while it is down, at most 15 s).
    let _back = Sidecar::inbound(&monolith, apps[2].addr(), REPORT_EXPORT_POLICY)
        .inbound_listen(killed_addr)
        .spawn()
        .await
        .expect("the killed endpoint's sidecar restarts");
    let back = Instant::now();
    let before = apps[2].count();
    while apps[2].count() == before {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "the endpoint back on its address got no request within 30 s"
        );
        assert_eq!(load(&http, &url, 40, 4).await, 0);
    }
    eprintln!("restarted endpoint used again after {:?}", back.elapsed());

    // A fourth task and A record (the killed one's record removed): it gets traffic within 15 s.
    let app4 = FakeApp::start().await;
    let _sc4 = Sidecar::inbound(&monolith, app4.addr(), REPORT_EXPORT_POLICY)
        .inbound_listen(SocketAddr::new(ip("127.0.0.4"), port))
        .spawn()
        .await
        .expect("fourth monolith sidecar starts");
    dns.set_records(&[
        (NAME, ip("127.0.0.1")),
        (NAME, ip("127.0.0.2")),
        (NAME, ip("127.0.0.4")),
    ]);
    let added = Instant::now();
    while app4.count() == 0 {
        assert!(
            added.elapsed() < Duration::from_secs(15),
            "the new endpoint got no request within 15 s"
        );
        assert_eq!(load(&http, &url, 40, 4).await, 0);
    }
    eprintln!("new endpoint used after {:?}", added.elapsed());
    let ejections = outbound
        .metric(
            "gatehouse_outbound_ejections_total",
            &[("upstream", "monolith")],
        )
        .await
        .expect("metrics");
    assert!(ejections >= 1.0, "ejections counted: {ejections}");
}

/// An endpoint whose sidecar presents another identity than `server_id` (an api-gateway
/// certificate from the same CA): ejected, never sent a request byte, and the requests that
/// tried it went to another endpoint instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_with_the_wrong_identity_is_ejected_and_gets_no_request() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let pki = Pki::new(FINTECH_TD);
    let monolith = pki.issue(MONOLITH_ID);
    let impostor = pki.issue(GATEWAY);
    let reports = pki.issue(REPORT_SERVICE_ID);

    let (apps, sidecars, _port, _dns, outbound) =
        fleet([&monolith, &monolith, &impostor], &reports).await;
    let url = format!("http://{}{QUERY}", outbound.listener("outbound:monolith"));
    let http: Http = Client::builder(TokioExecutor::new()).build_http();

    let failed = load(&http, &url, 300, 4).await;
    assert_eq!(failed, 0, "requests that tried the impostor went elsewhere");
    assert_eq!(apps[2].count(), 0, "the impostor's app saw a request");
    assert_eq!(apps[0].count() + apps[1].count(), 300);
    let impostor_addr = sidecars[2].inbound_addr();
    let status = outbound.status_json().await.expect("/status");
    assert_eq!(
        endpoint_state(&status, impostor_addr).as_deref(),
        Some("ejected"),
        "{status}"
    );
    // The impostor's sidecar never decided on a request (no audit line).
    assert!(sidecars[2].audit().is_empty(), "{:?}", sidecars[2].audit());
}

/// One request's latency and the app that answered it (`x-app-addr`), or `None` when it
/// failed.
type Timed = Option<(Duration, String)>;

/// `n` GETs at concurrency `c`, each timed and named by the app that answered.
async fn timed_load(http: &Http, url: &str, n: usize, c: usize) -> Vec<Timed> {
    let left = Arc::new(AtomicUsize::new(n));
    let mut tasks = Vec::new();
    for _ in 0..c {
        let (http, url, left) = (http.clone(), url.to_owned(), left.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
                .is_ok()
            {
                let started = Instant::now();
                let req = Request::get(&url).body(Full::default()).expect("request");
                let timed = match http.request(req).await {
                    Ok(resp) if resp.status() == StatusCode::OK => {
                        let app = resp.headers().get("x-app-addr").cloned();
                        let _ = resp.into_body().collect().await;
                        app.and_then(|a| a.to_str().ok().map(str::to_owned))
                            .map(|a| (started.elapsed(), a))
                    }
                    _ => None,
                };
                out.push(timed);
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

fn p99(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort_unstable();
    let i = (latencies.len() * 99).div_ceil(100).saturating_sub(1);
    latencies.get(i).copied().unwrap_or_default()
}

/// One endpoint answering 200 ms slower than the others: it gets under 15 % of the requests,
/// and the p99 through the outbound stays under twice the fast endpoints' p99 (measured in the
/// same run, over the requests the fast apps answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_gets_few_requests_and_the_p99_stays_near_the_fast_ones() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let (_pki, _, (apps, _sidecars, _port, _dns, outbound)) =
        monolith_fleet("slow_start = \"0s\"\n", REPORT_EXPORT_POLICY).await;
    apps[2].set_delay(Duration::from_millis(200));
    let slow = apps[2].addr().to_string();
    let url = format!("http://{}{QUERY}", outbound.listener("outbound:monolith"));
    let http: Http = Client::builder(TokioExecutor::new()).build_http();

    let timed = timed_load(&http, &url, 3000, 8).await;
    let ok: Vec<&(Duration, String)> = timed.iter().flatten().collect();
    assert_eq!(ok.len(), 3000, "every request got 200");
    let on_slow = ok.iter().filter(|(_, app)| *app == slow).count();
    let fast = p99(ok
        .iter()
        .filter(|(_, app)| *app != slow)
        .map(|(d, _)| *d)
        .collect());
    let all = p99(ok.iter().map(|(d, _)| *d).collect());
    let share = on_slow as f64 / ok.len() as f64;
    eprintln!(
        "slow endpoint: {on_slow} of {} requests ({:.2} %); p99 through the outbound {all:?}, \
         fast endpoints' p99 {fast:?}",
        ok.len(),
        share * 100.0
    );
    assert!(share < 0.15, "the slow endpoint got {:.1} %", share * 100.0);
    assert!(
        all < fast * 2,
        "p99 {all:?} is not under twice the fast endpoints' p99 {fast:?} \
         ({on_slow} requests on the slow endpoint)"
    );
}

/// A fourth A record added to the DNS server: `/status` shows the new endpoint warming up
/// (slow start) first, and it gets traffic within 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_a_record_warms_up_and_gets_traffic_within_15_s() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let (_pki, monolith, (_apps, _sidecars, port, dns, outbound)) =
        monolith_fleet("slow_start = \"5s\"\n", REPORT_EXPORT_POLICY).await;
    let url = format!("http://{}{QUERY}", outbound.listener("outbound:monolith"));
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    assert_eq!(load(&http, &url, 100, 4).await, 0);

    let app4 = FakeApp::start().await;
    let fourth = SocketAddr::new(ip("127.0.0.4"), port);
    let _sc4 = Sidecar::inbound(&monolith, app4.addr(), REPORT_EXPORT_POLICY)
        .inbound_listen(fourth)
        .spawn()
        .await
        .expect("fourth monolith sidecar starts");
    dns.set_records(&[
        (NAME, ip("127.0.0.1")),
        (NAME, ip("127.0.0.2")),
        (NAME, ip("127.0.0.3")),
        (NAME, ip("127.0.0.4")),
    ]);
    let added = Instant::now();
    // Load keeps running while /status is watched for the new endpoint's first state.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (http, url, stop) = (http.clone(), url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failed = 0;
            while !stop.load(Ordering::Acquire) {
                failed += load(&http, &url, 20, 4).await;
            }
            failed
        })
    };
    let first_state = loop {
        assert!(
            added.elapsed() < Duration::from_secs(15),
            "the fourth endpoint never appeared in /status"
        );
        let status = outbound.status_json().await.expect("/status");
        if let Some(state) = endpoint_state(&status, fourth) {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first_state, "warming", "a new endpoint warms up first");
    while app4.count() == 0 {
        assert!(
            added.elapsed() < Duration::from_secs(15),
            "the new endpoint got no request within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let used_after = added.elapsed();
    stop.store(true, Ordering::Release);
    assert_eq!(background.await.expect("load task"), 0, "no request failed");
    eprintln!("fourth endpoint: first seen warming, used after {used_after:?}");
}

async fn post(http: &Http, url: &str) -> StatusCode {
    send(http, Request::post(url), StatusCode::BAD_GATEWAY).await
}

/// `retry_idempotent = true` with one endpoint answering 503: every GET succeeds (the 503s
/// are retried on another endpoint), a POST that met the 503 gets it (never retried), and
/// with every endpoint answering 503 the retries stay within the budget (20 % of the requests
/// plus 10 per second over 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_idempotent_retries_gets_on_a_503_within_the_budget_and_never_posts() {
    let _one = ONE_FLEET_AT_A_TIME.lock().await;
    let (_pki, _, (apps, sidecars, _port, _dns, outbound)) = monolith_fleet(
        "slow_start = \"0s\"\nretry_idempotent = true\n",
        BULK_POLICY,
    )
    .await;
    let t0 = Instant::now();
    let url = format!("http://{}{QUERY}", outbound.listener("outbound:monolith"));
    let bulk = format!("http://{}/bulk", outbound.listener("outbound:monolith"));
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    apps[2].set_status(StatusCode::SERVICE_UNAVAILABLE);
    let retries = async |reason: &str| {
        outbound
            .metric(
                "gatehouse_outbound_retries_total",
                &[("upstream", "monolith"), ("reason", reason)],
            )
            .await
            .expect("metrics")
    };
    let posts_seen = |app: &FakeApp| {
        app.requests()
            .iter()
            .filter(|r| r.method == http::Method::POST)
            .count()
    };

    // POSTs (without a body: their head is kept, yet a 503 is never retried), eight at a time
    // (with nothing outstanding, an endpoint not tried yet loses every pick to faster ones),
    // until one met the failing endpoint.
    let (mut sent, mut got_503) = (0, 0);
    let started = Instant::now();
    while posts_seen(&apps[2]) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no POST reached the failing endpoint"
        );
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (http, bulk) = (http.clone(), bulk.clone());
            batch.spawn(async move { post(&http, &bulk).await });
        }
        for status in batch.join_all().await {
            sent += 1;
            match status {
                StatusCode::OK => {}
                StatusCode::SERVICE_UNAVAILABLE => got_503 += 1,
                other => panic!("POST answered {other}"),
            }
        }
    }
    let seen: Vec<usize> = apps.iter().map(posts_seen).collect();
    assert_eq!(
        seen.iter().sum::<usize>(),
        sent,
        "each POST sent once: {seen:?}"
    );
    assert_eq!(
        got_503, seen[2],
        "every POST the failing app saw got its 503"
    );
    assert_eq!(retries("status_503").await, 0.0, "no POST retried");

    // GETs: all 200; the failing app's GETs were each retried once elsewhere. (The POSTs' 503s
    // may have ejected it: wait until it is tried again.)
    let failing = sidecars[2].inbound_addr();
    outbound
        .wait_status("the failing endpoint back from its ejection", |s| {
            endpoint_state(s, failing).as_deref() == Some("active")
        })
        .await;
    let failed = load(&http, &url, 600, 8).await;
    assert_eq!(failed, 0, "every GET succeeded");
    let gets_on_503 = apps[2].count() - seen[2];
    assert!(gets_on_503 >= 1, "no GET met the failing endpoint");
    assert_eq!(retries("status_503").await, gets_on_503 as f64);
    eprintln!("POSTs: {sent} sent, {got_503} answered 503; GETs: {gets_on_503} retried of 600");

    // Every endpoint fails: retries stop at the budget (the 503s reach the app).
    for app in &apps {
        app.set_status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let before = retries("status_503").await;
    let n = 1000;
    let failed = load(&http, &url, n, 8).await;
    assert_eq!(failed, n, "every endpoint answers 503");
    let retried = retries("status_503").await - before;
    let exhausted = outbound
        .metric(
            "gatehouse_outbound_retry_budget_exhausted_total",
            &[("upstream", "monolith")],
        )
        .await
        .expect("metrics");
    let requests = (sent + 600 + n) as f64;
    // The reserve (10/s over a 10 s window) renews with each window the test spanned.
    let windows = (t0.elapsed().as_secs() / 10 + 1) as f64;
    eprintln!("all failing: {retried} retries for {n} GETs, {exhausted} refused by the budget");
    assert!(
        before + retried <= 0.2 * requests + 100.0 * windows,
        "retries {} over the budget for {requests} requests",
        before + retried
    );
    assert!(exhausted > 0.0, "the budget refused retries");
}
