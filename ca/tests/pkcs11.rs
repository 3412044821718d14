//! CA keys in a PKCS#11 token: real SoftHSM2 (Debian `softhsm2`, installed by `.ci/run`), a
//! token created per test in the sandbox (`SOFTHSM2_CONF` pointing at it), the real `ca`
//! binary. The keys are generated in the token and never appear in the CA directory; leaves,
//! CSR signatures, CRLs, root rotation and `ca serve` all sign through the token.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::https::{csr, enroll, ok_cert, renew, serve, token, verified};
use common::{Sandbox, verifier, verify};
use rcgen::KeyPair;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "pin-7f3a9c";
const TOKEN: &str = "gatehouse";

/// A sandbox with one initialized SoftHSM2 token (label `gatehouse`, user PIN [`PIN`]) and the
/// environment every `ca` run gets: SOFTHSM2_CONF, GATEHOUSE_PKCS11_MODULE, GATEHOUSE_PKCS11_PIN.
fn hsm_sandbox() -> Sandbox {
    assert!(
        Path::new(MODULE).exists(),
        "{MODULE} is missing: install Debian's softhsm2 (.ci/run does)"
    );
    let mut sb = Sandbox::new();
    let tokens = sb.path("hsm/tokens");
    std::fs::create_dir_all(&tokens).expect("token dir");
    let conf = sb.path("hsm/softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("softhsm2.conf");
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", TOKEN])
        .args(["--so-pin", "so-2b8e41", "--pin", PIN])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("run softhsm2-util (install softhsm2)");
    assert!(
        out.status.success(),
        "softhsm2-util: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sb.env = vec![
        ("SOFTHSM2_CONF".into(), conf.display().to_string()),
        ("GATEHOUSE_PKCS11_MODULE".into(), MODULE.into()),
        ("GATEHOUSE_PKCS11_PIN".into(), PIN.into()),
    ];
    sb
}

fn key_store(object: &str) -> String {
    format!("pkcs11:token={TOKEN};object={object}")
}

fn init_in_token(sb: &Sandbox, key_type: &str, intermediate: bool) -> serde_json::Value {
    let ks = key_store("fin");
    let mut args = vec![
        "--format",
        "json",
        "init",
        "--dir",
        "ca",
        "--trust-domain",
        "fintech.internal",
        "--key-type",
        key_type,
        "--key-store",
        &ks,
    ];
    if intermediate {
        args.push("--intermediate");
    }
    serde_json::from_str(&sb.ok(&args)).expect("init json")
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// DER prefixes of an EC private key: PKCS#8 (`version 0, AlgorithmIdentifier
/// id-ecPublicKey`) and SEC1 (`version 1, OCTET STRING` of 32 or 48 bytes), also inside base64.
const KEY_DER_MARKERS: [&[u8]; 3] = [
    &[
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    ],
    &[0x02, 0x01, 0x01, 0x04, 0x20],
    &[0x02, 0x01, 0x01, 0x04, 0x30],
];

/// Files under `dir` that hold private key material: a `PRIVATE KEY` PEM label, a `.key` file,
/// or an EC private key's DER (raw or base64-decoded from any PEM block).
fn key_material_under(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            let mut blobs = vec![bytes.clone()];
            for block in x509_parser::pem::Pem::iter_from_buffer(&bytes).flatten() {
                blobs.push(block.contents);
            }
            text.contains("PRIVATE KEY")
                || p.extension().is_some_and(|x| x == "key")
                || blobs.iter().any(|b| {
                    KEY_DER_MARKERS
                        .iter()
                        .any(|m| b.windows(m.len()).any(|w| w == *m))
                        || b.windows(11).any(|w| w == b"PRIVATE KEY")
                })
        })
        .collect()
}

