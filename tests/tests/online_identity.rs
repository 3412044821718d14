//! Online identity end to end (issue 16): the real `ca serve` and two real sidecars
//! (report-service outbound → monolith inbound) enrolled with join tokens, under continuous
//! load: short SVIDs renewed several times with a new key each and no failed request, a CA
//! outage spanning a renewal, revocation through the CA, and no workload key on disk.
//!
//! Needs `target/debug/{ca,sidecar}`: run `cargo build --workspace --bins` first.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gatehouse_tests::harness::ca_serve::private_keys_under;
use gatehouse_tests::harness::{
    CaSandbox, CaServe, FakeApp, Sidecar, eventually, free_port, http_get, sidecar_cli,
    sidecar_status,
};
use gatehouse_tests::load::{Load, Sample, failures, one_request};

const TD: &str = "online.test";
/// SVID lifetime given to `ca serve`: renewals every ~2/3 of it.
const SVID_TTL: &str = "10s";

const POLICY: &str = r#"version = 1
trust_domain = "online.test"

[identities]
report-service = "spiffe://online.test/report-service"

[[route]]
name    = "api"
methods = ["GET"]
path    = "/api/**"
allow   = ["report-service"]
"#;

fn sandbox() -> CaSandbox {
    CaSandbox::new(TD, false)
}

fn serve(sb: &CaSandbox, listen: &str) -> CaServe {
    CaServe::start(sb, "ca", listen, &["--svid-ttl", SVID_TTL]).expect("ca serve starts")
}

fn identity(sb: &CaSandbox, ca: SocketAddr, name: &str) -> String {
    sb.identity(&[ca], name)
}

fn renewals(status: &serde_json::Value) -> u64 {
    status["online_identity"]["renewals"].as_u64().unwrap_or(0)
}

/// The monolith's sidecar (inbound, in front of a fake app) and report-service's (outbound to
/// it), both enrolling online with the CA endpoints `cas`.
async fn online_pair(sb: &CaSandbox, cas: &[SocketAddr]) -> (FakeApp, Sidecar, Sidecar) {
    let app = FakeApp::start().await;
    let monolith = Sidecar::online(&sb.identity(cas, "monolith"))
        .app(app.addr())
        .policy(POLICY)
        .spawn()
        .await
        .expect("monolith sidecar enrolls and becomes ready");
    let entry = format!(
        "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\n\
         server_id = \"spiffe://{TD}/monolith\"\n",
        monolith.inbound_addr()
    );
    let report = Sidecar::online(&sb.identity(cas, "report-service"))
        .section(&entry)
        .spawn()
        .await
        .expect("report-service sidecar enrolls and becomes ready");
    (app, monolith, report)
}

/// Both sidecars' logs, for a failure message.
fn pair_logs(monolith: &Sidecar, report: &Sidecar) -> String {
    format!(
        "--- monolith ---\n{}\n--- report-service ---\n{}",
        monolith.stderr_text(),
        report.stderr_text()
    )
}

