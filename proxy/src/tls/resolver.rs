//! The sidecar's own certificate, swappable without dropping connections: one
//! [`CertResolver`] serves the inbound server role and the outbound client role. A reload stores
//! a new [`CertifiedKey`]; only handshakes that start afterwards see it.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Holds the current certificate and key.
pub(crate) struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    /// A resolver presenting `ck`.
    pub(crate) fn new(ck: Arc<CertifiedKey>) -> Self {
        Self {
            current: ArcSwap::new(ck),
        }
    }

    /// Presents `ck` on every handshake from now on.
    pub(crate) fn store(&self, ck: Arc<CertifiedKey>) {
        self.current.store(ck);
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
