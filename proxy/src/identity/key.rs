//! The workload key: made in memory (ECDSA P-256, aws-lc-rs through rcgen), never written
//! anywhere, and a PKCS#10 request for it. The CA only uses the request's public key (the
//! SPIFFE ID comes from the credential), so the request has an empty subject and no extensions.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A fresh key pair held only in this process.
pub struct WorkloadKey {
    pair: KeyPair,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkloadKey(ECDSA P-256, in memory)")
    }
}

impl WorkloadKey {
    /// Generates a new P-256 key.
    ///
    /// # Errors
    /// The crypto library failed (no randomness).
    pub fn generate() -> Result<Self, rcgen::Error> {
        Ok(Self {
            pair: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A certificate signing request (PEM) for this key.
    ///
    /// # Errors
    /// Signing the request failed.
    pub fn csr_pem(&self) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.serialize_request(&self.pair)?.pem()
    }

    /// The private key (PKCS#8 DER), for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.pair.serialize_der()).into()
    }

    /// The SubjectPublicKeyInfo (DER) of this key.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.pair)
    }
}
