//! Expiry and staleness: the certificate expiry and CRL metrics, the warning when the own leaf
//! nears its end, and stale CRLs reaching open connections.

use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::warn;

use super::Reloader;
use crate::metrics::Metrics;
use crate::state::Snapshot;

impl Reloader {
    /// Reports stale CRLs (see [`crate::tls::crl::StaleReport`]) at start, after every reload and on every
    /// poll tick, so it fires as time passes with no reload. When one went stale beyond
    /// `crl_grace` with `crl_stale = "refuse"`, open connections were verified before: inbound
    /// ones re-check their peer, pooled outbound ones are retired so the next request
    /// verifies its server again ([`crate::state::State::recheck_peers`]).
    pub(super) fn check_crls(&mut self, snap: &Snapshot) {
        let policy = self.state.config.identity.crl_policy;
        if self.crl_report.check(&snap.credentials.crl_set, policy) {
            self.state.recheck_peers();
        }
    }

    /// Warns once per leaf when less than a third of its lifetime is left (and once when it
    /// has expired: `/readyz` fails from then on).
    pub(super) fn check_lifetime(&mut self, snap: &Snapshot) {
        if self.state.config.is_online() {
            // The CA backdates not-before, so "a third of the lifetime" says nothing here; the
            // driver warns when a renewal fails, with the time left.
            return;
        }
        let Some((not_before, not_after)) =
            validity(snap.credentials.certified.end_entity_cert().ok())
        else {
            return;
        };
        let now = OffsetDateTime::now_utc();
        let serial = &snap.credentials.serial_hex;
        let left = not_after - now;
        let third = (not_after - not_before) / 3;
        let key = if left <= time::Duration::ZERO {
            format!("{serial}:expired")
        } else if left < third {
            serial.clone()
        } else {
            return;
        };
        if self.warned_serial.as_deref() == Some(key.as_str()) {
            return;
        }
        self.warned_serial = Some(key);
        warn!(
            cert = %self.state.config.identity.cert.display(),
            serial = %serial,
            not_after = %not_after.format(&Rfc3339).unwrap_or_default(),
            seconds_left = left.whole_seconds(),
            "own certificate has less than a third of its lifetime left: rotate it (`ca rotate --dir CA OUTDIR`)"
        );
    }
}

/// Sets `gatehouse_cert_expiry_timestamp_seconds` for the leaf and every bundle root, and
/// `gatehouse_crl_next_update_timestamp_seconds` for every CRL.
pub(crate) fn publish_expiry(metrics: &Metrics, snap: &Snapshot) {
    metrics.publish_crls(&snap.credentials.crl_set);
    let g = &metrics.cert_expiry;
    g.reset();
    g.with_label_values(&["leaf"])
        .set(snap.credentials.not_after.unix_timestamp());
    for root in &snap.credentials.bundle {
        if let Some((serial, not_after)) = serial_and_expiry(root) {
            let label = format!("root:{}", &serial[..serial.len().min(16)]);
            g.with_label_values(&[label.as_str()])
                .set(not_after.unix_timestamp());
        }
    }
}

/// Serial (hex), not-after of a certificate.
pub(crate) fn serial_and_expiry(cert: &CertificateDer<'_>) -> Option<(String, OffsetDateTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(cert.as_ref()).ok()?;
    Some((
        hex::encode(c.raw_serial()),
        c.validity().not_after.to_datetime(),
    ))
}

fn validity(cert: Option<&CertificateDer<'_>>) -> Option<(OffsetDateTime, OffsetDateTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(cert?.as_ref()).ok()?;
    Some((
        c.validity().not_before.to_datetime(),
        c.validity().not_after.to_datetime(),
    ))
}
