//! Issue 17, TCP mode, against a real PostgreSQL (`tests/src/postgres.rs`) and the real
//! `sidecar` and `ca` binaries:
//!
//! - `report_service_copies_10000_rows_through_tcp_sidecars_and_reads_them_back`: `psql` as
//!   report-service through `[[tcp_outbound]]` → `[[tcp_inbound]]` creates a table, `COPY`s
//!   10,000 rows in and reads them back (count, sum and SHA-256 of every row); metrics and the
//!   connection audit lines account for it;
//! - `api_gateway_is_refused_before_any_byte_reaches_postgres`: the same with an api-gateway
//!   certificate fails, PostgreSQL's own log shows no connection (and does show the next,
//!   allowed one: the counter works);
//! - `revoking_report_service_closes_its_open_psql_session_within_2s`: an open interactive
//!   `psql` session is cut when the CRL revoking report-service is written (reload), within
//!   2 s, seen from PostgreSQL (`pg_stat_activity`) and from `psql` itself.
//! - `half_close_passes_through_both_sidecars_and_idle_connections_are_closed`: an app that
//!   answers only after end of stream gets it through both sidecars (half-close), and a silent
//!   connection is closed after `idle_timeout` with an `idle_timeout` audit line.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gatehouse_tests::harness::{
    CertDir, Pki, Sidecar, ca_json, closed_by_peer, eventually, tcp_connect_from,
};
use gatehouse_tests::postgres::{DATABASE, Postgres, conninfo, psql};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TD: &str = "fintech.internal";
const DB_ID: &str = "spiffe://fintech.internal/reports-db";
const REPORT_ID: &str = "spiffe://fintech.internal/report-service";
const GATEWAY_ID: &str = "spiffe://fintech.internal/api-gateway";

/// Only `[[tcp]]` entries: a database sidecar has no HTTP routes.
const POLICY: &str = r#"version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"

[[tcp]]
name  = "postgres"
allow = ["report-service"]
"#;

const RELOAD: &str = "[reload]\ndebounce = \"50ms\"\npoll_interval = \"1s\"\n";
const ROWS: u64 = 10_000;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The database sidecar: only a `[[tcp_inbound]]` in front of `pg`, with `crl`.
async fn db_sidecar(pki: &Pki, pg: &Postgres, crl: &Path) -> Sidecar {
    let cert = pki.issue(DB_ID);
    Sidecar::builder(&cert)
        .policy(POLICY)
        .crl(crl)
        .section(RELOAD)
        .section(&format!(
            "[[tcp_inbound]]\nname = \"postgres\"\nlisten = \"127.0.0.1:0\"\napp = \"{}\"\npolicy = \"policy.toml\"\n",
            pg.addr()
        ))
        .spawn()
        .await
        .expect("database sidecar starts")
}

/// A client sidecar for `cert`: only a `[[tcp_outbound]]` to `db`, the database's identity pinned.
async fn client_sidecar(cert: &CertDir, db: &Sidecar) -> Sidecar {
    Sidecar::builder(cert)
        .section(&format!(
            "[[tcp_outbound]]\nname = \"reports-db\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\nserver_id = \"{DB_ID}\"\n",
            db.listener("tcp_inbound:postgres")
        ))
        .spawn()
        .await
        .expect("client sidecar starts")
}

/// A CRL (nothing revoked yet) in a fresh directory.
async fn empty_crl(pki: &Pki) -> std::path::PathBuf {
    let crl = pki.fresh_dir("crl").join("crl.pem");
    let dir = s(pki.authority().dir());
    ca_json(&["crl", "--dir", &dir, "--out", &s(&crl)]).await;
    crl
}

fn rows() -> (Vec<u8>, String) {
    let mut copy = String::new();
    let mut canonical = Vec::new();
    for i in 1..=ROWS {
        let line = format!("{i}\t{}\trow-{i:05}", i * 7 % 1000);
        copy.push_str(&line);
        copy.push('\n');
        canonical.push(line.replace('\t', ":"));
    }
    let digest = hex::encode(Sha256::digest(canonical.join(",").as_bytes()));
    (copy.into_bytes(), digest)
}

