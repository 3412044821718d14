//! Issue 22 (5), offline root: with `--intermediate`, once `gen-N/root.key` is moved out of the
//! CA directory, `ca crl`, `ca revoke --crl`, `ca issue`, `ca rotate` and `ca root rotate` keep
//! working; the CRL file still holds a CRL from every CA of the chain (the root's is the one
//! stored by the last `ca crl` with the key present), and `ca crl` refuses clearly when that
//! stored root CRL is missing or expires within the new CRL's lifetime.

mod common;

use common::{Sandbox, crls, serial, verifier, verify};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

/// (issuer CN, CRL number, seconds from now to next-update) of every CRL in `file`.
fn crl_summary(sb: &Sandbox, file: &str) -> Vec<(String, String, i64)> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    crls(sb, file)
        .iter()
        .map(|der| {
            let (_, crl) = CertificateRevocationList::from_der(der.as_ref()).expect("parse");
            let cn = crl
                .issuer()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .unwrap_or_default()
                .to_owned();
            let number = crl.crl_number().map(|n| n.to_string()).unwrap_or_default();
            let next = crl.next_update().expect("next-update").timestamp() - now;
            (cn, number, next)
        })
        .collect()
}

const DAY: i64 = 24 * 3600;

fn move_root_key_offline(sb: &Sandbox, generation: u32) {
    std::fs::create_dir_all(sb.path("vault")).expect("vault");
    std::fs::rename(
        sb.path(&format!("ca/gen-{generation}/root.key")),
        sb.path(&format!("vault/root-{generation}.key")),
    )
    .expect("move root.key offline");
}

#[test]
fn issue_22_crl_issue_and_rotate_work_with_the_root_key_offline() {
    let sb = Sandbox::new();
    sb.init(true);

    // Root key away before any root CRL was stored: a clear refusal, nothing written.
    move_root_key_offline(&sb, 1);
    let err = sb.fails(1, &["crl", "--dir", "ca", "--out", "crl.pem"]);
    assert!(
        err.contains("gen-1/root.key is offline") && err.contains("no stored root CRL"),
        "{err}"
    );
    assert!(
        err.contains("help: bring gen-1/root.key back") && err.contains("--root-ttl"),
        "says what to do: {err}"
    );
    assert!(!sb.path("crl.pem").exists());

    // Key back: sign (and store) a long root CRL, then the key goes offline for good.
    std::fs::rename(sb.path("vault/root-1.key"), sb.path("ca/gen-1/root.key")).expect("back");
    sb.ok(&[
        "crl",
        "--dir",
        "ca",
        "--out",
        "crl.pem",
        "--root-ttl",
        "2160h",
    ]);
    assert!(sb.path("ca/gen-1/root.crl.pem").exists());
    move_root_key_offline(&sb, 1);

    // Day to day, online: issue, rotate, revoke with --crl, crl.
    sb.issue("mallory");
    sb.issue("alice");
    sb.ok(&["rotate", "--dir", "ca", "--force", "alice"]);
    let mallory = serial(&sb, "mallory");
    sb.ok(&[
        "revoke", "--dir", "ca", "--serial", &mallory, "--crl", "crl.pem",
    ]);
    sb.ok(&["crl", "--dir", "ca", "--out", "crl.pem", "--ttl", "48h"]);

    // One CRL from the intermediate (fresh number, 48h) and the stored one from the root (its
    // number from the key's last run, 90 days).
    let summary = crl_summary(&sb, "crl.pem");
    assert_eq!(summary.len(), 2, "{summary:?}");
    let (int_cn, int_number, int_next) = &summary[0];
    let (root_cn, root_number, root_next) = &summary[1];
    assert!(int_cn.contains("intermediate CA"), "{summary:?}");
    assert!(root_cn.contains("root CA"), "{summary:?}");
    assert_eq!((int_number.as_str(), root_number.as_str()), ("3", "1"));
    assert!((int_next - 2 * DAY).abs() < 60, "{summary:?}");
    assert!((root_next - 90 * DAY).abs() < 120, "{summary:?}");

    // The sidecar's check: the whole chain has CRLs; the revoked leaf is refused, the others pass.
    let v = verifier(&sb, "crl.pem");
    verify(v.as_ref(), &sb, "alice").expect("alice's chain verifies with both CRLs");
    assert_eq!(
        verify(v.as_ref(), &sb, "mallory").expect_err("revoked"),
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
    );

    // A CRL that would outlive the stored root CRL is refused: the key must come back.
    let err = sb.fails(
        1,
        &["crl", "--dir", "ca", "--out", "crl.pem", "--ttl", "2200h"],
    );
    assert!(
        err.contains("the stored root CRL expires") && err.contains("help: bring gen-1/root.key"),
        "{err}"
    );
    assert_eq!(
        crl_summary(&sb, "crl.pem")[0].1,
        "3",
        "the file was not replaced"
    );

    // Root rotation needs no old root key: the new generation's CRLs join, gen-1's stored one stays.
    sb.ok(&["root", "rotate", "--dir", "ca"]);
    sb.issue("new-root-leaf");
    let v = verifier(&sb, "crl.pem");
    verify(v.as_ref(), &sb, "new-root-leaf").expect("the new root's CAs have CRLs");
    verify(v.as_ref(), &sb, "alice").expect("the old chain still verifies");
}
