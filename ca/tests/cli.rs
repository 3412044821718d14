//! The `ca` command line, run as a real process: help, init, sign, inspect, list, every bad input
//! from the issue (clear error, non-zero exit, no files left), concurrency, and openssl.

mod common;

use std::collections::HashSet;
use std::process::Command;

use common::{Sandbox, issue_args, pem_certs};

#[test]
fn every_subcommand_has_help() {
    let sb = Sandbox::new();
    for sub in [
        &["--help"][..],
        &["init", "--help"],
        &["issue", "--help"],
        &["sign", "--help"],
        &["inspect", "--help"],
        &["list", "--help"],
    ] {
        let out = sb.ok(sub);
        assert!(out.contains("Usage: ca"), "{sub:?}: {out}");
    }
    assert!(sb.ok(&["issue", "--help"]).contains("--spiffe-id"));
}

#[test]
fn init_refuses_to_overwrite_an_existing_ca() {
    let sb = Sandbox::new();
    sb.init(false);
    let before = sb.read("ca/gen-1/root.pem");
    let err = sb.fails(
        1,
        &["init", "--dir", "ca", "--trust-domain", "other.internal"],
    );
    assert!(
        err.contains("error: ") && err.contains("refusing to overwrite") && err.contains("help: "),
        "{err}"
    );
    assert_eq!(sb.read("ca/gen-1/root.pem"), before, "root untouched");
    assert!(
        !sb.tree().iter().any(|p| p.contains(".init-")),
        "no temp dir left: {:?}",
        sb.tree()
    );
}

#[test]
fn init_with_invalid_trust_domain_leaves_nothing() {
    let sb = Sandbox::new();
    let err = sb.fails(
        2,
        &["init", "--dir", "ca", "--trust-domain", "Fintech.Internal"],
    );
    assert!(
        err.contains("invalid character 'F'") && err.contains("help:"),
        "{err}"
    );
    assert!(sb.tree().is_empty());
}

/// Runs a failing `ca issue`/`ca sign` and checks: exit code, message, help, and that neither
/// the sandbox tree nor the inventory changed.
fn assert_refused(sb: &Sandbox, code: i32, args: &[&str], message: &str) {
    let tree = sb.tree();
    let inventory = std::fs::read_to_string(sb.path("ca/inventory.jsonl")).ok();
    let err = sb.fails(code, args);
    assert!(
        err.starts_with("error: ") && err.contains(message),
        "{args:?}: expected {message:?} in:\n{err}"
    );
    assert!(
        err.contains("\nhelp: "),
        "{args:?}: a help line says what to do:\n{err}"
    );
    assert_eq!(sb.tree(), tree, "{args:?} left files behind");
    assert_eq!(
        std::fs::read_to_string(sb.path("ca/inventory.jsonl")).ok(),
        inventory,
        "inventory unchanged"
    );
}

#[test]
fn bad_issue_inputs_get_a_clear_error_and_leave_no_files() {
    let sb = Sandbox::new();
    sb.init(false);
    assert_refused(
        &sb,
        2,
        &issue_args("spiffe://fintech.internal/a/../b", &[], "o"),
        "`.` and `..` are not allowed",
    );
    assert_refused(
        &sb,
        2,
        &issue_args("https://fintech.internal/a", &[], "o"),
        "must start with `spiffe://`",
    );
    assert_refused(
        &sb,
        1,
        &issue_args("spiffe://evil.internal/a", &[], "o"),
        "not in this CA's trust domain `fintech.internal`",
    );
    assert_refused(
        &sb,
        1,
        &issue_args("spiffe://fintech.internal/a", &["--ttl", "100000h"], "o"),
        "after the signing CA certificate expires",
    );
    let err = sb.fails(
        2,
        &[
            "issue",
            "--dir",
            "missing",
            "--spiffe-id",
            "spiffe://fintech.internal/a",
            "--out",
            "o",
        ],
    );
    assert!(
        err.contains("error: no CA in missing")
            && err.contains("help: run `ca init --dir missing --trust-domain"),
        "{err}"
    );
    assert!(!sb.path("missing").exists() && !sb.path("o").exists());
    assert_refused(
        &sb,
        2,
        &issue_args("spiffe://fintech.internal/a", &["--dns", "bad name"], "o"),
        "invalid DNS name",
    );
    std::fs::write(sb.path("file.txt"), "x").expect("write");
    assert_refused(
        &sb,
        2,
        &issue_args("spiffe://fintech.internal/a", &[], "file.txt/deeper/o"),
        "cannot write into file.txt",
    );
    // Missing parents of --out are created.
    sb.ok(&issue_args(
        "spiffe://fintech.internal/a",
        &[],
        "certs/team/a",
    ));
    assert!(sb.path("certs/team/a/cert.pem").exists());
}

