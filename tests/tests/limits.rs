//! Per-caller `[[limit]]`s, end to end: the real `sidecar` binary in front of a fake app, real
//! mTLS clients with certificates from our CA. One caller over its rate gets 429, over its
//! concurrency 503, both with `retry-after`, while another caller's requests at the same time all
//! pass; the audit lines and metrics carry the reasons; a limit written for a pattern gives each
//! matching identity its own budget; a reload that changes the policy applies new limits, one
//! that leaves it unchanged keeps the budgets. Run `cargo build --workspace --bins` first.

use std::time::Duration;

use bytes::Bytes;
use gatehouse_tests::fintech_policy_head;
use gatehouse_tests::harness::fixtures::{GATEWAY, MONOLITH, REPORTS, TD};
use gatehouse_tests::harness::{FakeApp, MtlsClient, Pki, Proto, Sidecar, eventually};
use http::{Request, StatusCode};
use http_body_util::Full;

const POLICY: &str = concat!(
    fintech_policy_head!(),
    r#"api-gateway    = "spiffe://fintech.internal/api-gateway"
batch          = "spiffe://fintech.internal/batch/*"

[[route]]
name  = "api"
path  = "/api/**"
allow = ["report-service", "api-gateway", "batch"]

[[route]]
name  = "download"
path  = "/download"
allow = ["report-service", "api-gateway"]

[[limit]]
caller = "report-service"
route  = "api"
rate   = "3/m"

[[limit]]
caller      = "report-service"
route       = "download"
concurrency = 2

[[limit]]
caller      = "api-gateway"
rate        = "1000/s"
concurrency = 64

[[limit]]
caller = "batch"
rate   = "2/m"
"#
);

/// A large streamed body: its head arrives at once, its end only when the client reads it all.
const STREAMING: &str = "/download?download=67108864";

/// A PKI, the fake app and a monolith sidecar with [`POLICY`] in front of it (`section`
/// appended to its configuration).
async fn start(section: &str) -> (Pki, FakeApp, Sidecar) {
    let pki = Pki::new(TD);
    let app = FakeApp::start().await;
    let sidecar = Sidecar::inbound(&pki.issue(MONOLITH), app.addr(), POLICY)
        .section(section)
        .spawn()
        .await
        .expect("sidecar starts");
    (pki, app, sidecar)
}