/// Stops the load; asserts it ran (> 500 requests) and that no request failed.
async fn stop_load_without_failures(load: Load, logs: impl Fn() -> String) {
    let started = load.started;
    let (samples, elapsed) = load.stop().await;
    let failed = failures(&samples, started, Sample::is_200);
    println!(
        "{} requests in {elapsed:?}, {} failed",
        samples.len(),
        samples.iter().filter(|s| !s.is_200()).count()
    );
    assert!(samples.len() > 500, "the load ran: {}", samples.len());
    assert!(failed.is_empty(), "failed requests: {failed:?}\n{}", logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrolled_sidecars_renew_ride_out_a_ca_outage_and_are_revoked_through_the_ca() {
    let t0 = Instant::now();
    let sb = sandbox();
    let mut ca = serve(&sb, "127.0.0.1:0");
    let ca_addr = ca.addr();
    let (_app, monolith, report) = online_pair(&sb, &[ca_addr]).await;
    let logs = || pair_logs(&monolith, &report);
    let sidecars = [&monolith, &report];
    println!("both enrolled after {:?}", t0.elapsed());

    let out = report.listener("outbound:monolith");
    let load = Load::start(out, "/api/report", "monolith", 4, 100.0);
    load.wait_flowing().await;

    // 1. At least three renewals each (plus the enrollment), under load.
    for sc in sidecars {
        eventually("three renewals", Duration::from_secs(40), async || {
            (renewals(&sidecar_status(sc).await) >= 4).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    }
    println!("three renewals each after {:?}", t0.elapsed());

    // 2. The CA stops until one sidecar's renewal has failed, for at least 3 s; traffic keeps
    //    flowing on the current SVIDs; renewal resumes once the CA is back.
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for sc in sidecars {
            v.push(renewals(&sidecar_status(sc).await));
        }
        v
    };
    drop(ca);
    let down = Instant::now();
    let mut failed_one = None;
    eventually(
        "a renewal failing while the CA is down",
        Duration::from_secs(12),
        async || {
            for (i, sc) in sidecars.iter().enumerate() {
                let s = sidecar_status(sc).await;
                if s["online_identity"]["failures_in_a_row"].as_u64() >= Some(1) {
                    failed_one = Some(i);
                }
            }
            (failed_one.is_some() && down.elapsed() >= Duration::from_secs(3)).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let failed_one = failed_one.expect("set above");
    let outage = down.elapsed();
    ca = serve(&sb, &ca_addr.to_string());
    eventually("renewal resumes", Duration::from_secs(15), async || {
        let s = sidecar_status(sidecars[failed_one]).await;
        (renewals(&s) > before[failed_one]
            && s["online_identity"]["failures_in_a_row"].as_u64() == Some(0))
        .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    println!(
        "CA down for {outage:?}; renewal resumed {:?} after it came back",
        down.elapsed() - outage
    );

    stop_load_without_failures(load, logs).await;

    // Every renewal had a new key: serials and public keys differ in the inventory.
    let inventory = sb.inventory();
    for name in ["monolith", "report-service"] {
        let id = format!("spiffe://{TD}/{name}");
        let mine: Vec<&serde_json::Value> = inventory
            .iter()
            .filter(|e| e["spiffe_id"].as_str() == Some(id.as_str()))
            .collect();
        assert!(mine.len() >= 4, "{name}: {} issuances", mine.len());
        for field in ["serial", "sha256"] {
            let values: std::collections::BTreeSet<&str> =
                mine.iter().filter_map(|e| e[field].as_str()).collect();
            assert_eq!(
                values.len(),
                mine.len(),
                "{name}: distinct {field}s: {mine:?}"
            );
        }
    }
    // ... and the inventory's public-key digests say the same: one key per issuance.
    for name in ["monolith", "report-service"] {
        let id = format!("spiffe://{TD}/{name}");
        let keys: Vec<&str> = inventory
            .iter()
            .filter(|e| e["spiffe_id"].as_str() == Some(id.as_str()))
            .map(|e| e["public_key_sha256"].as_str().expect("public_key_sha256"))
            .collect();
        let distinct: std::collections::BTreeSet<&str> = keys.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "{name}: a key was reused: {keys:?}"
        );
    }

    // 3. Revocation through the CA cuts report-service's traffic within 10 s, no file copied.
    let serial = sidecar_status(&report).await["online_identity"]["serial"]
        .as_str()
        .expect("serial")
        .to_owned();
    let revoked_at = Instant::now();
    sb.revoke(&serial);
    let mut sender = None;
    eventually(
        "report-service refused",
        Duration::from_secs(10),
        async || {
            (one_request(out, &mut sender, "/api/report", "monolith").await != Ok(200))
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    println!(
        "revocation cut the traffic after {:?}",
        revoked_at.elapsed()
    );

    // 4. No workload key on disk: the sandbox (but the CA's own directory) and the sidecars'
    //    directories.
    let mut keys = sb.workload_keys_on_disk();
    for sc in sidecars {
        let dir = sc.policy_path().parent().expect("work dir").to_path_buf();
        keys.extend(private_keys_under(&dir, &|_| false));
    }
    assert!(keys.is_empty(), "private keys on disk: {keys:?}");
    drop(ca);
    println!("total {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_the_first_svid_and_check_does_not_contact_the_ca() {
    let sb = sandbox();
    // A CA address nobody listens on (yet): a port picked on a loopback address no other test
    // binds, so it stays free.
    let ip = [127, 0, 8, 2].into();
    let ca_addr = SocketAddr::new(ip, free_port(ip).expect("a free port on 127.0.8.2"));
    let app = FakeApp::start().await;
    let builder = Sidecar::online(&identity(&sb, ca_addr, "monolith"))
        .app(app.addr())
        .policy(POLICY);
    let config = builder.write();
    let out = sidecar_cli("check", &config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("(online)") && text.contains("not contacted by check"),
        "{text}"
    );

    let sc = builder.start().await.expect("sidecar starts");
    let admin = sc.admin_addr();
    let (code, body) = http_get(admin, "/readyz").await.expect("/readyz");
    assert_eq!(code.as_u16(), 503, "{body}");
    assert!(body.contains("waiting for the first SVID"), "{body}");
    let status = sidecar_status(&sc).await;
    assert_eq!(status["ready"], false, "{status}");
    assert_eq!(status["online_identity"]["renewals"], 0, "{status}");

    // The CA comes up on that address: the sidecar enrolls and becomes ready by itself.
    let _ca = serve(&sb, &ca_addr.to_string());
    eventually("/readyz 200", Duration::from_secs(15), async || {
        matches!(http_get(admin, "/readyz").await, Ok((c, _)) if c.as_u16() == 200).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
    let status = sidecar_status(&sc).await;
    assert_eq!(status["online_identity"]["renewals"], 1, "{status}");
    assert!(status["online_identity"]["serial"].is_string(), "{status}");
}

fn ca_endpoint(status: &serde_json::Value) -> Option<String> {
    status["online_identity"]["ca_endpoint"]
        .as_str()
        .map(str::to_owned)
}

/// Issue 18: two `ca serve` replicas on one real PostgreSQL, two sidecars listing both (A first,
/// `ca = [A, B]`) under continuous load. Replica A is killed: every renewal goes through B
/// within the same attempt (no failed renewal, no failed request). Then the database stops:
/// both replicas (A restarted) answer 503 and the sidecars keep serving on their current SVIDs;
/// the database comes back and renewal resumes with no restart of anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_killed_then_database_stopped_sidecars_renew_through_the_other_and_keep_serving() {
    let t0 = Instant::now();
    let mut pg = gatehouse_tests::postgres::Postgres::start()
        .await
        .expect("PostgreSQL starts (apt-get install postgresql)");
    let mut sb = sandbox();
    sb.use_store(&pg.url());
    let b_dir = sb.replica_dir("ca-b");
    let ttl = ["--svid-ttl", SVID_TTL];
    let a = CaServe::start(&sb, "ca", "127.0.0.1:0", &ttl).expect("replica A");
    let b = CaServe::start(&sb, &b_dir, "127.0.0.1:0", &ttl).expect("replica B");
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let (a_url, b_url) = (format!("https://{a_addr}"), format!("https://{b_addr}"));
    let (_app, monolith, report) = online_pair(&sb, &[a_addr, b_addr]).await;
    let sidecars = [&monolith, &report];
    let logs = || pair_logs(&monolith, &report);
    // Both enrolled through A, the first listed.
    for sc in sidecars {
        assert_eq!(
            ca_endpoint(&sidecar_status(sc).await).as_deref(),
            Some(a_url.as_str())
        );
    }
    let out = report.listener("outbound:monolith");
    let load = Load::start(out, "/api/report", "monolith", 4, 100.0);
    load.wait_flowing().await;

    // 1. Replica A killed: the next renewals go through B.
    let mut before = Vec::new();
    for sc in sidecars {
        before.push(renewals(&sidecar_status(sc).await));
    }
    a.kill();
    let killed = time::OffsetDateTime::now_utc();
    println!("replica A killed after {:?}", t0.elapsed());
    for (sc, n) in sidecars.iter().zip(&before) {
        eventually(
            "two renewals through B",
            Duration::from_secs(30),
            async || (renewals(&sidecar_status(sc).await) >= n + 2).then_some(()),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    }
    println!("two renewals each through B after {:?}", t0.elapsed());
    for sc in sidecars {
        let s = sidecar_status(sc).await;
        assert_eq!(ca_endpoint(&s).as_deref(), Some(b_url.as_str()), "{s}");
        for result in ["error", "refused"] {
            let failed = sc
                .metric("gatehouse_identity_renewals_total", &[("result", result)])
                .await
                .expect("metrics");
            assert_eq!(
                failed, 0.0,
                "renewals {result}: the failover is within one attempt"
            );
        }
    }
    // The inventory (PostgreSQL, `ca list --store`) holds the renewals issued since the kill:
    // only B was there to issue them, each with a new key.
    let inventory = sb.inventory();
    for name in ["monolith", "report-service"] {
        let id = format!("spiffe://{TD}/{name}");
        let since: Vec<&serde_json::Value> = inventory
            .iter()
            .filter(|e| e["spiffe_id"].as_str() == Some(id.as_str()) && e["source"] == "renew")
            .filter(|e| {
                e["issued_at"]
                    .as_str()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .is_some_and(|t| t >= killed.replace_millisecond(0).expect("ms"))
            })
            .collect();
        assert!(since.len() >= 2, "{name}: {since:?}");
    }

    // 2. A is back (same address), then the database stops: both replicas answer 503 and the
    //    sidecars keep serving on the SVIDs they hold.
    let a = CaServe::start(&sb, "ca", &a_addr.to_string(), &ttl).expect("replica A again");
    pg.stop();
    let stopped = Instant::now();
    let mut refused_one = None;
    eventually(
        "a renewal refused by both replicas",
        Duration::from_secs(15),
        async || {
            for (i, sc) in sidecars.iter().enumerate() {
                let s = sidecar_status(sc).await;
                let err = s["online_identity"]["last_error"].as_str().unwrap_or("");
                // Both replicas refuse: 503, or (when the outage outlasted a replica's own
                // serving certificate, which `ca serve` issues with `--svid-ttl` and cannot renew
                // without its database) a TLS refusal of that expired certificate. Either way
                // nothing is issued. At least one answered 503.
                let refused = err.matches("503 store_unavailable").count();
                let expired = err.matches("invalid peer certificate: Expired").count();
                if s["online_identity"]["failures_in_a_row"].as_u64() >= Some(1)
                    && refused >= 1
                    && refused + expired == 2
                {
                    refused_one = Some(i);
                }
            }
            refused_one
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let refused_one = refused_one.expect("set above");
    let held = renewals(&sidecar_status(sidecars[refused_one]).await);
    println!(
        "database down: renewal refused (503 at both replicas) after {:?}",
        stopped.elapsed()
    );

    // 3. The database is back: issuance resumes by itself.
    pg.restart().await.expect("PostgreSQL restarts");
    let down = stopped.elapsed();
    eventually("renewal resumes", Duration::from_secs(20), async || {
        let s = sidecar_status(sidecars[refused_one]).await;
        (renewals(&s) > held && s["online_identity"]["failures_in_a_row"].as_u64() == Some(0))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    println!(
        "database down {down:?}; renewal resumed {:?} after it came back",
        stopped.elapsed() - down
    );

    stop_load_without_failures(load, logs).await;
    let keys = sb.workload_keys_on_disk();
    assert!(keys.is_empty(), "private keys on disk: {keys:?}");
    drop((a, b));
    println!("total {:?}", t0.elapsed());
}