#[test]
fn ttl_beyond_an_intermediate_ca_is_refused_not_truncated() {
    let sb = Sandbox::new();
    sb.ok(&[
        "init",
        "--dir",
        "ca",
        "--trust-domain",
        "fintech.internal",
        "--intermediate",
        "--ttl",
        "48h",
    ]);
    assert_refused(
        &sb,
        1,
        &issue_args("spiffe://fintech.internal/a", &["--ttl", "49h"], "o"),
        "after the signing CA certificate expires",
    );
    sb.ok(&issue_args(
        "spiffe://fintech.internal/a",
        &["--ttl", "47h"],
        "o",
    ));
}

fn write_csr(sb: &Sandbox, name: &str, requested_san: &str) -> rcgen::KeyPair {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["evil.example.com".to_owned()]).expect("params");
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(requested_san.try_into().expect("ia5")));
    let csr = params.serialize_request(&key).expect("csr");
    std::fs::write(sb.path(name), csr.pem().expect("pem")).expect("write csr");
    key
}

#[test]
fn sign_uses_the_cli_identity_never_the_csr_sans() {
    let sb = Sandbox::new();
    sb.init(true);
    let key = write_csr(&sb, "req.pem", "spiffe://fintech.internal/admin");
    let out = sb.ok(&[
        "sign",
        "--dir",
        "ca",
        "--csr",
        "req.pem",
        "--spiffe-id",
        "spiffe://fintech.internal/reports",
        "--dns",
        "reports.internal",
        "--out",
        "reports.pem",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["spiffe_id"], "spiffe://fintech.internal/reports");
    let chain = pem_certs(&sb.read("reports.pem"));
    assert_eq!(chain.len(), 2);
    let inspect: serde_json::Value = serde_json::from_str(&sb.ok(&[
        "inspect",
        "reports.pem",
        "--bundle",
        "ca/bundle.pem",
        "--format",
        "json",
    ]))
    .expect("json");
    assert_eq!(
        inspect["uri_sans"],
        serde_json::json!(["spiffe://fintech.internal/reports"])
    );
    assert_eq!(
        inspect["dns"],
        serde_json::json!(["reports.internal"]),
        "evil.example.com from the CSR is dropped"
    );
    assert_eq!(inspect["verified"], true);
    assert_eq!(inspect["serial"], v["serial"]);
    // The certificate carries the CSR's public key; the CA never saw the private key.
    let (_, cert) = <x509_parser::certificate::X509Certificate as x509_parser::prelude::FromDer<
        _,
    >>::from_der(&chain[0])
    .expect("parse");
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    let list: serde_json::Value =
        serde_json::from_str(&sb.ok(&["list", "--dir", "ca", "--format", "json"])).expect("json");
    assert_eq!(list[0]["source"], "sign");
}

#[test]
fn malformed_csr_and_csr_with_bad_signature_are_refused_and_leave_no_files() {
    let sb = Sandbox::new();
    sb.init(false);
    std::fs::write(
        sb.path("garbage.pem"),
        "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n",
    )
    .expect("write");
    std::fs::write(sb.path("text.txt"), "hello").expect("write");
    let sign = |csr: &'static str| {
        [
            "sign",
            "--dir",
            "ca",
            "--csr",
            csr,
            "--spiffe-id",
            "spiffe://fintech.internal/a",
            "--out",
            "a.pem",
        ]
    };
    assert_refused(&sb, 2, &sign("garbage.pem"), "malformed CSR garbage.pem");
    assert_refused(&sb, 2, &sign("text.txt"), "malformed CSR text.txt");
    assert_refused(&sb, 2, &sign("absent.pem"), "cannot read absent.pem");

    // A valid CSR whose signature bytes are altered: parses, but the signature does not verify.
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr");
    let mut der = csr.der().as_ref().to_vec();
    let last = der.len() - 3;
    der[last] ^= 0x5a;
    std::fs::write(sb.path("tampered.der"), &der).expect("write");
    assert_refused(
        &sb,
        1,
        &sign("tampered.der"),
        "the signature of CSR tampered.der does not verify",
    );
    // The untampered DER is accepted (so the failure above is the signature, not the encoding).
    std::fs::write(sb.path("good.der"), csr.der().as_ref()).expect("write");
    sb.ok(&sign("good.der"));
}

