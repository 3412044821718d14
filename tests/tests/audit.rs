//! The audit log of both sidecar sides, end to end over the real `sidecar` binary: app →
//! outbound sidecar → inbound sidecar → fake app, with `[audit]` set on both.
//! - `enabled = false` writes no line on either side and says so at startup;
//! - buffered lines (`flush_interval`) are not written per request, and appear within the
//!   interval;
//! - lines still buffered are written on SIGTERM, before the process exits 0;
//! - an audit file is hash-chained: `sidecar audit verify` passes on it, names the line where
//!   one was deleted, edited or swapped (exit 1), and a restarted sidecar continues the chain;
//! - one request gives an outbound and an inbound line with the same W3C trace id (the app's
//!   `traceparent` kept, or one derived from the request id on both sides), the policy's SHA-256 and both
//!   certificates' serials.
//!
//! Run `cargo build --workspace --bins` first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_tests::harness::{
    CertDir, FINTECH_TD, FakeApp, MONOLITH_ID, Pki, REPORT_EXPORT_POLICY, REPORT_SERVICE_ID,
    Sidecar, binary, eventually, http_get,
};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

struct Pair {
    pki: Pki,
    app: FakeApp,
    inbound: Sidecar,
    outbound: Sidecar,
    monolith: CertDir,
    report: CertDir,
}

/// Both sidecars with `audit` (lines under `[audit]`).
async fn pair(audit: &str) -> Pair {
    pair_with(audit, audit).await
}

/// Both sidecars, each with its own `[audit]` lines.
async fn pair_with(inbound_audit: &str, outbound_audit: &str) -> Pair {
    let pki = Pki::new(FINTECH_TD);
    let app = FakeApp::start().await;
    let monolith = pki.issue(MONOLITH_ID);
    let inbound = Sidecar::inbound(&monolith, app.addr(), REPORT_EXPORT_POLICY)
        .section(&format!("[audit]\n{inbound_audit}\n"))
        .spawn()
        .await
        .expect("inbound sidecar starts");
    let report = pki.issue(REPORT_SERVICE_ID);
    let outbound = outbound_sidecar(&report, &inbound, outbound_audit).await;
    Pair {
        pki,
        app,
        inbound,
        outbound,
        monolith,
        report,
    }
}

/// report-service's sidecar with an `[[outbound]]` entry to `inbound`.
async fn outbound_sidecar(cert: &CertDir, inbound: &Sidecar, audit: &str) -> Sidecar {
    let entry = format!(
        "[[outbound]]\nname = \"monolith\"\nlisten = \"127.0.0.1:0\"\nconnect = \"{}\"\nserver_id = \"{MONOLITH_ID}\"\n",
        inbound.inbound_addr()
    );
    Sidecar::builder(cert)
        .section(&entry)
        .section(&format!("[audit]\n{audit}\n"))
        .spawn()
        .await
        .expect("outbound sidecar starts")
}

/// One allowed and one denied request through the pair.
async fn two_requests(p: &Pair) {
    let out = p.outbound.listener("outbound:monolith");
    let (status, _) = http_get(out, "/api/data/reports?x=1")
        .await
        .expect("allowed request");
    assert_eq!(status, StatusCode::OK);
    let (status, _) = http_get(out, "/api/secret").await.expect("denied request");
    assert_eq!(status, StatusCode::FORBIDDEN);
}

async fn wait_lines(s: &Sidecar, n: usize, within: Duration) -> Vec<serde_json::Value> {
    eventually("audit lines", within, async || {
        let a = s.audit();
        (a.len() >= n).then_some(a)
    })
    .await
    .unwrap_or_else(|_| panic!("{n} audit lines within {within:?}: {:?}", s.stdout_lines()))
}

