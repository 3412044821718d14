//! `policy test`: one request, or a table of expected decisions kept beside the policy
//! (`CASES.toml`) so teams run their policy tests in CI.
//!
//! ```toml
//! [[case]]
//! caller = "report-service"          # an exact-ID alias of the policy, or a spiffe:// ID
//! method = "GET"
//! path   = "/api/data/reports?since=2024-01-01"   # normalized exactly as the sidecar does
//! expect = "allow"                   # allow | deny | audit_deny | refused
//! route  = "report data export"      # optional: the route that must decide
//! ```

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::compile::Policy;
use crate::identity::SpiffeId;
use crate::method;
use crate::path::{self, NormalizeOptions};
use crate::source::{Diagnostic, SourceFile};

/// What the sidecar would do with one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// `"allow"`, `"deny"`, `"audit_deny"`, or `"refused"` when the method or the path is
    /// refused (400).
    pub decision: &'static str,
    /// `"allowed"`, `"no_route"`, `"not_allowed"`, or why the method or the path was refused.
    pub reason: String,
    /// Whether the request reaches the app.
    pub allowed: bool,
    /// The deciding route.
    pub route: Option<String>,
    /// The allow entry's pattern that admitted the caller.
    pub matched: Option<String>,
    /// The path the route was matched against.
    pub normalized_path: Option<String>,
}

/// Checks the method, normalizes `raw_path` (a query is ignored) and decides, as the sidecar
/// does.
pub fn evaluate(
    policy: &Policy,
    caller: &SpiffeId,
    method: &str,
    raw_path: &str,
    opts: &NormalizeOptions,
) -> Outcome {
    let refused = |reason: String| Outcome {
        decision: "refused",
        reason,
        allowed: false,
        route: None,
        matched: None,
        normalized_path: None,
    };
    if let Err(e) = method::check(method) {
        return refused(format!("method `{method}`: {e}"));
    }
    let normalized = match path::normalize(raw_path, opts) {
        Ok(p) => p,
        Err(e) => return refused(e.to_string()),
    };
    let d = policy.decide(caller, method, &normalized);
    Outcome {
        decision: d.label(),
        reason: d.reason().to_owned(),
        allowed: d.is_allowed(),
        route: d.route_name().map(str::to_owned),
        matched: d.matched().map(|m| m.to_string()),
        normalized_path: Some(normalized.into_owned()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCases {
    #[serde(default)]
    case: Vec<Spanned<RawCase>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: Option<String>,
    caller: Spanned<String>,
    method: String,
    path: String,
    expect: Spanned<String>,
    route: Option<String>,
}

/// One case and how it went.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Line of the `[[case]]` table.
    pub line: usize,
    /// The case's name, or `METHOD PATH as CALLER`.
    pub name: String,
    /// The expected decision.
    pub expect: String,
    /// The route the case requires to decide, if it names one.
    pub expect_route: Option<String>,
    /// What happened.
    pub outcome: Outcome,
    /// Whether the outcome is what the case expects.
    pub passed: bool,
}

const EXPECTATIONS: [&str; 4] = ["allow", "deny", "audit_deny", "refused"];

/// Runs every case of a cases file against `policy`.
///
/// # Errors
/// Every problem in the cases file (syntax, unknown caller alias, bad expectation).
pub fn run_cases(policy: &Policy, cases: &SourceFile) -> Result<Vec<CaseResult>, Vec<Diagnostic>> {
    let raw: RawCases = toml::from_str(cases.text()).map_err(|e| {
        let msg = e.message().trim().replace('\n', " ");
        let help =
            "cases are [[case]] tables with caller, method, path, expect and optional name, route";
        vec![match e.span() {
            Some(s) => cases.diagnostic(s, msg, help),
            None => Diagnostic::whole_file(cases.name(), msg, help),
        }]
    })?;
    let mut errors = Vec::new();
    let mut results = Vec::new();
    for case in &raw.case {
        let c = case.get_ref();
        if !EXPECTATIONS.contains(&c.expect.get_ref().as_str()) {
            errors.push(cases.diagnostic(
                c.expect.span(),
                format!("unknown expectation `{}`", c.expect.get_ref()),
                format!("write one of {}", EXPECTATIONS.join(", ")),
            ));
            continue;
        }
        let caller = match policy.resolve_caller(c.caller.get_ref()) {
            Ok(id) => id,
            Err(e) => {
                errors.push(cases.diagnostic(
                    c.caller.span(),
                    format!("caller `{}`: {e}", c.caller.get_ref()),
                    "write a spiffe:// ID or the name of an alias of the policy that stands for one exact ID",
                ));
                continue;
            }
        };
        let outcome = evaluate(
            policy,
            &caller,
            &c.method,
            &c.path,
            &NormalizeOptions::default(),
        );
        let passed = outcome.decision == c.expect.get_ref()
            && c.route
                .as_ref()
                .is_none_or(|r| outcome.route.as_ref() == Some(r));
        results.push(CaseResult {
            line: cases.line_col(case.span().start).0,
            name: c
                .name
                .clone()
                .unwrap_or_else(|| format!("{} {} as {}", c.method, c.path, c.caller.get_ref())),
            expect: c.expect.get_ref().clone(),
            expect_route: c.route.clone(),
            outcome,
            passed,
        });
    }
    if errors.is_empty() {
        Ok(results)
    } else {
        Err(errors)
    }
}