#[test]
fn inspect_reports_identity_and_fails_against_a_foreign_bundle() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.ok(&issue_args(
        "spiffe://fintech.internal/api",
        &["--dns", "api.internal", "--ttl", "2h"],
        "api",
    ));
    let text = sb.ok(&["inspect", "api/cert.pem", "--bundle", "api/bundle.pem"]);
    for want in [
        "spiffe://fintech.internal/api",
        "api.internal",
        "ecdsa-p256",
        "verifies    yes",
        "left",
    ] {
        assert!(text.contains(want), "missing {want:?}:\n{text}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&sb.ok(&["inspect", "api/cert.pem", "--format", "json"]))
            .expect("json");
    assert_eq!(v["spiffe_id"], "spiffe://fintech.internal/api");
    let left = v["seconds_left"].as_i64().expect("seconds_left");
    assert!((7000..=7200).contains(&left), "{left}");
    assert_eq!(v["is_ca"], false);

    sb.ok(&["init", "--dir", "other", "--trust-domain", "other.internal"]);
    let out = sb.ca(&["inspect", "api/cert.pem", "--bundle", "other/bundle.pem"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a chain that does not verify exits 1"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("verifies    NO"));
    sb.fails(2, &["inspect", "ca/inventory.jsonl"]);
}

#[test]
fn list_shows_the_inventory_in_text_and_json() {
    let sb = Sandbox::new();
    sb.init(false);
    assert!(
        sb.ok(&["list", "--dir", "ca"])
            .contains("no certificates issued yet")
    );
    sb.issue("a");
    sb.issue("b");
    let text = sb.ok(&["list", "--dir", "ca"]);
    assert!(
        text.contains("SERIAL")
            && text.contains("spiffe://fintech.internal/a")
            && text.contains("valid"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&sb.ok(&["list", "--dir", "ca", "--format", "json"])).expect("json");
    let rows = v.as_array().expect("array");
    assert_eq!(rows.len(), 2);
    for key in [
        "serial",
        "spiffe_id",
        "not_after",
        "sha256",
        "issued_at",
        "state",
    ] {
        assert!(rows[0].get(key).is_some(), "{key} in {}", rows[0]);
    }
    let inspect: serde_json::Value =
        serde_json::from_str(&sb.ok(&["inspect", "b/cert.pem", "--format", "json"])).expect("json");
    assert_eq!(
        rows[1]["sha256"], inspect["sha256"],
        "fingerprint matches the certificate"
    );
    assert_eq!(rows[1]["serial"], inspect["serial"]);
}

/// `ca list | head -1` (a reader that stops reading) is not a crash: exit 0 and nothing on
/// stderr, for every command that prints, in text and JSON. The pipe's read end is closed
/// before `ca` starts, so every write meets the broken pipe (`println!` panicked there). Output
/// that cannot be written for another reason (`> /dev/full`) is exit 2 with the error on stderr,
/// and the command's work is done (the certificate is issued and in the inventory).
#[test]
fn output_into_a_closed_pipe_exits_0_and_into_a_full_disk_exits_2() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("a");
    let run = |args: &[&str], stdout: std::process::Stdio| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(args)
            .current_dir(sb.path(""))
            .stdout(stdout)
            .output()
            .expect("run ca")
    };
    for format in ["text", "json"] {
        let id = format!("spiffe://fintech.internal/{format}");
        let commands: [&[&str]; 4] = [
            &["list", "--dir", "ca"],
            &["inspect", "a/cert.pem", "--bundle", "ca/bundle.pem"],
            &["issue", "--dir", "ca", "--spiffe-id", &id, "--out", format],
            &["crl", "--dir", "ca", "--out", "crl.pem"],
        ];
        for args in commands {
            let args = [args, &["--format", format]].concat();
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            let out = run(&args, writer.into());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.is_empty(),
                "{args:?}: {} {stderr}",
                out.status
            );
        }
    }
    let full = std::fs::File::create("/dev/full").expect("/dev/full");
    let out = run(
        &[
            "issue",
            "--dir",
            "ca",
            "--spiffe-id",
            "spiffe://fintech.internal/c",
            "--out",
            "c",
        ],
        full.into(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot write to stdout") && stderr.contains("help:"),
        "{stderr}"
    );
    assert!(sb.path("c/cert.pem").exists(), "the work is done");
    let list = sb.ca(&["list", "--dir", "ca"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("spiffe://fintech.internal/c"),
        "the inventory holds it"
    );
}

#[test]
fn eight_concurrent_issues_get_distinct_serials_and_well_formed_inventory_lines() {
    let sb = Sandbox::new();
    sb.init(true);
    let children: Vec<_> = (0..8)
        .map(|i| {
            let (id, out) = (format!("spiffe://fintech.internal/w{i}"), format!("w{i}"));
            sb.spawn(&issue_args(&id, &["--format", "json"], &out))
        })
        .collect();
    let mut serials = HashSet::new();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert!(serials.insert(v["serial"].as_str().expect("serial").to_owned()));
    }
    assert_eq!(serials.len(), 8);
    let ledger = sb.read("ca/inventory.jsonl");
    let lines: Vec<&str> = ledger.lines().collect();
    assert_eq!(lines.len(), 8, "{ledger}");
    let mut ledger_serials = HashSet::new();
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("malformed line {line:?}: {e}"));
        assert_eq!(v["event"], "issued");
        ledger_serials.insert(v["serial"].as_str().expect("serial").to_owned());
    }
    assert_eq!(
        ledger_serials, serials,
        "every issued serial is in the ledger, once"
    );
}