#[tokio::test]
async fn disabled_audit_writes_no_line_on_either_side_and_warns() {
    let p = pair("enabled = false").await;
    two_requests(&p).await;
    // The requests were decided and counted...
    let counted = p
        .inbound
        .metric("gatehouse_inbound_requests_total", &[])
        .await
        .expect("metrics");
    assert_eq!(counted, 2.0);
    // ...and, well past the default flush interval, nothing was written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in [&p.inbound, &p.outbound] {
        assert!(s.stdout_lines().is_empty(), "{:?}", s.stdout_lines());
        let err = s.stderr_text();
        assert!(
            err.contains("audit log OFF") && err.contains("decisions are not recorded"),
            "startup warning: {err}"
        );
    }
}

#[tokio::test]
async fn issue_19_without_an_audit_log_the_outbound_adds_no_traceparent() {
    // The trace id only joins two audit lines: with the log off, starting one cost both
    // sidecars an HPACK encode and decode per request and changed what the app sent.
    let p = pair("enabled = false").await;
    let out = p.outbound.listener("outbound:monolith");
    let (status, _) = get_with(out, "/api/data/reports", &[("x-request-id", "tp-1")]).await;
    assert_eq!(status, StatusCode::OK);
    let invalid = "00-not-a-trace";
    let (status, _) = get_with(
        out,
        "/api/data/reports",
        &[("x-request-id", "tp-2"), ("traceparent", invalid)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = p.app.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[0].headers.get("traceparent").is_none(),
        "none sent, none added: {:?}",
        seen[0].headers
    );
    assert_eq!(
        seen[1].headers["traceparent"], invalid,
        "the app's header passes as sent"
    );
}

#[tokio::test]
async fn buffered_lines_are_written_together_within_the_flush_interval() {
    let p = pair("flush_interval = \"2s\"").await;
    let started = Instant::now();
    two_requests(&p).await;
    if started.elapsed() < Duration::from_millis(1500) {
        for s in [&p.inbound, &p.outbound] {
            assert!(
                s.stdout_lines().is_empty(),
                "lines are buffered, not written per request: {:?}",
                s.stdout_lines()
            );
        }
    }
    for s in [&p.inbound, &p.outbound] {
        let lines = wait_lines(s, 2, Duration::from_secs(8)).await;
        assert_eq!(lines.len(), 2, "{lines:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "2 s interval, written after {waited:?}"
    );
    let inbound = p.inbound.audit();
    assert_eq!(inbound[0]["decision"], "allow");
    assert_eq!(inbound[1]["decision"], "deny");
    let outbound = p.outbound.audit();
    assert_eq!(outbound[0]["direction"], "outbound");
    assert_eq!(outbound[1]["status"], 403);
    assert_eq!(outbound[0]["request_id"], inbound[0]["request_id"]);
}

#[tokio::test]
async fn sigterm_writes_every_buffered_line_before_exiting() {
    let mut p = pair("flush_interval = \"10s\"").await;
    let started = Instant::now();
    two_requests(&p).await;
    for s in [&p.inbound, &p.outbound] {
        assert!(s.stdout_lines().is_empty(), "{:?}", s.stdout_lines());
    }
    p.outbound.sigterm();
    p.inbound.sigterm();
    for s in [&mut p.outbound, &mut p.inbound] {
        let exit = s.wait_exit(Duration::from_secs(8)).await.expect("exits");
        assert!(exit.success(), "exit status {exit}");
        let lines = wait_lines(s, 2, Duration::from_secs(2)).await;
        assert_eq!(lines.len(), 2, "{lines:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "written by the shutdown, not by the 10 s interval: {waited:?}"
    );
}

/// `sidecar audit verify FILES…`: exit code, stdout and stderr.
fn verify(files: &[&Path]) -> (i32, String, String) {
    let out = Command::new(binary("sidecar"))
        .args(["audit", "verify"])
        .args(files)
        .output()
        .expect("run sidecar audit verify");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn wait_file_lines(path: &Path, n: usize) -> Vec<String> {
    eventually("audit file lines", Duration::from_secs(10), async || {
        let l = file_lines(path);
        (l.len() >= n).then_some(l)
    })
    .await
    .unwrap_or_else(|_| panic!("{n} lines in {}: {:?}", path.display(), file_lines(path)))
}

/// Writes `lines` (each with its newline) to a fresh file in `dir` and returns its path.
fn write_lines(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let p = dir.join(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&p, text).expect("write");
    p
}

/// Stops the outbound sidecar (SIGTERM, exit 0) and starts a new one with `audit`.
async fn restart_outbound(p: &mut Pair, audit: &str) {
    p.outbound.sigterm();
    let exit = p
        .outbound
        .wait_exit(Duration::from_secs(8))
        .await
        .expect("exits");
    assert!(exit.success(), "{exit}");
    p.outbound = outbound_sidecar(&p.report, &p.inbound, audit).await;
}

#[tokio::test]
async fn audit_file_verifies_names_a_deleted_edited_or_swapped_line_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("outbound-audit.log");
    let file_audit = format!("path = \"{}\"\nflush_interval = \"0s\"", log.display());
    let mut p = pair_with("", &file_audit).await;
    two_requests(&p).await;
    two_requests(&p).await;
    let lines = wait_file_lines(&log, 4).await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    let (code, out, err) = verify(&[&log]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 4 lines verified"), "{out}");

    // A restarted sidecar appends to the file and continues its chain.
    restart_outbound(&mut p, &file_audit).await;
    two_requests(&p).await;
    let lines = wait_file_lines(&log, 6).await;
    assert_eq!(lines.len(), 6, "{lines:?}");
    let fifth: serde_json::Value = serde_json::from_str(&lines[4]).expect("JSON");
    assert_eq!(fifth["chain_start"], true, "{fifth}");
    assert_eq!(
        fifth["prev"],
        hex::encode(Sha256::digest(lines[3].as_bytes())),
        "the first line after the restart names the last line before it"
    );
    let (code, out, err) = verify(&[&log]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok: 6 lines verified") && out.contains("2 chain start(s)"),
        "{out}"
    );
    // Rotated away (moved) and the sidecar restarted on a new file: the new file's first line
    // names the rotated file's last line (the `.chain` anchor file), so both verify in order.
    let rotated = dir.path().join("outbound-audit.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    restart_outbound(&mut p, &file_audit).await;
    two_requests(&p).await;
    let after = wait_file_lines(&log, 2).await;
    let first: serde_json::Value = serde_json::from_str(&after[0]).expect("JSON");
    assert_eq!(first["chain_start"], true, "{first}");
    assert_eq!(
        first["prev"],
        hex::encode(Sha256::digest(lines[5].as_bytes()))
    );
    let (code, out, err) = verify(&[&rotated, &log]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 8 lines verified"), "{out}");
    // Split in two files (as rotation leaves them), verified in order.
    let old = write_lines(dir.path(), "old.log", &lines[..4]);
    let new = write_lines(dir.path(), "new.log", &lines[4..]);
    let (code, out, err) = verify(&[&old, &new]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = verify(&[&new, &old]);
    assert_eq!(code, 1, "files out of order: {err}");
    assert!(err.contains("old.log:1:"), "{err}");

    // Any one line deleted, edited or swapped with the next: verify names it, exit 1.
    for k in 0..lines.len() {
        let n = k + 1;
        let mut deleted = lines.clone();
        deleted.remove(k);
        let f = write_lines(dir.path(), "deleted.log", &deleted);
        let (code, out, err) = verify(&[&f]);
        if k == lines.len() - 1 {
            // The tail: nothing after it names it; verify prints the last hash to anchor.
            assert_eq!(code, 0, "{out}{err}");
            continue;
        }
        assert_eq!(code, 1, "deleted line {n}: {out}");
        assert!(
            err.contains(&format!("deleted.log:{n}:")),
            "deleted line {n}: {err}"
        );

        let mut edited = lines.clone();
        edited[k] = edited[k].replacen("\"status\":", "\"status\":1", 1);
        assert_ne!(edited[k], lines[k]);
        let f = write_lines(dir.path(), "edited.log", &edited);
        let (code, out, err) = verify(&[&f]);
        assert_eq!(code, 1, "edited line {n}: {out}");
        assert!(
            err.contains(&format!("edited.log:{}: broken chain", n + 1))
                && err.contains(&format!("edited.log:{n})")),
            "edited line {n}: {err}"
        );

        let mut swapped = lines.clone();
        swapped.swap(k, k + 1);
        let f = write_lines(dir.path(), "swapped.log", &swapped);
        let (code, out, err) = verify(&[&f]);
        assert_eq!(code, 1, "swapped lines {n} and {}: {out}", n + 1);
        assert!(
            err.contains(&format!("swapped.log:{n}:")),
            "swapped line {n}: {err}"
        );
    }
}

/// A GET through the outbound listener with `headers`.
async fn get_with(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Empty::<Bytes>::new()).expect("request"))
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let _ = body.collect().await;
    (parts.status, parts.headers)
}

fn serial_of(cert: &CertDir) -> String {
    let pem = std::fs::read_to_string(cert.cert()).expect("cert");
    gatehouse_ca::inspect::inspect_pem(&pem, &cert.cert(), None, time::OffsetDateTime::now_utc())
        .expect("inspect")
        .serial
}

#[tokio::test]
async fn both_sides_log_one_trace_id_the_policy_hash_and_both_serials() {
    let p = pair("flush_interval = \"0s\"").await;
    let out = p.outbound.listener("outbound:monolith");
    // The app sent no traceparent: both sides derive the trace id from the request id, and the
    // inbound starts the app's traceparent with it.
    let (status, _) = get_with(out, "/api/data/reports", &[("x-request-id", "trace-1")]).await;
    assert_eq!(status, StatusCode::OK);
    // The app sent one: kept as sent, end to end.
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, _) = get_with(
        out,
        "/api/data/reports",
        &[("x-request-id", "trace-2"), ("traceparent", sent)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let ins = p.inbound.wait_audit(2).await.expect("inbound lines");
    let outs = p.outbound.wait_audit(2).await.expect("outbound lines");
    let policy_sha = hex::encode(Sha256::digest(
        std::fs::read(p.inbound.policy_path()).expect("policy"),
    ));
    let (caller_serial, server_serial) = (serial_of(&p.report), serial_of(&p.monolith));
    assert_eq!(caller_serial.len(), 40, "{caller_serial}");
    assert_ne!(caller_serial, server_serial);
    let seen = p.app.requests();
    for (i, rid) in ["trace-1", "trace-2"].into_iter().enumerate() {
        let (i_line, o_line) = (&ins[i], &outs[i]);
        assert_eq!(i_line["request_id"], rid, "{i_line}");
        assert_eq!(o_line["request_id"], rid, "{o_line}");
        let trace = o_line["trace_id"].as_str().expect("outbound trace id");
        assert_eq!(trace.len(), 32, "{o_line}");
        assert!(
            trace
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(i_line["trace_id"], trace, "both sides join on the trace id");
        assert_eq!(i_line["policy_sha256"], policy_sha.as_str(), "{i_line}");
        assert_eq!(i_line["caller_serial"], caller_serial.as_str(), "{i_line}");
        assert_eq!(o_line["server_serial"], server_serial.as_str(), "{o_line}");
        let app_tp = seen[i].headers["traceparent"].to_str().expect("ascii");
        assert_eq!(
            &app_tp[3..35],
            trace,
            "the app got the same trace: {app_tp}"
        );
        if i == 1 {
            assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(app_tp, sent, "the app's traceparent is forwarded unchanged");
        }
    }
    let _ = &p.pki;
}
