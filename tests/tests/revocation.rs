//! CRL semantics in the sidecar and the CA tool (issue 21, findings 10, 11 and 13), over the
//! real `sidecar` and `ca` binaries and real TLS:
//!
//! - `issue_21_stale_crl_warns_is_measured_and_acts_past_the_grace_period`: a CRL past its
//!   next-update is logged, its next-update is a metric, and beyond `crl_grace` the default
//!   (`refuse`) refuses new handshakes and fails `/readyz`, `unready` only fails `/readyz`,
//!   `warn` keeps serving; all as time passes, with no reload; a fresh CRL restores service;
//! - `issue_21_older_crl_is_refused_and_the_serving_one_kept`: a validly signed CRL with a
//!   lower CRL number is refused at reload, the revoked client stays refused;
//! - `issue_21_crl_missing_a_bundle_root_is_refused_naming_it`: a bundle with a root the CRL
//!   file has no CRL from is refused at reload (and by `sidecar check`), naming that root;
//! - `issue_21_root_rotation_with_a_crl_under_load_fails_no_request`: the README's root
//!   rotation (`ca root rotate`, two roots, `ca rotate --force`, `ca root retire`) with
//!   `[identity] crl` set on an inbound + outbound pair under continuous load: zero failures.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gatehouse_tests::harness::{
    CertDir, FakeApp, MtlsClient, Pki, Proto, Sidecar, ca_json as ca, eventually, sidecar_cli,
    sidecar_status as status, wait_status,
};
use gatehouse_tests::load::{Load, Sample, failures};
use http::StatusCode;

const TD: &str = "revocation.test";
const SERVER_ID: &str = "spiffe://revocation.test/monolith";
const CLIENT_ID: &str = "spiffe://revocation.test/report-service";
const PATH: &str = "/api/data/reports";

/// Quick reload settings: file events plus a 1 s polling fallback (also the freshness tick).
const RELOAD: &str = "[reload]\ndebounce = \"50ms\"\npoll_interval = \"1s\"\n";

const POLICY: &str = r#"version = 1
trust_domain = "revocation.test"

[identities]
report-service = "spiffe://revocation.test/report-service"

[[route]]
name    = "api"
methods = ["GET"]
path    = "/api/**"
allow   = ["report-service"]
"#;

