//! Why a reload was refused, typed until it is rendered: in the `reload refused` log line
//! (joined by `; `) and in `/status` `reload.refused[].errors` (one string each).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use gatehouse_policy::SpiffeId;

use crate::error::LoadError;
use crate::tls::TlsError;

/// One reason a reload was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// What startup would refuse too: a file, the credentials, the policy, an outbound TLS
    /// configuration (the same errors `sidecar check` prints).
    #[error(transparent)]
    Build(#[from] LoadError),
    /// A CRL older than the serving one of its issuer (lower CRL number): it would un-revoke
    /// certificates.
    #[error(transparent)]
    CrlRollback(TlsError),
    /// The new certificate is for another SPIFFE ID and `[reload] allow_identity_change` is
    /// off.
    #[error(
        "{}: the certificate is for {found} but this sidecar runs as {running}; refusing to \
         change identity (set [reload] allow_identity_change = true to allow it, DANGEROUS)",
        cert.display()
    )]
    IdentityChange {
        /// The certificate file.
        cert: PathBuf,
        /// The SPIFFE ID in the new certificate.
        found: SpiffeId,
        /// The SPIFFE ID the sidecar runs as.
        running: SpiffeId,
    },
}

/// Every reason an attempt was refused, shared by the inputs it refused.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReloadErrors(Arc<[ReloadError]>);

impl ReloadErrors {
    /// One string per error (`/status`).
    pub(crate) fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

impl From<Vec<ReloadError>> for ReloadErrors {
    fn from(errors: Vec<ReloadError>) -> Self {
        Self(errors.into())
    }
}

/// The errors joined by `; ` (the log line).
impl fmt::Display for ReloadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rendered messages are what the log and `/status` showed as strings before.
    #[test]
    fn identity_change_message_and_join() {
        let id = |s| SpiffeId::parse(s).expect("id");
        let errors = ReloadErrors::from(vec![
            ReloadError::IdentityChange {
                cert: PathBuf::from("certs/cert.pem"),
                found: id("spiffe://t.test/b"),
                running: id("spiffe://t.test/a"),
            },
            ReloadError::Build(LoadError::Signal(std::io::Error::other("x"))),
        ]);
        assert_eq!(
            errors.to_strings()[0],
            "certs/cert.pem: the certificate is for spiffe://t.test/b but this sidecar runs as \
             spiffe://t.test/a; refusing to change identity (set [reload] \
             allow_identity_change = true to allow it, DANGEROUS)"
        );
        assert_eq!(
            errors.to_string(),
            format!(
                "{}; cannot install the SIGTERM/SIGINT handlers: x",
                errors.to_strings()[0]
            )
        );
    }
}
