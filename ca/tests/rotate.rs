//! `ca rotate` and root rotation, run as real processes: nothing re-issued on a second run, key
//! and certificate always match (even when `ca rotate` is SIGKILLed), `--keep-key`, root overlap
//! and retirement.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{Sandbox, issue_args, pem_certs};
use gatehouse_ca::{Authority, SpiffeId, inspect, store};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

fn ledger_lines(sb: &Sandbox) -> usize {
    sb.read("ca/inventory.jsonl").lines().count()
}

fn serial_of(dir: &Path) -> String {
    let der =
        pem_certs(&std::fs::read_to_string(dir.join("cert.pem")).expect("cert.pem")).remove(0);
    hex::encode(
        X509Certificate::from_der(&der)
            .expect("parse")
            .1
            .raw_serial(),
    )
}

/// cert.pem and key.pem of `dir` belong together.
/// `inspect::verify_chain` of the leaf file `leaf` against the roots file `roots` (sandbox paths).
fn verify_chain(
    sb: &Sandbox,
    leaf: &str,
    roots: &str,
    now: OffsetDateTime,
) -> Result<(), gatehouse_ca::CaError> {
    inspect::verify_chain(
        &sb.read(leaf),
        &sb.path(leaf),
        &sb.read(roots),
        &sb.path(roots),
        now,
    )
}

fn assert_matching_pair(dir: &Path) {
    let cert = std::fs::read_to_string(dir.join("cert.pem"))
        .unwrap_or_else(|e| panic!("{}: cert.pem: {e}", dir.display()));
    let key = std::fs::read_to_string(dir.join("key.pem"))
        .unwrap_or_else(|e| panic!("{}: key.pem: {e}", dir.display()));
    let der = pem_certs(&cert).remove(0);
    let (_, parsed) = X509Certificate::from_der(&der).expect("parse");
    let key = rcgen::KeyPair::from_pem(&key).expect("key parses");
    assert_eq!(
        parsed.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "{}: key.pem does not match cert.pem",
        dir.display()
    );
}

