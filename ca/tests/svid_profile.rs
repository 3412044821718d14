//! Every X.509-SVID rule, checked field by field (x509-parser) on certificates the real `ca`
//! binary and the library issue, and chain verification with webpki against bundle.pem.

mod common;

use std::time::Duration;

use ::time::OffsetDateTime;
use common::{Sandbox, issue_args, mode, pem_certs};
use gatehouse_ca::{Authority, InitOptions, IssueRequest, KeyType, SpiffeId, TrustDomain, inspect};
use x509_parser::prelude::*;

/// Asserts the SVID profile on a leaf; returns its serial bytes.
fn assert_svid_profile(
    leaf_der: &[u8],
    id: &str,
    dns: &[&str],
    ttl: Duration,
    issued_at: OffsetDateTime,
) -> Vec<u8> {
    let (rest, cert) = X509Certificate::from_der(leaf_der).expect("leaf parses");
    assert!(rest.is_empty());
    assert_eq!(cert.version(), X509Version::V3);

    // Exactly one URI SAN, the SPIFFE ID; DNS SANs as requested; nothing else.
    let san = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .expect("SAN present");
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::URI(u) = n {
                Some(*u)
            } else {
                None
            }
        })
        .collect();
    let names: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::DNSName(d) = n {
                Some(*d)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(uris, vec![id], "exactly one URI SAN");
    assert_eq!(names, dns);
    assert_eq!(
        san.value.general_names.len(),
        1 + dns.len(),
        "no other SAN types"
    );

    // CA:FALSE, critical.
    let bc = cert
        .basic_constraints()
        .expect("unique")
        .expect("basic constraints present");
    assert!(bc.critical, "basic constraints critical");
    assert!(!bc.value.ca, "CA:FALSE");
    assert!(!cert.is_ca());

    // Key usage: digitalSignature only, critical.
    let ku = cert
        .key_usage()
        .expect("unique")
        .expect("key usage present");
    assert!(ku.critical, "key usage critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign() && !ku.value.key_encipherment());
    assert_eq!(ku.value.flags, 1, "digitalSignature is the only bit");

    // EKU: serverAuth + clientAuth.
    let eku = cert
        .extended_key_usage()
        .expect("unique")
        .expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!eku.value.any && !eku.value.code_signing && eku.value.other.is_empty());

    // Serial: positive, at most 20 octets, minimally encoded.
    let serial = cert.raw_serial().to_vec();
    assert!(
        !serial.is_empty() && serial.len() <= 20,
        "serial is 1..=20 octets: {}",
        serial.len()
    );
    assert!(serial[0] & 0x80 == 0, "serial is positive");
    assert!(
        serial[0] != 0,
        "serial minimally encoded (and 20 random octets)"
    );

    // Validity: backdated about 5 minutes, lasting the requested TTL from issue time.
    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    let backdate = issued_at - nb;
    assert!(
        backdate >= ::time::Duration::seconds(295) && backdate <= ::time::Duration::seconds(330),
        "backdated ~5 min: {backdate}"
    );
    let lifetime = na - issued_at;
    let ttl = ::time::Duration::try_from(ttl).expect("ttl");
    assert!(
        (lifetime - ttl).abs() <= ::time::Duration::seconds(30),
        "not-after = issue time + TTL: {lifetime} vs {ttl}"
    );

    // Authority key identifier present (chain building), no name constraints on a leaf.
    assert!(
        cert.extensions()
            .iter()
            .any(|e| e.oid == oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
    );
    assert!(cert.name_constraints().expect("unique").is_none());
    serial
}

fn assert_ca_profile(der: &[u8], path_len: u32) {
    let (_, cert) = X509Certificate::from_der(der).expect("CA parses");
    let bc = cert.basic_constraints().expect("unique").expect("present");
    assert!(bc.critical && bc.value.ca, "CA:TRUE critical");
    assert_eq!(bc.value.path_len_constraint, Some(path_len));
    let ku = cert.key_usage().expect("unique").expect("present");
    assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
    assert!(!ku.value.digital_signature());
    assert!(
        cert.name_constraints().expect("unique").is_none(),
        "no name constraints (webpki rejects URI ones)"
    );
}

#[test]
fn cli_issued_svid_satisfies_every_profile_rule_and_verifies_without_intermediate() {
    let sb = Sandbox::new();
    sb.init(false);
    let t0 = OffsetDateTime::now_utc();
    sb.ok(&issue_args(
        "spiffe://fintech.internal/payments/api",
        &[
            "--dns",
            "api.fintech.internal",
            "--dns",
            "api",
            "--ttl",
            "12h",
        ],
        "api",
    ));
    let chain = pem_certs(&sb.read("api/cert.pem"));
    assert_eq!(chain.len(), 1, "no intermediate: cert.pem is the leaf");
    assert_svid_profile(
        &chain[0],
        "spiffe://fintech.internal/payments/api",
        &["api.fintech.internal", "api"],
        Duration::from_secs(12 * 3600),
        t0,
    );
    let roots = pem_certs(&sb.read("api/bundle.pem"));
    assert_eq!(roots.len(), 1);
    assert_ca_profile(&roots[0], 0);
    assert_eq!(sb.read("api/bundle.pem"), sb.read("ca/bundle.pem"));

    // Files: key 0600 PKCS#8, CA dir 0700, CA keys 0600.
    assert_eq!(mode(&sb.path("api/key.pem")), 0o600);
    assert!(
        sb.read("api/key.pem")
            .starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8 PEM"
    );
    assert_eq!(mode(&sb.path("ca")), 0o700);
    assert_eq!(mode(&sb.path("ca/gen-1/root.key")), 0o600);
    assert!(
        sb.read("ca/gen-1/root.key")
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );

    inspect::verify_chain(
        &sb.read("api/cert.pem"),
        &sb.path("api/cert.pem"),
        &sb.read("api/bundle.pem"),
        &sb.path("api/bundle.pem"),
        OffsetDateTime::now_utc(),
    )
    .expect("webpki verifies the leaf against bundle.pem");
}

#[test]
fn cli_issued_svid_with_intermediate_chains_through_it_and_verifies() {
    let sb = Sandbox::new();
    sb.init(true);
    let t0 = OffsetDateTime::now_utc();
    let dir = sb.issue("ledger");
    let chain = pem_certs(&sb.read("ledger/cert.pem"));
    assert_eq!(chain.len(), 2, "cert.pem = leaf + intermediate");
    assert_svid_profile(
        &chain[0],
        "spiffe://fintech.internal/ledger",
        &[],
        Duration::from_secs(24 * 3600),
        t0,
    );
    assert_ca_profile(&chain[1], 0);
    let roots = pem_certs(&sb.read("ledger/bundle.pem"));
    assert_ca_profile(&roots[0], 1);

    // Leaf issued by the intermediate, intermediate by the root.
    let (_, leaf) = X509Certificate::from_der(&chain[0]).expect("leaf");
    let (_, inter) = X509Certificate::from_der(&chain[1]).expect("intermediate");
    let (_, root) = X509Certificate::from_der(&roots[0]).expect("root");
    assert_eq!(leaf.issuer(), inter.subject());
    assert_eq!(inter.issuer(), root.subject());
    leaf.verify_signature(Some(inter.public_key()))
        .expect("leaf signed by intermediate");
    inter
        .verify_signature(Some(root.public_key()))
        .expect("intermediate signed by root");

    let now = OffsetDateTime::now_utc();
    let cert = dir.join("cert.pem");
    let bundle = dir.join("bundle.pem");
    inspect::verify_chain(
        &sb.read("ledger/cert.pem"),
        &cert,
        &sb.read("ledger/bundle.pem"),
        &bundle,
        now,
    )
    .expect("webpki verifies via the intermediate");

    // Without the intermediate in the file, webpki cannot build the path.
    let leaf_only = std::str::from_utf8(&pem_encode(&chain[0]))
        .expect("ascii")
        .to_owned();
    assert!(
        inspect::verify_chain(
            &leaf_only,
            &cert,
            &sb.read("ledger/bundle.pem"),
            &bundle,
            now
        )
        .is_err()
    );
}

fn pem_encode(der: &[u8]) -> Vec<u8> {
    use std::fmt::Write;
    let b64 = base64_encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        let _ = writeln!(s, "{}", std::str::from_utf8(chunk).expect("ascii"));
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s.into_bytes()
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn every_key_type_issues_valid_svids_with_fresh_random_serials() {
    for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519] {
        for intermediate in [false, true] {
            let tmp = tempfile::tempdir().expect("tmp");
            let opts = InitOptions {
                trust_domain: TrustDomain::parse("fintech.internal").expect("td"),
                key_type,
                ttl: Duration::from_secs(30 * 24 * 3600),
                intermediate,
            };
            let ca = Authority::init(&tmp.path().join("ca"), &opts).expect("init");
            let req = IssueRequest {
                spiffe_id: SpiffeId::parse("spiffe://fintech.internal/svc").expect("id"),
                dns: vec![],
                ttl: Duration::from_secs(3600),
            };
            let t0 = OffsetDateTime::now_utc();
            let a = ca.issue(&req).expect("issue");
            let b = ca.issue(&req).expect("issue");
            let sa = assert_svid_profile(
                &pem_certs(&a.cert_pem)[0],
                "spiffe://fintech.internal/svc",
                &[],
                req.ttl,
                t0,
            );
            let sb = assert_svid_profile(
                &pem_certs(&b.cert_pem)[0],
                "spiffe://fintech.internal/svc",
                &[],
                req.ttl,
                t0,
            );
            assert_eq!(sa.len(), 20, "20 random octets");
            assert_ne!(sa, sb, "serials never repeat for the same identity");
            assert_eq!(hex::encode(&sa), a.serial_hex);
            let report = inspect::inspect_pem(
                &a.cert_pem,
                tmp.path(),
                Some((&a.bundle_pem, tmp.path())),
                OffsetDateTime::now_utc(),
            )
            .expect("inspect");
            assert_eq!(report.key_type, key_type.as_str());
            assert_eq!(
                report.verified,
                Some(true),
                "{key_type} intermediate={intermediate}: {:?}",
                report.verify_error
            );
            assert_eq!(pem_certs(&a.cert_pem).len(), 1 + usize::from(intermediate));
        }
    }
}

#[test]
fn same_key_reissued_gets_a_new_serial() {
    // rcgen's default serial is a hash of the public key: re-issuing for the same key would repeat
    // it and break revocation by serial. We always set a random one.
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = InitOptions {
        trust_domain: TrustDomain::parse("fintech.internal").expect("td"),
        key_type: KeyType::EcdsaP256,
        ttl: Duration::from_secs(86400 * 30),
        intermediate: false,
    };
    let ca = Authority::init(&tmp.path().join("ca"), &opts).expect("init");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut serials = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut params = rcgen::CertificateParams::new(vec![]).expect("params");
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://fintech.internal/fixture".try_into().expect("ia5"),
        )];
        let pem = ca.sign_custom(params, &key).expect("sign_custom");
        let der = pem_certs(&pem).remove(0);
        let (_, cert) = X509Certificate::from_der(&der).expect("parse");
        assert!(serials.insert(cert.raw_serial().to_vec()));
    }
    let custom = ca.list().expect("list");
    assert_eq!(custom.len(), 3, "sign_custom is recorded in the inventory");
    assert!(
        custom
            .iter()
            .all(|e| e.source == gatehouse_ca::inventory::Source::Custom)
    );
}
