//! The sidecar's TLS loading: `load_chain`, `load_key`, `load_bundle`, `load_crls` and
//! `Credentials::parse` on the input as every file's content (a PEM file may hold every kind), the
//! X.509-SVID rules on each certificate, and the client verifier built with the input's CRLs
//! (webpki parses a CRL when the verifier is built and its entries when a leaf is checked, so
//! a real leaf of a real CA is verified against them) or with the input's bundle as roots.
#![no_main]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use gatehouse_ca::revoke::RevokeTarget;
use gatehouse_ca::{Authority, InitOptions, IssueRequest, KeyType, SpiffeId, TrustDomain};
use gatehouse_proxy::fuzzing::CrlPolicy;
use gatehouse_proxy::fuzzing::SpiffeClientVerifier;
use gatehouse_proxy::fuzzing::{self as tls, CredentialFiles, Credentials};
use gatehouse_proxy::fuzzing::{FileKind, Input};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};

/// A real CA with a revoked and a valid leaf, made once per process by the `ca` library.
struct Fixture {
    td: TrustDomain,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    leaf: Vec<CertificateDer<'static>>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("gatehouse-fuzz-pem-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fixture dir");
    let td = TrustDomain::parse("fintech.internal").expect("td");
    let opts = InitOptions {
        trust_domain: td.clone(),
        key_type: KeyType::EcdsaP256,
        ttl: Duration::from_secs(86_400),
        intermediate: true,
    };
    let ca = Authority::init(&dir.join("ca"), &opts).expect("ca init");
    let issue = |name: &str| {
        let req = IssueRequest {
            spiffe_id: SpiffeId::parse(&format!("spiffe://fintech.internal/{name}")).expect("id"),
            dns: Vec::new(),
            ttl: Duration::from_secs(3600),
        };
        ca.issue(&req).expect("issue")
    };
    let revoked = issue("revoked");
    ca.revoke(
        &RevokeTarget::Serial(revoked.serial_hex.clone()),
        "key-compromise",
    )
    .expect("revoke");
    let valid = issue("valid");
    let crl = dir.join("crl.pem");
    ca.write_crl(&crl, Duration::from_secs(3600)).expect("crl");
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, &valid.bundle_pem).expect("bundle");
    let leaf_file = dir.join("cert.pem");
    std::fs::write(&leaf_file, &valid.cert_pem).expect("cert");
    let fixture = Fixture {
        td,
        provider: tls::provider(),
        roots: tls::load_bundle(&Input::read(&bundle, FileKind::Bundle))
            .expect("bundle")
            .0,
        crls: tls::load_crls(&Input::read(&crl, FileKind::Crl)).expect("crls"),
        leaf: tls::load_chain(&Input::read(&leaf_file, FileKind::Cert)).expect("chain"),
    };
    let _ = std::fs::remove_dir_all(&dir);
    fixture
});

/// Verifies the fixture's valid leaf with `roots` and `crls`; any outcome but a panic is fine.
fn verify(
    f: &Fixture,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) {
    if let Ok(v) = SpiffeClientVerifier::new(roots, crls, f.td.clone(), f.provider.clone()) {
        let _ = v.verify_client_cert(&f.leaf[0], &f.leaf[1..], UnixTime::now());
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    // The content as `input::read` hands it over: the loaders parse bytes already read.
    let input = Input {
        path: PathBuf::from("/fuzz/input.pem"),
        content: Ok(data.to_vec()),
        digest: [0; 32],
    };
    let file = &input;
    if let Ok(chain) = tls::load_chain(file) {
        for cert in &chain {
            let _ = tls::leaf_identity(cert);
            let _ = tls::svid_identity(cert, &f.td);
        }
        let _ = chain.first().map(tls::serial_hex);
    }
    let _ = tls::load_key(file);
    if let Ok((roots, _)) = tls::load_bundle(file) {
        verify(f, roots, f.crls.clone());
    }
    if let Ok(crls) = tls::load_crls(file) {
        verify(f, f.roots.clone(), crls);
    }
    let files = CredentialFiles {
        cert: file,
        key: file,
        bundle: file,
        crl: Some(file),
        crl_policy: CrlPolicy::default(),
    };
    if let Err(errors) = Credentials::parse(files, &f.provider) {
        for e in &errors {
            let _ = (e.to_string(), e.help());
        }
    }
});