#[test]
fn rotate_twice_reissues_nothing_the_second_time() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("a");
    sb.issue("b");
    let before = ledger_lines(&sb);
    let out = sb.ok(&["rotate", "--dir", "ca", "a", "b"]);
    assert!(
        out.contains("current a") && out.contains("current b"),
        "{out}"
    );
    assert_eq!(ledger_lines(&sb), before, "nothing due: nothing issued");

    let (a0, b0) = (serial_of(&sb.path("a")), serial_of(&sb.path("b")));
    let out = sb.ok(&[
        "rotate", "--dir", "ca", "--force", "a", "b", "--format", "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["action"], "rotated");
    assert_eq!(v[0]["old_serial"], a0.as_str());
    assert_eq!(v[1]["old_serial"], b0.as_str());
    assert_ne!(serial_of(&sb.path("a")), a0);
    assert_eq!(ledger_lines(&sb), before + 2, "each rotation is recorded");
    let list: serde_json::Value =
        serde_json::from_str(&sb.ok(&["list", "--dir", "ca", "--format", "json"])).expect("json");
    assert_eq!(list[0]["state"], "superseded");
    assert_eq!(list[2]["source"], "rotate");
    assert_eq!(list[2]["replaces"], a0.as_str());

    // Second run right away: not due, nothing re-issued, same certificates on disk.
    let (a1, b1) = (serial_of(&sb.path("a")), serial_of(&sb.path("b")));
    let out = sb.ok(&["rotate", "--dir", "ca", "a", "b", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        v.as_array()
            .expect("array")
            .iter()
            .all(|r| r["action"] == "current"),
        "{v}"
    );
    assert_eq!(
        (serial_of(&sb.path("a")), serial_of(&sb.path("b"))),
        (a1, b1)
    );
    assert_eq!(ledger_lines(&sb), before + 2);
    assert_matching_pair(&sb.path("a"));
    assert_matching_pair(&sb.path("b"));
}

#[test]
fn a_certificate_in_the_last_third_of_its_life_is_rotated_with_the_same_identity() {
    let sb = Sandbox::new();
    sb.init(true);
    let ca = Authority::open(&sb.path("ca")).expect("open");
    // A 24 h certificate with 4 h left: inside the default window (the last 8 h).
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["old.internal".to_owned()]).expect("params");
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://fintech.internal/old".try_into().expect("ia5"),
    ));
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(20) - time::Duration::minutes(5);
    params.not_after = now + time::Duration::hours(4);
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = ca.sign_custom(params, &key).expect("sign");
    store::write_cert_dir(
        &sb.path("old"),
        &cert,
        &key.serialize_pem(),
        &ca.bundle_pem().expect("bundle"),
    )
    .expect("write");
    let old_serial = serial_of(&sb.path("old"));

    let out = sb.ok(&["rotate", "--dir", "ca", "old"]);
    assert!(
        out.contains("rotated old") && out.contains("inside its renewal window"),
        "{out}"
    );
    let report = inspect::inspect_pem(
        &sb.read("old/cert.pem"),
        &sb.path("old/cert.pem"),
        Some((&sb.read("old/bundle.pem"), &sb.path("old/bundle.pem"))),
        OffsetDateTime::now_utc(),
    )
    .expect("inspect");
    assert_eq!(
        report.spiffe_id.as_deref(),
        Some("spiffe://fintech.internal/old")
    );
    assert_eq!(report.dns, vec!["old.internal"]);
    assert_eq!(report.verified, Some(true));
    assert_ne!(report.serial, old_serial);
    let left = report.seconds_left;
    assert!(
        (23 * 3600..=24 * 3600).contains(&left),
        "same lifetime as before: {left}"
    );
    assert_matching_pair(&sb.path("old"));
    // Its key changed (default) ...
    assert_ne!(sb.read("old/key.pem"), key.serialize_pem());
    // ... and the next run finds nothing to do.
    assert!(
        sb.ok(&["rotate", "--dir", "ca", "old"])
            .contains("current old")
    );
    // The renewal window is configurable.
    assert!(
        sb.ok(&["rotate", "--dir", "ca", "--renew-before", "25h", "old"])
            .contains("rotated old")
    );
}

#[test]
fn keep_key_reuses_the_key_and_default_replaces_it() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("svc");
    let key0 = sb.read("svc/key.pem");
    sb.ok(&["rotate", "--dir", "ca", "--force", "--keep-key", "svc"]);
    assert_eq!(sb.read("svc/key.pem"), key0);
    assert_matching_pair(&sb.path("svc"));
    sb.ok(&["rotate", "--dir", "ca", "--force", "svc"]);
    assert_ne!(sb.read("svc/key.pem"), key0);
    assert_matching_pair(&sb.path("svc"));
    assert_eq!(common::mode(&sb.path("svc/key.pem")), 0o600);
}

#[test]
fn rotate_refuses_directories_it_did_not_issue_and_keeps_going() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("mine");
    sb.ok(&[
        "init",
        "--dir",
        "other",
        "--trust-domain",
        "fintech.internal",
    ]);
    sb.ok(&[
        "issue",
        "--dir",
        "other",
        "--spiffe-id",
        "spiffe://fintech.internal/theirs",
        "--out",
        "theirs",
    ]);
    std::fs::create_dir(sb.path("empty")).expect("mkdir");
    let out = sb.ca(&[
        "rotate", "--dir", "ca", "--force", "theirs", "empty", "mine",
    ]);
    assert_eq!(out.status.code(), Some(1), "refused by rule");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot rotate theirs: serial")
            && stderr.contains("not in this CA's inventory"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cannot rotate empty: no cert.pem"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rotated mine"),
        "the valid directory was still rotated"
    );
}

