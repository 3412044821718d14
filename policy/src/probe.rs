//! Representative requests for reasoning about whole policies (`policy check` coverage
//! warnings, `policy diff`).
//!
//! A policy's decision depends on the caller only through which allow patterns admit it, on
//! the path only through which route patterns match it, and on the method only through which
//! methods routes name. So one sample per class is enough: every exact identity the policies
//! mention plus an unlisted identity below each wildcard pattern; every route's path with each
//! `*` replaced by a segment no policy names and `/**` expanded to zero, one and two such
//! segments (the matcher ignores a trailing slash); every method routes can name plus one
//! extension method.
//! Everything here runs on compiled policies, never on their text.

use std::collections::HashSet;

use crate::compile::Policy;
use crate::identity::{IdentityPattern, SpiffeId};
use crate::matcher::{METHODS, Route, Segment};

/// The method that stands for every extension method (only any-method routes match it).
pub(crate) const EXTENSION_METHOD: &str = "PROPFIND";

/// A sample caller.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub id: SpiffeId,
    /// What reports call it: the alias name, the exact ID, or the wildcard it stands for.
    pub label: String,
}

/// Samples shared by one or more policies.
pub(crate) struct Probes {
    pub callers: Vec<Caller>,
    fresh_segment: String,
}

impl Probes {
    pub(crate) fn new(policies: &[&Policy]) -> Self {
        let paths: Vec<&str> = routes(policies).map(|r| r.path.as_str()).collect();
        let fresh_segment = fresh(|c| paths.iter().any(|p| p.contains(c)), "~unlisted");
        Self {
            callers: callers(policies),
            fresh_segment,
        }
    }

    /// Sample paths covering every class of requests `route` matches.
    pub(crate) fn paths(&self, route: &Route) -> Vec<String> {
        let mut base = String::new();
        let mut rest = false;
        for seg in &route.segments {
            match seg {
                Segment::Literal(lit) => {
                    base.push('/');
                    base.push_str(lit);
                }
                Segment::Star => {
                    base.push('/');
                    base.push_str(&self.fresh_segment);
                }
                Segment::Rest => rest = true,
            }
        }
        let root = if base.is_empty() { "/" } else { base.as_str() };
        if !rest {
            return vec![root.to_owned()];
        }
        let f = &self.fresh_segment;
        vec![
            root.to_owned(),
            format!("{base}/{f}"),
            format!("{base}/{f}/{f}"),
        ]
    }
}

/// The methods that can reach `route`: the ones it names, or every method (and an extension
/// method) when it names none.
pub(crate) fn methods(route: &Route) -> Vec<&'static str> {
    if route.methods.is_any() {
        METHODS.iter().copied().chain([EXTENSION_METHOD]).collect()
    } else {
        route.methods.names().collect()
    }
}

fn routes<'a>(policies: &'a [&'a Policy]) -> impl Iterator<Item = &'a Route> {
    policies.iter().flat_map(|p| p.routes.iter())
}

/// A name containing `base` that `taken` rejects for no suffix tried before it.
fn fresh(taken: impl Fn(&str) -> bool, base: &str) -> String {
    (0..)
        .map(|i| format!("{base}-{i}"))
        .find(|c| !taken(c))
        .unwrap_or_else(|| base.to_owned())
}

/// Exact identities first (labelled with an alias where the last policy has one), then one or
/// two unlisted identities per wildcard pattern.
fn callers(policies: &[&Policy]) -> Vec<Caller> {
    let mut patterns: Vec<&IdentityPattern> = Vec::new();
    for p in policies {
        patterns.extend(p.aliases.iter().map(|a| &a.pattern));
        patterns.extend(
            p.routes
                .iter()
                .flat_map(|r| r.allow.iter().map(|a| &a.pattern)),
        );
        patterns.extend(crate::tcp::patterns(p)); // issue 17: `[[tcp]]` callers
    }
    let ids: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
    let seg = fresh(|c| ids.iter().any(|i| i.contains(c)), "unlisted");
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut push = |id: SpiffeId, label: String| {
        if seen.insert(id.clone()) {
            out.push(Caller { id, label });
        }
    };
    for pattern in &patterns {
        if let IdentityPattern::Exact(id) = pattern {
            push(id.clone(), label_of(policies, id));
        }
    }
    for pattern in &patterns {
        for id in representatives(pattern, policies, &seg) {
            push(id, format!("any identity matching {pattern}"));
        }
    }
    out
}

fn label_of(policies: &[&Policy], id: &SpiffeId) -> String {
    policies
        .iter()
        .rev()
        .map(|p| p.caller_label(id))
        .find(|l| *l != "other")
        .map_or_else(|| id.to_string(), str::to_owned)
}

/// Identities no policy names that a wildcard pattern admits: one segment below it, and two
/// for `**` and `*` (which admits a path of any depth).
fn representatives(pattern: &IdentityPattern, policies: &[&Policy], seg: &str) -> Vec<SpiffeId> {
    let (td, prefix, deep) = match pattern {
        IdentityPattern::Exact(_) => return Vec::new(),
        IdentityPattern::Any => {
            let Some(p) = policies.first() else {
                return Vec::new();
            };
            (p.trust_domain.clone(), String::new(), true)
        }
        IdentityPattern::OneBelow {
            trust_domain,
            prefix,
        } => (trust_domain.clone(), prefix.clone(), false),
        IdentityPattern::AnyBelow {
            trust_domain,
            prefix,
        } => (trust_domain.clone(), prefix.clone(), true),
    };
    let mut paths = vec![format!("{prefix}/{seg}")];
    if deep {
        paths.push(format!("{prefix}/{seg}/{seg}"));
    }
    paths
        .iter()
        .filter_map(|p| SpiffeId::from_parts(&td, p).ok())
        .collect()
}
