//! Review warnings for `policy check`: things that compile but deserve a second look from a
//! security reviewer. Each warning has a stable code (for CI filters and JSON output) and a
//! [`Diagnostic`] pointing at the line to look at.
//!
//! What is not here: load errors (`compile.rs`); a warning never stops a policy from loading.

use serde::Serialize;

use crate::compile::Policy;
use crate::identity::IdentityPattern;
use crate::matcher::{Loc, Route, Segment};
use crate::probe::{self, Probes};
use crate::source::Diagnostic;

/// One review warning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// Stable identifier: `star-on-write`, `root-wildcard-path`, `unused-alias`,
    /// `wildcard-identity`, `redundant-route`, `audit-mode` or `tcp-wildcard-identity`.
    pub code: &'static str,
    /// Where and what, with a `help:` line.
    #[serde(flatten)]
    pub diagnostic: Diagnostic,
}

/// Every review warning for `policy`, in file order.
pub fn review(policy: &Policy) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |code, loc: Loc, message: String, help: &str| {
        out.push(Warning {
            code,
            diagnostic: Diagnostic {
                file: policy.source_name.clone(),
                line: loc.line,
                col: loc.col,
                message,
                help: help.to_owned(),
            },
        });
    };
    if let (true, Some(loc)) = (policy.audit, policy.mode_loc) {
        warn(
            "audit-mode",
            loc,
            "audit mode is on: denials are logged but every request is allowed".to_owned(),
            "set mode = \"enforce\" once the audit log shows no unexpected would-be denials",
        );
    }
    for (loc, message, help) in crate::tcp::review(policy) {
        warn("tcp-wildcard-identity", loc, message, help); // issue 17
    }
    for alias in &policy.aliases {
        let used = policy
            .routes
            .iter()
            .any(|r| r.allow.iter().any(|a| a.written == alias.name))
            || crate::tcp::uses_alias(policy, &alias.name); // issue 17
        if !used {
            warn(
                "unused-alias",
                alias.loc,
                format!("alias `{}` is never used in an allow-list", alias.name),
                "remove it, or grant the route it was meant for",
            );
        }
    }
    for route in &policy.routes {
        route_warnings(route, &mut warn);
    }
    for (code, loc, message, help) in coverage(policy) {
        warn(code, loc, message, help);
    }
    out.sort_by_key(|w| (w.diagnostic.line, w.diagnostic.col));
    out
}

type Emit<'a> = dyn FnMut(&'static str, Loc, String, &str) + 'a;

fn route_warnings(route: &Route, warn: &mut Emit<'_>) {
    if route.segments == [Segment::Rest] {
        warn(
            "root-wildcard-path",
            route.path_loc,
            format!(
                "route `{}` matches every path (`/**` at the root)",
                route.name
            ),
            "list the paths the callers need; a catch-all route also grants every endpoint added to the app later",
        );
    }
    let read_only =
        !route.methods.is_any() && route.methods.names().all(|m| m == "GET" || m == "HEAD");
    for entry in &route.allow {
        if !entry.pattern.is_wildcard() {
            continue;
        }
        if matches!(entry.pattern, IdentityPattern::Any) && !read_only {
            warn(
                "star-on-write",
                entry.loc,
                format!(
                    "route `{}` lets any identity of the trust domain use methods that can change state",
                    route.name
                ),
                "restrict the route to methods = [\"GET\", \"HEAD\"] or name the callers",
            );
        }
        let via = if entry.written == entry.pattern.to_string() {
            String::new()
        } else {
            format!(" (alias `{}`)", entry.written)
        };
        warn(
            "wildcard-identity",
            entry.loc,
            format!(
                "route `{}` admits a wildcard identity `{}`{via}",
                route.name, entry.pattern
            ),
            "name the exact callers (spiffe:// IDs or aliases) unless every current and future identity it matches needs this route",
        );
    }
}

/// `redundant-route`: a route that decides some requests, but the next route in line would
/// decide every one of them the same way for every caller, so removing it changes nothing.
///
/// There is no "never decides" case to report: indistinguishable routes are load errors, and
/// a route always decides the requests that fill its `*` and `/**` segments with a name no
/// other route uses, because a more specific route would need a literal there.
fn coverage(policy: &Policy) -> Vec<(&'static str, Loc, String, &'static str)> {
    let probes = Probes::new(&[policy]);
    let mut out = Vec::new();
    for (i, route) in policy.routes.iter().enumerate() {
        let me = Some(i as u32);
        let mut differs = false;
        let mut instead = Vec::new();
        for path in probes.paths(route) {
            for method in probe::methods(route) {
                if policy.matcher.find(method, &path, None) != me {
                    continue;
                }
                for caller in &probes.callers {
                    let (_, with) = policy.enforced(&caller.id, method, &path, None);
                    let (next, without) = policy.enforced(&caller.id, method, &path, me);
                    differs |= with != without;
                    if let Some(n) = next.map(|n| policy.routes[n as usize].name.as_str())
                        && !instead.contains(&n)
                    {
                        instead.push(n);
                    }
                }
            }
        }
        if !differs && !instead.is_empty() {
            out.push((
                "redundant-route",
                route.loc,
                format!(
                    "route `{}` changes nothing: without it, {} would decide every request it matches the same way",
                    route.name,
                    instead.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                ),
                "remove it, or narrow the broader route if this one was meant to grant less",
            ));
        }
    }
    out
}
