//! `[[tcp]]` entries: who may open a connection to a sidecar's TCP listener of the same name
//! (`[[tcp_inbound]]` in the sidecar configuration). A TCP listener has no methods or paths,
//! so an entry is a name and an allow-list, written exactly as a route's (`[identities]`
//! aliases, SPIFFE IDs, patterns, `"*"`), checked by the same code with `file:line:col`
//! errors. A policy file may hold only `[[tcp]]` entries (a database sidecar has no routes).
//!
//! What is not here: the TOML mirror (`file.rs`), the allow-list checks (`compile.rs`, shared
//! with routes), `policy diff` for TCP (`diff.rs` asks [`Policy::tcp_allows`]).

use std::collections::HashMap;

use serde::Deserialize;
use toml::Spanned;

use crate::compile::{Alias, Compiler, Policy};
use crate::identity::{IdentityPattern, SpiffeId, TrustDomain};
use crate::matcher::{AllowEntry, Loc};

/// One `[[tcp]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTcp {
    pub name: Option<Spanned<String>>,
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A compiled `[[tcp]]` entry.
#[derive(Debug, Clone)]
pub struct TcpEntry {
    pub(crate) name: String,
    pub(crate) allow: Vec<AllowEntry>,
    pub(crate) loc: Loc,
}

impl TcpEntry {
    /// The name (the `[[tcp_inbound]]` listener it decides for).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The allow-list, in file order.
    pub fn allow(&self) -> &[AllowEntry] {
        &self.allow
    }

    /// The line of the entry in the policy file.
    pub fn line(&self) -> usize {
        self.loc.line
    }

    /// The first allow entry admitting `caller`, if any.
    fn admitting(&self, caller: &SpiffeId) -> Option<&AllowEntry> {
        self.allow.iter().find(|a| a.pattern.matches(caller))
    }
}

/// What a policy says about one connection to a TCP listener.
#[derive(Debug, Clone, Copy)]
pub enum TcpDecision<'p> {
    /// The caller is on the entry's allow-list.
    Allow {
        /// The deciding entry.
        entry: &'p TcpEntry,
        /// The allow entry that admitted the caller.
        matched: &'p AllowEntry,
    },
    /// The entry exists and does not name the caller.
    NotAllowed {
        /// The entry.
        entry: &'p TcpEntry,
    },
    /// The policy has no `[[tcp]]` entry of that name: nobody may connect.
    NoEntry,
}

impl TcpDecision<'_> {
    /// Whether the connection may proceed (audit mode aside: see [`Policy::is_audit_mode`]).
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }

    /// `allowed`, `not_allowed` or `no_entry` (audit lines and metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Allow { .. } => "allowed",
            Self::NotAllowed { .. } => "not_allowed",
            Self::NoEntry => "no_entry",
        }
    }
}

impl Policy {
    /// The `[[tcp]]` entries, in file order.
    pub fn tcp_entries(&self) -> &[TcpEntry] {
        &self.tcp
    }

    /// The `[[tcp]]` entry named `name`.
    pub fn tcp_entry(&self, name: &str) -> Option<&TcpEntry> {
        self.tcp.iter().find(|t| t.name == name)
    }

    /// Decides a connection from `caller` to the TCP listener `name`. A caller of another
    /// trust domain is never allowed (the handshake refuses it first anyway).
    pub fn decide_tcp(&self, name: &str, caller: &SpiffeId) -> TcpDecision<'_> {
        let Some(entry) = self.tcp_entry(name) else {
            return TcpDecision::NoEntry;
        };
        match entry
            .admitting(caller)
            .filter(|_| caller.is_member_of(&self.trust_domain))
        {
            Some(matched) => TcpDecision::Allow { entry, matched },
            None => TcpDecision::NotAllowed { entry },
        }
    }

    /// Whether the rules (as enforced, audit mode aside) let `caller` connect to `name`.
    pub fn tcp_allows(&self, name: &str, caller: &SpiffeId) -> bool {
        self.decide_tcp(name, caller).is_allowed()
    }
}