fn openssl_verify(sb: &Sandbox, extra: &[&str], cert: &str) -> std::process::Output {
    let mut args = vec!["verify", "-x509_strict", "-CAfile", "ca/bundle.pem"];
    args.extend_from_slice(extra);
    args.push(cert);
    Command::new("openssl")
        .args(&args)
        .current_dir(sb.tmp.path())
        .output()
        .expect("openssl is installed (see .ci/run)")
}

#[test]
fn openssl_x509_strict_accepts_issued_leaves_with_and_without_intermediate() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("api");
    let out = openssl_verify(&sb, &[], "api/cert.pem");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("api/cert.pem: OK"));
    for purpose in ["sslclient", "sslserver"] {
        let out = openssl_verify(&sb, &["-purpose", purpose], "api/cert.pem");
        assert!(
            out.status.success(),
            "{purpose}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let sb = Sandbox::new();
    sb.init(true);
    sb.issue("api");
    let out = openssl_verify(
        &sb,
        &[
            "-untrusted",
            "ca/gen-1/intermediate.pem",
            "-purpose",
            "sslserver",
        ],
        "api/cert.pem",
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it does need the intermediate: the root alone does not sign the leaf.
    assert!(!openssl_verify(&sb, &[], "api/cert.pem").status.success());
}

/// Every file of the CA directory with its bytes: "the CA is untouched" assertions.
fn ca_snapshot(sb: &Sandbox) -> Vec<(String, Vec<u8>)> {
    sb.tree()
        .into_iter()
        .filter(|p| p == "ca" || p.starts_with("ca/"))
        .map(|p| {
            let full = sb.path(&p);
            let bytes = if full.is_dir() {
                Vec::new()
            } else {
                std::fs::read(&full).expect("read CA file")
            };
            (p, bytes)
        })
        .collect()
}

/// Issue 21 finding 14: `ca crl --out CA/gen-1/intermediate.key` replaced the signing key and
/// `ca sign --out CA/ca.json` corrupted the CA. Every command that writes a path the user named
/// refuses one inside the CA directory (links, `..` and not-yet-existing files resolved), with
/// exit 1 and a help line, before anything is signed, revoked or numbered.
#[test]
fn outputs_inside_the_ca_directory_are_refused_and_leave_the_ca_untouched() {
    let sb = Sandbox::new();
    sb.init(true);
    sb.issue("svc");
    write_csr(&sb, "req.pem", "spiffe://fintech.internal/x");
    std::os::unix::fs::symlink("ca", sb.path("link")).expect("dir symlink");
    std::os::unix::fs::symlink("ca/ca.json", sb.path("state-link.pem")).expect("file symlink");
    let serial = sb.read("svc/cert.pem");
    let serial = pem_certs(&serial)[0].clone();
    let serial = x509_serial(&serial);
    let abs_state = sb.path("ca/ca.json").display().to_string();
    let id = "spiffe://fintech.internal/x";
    let sign_to = |out| {
        let mut args = vec!["sign", "--dir", "ca", "--csr", "req.pem"];
        args.extend(["--spiffe-id", id, "--out", out]);
        args
    };
    let revoke_to = |crl| vec!["revoke", "--dir", "ca", "--serial", &serial, "--crl", crl];
    let before = ca_snapshot(&sb);
    let cases: Vec<Vec<&str>> = vec![
        vec!["crl", "--dir", "ca", "--out", "ca/gen-1/intermediate.key"],
        vec!["crl", "--dir", "ca", "--out", "ca/crl.pem"],
        vec!["crl", "--dir", "ca", "--out", &abs_state],
        vec!["crl", "--dir", "ca", "--out", "link/ca.json"],
        vec!["crl", "--dir", "ca", "--out", "link/new-crl.pem"],
        vec!["crl", "--dir", "ca", "--out", "missing/../ca/ca.json"],
        vec!["crl", "--dir", "ca", "--out", "svc/../ca/inventory.jsonl"],
        vec!["crl", "--dir", "./link/", "--out", "ca/bundle.pem"],
        vec!["crl", "--dir", "ca", "--out", "state-link.pem"],
        vec!["crl", "--dir", "ca", "--out", "ca/new/dir/crl.pem"],
        sign_to("ca/ca.json"),
        issue_args(id, &[], "ca"),
        issue_args(id, &[], "ca/gen-1"),
        issue_args(id, &[], "link/certs/x"),
        revoke_to("ca/bundle.pem"),
        vec!["rotate", "--dir", "ca", "--force", "ca/gen-1"],
    ];
    for args in &cases {
        let err = sb.fails(1, args);
        assert!(
            err.starts_with("error: refusing to write ")
                && err.contains("inside the CA directory")
                && err.contains("\nhelp: write outputs outside "),
            "{args:?}:\n{err}"
        );
        assert_eq!(
            ca_snapshot(&sb),
            before,
            "{args:?} changed the CA directory"
        );
    }
    assert!(!sb.path("missing").exists(), "nothing created on refusal");
    // The key is still a key and the CA still signs: nothing above reached it.
    sb.ok(&["crl", "--dir", "ca", "--out", "crl.pem"]);
    sb.ok(&sign_to("x.pem"));
    // Outside is outside, however it is spelled: a sibling whose name starts with the CA's.
    sb.ok(&["crl", "--dir", "ca", "--out", "ca-public/crl.pem"]);
    sb.ok(&["crl", "--dir", "link", "--out", "ca/../crl2.pem"]);
    sb.ok(&revoke_to("pub/crl.pem"));
    sb.ok(&["rotate", "--dir", "ca", "svc"]);
}

/// The serial of a DER certificate, lowercase hex (as `ca list` prints it).
fn x509_serial(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).expect("parse leaf");
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
