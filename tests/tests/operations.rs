//! `docs/OPERATIONS.md` "Root rotation", step by step, against a sidecar pair under continuous
//! load: real `sidecar` and `ca` binaries, real mTLS, a CRL configured on both sides, and each
//! sidecar reading its own *distributed copy* of the bundle and CRL (as on Kubernetes, ECS and
//! systemd, where the sidecar never reads the CA directory). Zero requests may fail.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_tests::harness::{FakeApp, Pki, Sidecar, ca_ok as ca, eventually};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const SERVER_ID: &str = "spiffe://ops.test/monolith";
const CLIENT_ID: &str = "spiffe://ops.test/report-service";
const RELOAD: &str = "[reload]\ndebounce = \"50ms\"\npoll_interval = \"1s\"\n";
/// `[[outbound]] max_connection_age` of the client sidecar (runbook step 6 waits this long).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(2);

const POLICY: &str = r#"version = 1
trust_domain = "ops.test"

[[route]]
name  = "data"
path  = "/api/**"
allow = ["spiffe://ops.test/report-service"]
"#;

/// What the platform's distribution step does: an atomic replace of the sidecar's copy.
fn distribute(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp-dist");
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, to).expect("rename");
}

fn roots(s: &serde_json::Value) -> usize {
    s["bundle"].as_array().map_or(0, Vec::len)
}

