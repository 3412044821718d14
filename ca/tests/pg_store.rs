//! `--store postgres://…`: two real `ca serve` replicas on one real PostgreSQL (Debian's
//! `postgresql`, `initdb`/`pg_ctl` into the sandbox, 127.0.0.1 on a free port, password auth).
//! The sidecar enrollment client is not part of this crate: renewals go through the HTTPS API
//! directly, as a sidecar would send them.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use common::Sandbox;
use common::https::{
    Server, call, csr, enroll, err, ok_cert, renew, serve, serve_dir, token, verified,
};
use rcgen::KeyPair;

const PASSWORD: &str = "pw-93c1e07d";
const TD: &str = "spiffe://serve.test";

/// A PostgreSQL cluster in a temporary directory, stopped on drop.
struct Pg {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    user: Option<String>,
    bin: PathBuf,
    /// Server options beyond the address (`-c ssl=on …`).
    extra: String,
}

fn pg_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("/usr/lib/postgresql: install Debian's postgresql (.ci/run does)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("no PostgreSQL server binaries")
}

impl Pg {
    fn start() -> Pg {
        Self::start_with(|_| String::new())
    }

    /// Starts a cluster; `setup` gets the cluster's private directory (owned by the server's
    /// user once started) and returns extra server options.
    fn start_with(setup: impl FnOnce(&std::path::Path) -> String) -> Pg {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("data");
        // initdb refuses to run as root: run the cluster as `postgres` then.
        let root = std::fs::metadata("/proc/self").expect("/proc/self").uid() == 0;
        let user = root.then(|| "postgres".to_owned());
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let pwfile = tmp.path().join("pw");
        std::fs::write(&pwfile, PASSWORD).expect("pwfile");
        if root {
            let out = Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .expect("id");
            let uid: u32 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("the postgres user (Debian's postgresql package creates it)");
            std::os::unix::fs::chown(tmp.path(), Some(uid), None).expect("chown");
            std::os::unix::fs::chown(&pwfile, Some(uid), None).expect("chown");
        }
        let extra = setup(tmp.path());
        if root {
            for e in std::fs::read_dir(tmp.path()).expect("ls").flatten() {
                let uid = std::fs::metadata(tmp.path()).expect("meta").uid();
                std::os::unix::fs::chown(e.path(), Some(uid), None).expect("chown");
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let pg = Pg {
            _tmp: tmp,
            data,
            port,
            user,
            bin: pg_bin(),
            extra,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data.display().to_string(),
                "-U",
                "gatehouse",
                "--auth=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        pg.ctl_start();
        pg
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).output().expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start -w`: returns once the server accepts connections (pg_ctl polls for it).
    fn ctl_start(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=100 {}",
            self.port,
            self.data.display(),
            self.extra
        );
        let log = self.data.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-o",
                &opts,
                "-l",
                &log.display().to_string(),
                "-w",
                "-t",
                "20",
                "start",
            ],
        );
    }

    fn ctl_stop(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    fn url(&self) -> String {
        format!(
            "postgres://gatehouse:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data.display().to_string();
        let args = ["-D", &data, "-m", "immediate", "stop"];
        let _ = match &self.user {
            Some(u) => Command::new("runuser")
                .args(["-u", u, "--"])
                .arg(&exe)
                .args(args)
                .output(),
            None => Command::new(&exe).args(args).output(),
        };
    }
}

/// `ca init` into `ca`, and a copy of it in `ca-b`: each replica has its own directory (its
/// own volume in Kubernetes), so nothing but the database is shared between them.
fn init(sb: &Sandbox) {
    sb.ok(&["init", "--dir", "ca", "--trust-domain", "serve.test"]);
    let out = Command::new("cp")
        .args(["-a", "ca", "ca-b"])
        .current_dir(sb.tmp.path())
        .output()
        .expect("cp");
    assert!(out.status.success());
}

fn rows(sb: &Sandbox, url: &str) -> Vec<serde_json::Value> {
    let out = sb.ok(&["list", "--dir", "ca", "--store", url, "--format", "json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .expect("json")
        .as_array()
        .expect("array")
        .clone()
}

/// The serials and CRL numbers in a `GET /v1/crl` answer.
fn crl_contents(pem: &[u8]) -> (HashSet<String>, Vec<u64>) {
    use x509_parser::prelude::FromDer;
    let mut serials = HashSet::new();
    let mut numbers = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.expect("pem");
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&block.contents)
                .expect("crl");
        for r in crl.iter_revoked_certificates() {
            serials.insert(hex::encode(r.raw_serial()));
        }
        if let Some(n) = crl.crl_number() {
            numbers.push(u64::try_from(n).expect("small CRL number"));
        }
    }
    (serials, numbers)
}

/// Replica A on `ca`, replica B on its copy `ca-b`, both on the database at `url`.
fn replicas(sb: &Sandbox, url: &str) -> (Server, Server) {
    let store = ["--store", url];
    (serve(sb, &store), serve_dir(sb, "ca-b", &store))
}

async fn get_crl(sb: &Sandbox, srv: &Server) -> Vec<u8> {
    let (s, body) = call(sb, srv.addr, None, "GET", "/v1/crl", None).await;
    assert_eq!(s, 200);
    body.to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_on_one_database_share_tokens_inventory_revocations_and_crl_numbers() {
    let pg = Pg::start();
    let url = pg.url();
    let sb = Sandbox::new();
    init(&sb);
    let (a, b) = replicas(&sb, &url);
    let sb = Arc::new(sb);

    // 200 concurrent enrollments, alternating replicas, on one 200-use token: 200 distinct
    // serials, 200 inventory rows, and the 201st use refused by the database.
    let id = format!("{TD}/fleet");
    let t = token(&sb, &id, &["--uses", "200", "--store", &url]);
    let tasks: Vec<_> = (0..201)
        .map(|i| {
            let (sb, t) = (Arc::clone(&sb), t.clone());
            let addr = if i % 2 == 0 { a.addr } else { b.addr };
            tokio::spawn(async move {
                let key = KeyPair::generate().expect("key");
                let (s, body) = enroll(&sb, addr, &t, &csr(&key)).await;
                (s, body, key)
            })
        })
        .collect();
    let mut serials = HashSet::new();
    let mut refused = 0;
    let mut one = None;
    for task in tasks {
        let (s, body, key) = task.await.expect("task");
        if s == 200 {
            let r = ok_cert(s, &body);
            assert_eq!(r.spiffe_id, id);
            assert!(serials.insert(r.serial.clone()), "duplicate serial");
            one.get_or_insert((r, key));
        } else {
            err(s, &body, 403, "token_used");
            refused += 1;
        }
    }
    assert_eq!((serials.len(), refused), (200, 1));
    let enrolled: HashSet<String> = rows(&sb, &url)
        .iter()
        .filter(|r| r["source"] == "enroll")
        .map(|r| r["serial"].as_str().expect("serial").to_owned())
        .collect();
    assert_eq!(enrolled, serials);
    // Nothing went to the directories' own ledgers.
    assert_eq!(sb.read("ca/inventory.jsonl"), "");
    assert_eq!(sb.read("ca-b/inventory.jsonl"), "");

    // One single-use token at both replicas at the same moment: exactly one enrollment.
    for round in 0..5 {
        let t = token(&sb, &id, &["--store", &url]);
        let (ka, kb) = (
            KeyPair::generate().expect("key"),
            KeyPair::generate().expect("key"),
        );
        let (ca_, cb_) = (csr(&ka), csr(&kb));
        let (ra, rb) = tokio::join!(enroll(&sb, a.addr, &t, &ca_), enroll(&sb, b.addr, &t, &cb_));
        let ok = [ra.0, rb.0].iter().filter(|s| **s == 200).count();
        assert_eq!(ok, 1, "round {round}: statuses {} and {}", ra.0, rb.0);
        let (loser_status, loser_body) = if ra.0 == 200 { rb } else { ra };
        err(loser_status, &loser_body, 403, "token_used");
    }

    // A certificate enrolled through one replica renews through the other.
    let (first, key) = one.expect("an enrollment");
    let next = KeyPair::generate().expect("key");
    let (s, body) = renew(&sb, b.addr, &first.cert_chain, &key, &next).await;
    let renewed = ok_cert(s, &body);
    verified(&renewed);

    // A revocation (`ca revoke --store`) is in the CRL either replica serves next, and the
    // CRL numbers keep increasing across replicas (one sequence).
    let (before, n0) = crl_contents(&get_crl(&sb, &b).await);
    assert!(!before.contains(&renewed.serial));
    sb.ok(&[
        "revoke",
        "--dir",
        "ca",
        "--store",
        &url,
        "--serial",
        &renewed.serial,
    ]);
    let (after_b, n1) = crl_contents(&get_crl(&sb, &b).await);
    assert!(
        after_b.contains(&renewed.serial),
        "replica B's CRL lacks it"
    );
    let (after_a, n2) = crl_contents(&get_crl(&sb, &a).await);
    assert!(
        after_a.contains(&renewed.serial),
        "replica A's CRL lacks it"
    );
    assert!(n0[0] < n1[0] && n1[0] < n2[0], "{n0:?} {n1:?} {n2:?}");
    // And `ca crl --store` continues the same sequence.
    sb.ok(&["crl", "--dir", "ca", "--store", &url, "--out", "crl.pem"]);
    let (file, n3) = crl_contents(sb.read("crl.pem").as_bytes());
    assert!(file.contains(&renewed.serial) && n3[0] > n2[0], "{n3:?}");
    // The revoked certificate no longer renews at either replica.
    let again = KeyPair::generate().expect("key");
    let (s, body) = renew(&sb, a.addr, &renewed.cert_chain, &next, &again).await;
    err(s, &body, 403, "revoked");
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread")]
async fn database_outage_means_503_at_every_replica_and_issuance_resumes_without_restart() {
    let pg = Pg::start();
    let url = pg.url();
    let sb = Sandbox::new();
    init(&sb);
    let (a, b) = replicas(&sb, &url);
    let id = format!("{TD}/payments");
    let t = token(&sb, &id, &["--uses", "10", "--store", &url]);
    let key = KeyPair::generate().expect("key");
    let (s, body) = enroll(&sb, a.addr, &t, &csr(&key)).await;
    let held = ok_cert(s, &body);

    pg.ctl_stop();
    for srv in [&a, &b] {
        let k = KeyPair::generate().expect("key");
        let (s, body) = enroll(&sb, srv.addr, &t, &csr(&k)).await;
        let e = err(s, &body, 503, "store_unavailable");
        assert!(!e.message.contains(PASSWORD));
        let (s, body) = renew(&sb, srv.addr, &held.cert_chain, &key, &k).await;
        err(s, &body, 503, "store_unavailable");
    }
    // The CLI says so too, without the password.
    let stderr = sb.fails(2, &["list", "--dir", "ca", "--store", &url]);
    assert!(
        stderr.contains("unavailable") && !stderr.contains(PASSWORD),
        "{stderr}"
    );

    pg.ctl_start();
    for srv in [&a, &b] {
        let k = KeyPair::generate().expect("key");
        let (s, body) = enroll(&sb, srv.addr, &t, &csr(&k)).await;
        verified(&ok_cert(s, &body));
    }
    // 1 before the outage + 2 after; the refused attempts recorded nothing.
    let enrolled = rows(&sb, &url)
        .iter()
        .filter(|r| r["source"] == "enroll")
        .count();
    assert_eq!(enrolled, 3);
    drop((a, b));
}

#[test]
fn migrations_are_versioned_and_the_password_is_never_printed() {
    let pg = Pg::start();
    let url = pg.url();
    let sb = Sandbox::new();
    init(&sb);
    // Two runs: the second finds version 1 applied and applies nothing.
    for _ in 0..2 {
        sb.ok(&["list", "--dir", "ca", "--store", &url]);
    }
    let store = gatehouse_ca::pg::PgStore::connect(&url).expect("connect");
    assert_eq!(store.schema_version().expect("version"), 1);
    // A wrong password: refused, and neither password appears anywhere in the output.
    let wrong = url.replace(PASSWORD, "wrong-1d7f");
    let out = sb.ca(&["list", "--dir", "ca", "--store", &wrong]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("postgres://gatehouse:***@127.0.0.1") && !text.contains("wrong-1d7f"),
        "{text}"
    );
    // From the environment (a Kubernetes Secret): used, and `--help` does not show it.
    let mut sb = sb;
    sb.env.push(("GATEHOUSE_CA_STORE".into(), url.clone()));
    let help = sb.ok(&["list", "--help"]);
    assert!(!help.contains(PASSWORD), "{help}");
    sb.ok(&["list", "--dir", "ca"]);
}

/// A CA certificate (PEM) and a server certificate + key for 127.0.0.1 signed by it.
fn tls_files(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, SanType};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let key = KeyPair::generate().expect("key");
    let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("params");
    leaf.subject_alt_names = vec![SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]))];
    let cert = leaf
        .signed_by(&key, &Issuer::new(ca, &ca_key))
        .expect("leaf");
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-server.pem")),
        dir.join(format!("{name}-server.key")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("write");
    std::fs::write(&paths.1, cert.pem()).expect("write");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&paths.2, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (paths.0, paths.1, paths.2)
}

#[test]
fn tls_to_the_database_verifies_its_certificate() {
    let mut ca_pem = PathBuf::new();
    let mut other_ca = PathBuf::new();
    let pg = Pg::start_with(|dir| {
        let (ca, cert, key) = tls_files(dir, "db");
        ca_pem = ca;
        other_ca = tls_files(dir, "other").0;
        format!(
            "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            cert.display(),
            key.display()
        )
    });
    let url = format!("{}?sslmode=require", pg.url());
    let mut sb = Sandbox::new();
    init(&sb);
    // sslmode=require without the database's CA: refused with what to set.
    let stderr = sb.fails(2, &["list", "--dir", "ca", "--store", &url]);
    assert!(stderr.contains("PGSSLROOTCERT"), "{stderr}");
    // The right CA: connects over TLS.
    sb.env = vec![("PGSSLROOTCERT".into(), ca_pem.display().to_string())];
    sb.ok(&["list", "--dir", "ca", "--store", &url]);
    // Another CA: the handshake fails, so the certificate really is verified.
    sb.env = vec![("PGSSLROOTCERT".into(), other_ca.display().to_string())];
    let stderr = sb.fails(2, &["list", "--dir", "ca", "--store", &url]);
    assert!(
        stderr.contains("unavailable") && !stderr.contains(PASSWORD),
        "{stderr}"
    );
}

/// Replica A killed while certificates it issued are being renewed: every renewal goes through
/// replica B (the sidecar's failover is another component; here the client moves on to B as a
/// sidecar would after a refused connection) and none fails.
#[tokio::test(flavor = "multi_thread")]
async fn replica_killed_during_renewals_the_other_renews_everything() {
    let pg = Pg::start();
    let url = pg.url();
    let sb = Sandbox::new();
    init(&sb);
    let (mut a, b) = replicas(&sb, &url);
    let id = format!("{TD}/orders");
    let t = token(&sb, &id, &["--uses", "20", "--store", &url]);
    let mut held = Vec::new();
    for _ in 0..20 {
        let key = KeyPair::generate().expect("key");
        let (s, body) = enroll(&sb, a.addr, &t, &csr(&key)).await;
        held.push((ok_cert(s, &body), key));
    }
    let sb = Arc::new(sb);
    // Renewals start at A; A dies after the first few; each renewal falls over to B.
    let a_addr = a.addr;
    let mut failed = 0;
    let mut via_b = 0;
    for (i, (cert, key)) in held.into_iter().enumerate() {
        if i == 5 {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        let next = KeyPair::generate().expect("key");
        // A refused connection is what a sidecar sees from a dead replica: it tries the next.
        let (s, resp) = if tokio::net::TcpStream::connect(a_addr).await.is_ok() {
            renew(&sb, a_addr, &cert.cert_chain, &key, &next).await
        } else {
            via_b += 1;
            renew(&sb, b.addr, &cert.cert_chain, &key, &next).await
        };
        if s == 200 {
            verified(&ok_cert(s, &resp));
        } else {
            failed += 1;
        }
    }
    assert_eq!(failed, 0);
    assert_eq!(via_b, 15, "the 15 renewals after the kill went to B");
    // Both replicas' renewals are in the one inventory.
    let renewed = rows(&sb, &url)
        .iter()
        .filter(|r| r["source"] == "renew")
        .count();
    assert_eq!(renewed, 20);
    drop(b);
}
