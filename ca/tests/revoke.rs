//! `ca revoke` + `ca crl`: the CRL is a signed v2 CRL with CRL number and next-update, and the
//! rustls client-certificate verifier (webpki) built `with_crls` rejects the revoked leaf and
//! accepts the others, with and without an intermediate.

mod common;

use common::{Sandbox, crls, pem_certs, serial, verifier, verify};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

fn revoked_leaf_is_rejected_and_others_accepted(intermediate: bool) {
    let sb = Sandbox::new();
    sb.init(intermediate);
    sb.issue("mallory");
    sb.issue("alice");
    sb.ok(&["crl", "--dir", "ca", "--out", "crl.pem"]);
    let v = verifier(&sb, "crl.pem");
    verify(v.as_ref(), &sb, "mallory").expect("not revoked yet");

    let mallory = serial(&sb, "mallory");
    let out = sb.ok(&[
        "revoke",
        "--dir",
        "ca",
        "--serial",
        &mallory,
        "--reason",
        "key-compromise",
        "--crl",
        "crl.pem",
    ]);
    assert!(
        out.contains(&format!("revoked serial {mallory} (key-compromise)")),
        "{out}"
    );
    let v = verifier(&sb, "crl.pem");
    let err = verify(v.as_ref(), &sb, "mallory").expect_err("revoked leaf is rejected");
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked),
        "{err:?}"
    );
    verify(v.as_ref(), &sb, "alice").expect("a non-revoked leaf is still accepted");

    // The CRL itself: v2, CRL number 2 (second run), next-update after this-update, the serial
    // with its reason, signed by the leaf's issuer.
    let list = crls(&sb, "crl.pem");
    assert_eq!(
        list.len(),
        1 + usize::from(intermediate),
        "one CRL per issuing CA"
    );
    let (_, crl) = CertificateRevocationList::from_der(list[0].as_ref()).expect("CRL parses");
    assert_eq!(crl.version().map(|v| v.0), Some(1), "v2 CRL");
    assert_eq!(
        crl.crl_number().map(|n| n.to_string()),
        Some("2".to_owned())
    );
    assert!(crl.next_update().expect("next-update") > crl.last_update());
    let entries: Vec<_> = crl.iter_revoked_certificates().collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(hex::encode(entries[0].raw_serial()), mallory);
    assert_eq!(
        entries[0].reason_code().map(|r| r.1.0),
        Some(1),
        "keyCompromise"
    );
    let issuer_der = pem_certs(&sb.read("mallory/cert.pem"))
        .pop()
        .expect("issuer");
    let issuer_der = if intermediate {
        issuer_der
    } else {
        pem_certs(&sb.read("ca/bundle.pem")).remove(0)
    };
    let (_, issuer) = X509Certificate::from_der(&issuer_der).expect("issuer");
    assert_eq!(crl.issuer(), issuer.subject());
    crl.verify_signature(issuer.public_key())
        .expect("CRL signed by the leaf's issuer");

    // openssl agrees.
    let mut args = vec![
        "verify".to_owned(),
        "-crl_check".into(),
        "-CAfile".into(),
        "ca/bundle.pem".into(),
        "-CRLfile".into(),
        "crl.pem".into(),
    ];
    if intermediate {
        args.extend([
            "-crl_check_all".into(),
            "-untrusted".into(),
            "ca/gen-1/intermediate.pem".into(),
        ]);
    }
    let run = |cert: &str| {
        let mut a = args.clone();
        a.push(cert.into());
        std::process::Command::new("openssl")
            .args(&a)
            .current_dir(sb.tmp.path())
            .output()
            .expect("openssl")
    };
    assert!(
        !run("mallory/cert.pem").status.success(),
        "openssl rejects the revoked leaf"
    );
    let ok = run("alice/cert.pem");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn revoked_leaf_is_rejected_by_rustls_with_crls_and_others_accepted() {
    revoked_leaf_is_rejected_and_others_accepted(false);
}

#[test]
fn revocation_through_an_intermediate_checks_the_whole_chain() {
    revoked_leaf_is_rejected_and_others_accepted(true);
}

#[test]
fn revoke_by_spiffe_id_revokes_every_live_certificate_of_that_identity() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("bob");
    let first = serial(&sb, "bob");
    sb.ok(&["rotate", "--dir", "ca", "--force", "bob"]);
    let second = serial(&sb, "bob");
    sb.issue("carol");
    let out = sb.ok(&[
        "revoke",
        "--dir",
        "ca",
        "--spiffe-id",
        "spiffe://fintech.internal/bob",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let serials: Vec<_> = v["revoked"]
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["serial"].as_str().expect("serial").to_owned())
        .collect();
    assert_eq!(
        serials,
        vec![first.clone(), second.clone()],
        "the superseded and the current certificate"
    );
    sb.ok(&["crl", "--dir", "ca", "--out", "crl.pem"]);
    let v = verifier(&sb, "crl.pem");
    assert!(verify(v.as_ref(), &sb, "bob").is_err());
    verify(v.as_ref(), &sb, "carol").expect("carol unaffected");
    // Revoking again records nothing new; the ledger shows the states.
    assert!(
        sb.ok(&["revoke", "--dir", "ca", "--serial", &first])
            .contains("already revoked")
    );
    let list: serde_json::Value =
        serde_json::from_str(&sb.ok(&["list", "--dir", "ca", "--format", "json"])).expect("json");
    let states: Vec<_> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["state"].as_str().expect("state").to_owned())
        .collect();
    assert_eq!(states, vec!["revoked", "revoked", "valid"]);
    assert_eq!(
        sb.read("ca/inventory.jsonl")
            .lines()
            .filter(|l| l.contains("\"event\":\"revoked\""))
            .count(),
        2
    );
}