async fn through(addr: SocketAddr, sql: &str, stdin: Option<Vec<u8>>) -> String {
    let out = psql(addr, DATABASE, sql, stdin).await.expect("psql runs");
    assert!(out.ok, "psql {sql:?} failed: {}", out.stderr);
    out.stdout
}

async fn metric(sc: &Sidecar, name: &str, labels: &[(&str, &str)]) -> f64 {
    sc.metric(name, labels).await.expect("metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_service_copies_10000_rows_through_tcp_sidecars_and_reads_them_back() {
    let pg = Postgres::start().await.expect("postgres");
    let pki = Pki::new(TD);
    let crl = empty_crl(&pki).await;
    let db = db_sidecar(&pki, &pg, &crl).await;
    let client = client_sidecar(&pki.issue(REPORT_ID), &db).await;
    let local = client.listener("tcp_outbound:reports-db");

    through(
        local,
        "CREATE TABLE reports (id bigint PRIMARY KEY, amount int NOT NULL, note text NOT NULL)",
        None,
    )
    .await;
    let (data, digest) = rows();
    let started = Instant::now();
    let copied = through(
        local,
        "COPY reports (id, amount, note) FROM STDIN",
        Some(data.clone()),
    )
    .await;
    let copy_time = started.elapsed();
    let back = through(
        local,
        "SELECT count(*), sum(id), encode(sha256(convert_to(string_agg(id || ':' || amount || ':' || note, ',' ORDER BY id), 'UTF8')), 'hex') FROM reports",
        None,
    )
    .await;
    eprintln!(
        "COPY of {ROWS} rows ({} bytes) took {copy_time:?}: {copied:?}",
        data.len()
    );
    let expected_sum: u64 = (1..=ROWS).sum();
    assert_eq!(back, format!("{ROWS}|{expected_sum}|{digest}"));

    // Metrics: three allowed connections; at least the COPY data went client → server.
    let labels = [("listener", "postgres"), ("result", "allowed")];
    let up = [("listener", "postgres"), ("direction", "client_to_server")];
    eventually("metrics", Duration::from_secs(10), async || {
        (metric(&db, "gatehouse_tcp_connections_total", &labels).await == 3.0
            && metric(&db, "gatehouse_tcp_bytes_total", &up).await >= data.len() as f64)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", db.stderr_text()));
    // One audit line per connection, written at close.
    let audit = db.wait_audit(3).await.expect("audit lines");
    let copy_line = audit
        .iter()
        .find(|l| l["bytes_client_to_server"].as_u64() >= Some(data.len() as u64))
        .unwrap_or_else(|| panic!("no audit line carries the COPY: {audit:?}"));
    assert_eq!(copy_line["direction"], "tcp_inbound");
    assert_eq!(copy_line["listener"], "postgres");
    assert_eq!(copy_line["peer"], REPORT_ID);
    assert_eq!(copy_line["decision"], "allow");
    assert_eq!(copy_line["reason"], "closed");
    assert!(copy_line["bytes_server_to_client"].as_u64() > Some(0));
    let out_audit = client.wait_audit(3).await.expect("client audit lines");
    assert!(
        out_audit
            .iter()
            .all(|l| l["direction"] == "tcp_outbound" && l["peer"] == DB_ID)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_gateway_is_refused_before_any_byte_reaches_postgres() {
    let pg = Postgres::start().await.expect("postgres");
    let pki = Pki::new(TD);
    let crl = empty_crl(&pki).await;
    let db = db_sidecar(&pki, &pg, &crl).await;
    let gateway = client_sidecar(&pki.issue(GATEWAY_ID), &db).await;
    let report = client_sidecar(&pki.issue(REPORT_ID), &db).await;
    let before = pg.connections_received();

    let out = psql(
        gateway.listener("tcp_outbound:reports-db"),
        DATABASE,
        "SELECT 1",
        None,
    )
    .await
    .expect("psql runs");
    assert!(!out.ok, "api-gateway must be refused: {out:?}");
    let audit = db.wait_audit(1).await.expect("deny audit line");
    assert_eq!(audit[0]["peer"], GATEWAY_ID);
    assert_eq!(audit[0]["decision"], "deny");
    assert_eq!(audit[0]["reason"], "not_allowed");
    assert_eq!(audit[0]["bytes_client_to_server"], 0);
    let denied = [("listener", "postgres"), ("result", "denied")];
    assert_eq!(
        metric(&db, "gatehouse_tcp_connections_total", &denied).await,
        1.0
    );
    assert_eq!(
        pg.connections_received(),
        before,
        "PostgreSQL saw a connection from api-gateway:\n{}",
        pg.log_text()
    );

    // Control: the allowed caller's connection does show in PostgreSQL's log.
    assert_eq!(
        through(
            report.listener("tcp_outbound:reports-db"),
            "SELECT 41 + 1",
            None
        )
        .await,
        "42"
    );
    assert_eq!(pg.connections_received(), before + 1, "{}", pg.log_text());
    eprintln!(
        "api-gateway: psql said {:?}; PostgreSQL connections: {before} before, {before} after the refusal, {} after report-service",
        out.stderr.trim(),
        before + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_report_service_closes_its_open_psql_session_within_2s() {
    let pg = Postgres::start().await.expect("postgres");
    let pki = Pki::new(TD);
    let crl = empty_crl(&pki).await;
    let db = db_sidecar(&pki, &pg, &crl).await;
    let report_cert = pki.issue(REPORT_ID);
    let client = client_sidecar(&report_cert, &db).await;
    let local = client.listener("tcp_outbound:reports-db");

    // An interactive session through the sidecars (psql reads commands from its stdin).
    let mut session = tokio::process::Command::new("psql")
        .arg(conninfo(local, DATABASE, "gh-session"))
        .args(["-X", "-q", "-t", "-A"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql");
    let mut stdin = session.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(session.stdout.take().expect("stdout")).lines();
    stdin
        .write_all(b"SELECT 'session ' || 'ready';\n")
        .await
        .expect("write");
    let line = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
        .await
        .expect("psql answers")
        .expect("read");
    assert_eq!(line.as_deref(), Some("session ready"));
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gh-session'";
    assert_eq!(through(pg.addr(), sessions, None).await, "1");

    let serial = ca_json(&["inspect", &s(&report_cert.cert())]).await["serial"]
        .as_str()
        .expect("serial")
        .to_owned();
    let dir = s(pki.authority().dir());
    ca_json(&[
        "revoke",
        "--dir",
        &dir,
        "--serial",
        &serial,
        "--crl",
        &s(&crl),
    ])
    .await;
    // The revocation takes effect when the new CRL is on disk: the clock starts there, not
    // before the `ca` process (a debug build under a loaded CI machine) started.
    let revoked_at = Instant::now();
    eventually(
        "the session gone from PostgreSQL",
        Duration::from_secs(5),
        async || (through(pg.addr(), sessions, None).await == "0").then_some(()),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", db.stderr_text()));
    let closed_after = revoked_at.elapsed();
    eprintln!("revoked → session closed in PostgreSQL after {closed_after:?}");
    assert!(
        closed_after < Duration::from_secs(2),
        "the revoked session lived {closed_after:?}"
    );
    let cut = db
        .wait_audit_line("the audit line of the cut", |l| {
            l["reason"] == "peer_not_trusted"
        })
        .await;
    assert_eq!(cut["peer"], REPORT_ID);
    assert!(cut["bytes_server_to_client"].as_u64() > Some(0));

    // psql itself finds its connection gone at its next command.
    let _ = stdin.write_all(b"SELECT 1;\n").await;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), session.wait_with_output())
        .await
        .expect("psql exits")
        .expect("psql output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "psql: {err}");
    assert!(err.contains("connection"), "psql: {err}");
    // And a new connection from the revoked identity is refused at the handshake.
    let again = psql(local, DATABASE, "SELECT 1", None)
        .await
        .expect("psql runs");
    assert!(!again.ok);
}

/// A plain TCP app that answers only once its client has half-closed: it reads to the end,
/// then writes `got N bytes` and closes.
async fn answer_after_eof() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if tokio::io::AsyncReadExt::read_to_end(&mut s, &mut all)
                    .await
                    .is_ok()
                {
                    let _ = s
                        .write_all(format!("got {} bytes", all.len()).as_bytes())
                        .await;
                }
            });
        }
    });
    addr
}

/// Sends `data` to `addr`, half-closes, and returns the whole answer ([`answer_after_eof`]
/// answers only after end of stream).
async fn send_then_eof(addr: SocketAddr, data: &[u8]) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(data).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer))
        .await
        .expect("answer within 10 s")
        .expect("read");
    answer
}

