//! `policy diff`: access granted and revoked between two compiled policies, per caller and
//! route.
//!
//! The diff is computed by asking both compiled policies the same questions, one sample
//! request per class of requests either policy tells apart (see `probe.rs`), so renaming an
//! alias or a route, reordering routes or rewriting a pattern equivalently shows no change,
//! while widening an identity to a wildcard shows as access granted to "any identity matching"
//! it. Audit mode is compared separately: the rules are diffed as enforced, and switching
//! enforcement off is reported on its own.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::compile::Policy;
use crate::limit::{self, LimitChange};
use crate::matcher::{METHODS, Route};
use crate::probe::{self, EXTENSION_METHOD, Probes};

/// Whether access was added or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The new policy allows what the old one denied.
    Granted,
    /// The new policy denies what the old one allowed.
    Revoked,
}

/// One line of a diff: a caller gained or lost some methods on a route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessChange {
    /// Granted or revoked.
    pub change: Change,
    /// The caller: an alias name, a SPIFFE ID, or `any identity matching PATTERN`.
    pub caller: String,
    /// The route that decides in the policy that allows: the new one for a grant, the old
    /// one for a revocation.
    pub route: String,
    /// That route's path pattern.
    pub path: String,
    /// The methods concerned; `["*"]` when every method, extension methods included.
    pub methods: Vec<String>,
}

/// The whole difference between two policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    /// Per caller and route, sorted: grants first.
    pub changes: Vec<AccessChange>,
    /// `Some(true)` when the new policy turns audit mode on (enforcement off), `Some(false)`
    /// when it turns it off, `None` when unchanged.
    pub audit_mode_turned_on: Option<bool>,
    /// `[[limit]]` changes: a raised or removed limit widens, a lowered or added one narrows.
    pub limits: Vec<LimitChange>,
}

impl PolicyDiff {
    /// Whether the new policy lets through anything the old one did not.
    pub fn widens(&self) -> bool {
        self.audit_mode_turned_on == Some(true)
            || self.changes.iter().any(|c| c.change == Change::Granted)
            || self.limits.iter().any(|l| l.change.widens())
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.audit_mode_turned_on.is_none() && self.limits.is_empty()
    }
}

/// Computes what `new` grants and revokes compared with `old`.
pub fn diff(old: &Policy, new: &Policy) -> PolicyDiff {
    let probes = Probes::new(&[old, new]);
    // (change, caller, route index in its policy) -> methods, in first-seen order per key.
    let mut found: BTreeMap<(Change, usize, bool, usize), Vec<&'static str>> = BTreeMap::new();
    let routes = old.routes.iter().chain(new.routes.iter());
    for route in routes {
        for path in probes.paths(route) {
            for method in probe::methods(route) {
                for (c, caller) in probes.callers.iter().enumerate() {
                    let (o_route, o_ok) = old.enforced(&caller.id, method, &path, None);
                    let (n_route, n_ok) = new.enforced(&caller.id, method, &path, None);
                    let key = match (o_ok, n_ok, o_route, n_route) {
                        (false, true, _, Some(r)) => (Change::Granted, c, true, r as usize),
                        (true, false, Some(r), _) => (Change::Revoked, c, false, r as usize),
                        _ => continue,
                    };
                    let methods = found.entry(key).or_default();
                    if !methods.contains(&method) {
                        methods.push(method);
                    }
                }
            }
        }
    }
    let mut changes: Vec<AccessChange> = found
        .into_iter()
        .map(|((change, c, in_new, r), methods)| {
            let route: &Route = if in_new {
                &new.routes[r]
            } else {
                &old.routes[r]
            };
            AccessChange {
                change,
                caller: probes.callers[c].label.clone(),
                route: route.name.clone(),
                path: route.path.clone(),
                methods: method_list(methods),
            }
        })
        .collect();
    changes.extend(crate::tcp::changes(old, new, &probes.callers)); // issue 17: [[tcp]] entries
    PolicyDiff {
        changes,
        audit_mode_turned_on: (old.audit != new.audit).then_some(new.audit),
        limits: limit::diff(old, new),
    }
}

/// Methods in canonical order, `*` for all of them.
fn method_list(mut methods: Vec<&'static str>) -> Vec<String> {
    if methods.len() == METHODS.len() + 1 {
        return vec!["*".to_owned()];
    }
    methods.sort_by_key(|m| METHODS.iter().position(|k| k == m).unwrap_or(METHODS.len()));
    methods
        .into_iter()
        .map(|m| {
            if m == EXTENSION_METHOD {
                "(extension methods)".to_owned()
            } else {
                m.to_owned()
            }
        })
        .collect()
}