#[test]
fn sigkill_during_rotate_leaves_every_directory_with_a_matching_cert_and_key() {
    let sb = Sandbox::new();
    sb.init(true);
    let ca = Authority::open(&sb.path("ca")).expect("open");
    let dirs: Vec<String> = (0..16).map(|i| format!("w{i}")).collect();
    for d in &dirs {
        let svid = ca
            .issue(&gatehouse_ca::IssueRequest {
                spiffe_id: SpiffeId::parse(&format!("spiffe://fintech.internal/{d}")).expect("id"),
                dns: vec![],
                ttl: Duration::from_secs(3600),
            })
            .expect("issue");
        svid.write_to(&sb.path(d)).expect("write");
    }
    let mut killed_mid_run = 0;
    for delay_ms in [1u64, 3, 6, 10, 15, 25, 40, 60, 90, 130, 200, 300] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(["rotate", "--dir", "ca", "--force"])
            .args(&dirs)
            .current_dir(sb.tmp.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
        let status = child.wait().expect("wait");
        if status.code().is_none() {
            killed_mid_run += 1;
        }
        for d in &dirs {
            assert_matching_pair(&sb.path(d));
        }
    }
    assert!(
        killed_mid_run > 0,
        "at least one run was killed before finishing"
    );
    // The CA and the directories are still usable afterwards.
    sb.ok(&["rotate", "--dir", "ca", "--force", "w0", "w15"]);
    for d in &dirs {
        assert_matching_pair(&sb.path(d));
        let versions = std::fs::read_dir(sb.path(d))
            .expect("dir")
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count();
        assert!(
            versions <= 2,
            "{d}: old versions are cleaned up ({versions})"
        );
    }
}

#[test]
fn root_rotation_overlaps_both_roots_then_retire_drops_the_old_one() {
    let sb = Sandbox::new();
    sb.init(true);
    sb.issue("api");
    let old_root = sb.read("ca/gen-1/root.pem");
    let out = sb.ok(&["root", "rotate", "--dir", "ca"]);
    assert!(out.contains("created root generation 2"), "{out}");
    let bundle = sb.read("ca/bundle.pem");
    assert_eq!(
        pem_certs(&bundle).len(),
        2,
        "old and new roots during the overlap"
    );
    assert!(bundle.contains(old_root.trim()));

    // The old leaf still verifies against the overlapping bundle; a new leaf chains to the new root.
    let now = OffsetDateTime::now_utc();
    verify_chain(&sb, "api/cert.pem", "ca/bundle.pem", now)
        .expect("old leaf verifies during overlap");
    sb.issue("new");
    let new_root = sb.read("ca/gen-2/root.pem");
    verify_chain(&sb, "new/cert.pem", "ca/gen-2/root.pem", now)
        .expect("new leaf chains to the new root");
    assert!(verify_chain(&sb, "new/cert.pem", "ca/gen-1/root.pem", now).is_err());

    // Retire refuses while an unexpired leaf chains to the old root.
    let err = sb.fails(1, &["root", "retire", "--dir", "ca"]);
    assert!(
        err.contains("1 unexpired")
            && err.contains("spiffe://fintech.internal/api")
            && err.contains("help:"),
        "{err}"
    );
    assert_eq!(
        pem_certs(&sb.read("ca/bundle.pem")).len(),
        2,
        "refusal changed nothing"
    );

    // `ca rotate` re-issues the old-root leaf (reason: old generation) and leaves the new one.
    let out = sb.ok(&["rotate", "--dir", "ca", "api", "new"]);
    assert!(
        out.contains("rotated api")
            && out.contains("signed by root generation 1")
            && out.contains("current new"),
        "{out}"
    );
    verify_chain(&sb, "api/cert.pem", "ca/gen-2/root.pem", now)
        .expect("re-issued leaf chains to the new root");

    sb.ok(&["root", "retire", "--dir", "ca"]);
    let bundle = sb.read("ca/bundle.pem");
    assert_eq!(
        pem_certs(&bundle),
        pem_certs(&new_root),
        "only the new root is left"
    );
    // The next rotate run hands the directories the new bundle without re-issuing.
    let out = sb.ok(&["rotate", "--dir", "ca", "api", "new"]);
    assert!(
        out.contains("bundle updated api") && out.contains("bundle updated new"),
        "{out}"
    );
    assert_eq!(sb.read("api/bundle.pem"), bundle);
    sb.fails(1, &["root", "retire", "--dir", "ca"]);
}

