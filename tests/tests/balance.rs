//! Issue 15: one outbound balanced over every endpoint a DNS name returns (a real dnsmasq on
//! loopback, three real monolith inbound sidecars on 127.0.0.1, .2 and .3 with one port), and
//! an endpoint killed mid-load is ejected while no request fails.

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
const QUERY: &str = "/api/data/reports?startDate=2024-01-01&endDate=2024-12-31";

type Http = Client<HttpConnector, Full<Bytes>>;

async fn get(http: &Http, url: &str) -> StatusCode {
    let req = Request::get(url).body(Full::default()).expect("request");
    match http.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            status
        }
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
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
    let mut apps = Vec::new();
    let mut sidecars = Vec::new();
    let mut port = 0;
    for (i, cert) in certs.into_iter().enumerate() {
        let app = FakeApp::start().await;
        let listen = SocketAddr::new(ip(&format!("127.0.0.{}", i + 1)), port);
        let sc = Sidecar::inbound(cert, app.addr(), REPORT_EXPORT_POLICY)
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
    let outbound = outbound_sidecar(reports, &dns, port).await;
    (apps, sidecars, port, dns, outbound)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

/// The report service's sidecar: one outbound to every A record of [`NAME`] at `port`.
async fn outbound_sidecar(cert: &CertDir, dns: &Dnsmasq, port: u16) -> Sidecar {
    Sidecar::builder(cert)
        .section(&format!(
            "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{NAME}:{port}\"\n\
             server_id = \"{MONOLITH_ID}\"\nresolver = \"{}\"\ndns_min_ttl = \"1s\"\nslow_start = \"0s\"\n",
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

    // 3,000 requests at concurrency 8: each endpoint gets 25–42 % of them.
    let failed = load(&http, &url, 3000, 8).await;
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
