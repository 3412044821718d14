//! The FinTech example end to end, with the real binaries (`ca`, `sidecar`, the fake services and
//! `fintech-demo` from target/<profile>/) and the configs of `deploy/examples/fintech/` exactly as
//! committed, so the example cannot rot.
//!
//! The example uses fixed loopback ports (127.0.0.1:17xxx, outside the ephemeral range), so every test
//! here takes `FIXED_PORTS` first and they run one after another. Needs
//! `cargo build --workspace --bins` first (the README's test command does it).

use std::process::Stdio;
use std::time::Duration;

use gatehouse_tests::fintech::online;
use gatehouse_tests::fintech::probe::{ProbeIdentity, ProbeOutcome, probe};
use gatehouse_tests::fintech::scenario::{self, Check, label};
use gatehouse_tests::fintech::stack::{LEAKED_KEY, Ports, Service, Stack, StackOptions, bin_dir};
use gatehouse_tests::harness::free_port;

/// The example's ports are fixed: one stack at a time in this test binary.
static FIXED_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start_stack(work: &tempfile::TempDir) -> Stack {
    let opts =
        StackOptions::for_repo(work.path().join("work"), Ports::default()).expect("binary dir");
    match Stack::start(opts).await {
        Ok(stack) => stack,
        Err(e) => panic!("stack did not start: {e}\nhelp: {}", e.help()),
    }
}

fn assert_all_hold(checks: &[Check]) {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(ToString::to_string)
        .collect();
    assert!(failed.is_empty(), "failed checks:\n{}", failed.join("\n"));
}

fn check<'a>(checks: &'a [Check], label: &str) -> &'a Check {
    checks
        .iter()
        .find(|c| c.label == label)
        .unwrap_or_else(|| panic!("no check `{label}` in {checks:#?}"))
}