fn ca_dir(pki: &Pki) -> String {
    pki.authority().dir().display().to_string()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

async fn metric(sc: &Sidecar, name: &str, labels: &[(&str, &str)]) -> f64 {
    sc.metric(name, labels).await.expect("metrics")
}

/// Waits until `gatehouse_reloads_total{what,result}` reaches `at_least` (any result when
/// `result` is empty).
async fn wait_reloads(sc: &Sidecar, what: &str, result: &str, at_least: f64) {
    let mut labels = vec![("what", what)];
    if !result.is_empty() {
        labels.push(("result", result));
    }
    eventually("reload counted", Duration::from_secs(15), async || {
        (metric(sc, "gatehouse_reloads_total", &labels).await >= at_least).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
}

async fn wait_log(sc: &Sidecar, needle: &str) {
    eventually(needle, Duration::from_secs(15), async || {
        sc.stderr_text().contains(needle).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
}

async fn readyz(sc: &Sidecar) -> StatusCode {
    sc.admin_get("/readyz").await.expect("/readyz").0
}

/// A fresh-connection GET through mTLS: the status, or the error (a refused handshake).
async fn get(client: &MtlsClient, sc: &Sidecar) -> Result<u16, String> {
    client
        .get(sc.inbound_addr(), Proto::H1, PATH)
        .await
        .map(|r| r.status.as_u16())
        .map_err(|e| format!("{e:#}"))
}

/// An inbound sidecar for `server` in front of `app`, with `crl` and extra `[identity]` lines.
async fn inbound(server: &CertDir, app: &FakeApp, crl: &Path, identity: &str) -> Sidecar {
    Sidecar::inbound(server, app.addr(), POLICY)
        .crl(crl)
        .section(RELOAD)
        .identity_option(identity)
        .spawn()
        .await
        .expect("inbound sidecar starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_stale_crl_warns_is_measured_and_acts_past_the_grace_period() {
    let pki = Pki::new(TD);
    let app = FakeApp::start().await;
    let server = pki.issue(SERVER_ID);
    let client = MtlsClient::new(&pki.issue(CLIENT_ID));
    let crl = pki.fresh_dir("crl").join("crl.pem");
    // Stale 4 s after it is written; the grace period ends 2 s later.
    ca(&[
        "crl",
        "--dir",
        &ca_dir(&pki),
        "--out",
        &s(&crl),
        "--ttl",
        "4s",
    ])
    .await;
    let written = time::OffsetDateTime::now_utc().unix_timestamp();
    let grace = "crl_grace = \"2s\"";
    let refuse = inbound(&server, &app, &crl, grace).await;
    let unready = inbound(
        &server,
        &app,
        &crl,
        &format!("{grace}\ncrl_stale = \"unready\""),
    )
    .await;
    let warn = inbound(
        &server,
        &app,
        &crl,
        &format!("{grace}\ncrl_stale = \"warn\""),
    )
    .await;

    // The next-update is a metric, per issuer.
    let next = metric(&refuse, "gatehouse_crl_next_update_timestamp_seconds", &[]).await;
    assert!(
        (next - (written + 4) as f64).abs() <= 2.0,
        "next-update {next}, written at {written}"
    );
    for sc in [&refuse, &unready, &warn] {
        assert_eq!(get(&client, sc).await, Ok(200));
    }

    // Past next-update: a warning, still serving.
    for sc in [&refuse, &unready, &warn] {
        wait_log(sc, "CRL is past its next-update").await;
    }
    // Beyond the grace period, with no reload: each acts per crl_stale.
    for sc in [&refuse, &unready, &warn] {
        wait_log(sc, "CRL is stale beyond the grace period").await;
    }
    assert_eq!(readyz(&refuse).await, StatusCode::SERVICE_UNAVAILABLE);
    let refused = get(&client, &refuse).await;
    assert!(
        refused.is_err(),
        "stale CRL, crl_stale = refuse: {refused:?}\n{}",
        refuse.stderr_text()
    );
    let stale = [("result", "error"), ("reason", "crl_stale")];
    assert!(metric(&refuse, "gatehouse_tls_handshakes_total", &stale).await >= 1.0);
    assert_eq!(readyz(&unready).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(get(&client, &unready).await, Ok(200));
    assert_eq!(readyz(&warn).await, StatusCode::OK);
    assert_eq!(get(&client, &warn).await, Ok(200));
    let st = status(&refuse).await;
    assert_eq!(st["crls"][0]["state"], "stale_beyond_grace", "{st}");
    for sc in [&refuse, &unready, &warn] {
        assert_eq!(
            metric(sc, "gatehouse_reloads_total", &[]).await,
            0.0,
            "it fired as time passed, not on a reload"
        );
    }

    // A fresh CRL restores service.
    ca(&["crl", "--dir", &ca_dir(&pki), "--out", &s(&crl)]).await;
    wait_reloads(&refuse, "crl", "ok", 1.0).await;
    assert_eq!(readyz(&refuse).await, StatusCode::OK);
    assert_eq!(get(&client, &refuse).await, Ok(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_older_crl_is_refused_and_the_serving_one_kept() {
    let pki = Pki::with_intermediate(TD);
    let app = FakeApp::start().await;
    let server = pki.issue(SERVER_ID);
    let revoked = pki.issue(CLIENT_ID);
    let client = MtlsClient::new(&revoked);
    let dir = pki.fresh_dir("crl");
    let (crl, old) = (dir.join("crl.pem"), dir.join("old.pem"));
    ca(&["crl", "--dir", &ca_dir(&pki), "--out", &s(&old)]).await;
    std::fs::copy(&old, &crl).expect("copy");
    let sc = inbound(&server, &app, &crl, "").await;
    assert_eq!(get(&client, &sc).await, Ok(200));

    let serial = ca(&["inspect", &s(&revoked.cert())]).await["serial"]
        .as_str()
        .expect("serial")
        .to_owned();
    ca(&[
        "revoke",
        "--dir",
        &ca_dir(&pki),
        "--serial",
        &serial,
        "--crl",
        &s(&crl),
    ])
    .await;
    wait_reloads(&sc, "crl", "ok", 1.0).await;
    assert!(get(&client, &sc).await.is_err(), "revoked");

    // Roll back to the older, validly signed CRL (number 1 < 2): refused, old one serves.
    let tmp = dir.join("crl.tmp");
    std::fs::copy(&old, &tmp).expect("copy");
    std::fs::rename(&tmp, &crl).expect("rename");
    wait_reloads(&sc, "crl", "", 2.0).await;
    let after = get(&client, &sc).await;
    assert!(
        after.is_err(),
        "the rolled-back CRL must not un-revoke the client: {after:?}"
    );
    assert_eq!(
        metric(
            &sc,
            "gatehouse_reloads_total",
            &[("what", "crl"), ("result", "error")]
        )
        .await,
        1.0
    );
    wait_log(&sc, "lower than the serving CRL's 2: refusing a rollback").await;
    let st = status(&sc).await;
    assert!(
        st["crls"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["number"] == "2")),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_21_crl_missing_a_bundle_root_is_refused_naming_it() {
    let pki = Pki::with_intermediate(TD);
    let app = FakeApp::start().await;
    let server = pki.issue(SERVER_ID);
    let client = MtlsClient::new(&pki.issue(CLIENT_ID));
    // A copy of the CRL, which the CA does not know about: `ca root rotate` cannot update it.
    let dir = pki.fresh_dir("crl");
    let (published, copy) = (dir.join("published.pem"), dir.join("copy.pem"));
    ca(&["crl", "--dir", &ca_dir(&pki), "--out", &s(&published)]).await;
    std::fs::copy(&published, &copy).expect("copy");
    let bundle = pki.authority().dir().join("bundle.pem");
    let builder = Sidecar::inbound(&server, app.addr(), POLICY)
        .bundle(&bundle)
        .crl(&copy)
        .section(RELOAD);
    let config = builder.write();
    let sc = builder.spawn().await.expect("sidecar starts");

    ca(&["root", "rotate", "--dir", &ca_dir(&pki)]).await;
    wait_reloads(&sc, "bundle", "", 1.0).await;
    let st = status(&sc).await;
    assert_eq!(
        st["bundle"].as_array().map(Vec::len),
        Some(1),
        "the new bundle is refused, the old one kept: {st}"
    );
    let g2 = "no CRL from `Gatehouse root CA revocation.test g2`, a root of the bundle";
    wait_log(&sc, g2).await;
    assert_eq!(get(&client, &sc).await, Ok(200));
    let out = sidecar_cli("check", &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(g2), "{stderr}");

    // The file `ca crl` wrote was republished with the new root's CRLs: pointing at it works.
    std::fs::copy(&published, &copy).expect("copy");
    wait_status(&sc, "both roots trusted", |s| {
        s["bundle"].as_array().is_some_and(|b| b.len() == 2)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn issue_21_root_rotation_with_a_crl_under_load_fails_no_request() {
    let pki = Pki::with_intermediate(TD);
    let ca_dir = ca_dir(&pki);
    let app = FakeApp::start().await;
    let server = pki.issue(SERVER_ID);
    let client = pki.issue(CLIENT_ID);
    let crl: PathBuf = pki.fresh_dir("crl").join("crl.pem");
    ca(&["crl", "--dir", &ca_dir, "--out", &s(&crl)]).await;
    let bundle = pki.authority().dir().join("bundle.pem");
    let inbound = Sidecar::inbound(&server, app.addr(), POLICY)
        .bundle(&bundle)
        .crl(&crl)
        .section(RELOAD)
        .spawn()
        .await
        .expect("inbound sidecar starts");
    let entry = format!(
        "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\n\
         server_id = \"{SERVER_ID}\"\n\n{RELOAD}",
        inbound.inbound_addr()
    );
    let outbound = Sidecar::builder(&client)
        .bundle(&bundle)
        .crl(&crl)
        .section(&entry)
        .spawn()
        .await
        .expect("outbound sidecar starts");
    let stderr = || {
        format!(
            "--- inbound ---\n{}\n--- outbound ---\n{}",
            inbound.stderr_text(),
            outbound.stderr_text()
        )
    };
    let load = Load::start(
        outbound.listener("outbound:monolith"),
        PATH,
        "monolith",
        8,
        300.0,
    );
    load.wait_flowing().await;
    let t0 = Instant::now();

    // The README's steps: a new root, wait for two roots, re-issue, retire.
    // An operator's pace: a few seconds between the steps.
    let pause = Duration::from_secs(3);
    ca(&["root", "rotate", "--dir", &ca_dir]).await;
    for sc in [&inbound, &outbound] {
        wait_status(sc, "two roots", |s| {
            s["bundle"].as_array().is_some_and(|b| b.len() == 2)
        })
        .await;
    }
    tokio::time::sleep(pause).await;
    ca(&[
        "rotate",
        "--dir",
        &ca_dir,
        "--force",
        &s(&server.dir),
        &s(&client.dir),
    ])
    .await;
    for (sc, dir) in [(&inbound, &server), (&outbound, &client)] {
        let serial = ca(&["inspect", &s(&dir.cert())]).await["serial"].clone();
        wait_status(sc, "the new-root leaf", |s| {
            s["certificate"]["serial"] == serial
        })
        .await;
    }
    tokio::time::sleep(pause).await;
    ca(&["root", "retire", "--dir", &ca_dir]).await;
    for sc in [&inbound, &outbound] {
        wait_status(sc, "one root", |s| {
            s["bundle"].as_array().is_some_and(|b| b.len() == 1)
        })
        .await;
    }
    println!("root rotation done in {:?}", t0.elapsed());
    // Keep the load on a little after the last swap.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = load.started;
    let (samples, elapsed) = load.stop().await;
    let failed = failures(&samples, started, Sample::is_200);
    let n_failed = samples.iter().filter(|s| !s.is_200()).count();
    println!(
        "root rotation with a CRL under load: {} requests in {:.1}s ({:.0} req/s), {n_failed} failed; app saw {}",
        samples.len(),
        elapsed.as_secs_f64(),
        samples.len() as f64 / elapsed.as_secs_f64(),
        app.count()
    );
    assert!(
        failed.is_empty(),
        "failed requests: {failed:#?}\n{}",
        stderr()
    );
    assert!(samples.len() >= 1500, "only {} requests", samples.len());
    for sc in [&inbound, &outbound] {
        let crls = status(sc).await["crls"].clone();
        let issuers: Vec<&str> = crls
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["issuer"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            issuers.len() == 2 && issuers.iter().all(|i| i.ends_with(" g2")),
            "the republished CRLs of the new root serve: {crls}"
        );
    }
}