#[test]
fn revoke_errors_are_clear() {
    let sb = Sandbox::new();
    sb.init(false);
    sb.issue("dave");
    let err = sb.fails(2, &["revoke", "--dir", "ca", "--serial", "00ff"]);
    assert!(
        err.contains("no certificate with serial 00ff") && err.contains("help: run `ca list"),
        "{err}"
    );
    let err = sb.fails(
        2,
        &[
            "revoke",
            "--dir",
            "ca",
            "--spiffe-id",
            "spiffe://fintech.internal/nobody",
        ],
    );
    assert!(
        err.contains("no valid certificate for spiffe://fintech.internal/nobody"),
        "{err}"
    );
    let err = sb.fails(
        2,
        &[
            "revoke",
            "--dir",
            "ca",
            "--serial",
            &serial(&sb, "dave"),
            "--reason",
            "bored",
        ],
    );
    assert!(
        err.contains("unknown revocation reason `bored`") && err.contains("key-compromise"),
        "{err}"
    );
    sb.fails(2, &["revoke", "--dir", "ca"]); // clap: --serial or --spiffe-id required
    assert!(
        !sb.read("ca/inventory.jsonl").contains("revoked"),
        "nothing recorded"
    );
    // Serial spelled as openssl prints it (upper case, colons) is accepted.
    let s = serial(&sb, "dave").to_uppercase();
    let colons: Vec<_> = s
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).expect("hex"))
        .collect();
    sb.ok(&["revoke", "--dir", "ca", "--serial", &colons.join(":")]);
}

#[test]
fn crl_numbers_increase_and_next_update_follows_ttl() {
    let sb = Sandbox::new();
    sb.init(false);
    for expected in 1..=3u32 {
        sb.ok(&["crl", "--dir", "ca", "--out", "crl.pem", "--ttl", "2h"]);
        let list = crls(&sb, "crl.pem");
        let (_, crl) = CertificateRevocationList::from_der(list[0].as_ref()).expect("parse");
        assert_eq!(
            crl.crl_number().map(|n| n.to_string()),
            Some(expected.to_string())
        );
        let next = crl.next_update().expect("next-update").timestamp();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((next - now - 7200).abs() < 60, "next-update = now + ttl");
    }
}

/// CRL numbers of every CRL in `file`.
fn crl_numbers(sb: &Sandbox, file: &str) -> Vec<String> {
    crls(sb, file)
        .iter()
        .map(|der| {
            let (_, crl) = CertificateRevocationList::from_der(der.as_ref()).expect("parse");
            crl.crl_number().map(|n| n.to_string()).unwrap_or_default()
        })
        .collect()
}

/// Issue 21 (13): `ca root rotate` and `ca root retire` rewrite the CRL file that `ca crl --out`
/// wrote, so it covers every CA of every root in the bundle: a leaf of the new root verifies
/// with webpki's defaults (a CRL from each CA of the chain), and the CRL number keeps rising.
#[test]
fn issue_21_root_changes_republish_the_crl_for_every_root() {
    let sb = Sandbox::new();
    sb.init(true);
    sb.ok(&["crl", "--dir", "ca", "--out", "pub/crl.pem", "--ttl", "2h"]);
    assert_eq!(crl_numbers(&sb, "pub/crl.pem"), ["1", "1"]);

    let out = sb.ok(&["root", "rotate", "--dir", "ca"]);
    sb.issue("new-root-leaf");
    let v = verifier(&sb, "pub/crl.pem");
    verify(&*v, &sb, "new-root-leaf").expect("the new root's CAs have CRLs in pub/crl.pem");
    assert!(out.contains("republished CRL"), "{out}");
    assert_eq!(crl_numbers(&sb, "pub/crl.pem"), ["2", "2", "2", "2"]);
    let list = crls(&sb, "pub/crl.pem");
    let (_, crl) = CertificateRevocationList::from_der(list[2].as_ref()).expect("parse");
    let next = crl.next_update().expect("next-update").timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((next - now - 7200).abs() < 60, "republished with --ttl 2h");

    sb.ok(&["root", "retire", "--dir", "ca"]);
    assert_eq!(crl_numbers(&sb, "pub/crl.pem"), ["3", "3"]);
    let v = verifier(&sb, "pub/crl.pem");
    verify(&*v, &sb, "new-root-leaf").expect("still covered after retire");

    // A recorded file that was removed is forgotten, not recreated.
    std::fs::remove_file(sb.path("pub/crl.pem")).expect("rm");
    sb.ok(&["root", "rotate", "--dir", "ca"]);
    assert!(!sb.path("pub/crl.pem").exists());
}