impl Compiler<'_> {
    /// Compiles every `[[tcp]]` table; names must be non-empty and unique.
    pub(crate) fn tcp(
        &mut self,
        raw: &[Spanned<RawTcp>],
        aliases: &[Alias],
        td: Option<&TrustDomain>,
    ) -> Vec<TcpEntry> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for t in raw {
            let span = t.span();
            let allow = self.allow(t.get_ref().allow.as_ref(), &span, aliases, td);
            let name = match &t.get_ref().name {
                Some(n) if !n.get_ref().trim().is_empty() => n,
                Some(n) => {
                    self.error(
                        n.span(),
                        "empty [[tcp]] name",
                        "write the name of the sidecar's [[tcp_inbound]] listener, e.g. name = \"postgres\"",
                    );
                    continue;
                }
                None => {
                    self.error(
                        span,
                        "[[tcp]] entry has no `name`",
                        "add name = \"...\": the [[tcp_inbound]] listener of that name is decided by this entry",
                    );
                    continue;
                }
            };
            let loc = self.loc(&span);
            if let Some(line) = seen.insert(name.get_ref().clone(), loc.line) {
                self.error(
                    name.span(),
                    format!(
                        "[[tcp]] name `{}` is already used on line {line}",
                        name.get_ref()
                    ),
                    "give each [[tcp]] entry its own name: one entry per TCP listener",
                );
                continue;
            }
            if let Some(allow) = allow {
                out.push(TcpEntry {
                    name: name.get_ref().clone(),
                    allow,
                    loc,
                });
            }
        }
        out
    }
}

/// Every exact identity and pattern `[[tcp]]` allow-lists name (the callers `policy diff`
/// samples).
pub(crate) fn patterns(policy: &Policy) -> impl Iterator<Item = &IdentityPattern> {
    policy
        .tcp
        .iter()
        .flat_map(|t| t.allow.iter().map(|a| &a.pattern))
}

/// Whether a `[[tcp]]` allow-list names the alias `name`.
pub(crate) fn uses_alias(policy: &Policy, name: &str) -> bool {
    policy
        .tcp
        .iter()
        .any(|t| t.allow.iter().any(|a| a.written == name))
}

/// `policy check` warnings (`tcp-wildcard-identity`): a `[[tcp]]` allow entry that stands for
/// more than one identity. A TCP listener has no methods or paths to narrow what a caller may
/// do, so every identity it admits gets the whole service (a database, say).
pub(crate) fn review(policy: &Policy) -> Vec<(Loc, String, &'static str)> {
    let mut out = Vec::new();
    for t in &policy.tcp {
        for a in t.allow.iter().filter(|a| a.pattern.is_wildcard()) {
            out.push((
                a.loc,
                format!(
                    "[[tcp]] `{}` admits every identity matching `{}`: each gets the whole TCP service",
                    t.name, a.pattern
                ),
                "list the exact callers (aliases or spiffe:// IDs) that need this connection",
            ));
        }
    }
    out
}

/// `policy explain` rows: one per `[[tcp]]` entry (methods `TCP`, path `-`), a cell per
/// caller column as for routes.
pub(crate) fn matrix_rows(
    policy: &Policy,
    callers: &[(String, IdentityPattern)],
) -> Vec<crate::explain::MatrixRoute> {
    policy
        .tcp
        .iter()
        .map(|t| crate::explain::MatrixRoute {
            name: t.name.clone(),
            methods: vec!["TCP"],
            path: "-".to_owned(),
            allowed_by: callers
                .iter()
                .map(|(_, who)| {
                    t.allow
                        .iter()
                        .find(|a| a.pattern.covers(who))
                        .map(|a| a.written.clone())
                })
                .collect(),
        })
        .collect()
}

