//! Online identity end to end (issue 16): the real `ca serve` and two real sidecars
//! (report-service outbound → monolith inbound) enrolled with join tokens, under continuous
//! load: short SVIDs renewed several times with a new key each and no failed request, a CA
//! outage spanning a renewal, revocation through the CA, and no workload key on disk.
//!
//! Needs `target/debug/{ca,sidecar}`: run `cargo build --workspace --bins` first.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse_tests::harness::{
    FakeApp, Sidecar, binary, eventually, http_get, sidecar_cli, sidecar_status,
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

/// The CA's directory and the bootstrap files, in one temporary directory.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let sb = Self {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        sb.ca(&["init", "--dir", "ca", "--trust-domain", TD]);
        std::fs::create_dir(sb.path("bootstrap")).expect("mkdir");
        std::fs::copy(sb.path("ca/bundle.pem"), sb.path("bootstrap/bundle.pem")).expect("copy");
        sb
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn ca(&self, args: &[&str]) -> String {
        let out = Command::new(binary("ca"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run ca");
        assert!(
            out.status.success(),
            "ca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// A single-use join token for `spiffe://online.test/<name>`, in bootstrap/<name>.token.
    fn token(&self, name: &str) -> PathBuf {
        let id = format!("spiffe://{TD}/{name}");
        let out = self.ca(&[
            "--format",
            "json",
            "token",
            "create",
            "--dir",
            "ca",
            "--spiffe-id",
            &id,
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        let path = self.path(&format!("bootstrap/{name}.token"));
        std::fs::write(&path, v["token"].as_str().expect("token")).expect("write token");
        path
    }

    /// `ca list --format json`: every issuance.
    fn inventory(&self) -> Vec<serde_json::Value> {
        let out = self.ca(&["--format", "json", "list", "--dir", "ca"]);
        match serde_json::from_str(&out).expect("ca list json") {
            serde_json::Value::Array(a) => a,
            other => panic!("ca list: {other}"),
        }
    }
}

/// Files under `root` (skipping `skip`) holding a private key.
fn private_keys_under(root: &Path, skip: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            if p == skip {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains("PRIVATE KEY"))
            {
                found.push(p);
            }
        }
    }
    found
}

/// A running `ca serve`, killed on drop.
struct CaServer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for CaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(sb: &Sandbox, listen: &str) -> CaServer {
    let mut child = Command::new(binary("ca"))
        .args(["serve", "--dir", "ca", "--listen", listen])
        .args(["--svid-ttl", SVID_TTL])
        .current_dir(sb.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ca serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read stdout");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("address");
    CaServer { child, addr }
}

fn identity(sb: &Sandbox, ca: SocketAddr, name: &str) -> String {
    format!(
        "ca = \"https://{ca}\"\nspiffe_id = \"spiffe://{TD}/{name}\"\nca_bundle = {:?}\n\
         join_token_file = {:?}\nca_poll = \"1s\"",
        sb.path("bootstrap/bundle.pem"),
        sb.token(name)
    )
}

fn renewals(status: &serde_json::Value) -> u64 {
    status["online_identity"]["renewals"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrolled_sidecars_renew_ride_out_a_ca_outage_and_are_revoked_through_the_ca() {
    let t0 = Instant::now();
    let sb = Sandbox::new();
    let mut ca = serve(&sb, "127.0.0.1:0");
    let ca_addr = ca.addr;
    let app = FakeApp::start().await;

    let monolith = Sidecar::online(&identity(&sb, ca_addr, "monolith"))
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
    let report = Sidecar::online(&identity(&sb, ca_addr, "report-service"))
        .section(&entry)
        .spawn()
        .await
        .expect("report-service sidecar enrolls and becomes ready");
    let logs = || {
        format!(
            "--- monolith ---\n{}\n--- report-service ---\n{}",
            monolith.stderr_text(),
            report.stderr_text()
        )
    };
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

    // 3. Revocation through the CA cuts report-service's traffic within 10 s, no file copied.
    let serial = sidecar_status(&report).await["online_identity"]["serial"]
        .as_str()
        .expect("serial")
        .to_owned();
    let revoked_at = Instant::now();
    sb.ca(&["revoke", "--dir", "ca", "--serial", &serial]);
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
    let mut keys = private_keys_under(sb.dir.path(), &sb.path("ca"));
    for sc in sidecars {
        let dir = sc.policy_path().parent().expect("work dir").to_path_buf();
        keys.extend(private_keys_under(&dir, Path::new("/nonexistent")));
    }
    assert!(keys.is_empty(), "private keys on disk: {keys:?}");
    drop(ca);
    println!("total {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_the_first_svid_and_check_does_not_contact_the_ca() {
    let sb = Sandbox::new();
    // A CA address nobody listens on (yet).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let ca_addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
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