#[test]
fn root_retire_force_cuts_off_live_leaves_loudly() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("api");
    sb.ok(&["root", "rotate", "--dir", "ca"]);
    let out = sb.ca(&["root", "retire", "--dir", "ca", "--force"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: --force: 1 unexpired certificate(s)"),
        "{stderr}"
    );
    let inspect = sb.ca(&["inspect", "api/cert.pem", "--bundle", "ca/bundle.pem"]);
    assert_eq!(
        inspect.status.code(),
        Some(1),
        "the old leaf no longer verifies"
    );
}

#[test]
fn concurrent_writers_to_one_directory_take_turns() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("shared");
    let children: Vec<_> = (0..6)
        .map(|i| {
            if i % 2 == 0 {
                sb.spawn(&issue_args(
                    "spiffe://fintech.internal/shared",
                    &[],
                    "shared",
                ))
            } else {
                sb.spawn(&["rotate", "--dir", "ca", "--force", "shared"])
            }
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_matching_pair(&sb.path("shared"));
    let versions = std::fs::read_dir(sb.path("shared"))
        .expect("dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    assert_eq!(versions, 1, "exactly the current version is left");
}

#[test]
fn rotate_skips_a_revoked_directory_by_default_and_says_so() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("live");
    sb.issue("revoked");
    let revoked0 = serial_of(&sb.path("revoked"));
    sb.ok(&["revoke", "--dir", "ca", "--serial", &revoked0]);
    let before = ledger_lines(&sb);

    // The hourly job, even forced (as the root-rotation runbook does): the revoked identity is
    // not minted a fresh certificate, and the output says why and how to override.
    let out = sb.ok(&["rotate", "--dir", "ca", "--force", "live", "revoked"]);
    assert!(
        out.contains("skipped revoked (spiffe://fintech.internal/revoked)")
            && out.contains("--include-revoked"),
        "{out}"
    );
    assert!(out.contains("rotated live"), "{out}");
    assert_eq!(serial_of(&sb.path("revoked")), revoked0, "left as it was");
    assert_eq!(ledger_lines(&sb), before + 1, "only the live one re-issued");
    let out = sb.ok(&["rotate", "--dir", "ca", "revoked", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["action"], "skipped", "{v}");
    assert_eq!(v[0]["serial"], revoked0.as_str(), "{v}");

    // Re-issuing it takes the explicit flag, and never keeps the (possibly leaked) key.
    let err = sb.fails(
        1,
        &[
            "rotate",
            "--dir",
            "ca",
            "--include-revoked",
            "--keep-key",
            "revoked",
        ],
    );
    assert!(err.contains("revoked") && err.contains("help:"), "{err}");
    let old_key = sb.read("revoked/key.pem");
    let out = sb.ok(&["rotate", "--dir", "ca", "--include-revoked", "revoked"]);
    assert!(
        out.contains("rotated revoked") && out.contains("revoked"),
        "{out}"
    );
    assert_ne!(serial_of(&sb.path("revoked")), revoked0);
    assert_ne!(sb.read("revoked/key.pem"), old_key, "a new key");
    assert_matching_pair(&sb.path("revoked"));
}

#[test]
fn rotate_exit_code_says_whether_anything_was_written() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("a");
    let code = |args: &[&str]| sb.ca(args).status.code();
    // Without --exit-code a re-issue is still exit 0 (cron jobs keep succeeding).
    assert_eq!(code(&["rotate", "--dir", "ca", "--force", "a"]), Some(0));
    // With it: 0 when nothing changed, 3 when a directory was re-issued or got a new bundle.
    assert_eq!(
        code(&["rotate", "--dir", "ca", "--exit-code", "a"]),
        Some(0)
    );
    assert_eq!(
        code(&["rotate", "--dir", "ca", "--exit-code", "--force", "a"]),
        Some(3)
    );
    // A skipped revoked directory is not a change.
    sb.issue("r");
    let serial = serial_of(&sb.path("r"));
    sb.ok(&["revoke", "--dir", "ca", "--serial", &serial]);
    assert_eq!(
        code(&["rotate", "--dir", "ca", "--exit-code", "--force", "r"]),
        Some(0)
    );
    // A failure wins over a change: the job must see the error.
    std::fs::create_dir(sb.path("empty")).expect("mkdir");
    assert_eq!(
        code(&[
            "rotate",
            "--dir",
            "ca",
            "--exit-code",
            "--force",
            "a",
            "empty"
        ]),
        Some(1)
    );
}

#[test]
fn ca_bundle_writes_the_current_bundle_alone_for_the_bundle_only_step() {
    let sb = Sandbox::new();
    sb.init(true);
    sb.issue("a");
    let leaf_before = sb.read("a/cert.pem");
    sb.ok(&["root", "rotate", "--dir", "ca"]);
    let out = sb.ok(&["bundle", "--dir", "ca", "--out", "dist/bundle.pem"]);
    assert!(out.contains("2 root(s)"), "{out}");
    assert_eq!(sb.read("dist/bundle.pem"), sb.read("ca/bundle.pem"));
    assert_eq!(pem_certs(&sb.read("dist/bundle.pem")).len(), 2);
    assert_eq!(sb.read("a/cert.pem"), leaf_before, "no leaf touched");
    let mode = std::fs::metadata(sb.path("dist/bundle.pem"))
        .expect("stat")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o644);
    sb.ok(&["rotate", "--dir", "ca", "a"]);
    sb.ok(&["root", "retire", "--dir", "ca"]);
    let out = sb.ok(&[
        "bundle",
        "--dir",
        "ca",
        "--out",
        "dist/bundle.pem",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["roots"], 1, "{v}");
    assert_eq!(sb.read("dist/bundle.pem"), sb.read("ca/bundle.pem"));
    // Not a CA directory: a clear error, nothing written.
    let err = sb.fails(2, &["bundle", "--dir", "nowhere", "--out", "x.pem"]);
    assert!(err.contains("help:"), "{err}");
    assert!(!sb.path("x.pem").exists());
}

#[test]
fn rotate_bundle_only_hands_out_both_roots_and_reissues_nothing() {
    let sb = Sandbox::new();
    sb.init(true);
    sb.issue("a");
    let (serial, key) = (serial_of(&sb.path("a")), sb.read("a/key.pem"));
    sb.ok(&["root", "rotate", "--dir", "ca"]);
    let before = ledger_lines(&sb);
    // Every leaf is due now (old root), yet --bundle-only re-issues none of them.
    let out = sb.ok(&["rotate", "--dir", "ca", "--bundle-only", "a"]);
    assert!(out.contains("bundle updated a"), "{out}");
    assert_eq!(serial_of(&sb.path("a")), serial);
    assert_eq!(sb.read("a/key.pem"), key);
    assert_eq!(ledger_lines(&sb), before, "nothing issued");
    assert_eq!(pem_certs(&sb.read("a/bundle.pem")).len(), 2);
    assert_matching_pair(&sb.path("a"));
    let code = sb
        .ca(&["rotate", "--dir", "ca", "--bundle-only", "--exit-code", "a"])
        .status
        .code();
    assert_eq!(code, Some(0), "second run: nothing to write");
    sb.fails(
        2,
        &["rotate", "--dir", "ca", "--bundle-only", "--force", "a"],
    );
    // The next ordinary run re-issues under the new root.
    let out = sb.ok(&["rotate", "--dir", "ca", "a"]);
    assert!(
        out.contains("rotated a") && out.contains("generation 1"),
        "{out}"
    );
}