/// `policy diff` lines for `[[tcp]]` entries: per sampled caller and entry name, whether the
/// new policy lets it connect where the old one did not (granted) or the reverse (revoked).
pub(crate) fn changes(
    old: &Policy,
    new: &Policy,
    callers: &[crate::probe::Caller],
) -> Vec<crate::diff::AccessChange> {
    let mut names: Vec<&str> = old
        .tcp
        .iter()
        .chain(&new.tcp)
        .map(|t| t.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        for caller in callers {
            let change = match (
                old.tcp_allows(name, &caller.id),
                new.tcp_allows(name, &caller.id),
            ) {
                (false, true) => crate::diff::Change::Granted,
                (true, false) => crate::diff::Change::Revoked,
                _ => continue,
            };
            out.push(crate::diff::AccessChange {
                change,
                caller: caller.label.clone(),
                route: name.to_owned(),
                path: "[[tcp]]".to_owned(),
                methods: vec!["TCP".to_owned()],
            });
        }
    }
    out.sort_by(|a, b| (a.change, &a.caller, &a.route).cmp(&(b.change, &b.caller, &b.route)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_ONLY: &str = r#"version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"

[[tcp]]
name  = "postgres"
allow = ["report-service", "spiffe://fintech.internal/ns/ops/*"]
"#;

    #[test]
    fn check_warns_about_tcp_wildcards_and_counts_tcp_aliases_as_used() {
        let p = Policy::parse("policy.toml", TCP_ONLY).expect("compiles");
        let w = crate::review::review(&p);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].code, "tcp-wildcard-identity");
        assert_eq!((w[0].diagnostic.line, w[0].diagnostic.col), (9, 28));
    }

    #[test]
    fn diff_reports_an_added_tcp_caller_as_a_widening_and_explain_shows_the_row() {
        let old = Policy::parse("old.toml", TCP_ONLY).expect("old");
        let wider = TCP_ONLY.replace(
            "allow = [\"report-service\",",
            "allow = [\"report-service\", \"spiffe://fintech.internal/api-gateway\",",
        );
        let new = Policy::parse("new.toml", &wider).expect("new");
        let d = crate::diff::diff(&old, &new);
        assert!(d.widens(), "{d:?}");
        assert_eq!(d.changes.len(), 1, "{d:?}");
        let c = &d.changes[0];
        assert_eq!(c.change, crate::diff::Change::Granted);
        assert_eq!(c.caller, "spiffe://fintech.internal/api-gateway");
        assert_eq!(
            (c.route.as_str(), c.methods[0].as_str()),
            ("postgres", "TCP")
        );
        let back = crate::diff::diff(&new, &old);
        assert!(!back.widens());
        assert_eq!(back.changes[0].change, crate::diff::Change::Revoked);
        assert!(crate::diff::diff(&old, &old).is_empty());

        let m = crate::explain::matrix(&new);
        assert_eq!(m.tcp.len(), 1);
        let table = m.to_table();
        assert!(table.contains("postgres"), "{table}");
        let gateway = m
            .callers
            .iter()
            .position(|c| c.name == "spiffe://fintech.internal/api-gateway")
            .expect("column");
        assert_eq!(
            m.tcp[0].allowed_by[gateway].as_deref(),
            Some("spiffe://fintech.internal/api-gateway")
        );
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("valid id")
    }

    #[test]
    fn a_policy_of_only_tcp_entries_decides_by_name_and_caller() {
        let p = Policy::parse("policy.toml", TCP_ONLY).expect("compiles");
        assert_eq!(p.route_count(), 0);
        assert_eq!(p.tcp_entries().len(), 1);
        let report = id("spiffe://fintech.internal/report-service");
        let ops = id("spiffe://fintech.internal/ns/ops/dba");
        let gateway = id("spiffe://fintech.internal/api-gateway");
        let d = p.decide_tcp("postgres", &report);
        assert!(d.is_allowed());
        assert!(
            matches!(d, TcpDecision::Allow { matched, .. } if matched.written() == "report-service")
        );
        assert!(p.tcp_allows("postgres", &ops));
        assert_eq!(p.decide_tcp("postgres", &gateway).reason(), "not_allowed");
        assert_eq!(p.decide_tcp("redis", &report).reason(), "no_entry");
    }

    #[test]
    fn tcp_errors_point_at_line_and_column() {
        let with_port = r#"version = 1
trust_domain = "fintech.internal"

[[tcp]]
name  = "postgres"
allow = ["reports-service"]

[[tcp]]
name  = "postgres"
allow = ["spiffe://other.internal/x"]

[[tcp]]
allow = []
port = 5432
"#;
        let errs = Policy::parse("p.toml", with_port).expect_err("refused");
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|e| e.contains("p.toml:14:1") && e.contains("unknown field `port`")),
            "{text:?}"
        );
        // The same file without the unknown field: every other error is reported.
        let text = &with_port.replace("port = 5432\n", "");
        let errs = Policy::parse("p.toml", text).expect_err("refused");
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        let has = |at: &str, what: &str| text.iter().any(|e| e.contains(at) && e.contains(what));
        assert!(
            has("p.toml:6:10", "unknown identity alias `reports-service`"),
            "{text:?}"
        );
        assert!(has("p.toml:9:9", "already used on line 4"), "{text:?}");
        assert!(
            has("p.toml:10:10", "trust domain `other.internal`"),
            "{text:?}"
        );
        assert!(has("p.toml:13:9", "empty allow-list"), "{text:?}");
        assert!(has("p.toml:12:1", "has no `name`"), "{text:?}");
    }
}