/// Keep-alive HTTP/1.1 load through the client sidecar's outbound listener: every non-200
/// response and every transport error is recorded.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    fn start(addr: std::net::SocketAddr, workers: usize) -> Self {
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = Instant::now();
        let uri: http::Uri = format!("http://{addr}/api/data").parse().expect("uri");
        let tasks = (0..workers)
            .map(|_| {
                let (client, stop, ok, failures, uri) = (
                    client.clone(),
                    stop.clone(),
                    ok.clone(),
                    failures.clone(),
                    uri.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let res = tokio::time::timeout(Duration::from_secs(15), async {
                            let resp = client.get(uri.clone()).await.map_err(|e| e.to_string())?;
                            let status = resp.status();
                            resp.into_body()
                                .collect()
                                .await
                                .map_err(|e| e.to_string())?;
                            Ok::<_, String>(status)
                        })
                        .await;
                        match res {
                            Ok(Ok(StatusCode::OK)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures.lock().expect("failures").push(format!(
                                "t={:.3}s {other:?}",
                                started.elapsed().as_secs_f64()
                            )),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            tasks,
            started,
        }
    }

    async fn stop(self) -> (u64, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        let failures = self.failures.lock().expect("failures").clone();
        (
            self.ok.load(Ordering::Relaxed),
            failures,
            self.started.elapsed(),
        )
    }
}

/// A sidecar's distributed copies of the bundle and CRL.
struct Dist {
    bundle: PathBuf,
    crl: PathBuf,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_runbook_under_load_with_a_crl_fails_no_request() {
    let pki = Pki::with_intermediate("ops.test");
    let ca_dir = pki.authority().dir().display().to_string();
    let app = FakeApp::start().await;
    let server = pki.issue(SERVER_ID);
    let client = pki.issue(CLIENT_ID);
    let work = pki.fresh_dir("dist");
    let published = work.join("crl.pem"); // what `ca crl` writes on the CA host
    let bundle_out = work.join("bundle.pem"); // what `ca bundle` writes on the CA host
    ca(&[
        "crl",
        "--dir",
        &ca_dir,
        "--out",
        &published.display().to_string(),
    ])
    .await;
    let dist: Vec<Dist> = ["inbound", "outbound"]
        .iter()
        .map(|name| {
            let d = work.join(name);
            std::fs::create_dir_all(&d).expect("mkdir");
            let dist = Dist {
                bundle: d.join("bundle.pem"),
                crl: d.join("crl.pem"),
            };
            distribute(&server.bundle(), &dist.bundle);
            distribute(&published, &dist.crl);
            dist
        })
        .collect();
    // The inbound sidecar reads the bundle.pem of its certificate directory (systemd layout:
    // `ca rotate --bundle-only` updates it); the outbound one a copy handed out from `ca bundle`.
    let inbound = Sidecar::inbound(&server, app.addr(), POLICY)
        .crl(&dist[0].crl)
        .section(RELOAD)
        .spawn()
        .await
        .expect("inbound sidecar starts");
    let entry = format!(
        "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\n\
         server_id = \"{SERVER_ID}\"\nmax_connection_age = \"{}s\"\n\n{RELOAD}",
        inbound.inbound_addr(),
        MAX_CONNECTION_AGE.as_secs()
    );
    let outbound = Sidecar::builder(&client)
        .bundle(&dist[1].bundle)
        .crl(&dist[1].crl)
        .section(&entry)
        .spawn()
        .await
        .expect("outbound sidecar starts");
    let sidecars = [&inbound, &outbound];
    let publish_all = |what: &Path, pick: fn(&Dist) -> &Path| {
        for d in &dist {
            distribute(what, pick(d));
        }
    };
    let dirs = [
        server.dir.display().to_string(),
        client.dir.display().to_string(),
    ];
    // Steps 3 and 7: republish the CRL, hand out the CA's current bundle without touching a leaf
    // (`ca bundle` for the outbound sidecar's copy, `ca rotate --bundle-only` for the inbound
    // sidecar's SVID directory).
    let hand_out = async || {
        let (crl, bundle) = (
            published.display().to_string(),
            bundle_out.display().to_string(),
        );
        ca(&["crl", "--dir", &ca_dir, "--out", &crl]).await;
        publish_all(&published, |d| &d.crl);
        ca(&["bundle", "--dir", &ca_dir, "--out", &bundle]).await;
        publish_all(&bundle_out, |d| &d.bundle);
        ca(&["rotate", "--dir", &ca_dir, "--bundle-only", &dirs[0]]).await;
    };
    let load = Load::start(outbound.listener("outbound:monolith"), 4);
    eventually("the load to flow", Duration::from_secs(30), async || {
        (load.ok.load(Ordering::Relaxed) >= 8).then_some(())
    })
    .await
    .expect("load flowing");

    // Step 1 (pause the rotation timer/CronJob) has nothing to stop here: no job runs.
    // Step 2: a new root next to the old one.
    ca(&["root", "rotate", "--dir", &ca_dir]).await;
    // Step 3: re-publish the CRL (one per issuer in the bundle) and hand out the two-root bundle
    // alone; no leaf changes yet.
    hand_out().await;
    // Step 4: wait until every sidecar's /status lists two roots.
    for sc in sidecars {
        sc.wait_status("bundle with the old and new root", |s| roots(s) == 2)
            .await;
    }
    // The CRL's next-update is exported for the CRL-age alert, one series per CRL issuer: after
    // step 3 the file holds CRLs from both roots' issuers.
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    let crl_next_update = "gatehouse_crl_next_update_timestamp_seconds{";
    for sc in sidecars {
        eventually(
            "a next-update sample for the CRLs of both roots",
            Duration::from_secs(20),
            async || {
                let (_, text) = sc.admin_get("/metrics").await.ok()?;
                let fresh = text
                    .lines()
                    .filter(|l| l.starts_with(crl_next_update))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .filter(|next| *next > now)
                    .count();
                (fresh >= 2).then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sc.stderr_text()));
    }
    // Step 5: re-issue every leaf under the new root; the sidecars reload them.
    let out = ca(&["rotate", "--dir", &ca_dir, "--force", &dirs[0], &dirs[1]]).await;
    assert_eq!(out.matches("rotated ").count(), 2, "{out}");
    for (sc, dir) in sidecars.iter().zip(&dirs) {
        let serial = ca(&["inspect", &format!("{dir}/cert.pem"), "--format", "json"]).await;
        let serial: serde_json::Value = serde_json::from_str(&serial).expect("json");
        let serial = serial["serial"].clone();
        sc.wait_status("the new-root leaf is served", |s| {
            s["certificate"]["serial"] == serial
        })
        .await;
    }
    // Step 6: wait out the longest outbound max_connection_age, so no pooled connection made
    // with an old-root leaf is left.
    tokio::time::sleep(MAX_CONNECTION_AGE + Duration::from_millis(1000)).await;
    // Step 7: retire the old root, re-publish the CRL, hand out the one-root bundle.
    ca(&["root", "retire", "--dir", &ca_dir]).await;
    hand_out().await;
    for sc in sidecars {
        sc.wait_status("bundle with only the new root", |s| roots(s) == 1)
            .await;
    }
    // Step 8 (resume the job): a rotate right after has nothing to do.
    let out = ca(&["rotate", "--dir", &ca_dir, &dirs[0]]).await;
    assert!(out.starts_with("current "), "{out}");
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let (ok, failures, elapsed) = load.stop().await;
    println!(
        "root rotation runbook under load: {ok} requests in {:.1}s, {} failed",
        elapsed.as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "failed requests: {:#?}\n--- inbound ---\n{}\n--- outbound ---\n{}",
        &failures[..failures.len().min(10)],
        inbound.stderr_text(),
        outbound.stderr_text()
    );
    assert!(
        ok >= 200,
        "only {ok} requests in {elapsed:?}: the load did not run"
    );
    assert!(
        app.count() as u64 >= ok,
        "the app saw every successful request"
    );
}