fn retry_after(headers: &http::HeaderMap) -> u64 {
    headers
        .get(http::header::RETRY_AFTER)
        .expect("retry-after is sent")
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("whole seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_rate_429_over_concurrency_503_while_another_caller_passes() {
    let (pki, app, sidecar) = start("").await;
    let addr = sidecar.inbound_addr();
    let reports = MtlsClient::new(&pki.issue(REPORTS));
    let gateway = MtlsClient::new(&pki.issue(GATEWAY));

    // The api-gateway keeps calling both routes the whole time report-service is refused.
    let gw = gateway.clone();
    let gateway_load = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for i in 0..30 {
            let proto = if i % 2 == 0 { Proto::H1 } else { Proto::H2 };
            let path = if i % 3 == 0 {
                "/download"
            } else {
                "/api/orders"
            };
            let resp = gw.get(addr, proto, path).await.expect("gateway request");
            statuses.push(resp.status);
        }
        statuses
    });

    // Rate: a burst of 3, then 429 with the wait until the next token (20 s at 3/m).
    for proto in [Proto::H1, Proto::H2, Proto::H1] {
        let ok = reports.get(addr, proto, "/api/reports").await.expect("get");
        assert_eq!(ok.status, StatusCode::OK);
    }
    let mut rate_limited = 0;
    for proto in [Proto::H1, Proto::H2] {
        let refused = reports.get(addr, proto, "/api/reports").await.expect("get");
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{proto:?}");
        let wait = retry_after(&refused.headers);
        assert!((1..=20).contains(&wait), "retry-after {wait}");
        assert_eq!(refused.json()["reason"], "rate_limited");
        rate_limited += 1;
    }

    // Concurrency: two responses streaming (heads sent, bodies unread), one over HTTP/2; the
    // third request is refused with 503 until one of them is finished.
    let get = |path: &str| {
        Request::get(path)
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let first = reports
        .send(addr, Proto::H1, get(STREAMING))
        .await
        .expect("first");
    let second = reports
        .send(addr, Proto::H2, get(STREAMING))
        .await
        .expect("second");
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let mut overloaded = 0;
    for proto in [Proto::H1, Proto::H2] {
        let refused = reports.get(addr, proto, "/download").await.expect("get");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{proto:?}");
        assert!(retry_after(&refused.headers) >= 1);
        assert_eq!(refused.json()["reason"], "overloaded");
        overloaded += 1;
    }
    // The HTTP/2 stream's end (the client resets it) releases its slot.
    drop(second);
    eventually(
        "a slot freed by the reset stream",
        Duration::from_secs(10),
        async || {
            let r = reports.get(addr, Proto::H1, "/download").await.ok()?;
            match r.status {
                StatusCode::OK => Some(()),
                StatusCode::SERVICE_UNAVAILABLE => {
                    overloaded += 1;
                    None
                }
                other => panic!("unexpected {other}"),
            }
        },
    )
    .await
    .expect("the concurrency slot comes back");
    drop(first);

    let statuses = gateway_load.await.expect("gateway task");
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "every api-gateway request passes: {statuses:?}"
    );
    // Refused requests never reach the app: 3 within the rate, 2 streaming, 1 after the
    // release, 30 from the api-gateway.
    assert_eq!(app.count(), 36);

    // Audit lines: one per refusal, with its reason and the status sent.
    let audit = eventually(
        "the refusals' audit lines",
        Duration::from_secs(10),
        async || {
            let a = sidecar.audit();
            let n = |reason: &str| a.iter().filter(|l| l["reason"] == reason).count();
            (n("rate_limited") == rate_limited && n("overloaded") == overloaded).then_some(a)
        },
    )
    .await
    .expect("audit lines");
    for l in audit.iter().filter(|l| l["reason"] == "rate_limited") {
        assert_eq!(l["caller"], REPORTS);
        assert_eq!(l["status"], 429);
        assert_eq!(l["decision"], "reject");
        assert_eq!(l["route"], "api");
    }
    for l in audit.iter().filter(|l| l["reason"] == "overloaded") {
        assert_eq!(l["caller"], REPORTS);
        assert_eq!(l["status"], 503);
        assert_eq!(l["route"], "download");
    }
    assert!(
        audit
            .iter()
            .filter(|l| l["caller"] == GATEWAY)
            .all(|l| l["reason"] == "allowed"),
        "no api-gateway request was limited"
    );

    // Metrics by caller and reason.
    let limited = "gatehouse_inbound_limited_total";
    let count = |caller: &'static str, reason: &'static str| {
        let sidecar = &sidecar;
        async move {
            sidecar
                .metric(limited, &[("caller", caller), ("reason", reason)])
                .await
                .expect("metrics")
        }
    };
    assert_eq!(
        count("report-service", "rate_limited").await,
        rate_limited as f64
    );
    assert_eq!(
        count("report-service", "overloaded").await,
        overloaded as f64
    );
    assert_eq!(
        sidecar
            .metric(limited, &[("caller", "api-gateway")])
            .await
            .expect("metrics"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_for_a_pattern_gives_each_identity_its_own_budget() {
    let (pki, app, sidecar) = start("").await;
    let addr = sidecar.inbound_addr();
    let a = MtlsClient::new(&pki.issue("spiffe://fintech.internal/batch/a"));
    let b = MtlsClient::new(&pki.issue("spiffe://fintech.internal/batch/b"));

    // batch/a spends its burst of 2 and is refused ...
    for _ in 0..2 {
        let r = a.get(addr, Proto::H1, "/api/jobs").await.expect("get");
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = a.get(addr, Proto::H1, "/api/jobs").await.expect("get");
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // ... and batch/b, under the same `batch/*` limit, still has its own.
    for _ in 0..2 {
        let r = b.get(addr, Proto::H2, "/api/jobs").await.expect("get");
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = b.get(addr, Proto::H2, "/api/jobs").await.expect("get");
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    // Identities behind a pattern are not policy aliases: their metric caller is `other`.
    eventually("the metric", Duration::from_secs(10), async || {
        let n = sidecar
            .metric(
                "gatehouse_inbound_limited_total",
                &[("caller", "other"), ("reason", "rate_limited")],
            )
            .await
            .ok()?;
        (n == 2.0).then_some(())
    })
    .await
    .expect("two rate_limited for `other`");
    assert_eq!(app.count(), 4, "refused requests never reach the app");
}

/// Waits until `gatehouse_reloads_total{what,result="ok"}` reaches `at_least`.
async fn wait_reload(sc: &Sidecar, what: &str, at_least: f64) {
    let labels = &[("what", what), ("result", "ok")];
    eventually("the reload", Duration::from_secs(10), async || {
        let v = sc.metric("gatehouse_reloads_total", labels).await.ok()?;
        (v >= at_least).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_limits_applies_and_one_that_does_not_keeps_budgets() {
    let (pki, _app, sidecar) =
        start("[reload]\ndebounce = \"50ms\"\npoll_interval = \"1s\"\n").await;
    let addr = sidecar.inbound_addr();
    let a = MtlsClient::new(&pki.issue("spiffe://fintech.internal/batch/a"));
    let status = async || {
        a.get(addr, Proto::H1, "/api/jobs")
            .await
            .expect("get")
            .status
    };
    for _ in 0..2 {
        assert_eq!(status().await, StatusCode::OK);
    }
    assert_eq!(status().await, StatusCode::TOO_MANY_REQUESTS);

    // SIGHUP with the policy unchanged: a new snapshot, the same budgets (no refill).
    sidecar.sighup();
    wait_reload(&sidecar, "none", 1.0).await;
    assert_eq!(status().await, StatusCode::TOO_MANY_REQUESTS);

    // A policy that raises the limit: new requests get the new budgets.
    let raised = POLICY.replace("rate   = \"2/m\"", "rate   = \"100/s\"");
    assert_ne!(raised, POLICY);
    let path = sidecar.policy_path();
    let tmp = path.with_extension("tmp-test");
    std::fs::write(&tmp, raised).expect("write policy");
    std::fs::rename(&tmp, &path).expect("replace policy");
    wait_reload(&sidecar, "policy", 1.0).await;
    for _ in 0..5 {
        assert_eq!(status().await, StatusCode::OK);
    }
}
