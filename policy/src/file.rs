//! The policy file as written: a serde mirror of the TOML with a span on every value, so the
//! validation pass in `compile.rs` can point at the exact line and column of each problem.
//!
//! Fields a file may omit are `Option`s here so that their absence is reported by `compile.rs`
//! together with every other problem, instead of stopping serde at the first one. The structs
//! stay flat because `deny_unknown_fields` does not work with `#[serde(flatten)]`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub version: Option<Spanned<i64>>,
    pub trust_domain: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub identities: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub limit: Vec<Spanned<RawLimit>>,
    #[serde(default)] // issue 17: `[[tcp]]` entries (policy/src/tcp.rs)
    pub tcp: Vec<Spanned<crate::tcp::RawTcp>>,
}

/// One `[[route]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: Option<Spanned<String>>,
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub path: Option<Spanned<String>>,
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
}

/// One `[[limit]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimit {
    pub caller: Option<Spanned<String>>,
    pub route: Option<Spanned<String>>,
    pub concurrency: Option<Spanned<i64>>,
    pub rate: Option<Spanned<String>>,
    pub burst: Option<Spanned<i64>>,
}

/// Parses the TOML; a syntax error, an unknown key or a value of the wrong type is returned
/// with its byte span (the parser stops at the first one).
pub(crate) fn parse(text: &str) -> Result<RawPolicy, toml::de::Error> {
    toml::from_str(text)
}