/// `openssl verify -x509_strict` of DIR/cert.pem (leaf + chain) against the CA's bundle; the
/// file itself is the untrusted pool (its intermediate, if any).
fn openssl_verify(sb: &Sandbox, dir: &str) {
    let cert = format!("{dir}/cert.pem");
    let out = Command::new("openssl")
        .current_dir(sb.tmp.path())
        .args(["verify", "-x509_strict", "-purpose", "sslclient"])
        .args(["-CAfile", "ca/bundle.pem", "-untrusted", &cert, &cert])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl verify {dir}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The signature algorithm openssl reports for the leaf of DIR/cert.pem.
fn leaf_sig_alg(sb: &Sandbox, dir: &str) -> String {
    let out = Command::new("openssl")
        .current_dir(sb.tmp.path())
        .args(["x509", "-noout", "-text", "-in", &format!("{dir}/cert.pem")])
        .output()
        .expect("openssl x509");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.trim_start().starts_with("Signature Algorithm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn token_ca_signs_everything(key_type: &str, intermediate: bool, sha: &str) {
    let sb = hsm_sandbox();
    let init = init_in_token(&sb, key_type, intermediate);
    let keys = init["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1 + usize::from(intermediate), "{init}");
    assert_eq!(
        keys[0]["location"],
        "pkcs11:token=gatehouse;object=fin-g1-root;type=private"
    );

    // Leaves: `ca issue` and `ca sign`, signed through the token.
    sb.issue("api");
    let key = KeyPair::generate().expect("key");
    std::fs::write(sb.path("req.csr"), csr(&key)).expect("csr");
    std::fs::create_dir(sb.path("billing")).expect("mkdir");
    sb.ok(&[
        "sign",
        "--dir",
        "ca",
        "--csr",
        "req.csr",
        "--spiffe-id",
        "spiffe://fintech.internal/billing",
        "--out",
        "billing/cert.pem",
    ]);
    for dir in ["api", "billing"] {
        openssl_verify(&sb, dir);
        assert!(leaf_sig_alg(&sb, dir).contains(sha), "{dir}: {sha}");
    }

    // CRLs signed by the token; the verifier the sidecars use accepts the chain, then refuses
    // the revoked leaf.
    sb.ok(&["crl", "--dir", "ca", "--out", "crl.pem"]);
    verify(&*verifier(&sb, "crl.pem"), &sb, "api").expect("api verifies with the token's CRL");
    sb.ok(&[
        "revoke",
        "--dir",
        "ca",
        "--spiffe-id",
        "spiffe://fintech.internal/api",
        "--crl",
        "crl.pem",
    ]);
    let revoked = verify(&*verifier(&sb, "crl.pem"), &sb, "api");
    assert!(
        matches!(
            revoked,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        ),
        "{revoked:?}"
    );
    verify(&*verifier(&sb, "crl.pem"), &sb, "billing").expect("billing still verifies");

    // Root rotation makes new keys in the token; `ca rotate` re-issues under them.
    sb.ok(&["root", "rotate", "--dir", "ca"]);
    sb.issue("web");
    sb.ok(&["rotate", "--dir", "ca", "--force", "web"]);
    openssl_verify(&sb, "web");
    let list = sb.ok(&["list", "--dir", "ca"]);
    assert!(
        list.contains("gen-2 root          pkcs11:token=gatehouse;object=fin-g2-root;type=private"),
        "{list}"
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&sb.ok(&["--format", "json", "inspect", "--dir", "ca"]))
            .expect("inspect json");
    assert_eq!(
        inspect["keys"].as_array().expect("keys").len(),
        2 * (1 + usize::from(intermediate))
    );

    // No private key material and no PIN anywhere in the CA directory.
    let found = key_material_under(&sb.path("ca"));
    assert!(
        found.is_empty(),
        "key material in the CA directory: {found:?}"
    );
    for f in files_under(&sb.path("ca")) {
        let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap_or_default()).into_owned();
        assert!(!text.contains(PIN), "the PIN is in {}", f.display());
    }
}

#[test]
fn p256_root_in_softhsm2_issues_svids_that_pass_openssl_and_webpki() {
    token_ca_signs_everything("ecdsa-p256", false, "ecdsa-with-SHA256");
}

#[test]
fn p384_root_and_intermediate_in_softhsm2_issue_svids_that_pass_openssl_and_webpki() {
    token_ca_signs_everything("ecdsa-p384", true, "ecdsa-with-SHA384");
}

/// The search above can fail: a file-key CA directory is full of key material.
#[test]
fn the_key_material_search_finds_file_keys() {
    let sb = Sandbox::new();
    sb.init(true);
    let found = key_material_under(&sb.path("ca"));
    assert_eq!(found.len(), 2, "{found:?}");
    // And the DER markers alone (a key without its PEM label) are found too.
    let der = KeyPair::generate().expect("key").serialize_der();
    std::fs::write(sb.path("ca/raw.bin"), der).expect("write");
    assert_eq!(key_material_under(&sb.path("ca")).len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_serve_enrolls_and_renews_with_a_token_key() {
    let sb = hsm_sandbox();
    init_in_token(&sb, "ecdsa-p256", true);
    let id = "spiffe://fintech.internal/payments";
    let t = token(&sb, id, &[]);
    let srv = serve(&sb, &["--svid-ttl", "10m"]);
    let key = KeyPair::generate().expect("key");
    let (s, b) = enroll(&sb, srv.addr, &t, &csr(&key)).await;
    let first = ok_cert(s, &b);
    assert_eq!(verified(&first).spiffe_id.as_deref(), Some(id));
    let next = KeyPair::generate().expect("key");
    let (s, b) = renew(&sb, srv.addr, &first.cert_chain, &key, &next).await;
    let second = ok_cert(s, &b);
    assert_ne!(first.serial, second.serial);
    verified(&second);
    drop(srv);
    let found = key_material_under(&sb.path("ca"));
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn token_misconfiguration_is_refused_clearly_and_leaves_nothing() {
    let mut sb = hsm_sandbox();
    // Ed25519 cannot live in the token: refused before anything is generated.
    let ks = key_store("ed");
    let err = sb.fails(
        2,
        &[
            "init",
            "--dir",
            "ca",
            "--trust-domain",
            "t.internal",
            "--key-type",
            "ed25519",
            "--key-store",
            &ks,
        ],
    );
    assert!(err.contains("ecdsa-p256 or ecdsa-p384"), "{err}");
    assert!(!sb.path("ca").exists());
    // A token label that does not exist: the message lists the tokens there are.
    let err = sb.fails(
        2,
        &[
            "init",
            "--dir",
            "ca",
            "--trust-domain",
            "t.internal",
            "--key-store",
            "pkcs11:token=nope;object=x",
        ],
    );
    assert!(
        err.contains("no token labelled `nope`") && err.contains("gatehouse"),
        "{err}"
    );
    assert!(!sb.path("ca").exists());
    // --pin-env names the variable; a wrong PIN fails at C_Login and is never echoed.
    sb.env.push(("OTHER_PIN".into(), "wrong-5150".into()));
    let ks = key_store("fin");
    let err = sb.fails(
        2,
        &[
            "--pin-env",
            "OTHER_PIN",
            "init",
            "--dir",
            "ca",
            "--trust-domain",
            "t.internal",
            "--key-store",
            &ks,
        ],
    );
    assert!(
        err.contains("C_Login") && !err.contains("wrong-5150"),
        "{err}"
    );
    assert!(!sb.path("ca").exists());
    // A pin-value in the URI is used and never written to ca.json.
    sb.env.retain(|(k, _)| k != "GATEHOUSE_PKCS11_PIN");
    let uri = format!("{}?pin-value={PIN}", key_store("fin"));
    sb.ok(&[
        "init",
        "--dir",
        "ca",
        "--trust-domain",
        "t.internal",
        "--key-store",
        &uri,
    ]);
    let state = sb.read("ca/ca.json");
    assert!(
        !state.contains(PIN) && state.contains("pkcs11:token=gatehouse;object=fin"),
        "{state}"
    );
    // Later commands without any PIN say where to put one.
    let err = sb.fails(2, &common::issue_args("spiffe://t.internal/a", &[], "a"));
    assert!(err.contains("GATEHOUSE_PKCS11_PIN"), "{err}");
    // The same object prefix again: an existing key is never reused or overwritten.
    sb.env.push(("GATEHOUSE_PKCS11_PIN".into(), PIN.into()));
    let err = sb.fails(
        2,
        &[
            "init",
            "--dir",
            "ca2",
            "--trust-domain",
            "t.internal",
            "--key-store",
            &key_store("fin"),
        ],
    );
    assert!(
        err.contains("already holds an object labelled `fin-g1-root`"),
        "{err}"
    );
}