/// Runs `fintech-demo --work-dir WORK/demo EXTRA…` in its own process group (killed with its
/// children after 4 minutes) and returns its output.
async fn run_demo(work: &tempfile::TempDir, extra: &[&str]) -> std::process::Output {
    let demo = bin_dir().expect("binary dir").join("fintech-demo");
    // Its own process group, so a timeout can take the demo's children down with it.
    let child = tokio::process::Command::new(&demo)
        .arg("--work-dir")
        .arg(work.path().join("demo"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (cargo build --workspace --bins first)",
                demo.display()
            )
        });
    let pid = child.id().expect("running");
    match tokio::time::timeout(Duration::from_secs(240), child.wait_with_output()).await {
        Ok(out) => out.expect("demo output"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            panic!("the demo did not finish within 4 minutes; killed its process group");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_exits_0_and_its_transcript_shows_every_expected_outcome() {
    let _ports = FIXED_PORTS.lock().await;
    let work = tempfile::tempdir().expect("temp dir");
    let out = run_demo(&work, &[]).await;
    let transcript = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo exited {}\n{transcript}\n{stderr}",
        out.status
    );
    for expected in label::ALL {
        assert!(
            transcript.contains(&format!("✔ {expected}")),
            "missing `✔ {expected}` in:\n{transcript}"
        );
    }
    assert!(!transcript.contains('✘'), "a failed step in:\n{transcript}");
    assert!(
        transcript.contains(&format!("all {} checks passed", label::ALL.len())),
        "{transcript}"
    );
    assert!(
        transcript.contains("gatehouse_inbound_requests_total{"),
        "no metrics excerpt in:\n{transcript}"
    );
}

/// The README's online demo (`fintech-demo --online`, issue 16): the three sidecars enroll with a
/// real `ca serve` using join tokens, serve the report flow and the denial, renew under load with
/// a new key each time and no failed request, and leave no workload key on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_demo_enrolls_renews_under_load_and_exits_0() {
    let _ports = FIXED_PORTS.lock().await;
    let work = tempfile::tempdir().expect("temp dir");
    let out = run_demo(&work, &["--online"]).await;
    let transcript = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo exited {}\n{transcript}\n{stderr}",
        out.status
    );
    for expected in [
        online::label::CA,
        online::label::STARTED,
        online::label::ENROLLED,
        label::REPORT_ACCEPTED,
        label::DATA_FETCHED,
        label::DOWNLOADED,
        label::DENIED,
        online::label::RENEWED,
        online::label::NO_KEY_ON_DISK,
    ] {
        assert!(
            transcript.contains(&format!("✔ {expected}")),
            "missing `✔ {expected}` in:\n{transcript}"
        );
    }
    assert!(!transcript.contains('✘'), "a failed step in:\n{transcript}");
    assert!(transcript.contains("checks passed"), "{transcript}");
    // Nothing was minted for the workloads: no certs/<service>/ directories, only the CA's.
    let certs = work.path().join("demo/certs");
    for s in Service::ALL {
        assert!(!certs.join(s.name()).exists(), "{} minted", s.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_report_is_generated_over_mtls_and_its_webhook_reaches_the_gateway() {
    let _ports = FIXED_PORTS.lock().await;
    let work = tempfile::tempdir().expect("temp dir");
    let stack = start_stack(&work).await;
    let checks = scenario::report_flow(&stack).await;
    assert_all_hold(&checks);
    for expected in [
        label::REPORT_ACCEPTED,
        label::DATA_FETCHED,
        label::WEBHOOK,
        label::DOWNLOADED,
    ] {
        assert!(check(&checks, expected).ok);
    }
    // The report service's data fetch is in the monolith sidecar's audit log as an allow, under the
    // route that only the report service may use.
    let audit = stack.audit(Service::Monolith).await;
    let report_service = Service::ReportService.spiffe_id();
    assert!(
        audit.iter().any(|l| l["caller"] == report_service.as_str()
            && l["route"] == "report data export"
            && l["decision"] == "allow"
            && l["status"] == 200),
        "no allow line for the data fetch in {audit:#?}"
    );
    // And the webhook is in the gateway sidecar's audit log, allowed for the report service.
    let audit = stack.audit(Service::ApiGateway).await;
    assert!(
        audit.iter().any(|l| l["caller"] == report_service.as_str()
            && l["path"] == "/webhooks/report-ready"
            && l["decision"] == "allow"),
        "no allow line for the webhook in {audit:#?}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_gets_403_on_report_data_and_the_monolith_app_never_sees_it() {
    let _ports = FIXED_PORTS.lock().await;
    let work = tempfile::tempdir().expect("temp dir");
    let stack = start_stack(&work).await;
    let checks = scenario::denied_flow(&stack).await;
    assert_all_hold(&checks);
    // Nothing from the gateway to the data export ever reached the app, whatever the query.
    let seen = stack.seen(Service::Monolith).await.expect("debug endpoint");
    let gateway = Service::ApiGateway.spiffe_id();
    assert!(
        !seen.iter().any(|r| r.path == "/api/data/reports"),
        "the app saw a data export request: {seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.path == "/api/dashboard" && r.caller() == Some(gateway.clone()))
    );
    let metrics = stack.metrics(Service::Monolith).await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gatehouse_inbound_requests_total")
                && l.contains("caller=\"api-gateway\"")
                && l.contains("decision=\"deny\"")
                && l.contains("reason=\"not_allowed\"")),
        "deny not counted:\n{metrics}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostor_and_revoked_certificates_are_refused_at_the_handshake() {
    let _ports = FIXED_PORTS.lock().await;
    let work = tempfile::tempdir().expect("temp dir");
    let stack = start_stack(&work).await;
    let checks = scenario::refused_handshakes(&stack).await;
    assert_all_hold(&checks);
    // Every inbound sidecar refuses both, not only the monolith's.
    let certs = stack.certs_dir();
    for s in Service::ALL {
        for who in ["impostor", "revoked-report-service"] {
            let outcome = probe(
                stack.ports().inbound(s),
                &ProbeIdentity::in_dir(&certs.join(who)),
                "/",
            )
            .await
            .unwrap_or_else(|e| panic!("probe {who} → {}: {e}", s.name()));
            assert!(
                matches!(outcome, ProbeOutcome::Refused { .. }),
                "{who} → {} sidecar: {outcome}",
                s.name()
            );
        }
    }
    for s in Service::ALL {
        let seen = stack.seen(s).await.expect("debug endpoint");
        let from_probe = seen
            .iter()
            .filter(|r| r.caller() == Some(Service::ReportService.spiffe_id()));
        // Only the monolith got one request with a report-service identity: the control probe.
        let expected = usize::from(s == Service::Monolith);
        assert_eq!(
            from_probe.count(),
            expected,
            "{} app saw {seen:#?}",
            s.name()
        );
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_config_passes_sidecar_check_with_the_minted_certificates() {
    // No listener is bound by `sidecar check`, so no port lock is needed.
    let work = tempfile::tempdir().expect("temp dir");
    let opts =
        StackOptions::for_repo(work.path().join("work"), Ports::default()).expect("binary dir");
    let stack = match Stack::prepare(opts).await {
        Ok(stack) => stack,
        Err(e) => panic!("could not prepare the example: {e}\nhelp: {}", e.help()),
    };
    let leaked = stack.work_dir().join(LEAKED_KEY).join("sidecar.toml");
    let configs = Service::ALL
        .iter()
        .map(|s| (stack.sidecar_config(*s), s.spiffe_id()))
        .chain([(leaked, Service::ReportService.spiffe_id())]);
    for (config, id) in configs {
        let out = tokio::process::Command::new(stack.options().bin_dir.join("sidecar"))
            .arg("check")
            .arg("--config")
            .arg(&config)
            .output()
            .await
            .expect("run sidecar check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let name = config.display();
        assert!(out.status.success(), "sidecar check {name} failed:\n{text}");
        assert!(
            text.contains(id.as_str()),
            "{name}: summary does not name {id}:\n{text}"
        );
    }
}

/// The loopback address of the extra sidecar's listeners, whose ports its config names
/// ([`free_port`]).
const OWN_IP: [u8; 4] = [127, 0, 8, 1];

/// A free port on [`OWN_IP`].
fn own_port() -> u16 {
    free_port(OWN_IP.into()).expect("a free port on 127.0.8.1")
}

/// Runs a fourth sidecar with the certificate in `certs/<who>/`, with one outbound listener toward the
/// monolith, and asks it for the report data. Its bundle holds our CA's root (so it can verify the
/// monolith: the bundle is public) and the root of its own certificate (a sidecar refuses to start
/// with a certificate its bundle does not verify); the CRL is ours.
async fn call_monolith_through_own_sidecar(stack: &mut Stack, who: &str) -> (u16, String) {
    let (listen, admin) = (own_port(), own_port());
    let dir = stack.work_dir().join(format!("own-{who}"));
    tokio::fs::create_dir_all(&dir).await.expect("create dir");
    let config = dir.join("sidecar.toml");
    let certs = stack.certs_dir();
    let mut bundle = tokio::fs::read_to_string(certs.join("bundle.pem"))
        .await
        .expect("our bundle");
    bundle += &tokio::fs::read_to_string(certs.join(who).join("bundle.pem"))
        .await
        .expect("its bundle");
    tokio::fs::write(dir.join("bundle.pem"), bundle)
        .await
        .expect("write bundle");
    let monolith = stack.ports().inbound(Service::Monolith);
    let text = format!(
        "[identity]\ncert = \"../certs/{who}/cert.pem\"\nkey = \"../certs/{who}/key.pem\"\n\
         bundle = \"bundle.pem\"\ncrl = \"../certs/crl.pem\"\n\n\
         [[outbound]]\nname = \"monolith\"\nlisten = \"127.0.8.1:{listen}\"\nconnect = \"{monolith}\"\n\
         server_id = \"spiffe://fintech.internal/monolith\"\n\n[admin]\nlisten = \"127.0.8.1:{admin}\"\n"
    );
    tokio::fs::write(&config, text).await.expect("write config");
    let admin = std::net::SocketAddr::from((OWN_IP, admin));
    if let Err(e) = stack
        .start_sidecar(&format!("own-{who}-sidecar"), &config, admin)
        .await
    {
        panic!("{who} sidecar did not start: {e}");
    }
    let url = format!(
        "http://127.0.8.1:{listen}/api/data/reports?{}",
        scenario::REPORT_QUERY
    );
    let reply = stack
        .client()
        .get(&url)
        .await
        .expect("the outbound listener answers");
    (reply.status.as_u16(), reply.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_impostor_services_behind_their_own_sidecars_get_502_and_reach_nothing() {
    let _ports = FIXED_PORTS.lock().await;
    let work = tempfile::tempdir().expect("temp dir");
    let mut stack = start_stack(&work).await;
    // The monolith's sidecar refuses both client certificates; each sidecar reports the TLS alert.
    // The foreign CA has our CA's name but not its key, so its signature fails: `decrypt_error`.
    for (who, alert) in [
        ("revoked-report-service", "certificate_revoked"),
        ("impostor", "decrypt_error"),
    ] {
        let (status, body) = call_monolith_through_own_sidecar(&mut stack, who).await;
        assert_eq!(status, 502, "{who}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(body["alert"], alert, "{who}: {body}");
        assert_eq!(body["upstream"], "monolith", "{who}: {body}");
    }
    let seen = stack.seen(Service::Monolith).await.expect("debug endpoint");
    assert!(seen.is_empty(), "the monolith app saw {seen:#?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_revocation_takes_effect_without_restart_and_a_reissued_svid_restores_service() {
    let _ports = FIXED_PORTS.lock().await;
    let work = tempfile::tempdir().expect("temp dir");
    let mut stack = start_stack(&work).await;
    let checks = scenario::live_revocation(&stack).await;
    assert_all_hold(&checks);
    // Nothing was restarted: every process started with the stack is still running.
    if let Err(e) = stack.check_alive().await {
        panic!("a process exited: {e}");
    }
    // Both reloads are visible in the sidecars' own metrics: the CRL on the monolith's, the new
    // certificate on the report service's.
    for s in [Service::Monolith, Service::ReportService] {
        let metrics = stack.metrics(s).await.expect("metrics");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("gatehouse_reloads_total") && l.contains("result=\"ok\"")),
            "{} sidecar counted no successful reload:\n{metrics}",
            s.name()
        );
    }
    // And the whole flow works end to end again with the new SVID.
    assert_all_hold(&scenario::report_flow(&stack).await);
    stack.stop().await;
}
