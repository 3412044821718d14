//! What the reloader reports on `/status` (`reload`): the last attempt, a stuck attempt, and
//! every input refused with its errors.

use std::path::PathBuf;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::error::ReloadErrors;
use crate::input::WATCHED;

/// One refused input: which content, since when, why.
#[derive(Debug, Clone)]
pub(super) struct Refused {
    pub(super) digest: [u8; 32],
    pub(super) path: PathBuf,
    pub(super) since: OffsetDateTime,
    pub(super) errors: ReloadErrors,
}

/// What the reloader reports on `/status` (`reload`).
#[derive(Debug, Default)]
pub(crate) struct ReloadStatus {
    pub(super) refused: [Option<Refused>; 5],
    pub(super) last_attempt: Option<OffsetDateTime>,
    pub(super) last_result: Option<&'static str>,
    pub(super) stuck_since: Option<OffsetDateTime>,
}

impl ReloadStatus {
    /// `{"last_attempt", "last_result", "stuck_since", "refused": [{"what", "path", "since",
    /// "errors"}]}`; times in RFC 3339.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let time = |t: Option<OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
        let refused: Vec<serde_json::Value> = self
            .refused
            .iter()
            .zip(WATCHED)
            .filter_map(|(r, kind)| {
                let r = r.as_ref()?;
                Some(serde_json::json!({
                    "what": kind.label(),
                    "path": r.path.display().to_string(),
                    "since": time(Some(r.since)),
                    "errors": r.errors.to_strings(),
                }))
            })
            .collect();
        serde_json::json!({
            "last_attempt": time(self.last_attempt),
            "last_result": self.last_result,
            "stuck_since": time(self.stuck_since),
            "refused": refused,
        })
    }
}