/// A database sidecar whose `[[tcp_inbound]]` (with the `extra` line) leads to
/// [`answer_after_eof`] instead of PostgreSQL.
async fn echo_db(pki: &Pki, extra: &str) -> Sidecar {
    let app = answer_after_eof().await;
    Sidecar::builder(&pki.issue(DB_ID))
        .policy(POLICY)
        .section(&format!(
            "[[tcp_inbound]]\nname = \"postgres\"\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\npolicy = \"policy.toml\"\n{extra}\n"
        ))
        .spawn()
        .await
        .expect("sidecar starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_passes_through_both_sidecars_and_idle_connections_are_closed() {
    let pki = Pki::new(TD);
    let db = echo_db(&pki, "idle_timeout = \"1s\"").await;
    let client = client_sidecar(&pki.issue(REPORT_ID), &db).await;
    let local = client.listener("tcp_outbound:reports-db");

    // Half-close: the app answers only after our end of stream crossed both sidecars.
    assert_eq!(
        send_then_eof(local, &vec![7u8; 100_000]).await,
        "got 100000 bytes"
    );

    // Idle: a connection that moves nothing is closed after idle_timeout (1 s).
    let mut idle = tokio::net::TcpStream::connect(local)
        .await
        .expect("connect");
    idle.write_all(b"x").await.expect("write");
    let after = closed_by_peer(&mut idle, Duration::from_secs(10)).await;
    assert!(
        after >= Duration::from_millis(900),
        "closed too early: {after:?}"
    );
    eprintln!("idle connection closed after {after:?} (idle_timeout 1s)");
    let line = db
        .wait_audit_line("the idle_timeout audit line", |l| {
            l["reason"] == "idle_timeout"
        })
        .await;
    assert_eq!(line["bytes_client_to_server"], 1);
    let first = db
        .audit()
        .into_iter()
        .find(|l| l["reason"] == "closed")
        .expect("closed line");
    assert_eq!(first["bytes_client_to_server"], 100_000);
    assert_eq!(first["bytes_server_to_client"], 16);
}

/// Issue 21's finding 8 on a `[[tcp_inbound]]`: one source that opens connections and sends no
/// TLS byte gets `max_connections_per_source` of them; its next one is closed at once (not
/// after the 10 s handshake timeout) and counted, while report-service's connections from
/// another address still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_tcp_inbound_slot() {
    let pki = Pki::new(TD);
    let db = echo_db(&pki, "max_connections_per_source = 3").await;
    let inbound = db.listener("tcp_inbound:postgres");
    let source = Some("127.0.0.2".parse().expect("address"));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tcp_connect_from(inbound, source).await.expect("connect"));
    }
    // Closed at once, not after the 10 s handshake timeout.
    let mut fourth = tcp_connect_from(inbound, source).await.expect("connect");
    closed_by_peer(&mut fourth, Duration::from_secs(3)).await;
    eventually("the refusal counted", Duration::from_secs(5), async || {
        let refused = metric(
            &db,
            "gatehouse_tcp_connections_total",
            &[
                ("listener", "postgres"),
                ("result", "refused_source_connections"),
            ],
        )
        .await;
        (refused >= 1.0).then_some(())
    })
    .await
    .expect("gatehouse_tcp_connections_total{result=\"refused_source_connections\"} counted");

    // report-service, from 127.0.0.1, is served while 127.0.0.2 holds its cap.
    let client = client_sidecar(&pki.issue(REPORT_ID), &db).await;
    let local = client.listener("tcp_outbound:reports-db");
    assert_eq!(send_then_eof(local, b"hello").await, "got 5 bytes");
    drop(held);
}
