//! Test PKI, minted one way: a `gatehouse-ca` [`Authority`] in a temp dir ([`Pki`]) issues every
//! test certificate, good or deliberately broken (`sign_custom`). The real `ca` CLI ([`ca_ok`],
//! [`ca_json`]) is for tests of the CLI itself and of what it writes; the FinTech demo mints with
//! the example's `mint.sh` because that script is the documented path being demonstrated.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use gatehouse_ca::{Authority, InitOptions, IssueRequest, KeyType, SpiffeId, TrustDomain};
use tempfile::TempDir;

use super::binary;

/// Runs the real `ca ARGS` to completion.
///
/// # Panics
/// When it cannot be started or exits non-zero (with its stdout and stderr).
async fn ca_run(args: &[&str], extra: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(binary("ca"))
        .args(args)
        .args(extra)
        .output()
        .await
        .expect("run ca");
    assert!(
        out.status.success(),
        "ca {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the real `ca ARGS` to completion and returns its stdout.
///
/// # Panics
/// When it cannot be started or exits non-zero (with its stdout and stderr).
pub async fn ca_ok(args: &[&str]) -> String {
    String::from_utf8_lossy(&ca_run(args, &[]).await.stdout).into_owned()
}

/// Runs `ca ARGS --format json` and returns its JSON output (`null` when it printed none).
///
/// # Panics
/// When `ca` cannot be run or fails.
pub async fn ca_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&ca_run(args, &["--format", "json"]).await.stdout)
        .unwrap_or(serde_json::Value::Null)
}

/// A certificate directory as `ca issue` writes it: `cert.pem`, `key.pem`, `bundle.pem`.
#[derive(Debug, Clone)]
pub struct CertDir {
    /// The directory.
    pub dir: PathBuf,
}

impl CertDir {
    /// `cert.pem` (leaf + chain).
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    /// `key.pem`.
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    /// `bundle.pem`.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }
}

/// A CA of our own (gatehouse-ca, in-process) in a fresh temp dir.
pub struct Pki {
    dir: TempDir,
    ca: Authority,
    counter: Mutex<u32>,
}

impl Pki {
    /// A root CA for trust domain `td`.
    ///
    /// # Panics
    /// If the CA cannot be created (a broken test environment).
    pub fn new(td: &str) -> Self {
        Self::build(td, false)
    }

    /// A root + intermediate CA for `td` (leaves signed by the intermediate).
    ///
    /// # Panics
    /// If the CA cannot be created.
    pub fn with_intermediate(td: &str) -> Self {
        Self::build(td, true)
    }

    fn build(td: &str, intermediate: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let opts = InitOptions {
            trust_domain: TrustDomain::parse(td).expect("valid trust domain"),
            key_type: KeyType::EcdsaP256,
            ttl: Duration::from_secs(10 * 24 * 3600),
            intermediate,
        };
        let ca = Authority::init(&dir.path().join("ca"), &opts).expect("ca init");
        Self {
            dir,
            ca,
            counter: Mutex::new(0),
        }
    }

    /// The authority.
    pub fn authority(&self) -> &Authority {
        &self.ca
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// A fresh directory under this PKI's temp dir.
    pub fn fresh_dir(&self, hint: &str) -> PathBuf {
        let mut n = self.counter.lock().expect("counter");
        *n += 1;
        let safe: String = hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let p = self.dir.path().join(format!("{n:03}-{safe}"));
        std::fs::create_dir_all(&p).expect("create dir");
        p
    }

    /// Issues an SVID for `id` (DNS SAN `localhost`, so curl and openssl can verify a sidecar
    /// by name) and writes it to a fresh directory.
    ///
    /// # Panics
    /// If issuance fails.
    pub fn issue(&self, id: &str) -> CertDir {
        let req = IssueRequest {
            spiffe_id: SpiffeId::parse(id).expect("valid SPIFFE ID"),
            dns: vec!["localhost".into()],
            ttl: Duration::from_secs(24 * 3600),
        };
        let svid = self.ca.issue(&req).expect("issue");
        let dir = self.fresh_dir(id);
        svid.write_to(&dir).expect("write svid");
        CertDir { dir }
    }

    /// X.509-SVID parameters for `id`, valid from `not_before` to `not_after`, for tests that
    /// then break one rule before [`Pki::sign_custom`].
    ///
    /// # Panics
    /// If the parameters cannot be built.
    pub fn svid_params(
        &self,
        id: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> rcgen::CertificateParams {
        // svid_params builds a parseable SpiffeId; a foreign trust domain is fine here.
        let id = SpiffeId::parse(id).expect("valid SPIFFE ID");
        gatehouse_ca::profile::svid_params(&id, &[], not_before, not_after).expect("params")
    }

    /// Valid-now parameters for `id` (one day).
    pub fn params_now(&self, id: &str) -> rcgen::CertificateParams {
        let now = time::OffsetDateTime::now_utc();
        self.svid_params(id, now, now + time::Duration::days(1))
    }

    /// Signs `params` with this CA (bypassing the SVID profile checks) for a fresh key and
    /// writes the result as a certificate directory.
    ///
    /// # Panics
    /// If signing fails.
    pub fn sign_custom(&self, hint: &str, params: rcgen::CertificateParams) -> CertDir {
        let key = rcgen::KeyPair::generate().expect("key");
        let chain = self.ca.sign_custom(params, &key).expect("sign_custom");
        let dir = self.fresh_dir(hint);
        std::fs::write(dir.join("cert.pem"), chain).expect("write cert");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write key");
        std::fs::write(
            dir.join("bundle.pem"),
            self.ca.bundle_pem().expect("bundle"),
        )
        .expect("write bundle");
        CertDir { dir }
    }

    /// Writes the bundle to a fresh file and returns its path.
    pub fn bundle_file(&self) -> PathBuf {
        let p = self.fresh_dir("bundle").join("bundle.pem");
        std::fs::write(&p, self.ca.bundle_pem().expect("bundle")).expect("write bundle");
        p
    }
}
