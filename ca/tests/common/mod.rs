//! Shared helpers for the `ca` integration tests: run the real binary, read files back.
#![allow(dead_code, reason = "each test file uses a different subset")]

pub mod https;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A temp directory (removed on drop) with helpers to run `ca` in it.
pub struct Sandbox {
    pub tmp: tempfile::TempDir,
    /// Environment variables every `ca` run gets (the PKCS#11 tests' SoftHSM2 settings).
    pub env: Vec<(String, String)>,
}

impl Sandbox {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().expect("create temp dir"),
            env: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Runs `ca ARGS` with the sandbox as working directory.
    pub fn ca(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.tmp.path())
            .output()
            .expect("run ca")
    }

    /// Starts `ca ARGS` in the sandbox with stdout and stderr piped, for concurrent runs.
    pub fn spawn(&self, args: &[&str]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_ca"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.tmp.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ca")
    }

    /// Runs `ca ARGS` and asserts success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ca(args);
        assert!(
            out.status.success(),
            "ca {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs `ca ARGS` and asserts failure with `code`, returning stderr.
    pub fn fails(&self, code: i32, args: &[&str]) -> String {
        let out = self.ca(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "ca {args:?}: expected exit {code}, stderr:\n{stderr}"
        );
        stderr
    }

    /// `ca init --dir ca --trust-domain fintech.internal [--intermediate]`.
    pub fn init(&self, intermediate: bool) {
        let mut args = vec!["init", "--dir", "ca", "--trust-domain", "fintech.internal"];
        if intermediate {
            args.push("--intermediate");
        }
        self.ok(&args);
    }

    /// `ca issue --dir ca --spiffe-id spiffe://fintech.internal/NAME --out NAME`.
    pub fn issue(&self, name: &str) -> PathBuf {
        let id = format!("spiffe://fintech.internal/{name}");
        self.ok(&issue_args(&id, &[], name));
        self.path(name)
    }

    /// Every path under the sandbox (relative), sorted: "no files left behind" assertions.
    pub fn tree(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(self.tmp.path(), self.tmp.path(), &mut out);
        out.sort();
        out
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }
}

/// The arguments of `ca issue --dir ca --spiffe-id ID EXTRA.. --out OUT`, for [`Sandbox::ok`]
/// and [`Sandbox::fails`].
pub fn issue_args<'a>(id: &'a str, extra: &[&'a str], out: &'a str) -> Vec<&'a str> {
    let mut args = vec!["issue", "--dir", "ca", "--spiffe-id", id];
    args.extend_from_slice(extra);
    args.extend(["--out", out]);
    args
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = entry.path();
        out.push(
            p.strip_prefix(root)
                .expect("under root")
                .display()
                .to_string(),
        );
        if entry.file_type().expect("file type").is_dir() {
            walk(root, &p, out);
        }
    }
}

/// The DER certificates of a PEM file.
pub fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.expect("PEM cert").as_ref().to_vec())
        .collect()
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// The CRLs of `file` (relative to the sandbox).
pub fn crls(sb: &Sandbox, file: &str) -> Vec<CertificateRevocationListDer<'static>> {
    CertificateRevocationListDer::pem_file_iter(sb.path(file))
        .expect("crl file")
        .collect::<Result<_, _>>()
        .expect("pem")
}

/// The sidecar's client-certificate verifier: rustls/webpki with `ca/bundle.pem` and the CRLs of
/// `crl_file`, checking the whole chain and denying a CA without a CRL (rustls' defaults).
pub fn verifier(sb: &Sandbox, crl_file: &str) -> Arc<dyn ClientCertVerifier> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(sb.path("ca/bundle.pem")).expect("bundle") {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .with_crls(crls(sb, crl_file))
        .build()
        .expect("verifier with CRLs")
}

/// Runs the rustls verifier on the chain in `dir/cert.pem`.
pub fn verify(v: &dyn ClientCertVerifier, sb: &Sandbox, dir: &str) -> Result<(), rustls::Error> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(sb.path(&format!("{dir}/cert.pem")))
            .expect("cert")
            .collect::<Result<_, _>>()
            .expect("pem");
    v.verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map(|_| ())
}

/// The serial (hex) of the leaf in `dir/cert.pem`.
pub fn serial(sb: &Sandbox, dir: &str) -> String {
    let der = pem_certs(&sb.read(&format!("{dir}/cert.pem"))).remove(0);
    hex::encode(
        X509Certificate::from_der(&der)
            .expect("parse")
            .1
            .raw_serial(),
    )
}
