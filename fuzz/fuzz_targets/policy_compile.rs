//! The policy file: TOML parsing, validation and compilation (`Policy::parse`), then what the
//! `policy` CLI and the sidecar do with a compiled policy: decisions, review warnings, the
//! explain matrix, and a diff against itself (which must be empty). Errors are rendered as the
//! CLI renders them (`file:line:col`, so byte offsets must fall on character boundaries).
#![no_main]
#![forbid(unsafe_code)]

use std::sync::LazyLock;

use gatehouse_policy::path::{NormalizeOptions, normalize};
use gatehouse_policy::{Policy, SpiffeId, diff, explain, review};

static CALLERS: LazyLock<Vec<SpiffeId>> = LazyLock::new(|| {
    [
        "spiffe://fintech.internal/report-service",
        "spiffe://fintech.internal/api-gateway",
        "spiffe://fintech.internal/ns/ops/a",
        "spiffe://other.internal/x",
    ]
    .iter()
    .filter_map(|s| SpiffeId::parse(s).ok())
    .collect()
});

const REQUESTS: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/api/data/reports"),
    ("POST", "/api/x"),
    ("DELETE", "/admin/users/1"),
    ("PATCH", "/a/b/c/"),
    ("BREW", "/healthz"),
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::parse("fuzz.toml", text) {
        Ok(p) => p,
        Err(diagnostics) => {
            assert!(!diagnostics.is_empty(), "an error with no diagnostic");
            for d in &diagnostics {
                let _ = d.to_string();
            }
            return;
        }
    };
    for caller in CALLERS.iter() {
        let _ = policy.caller_label(caller);
        for (method, raw) in REQUESTS {
            let path = normalize(raw, &NormalizeOptions::default()).expect("fixed paths are valid");
            let d = policy.decide(caller, method, &path);
            let _ = (d.is_allowed(), d.label(), d.reason(), d.route_name());
        }
    }
    for route in policy.routes() {
        let _ = (
            route.name(),
            route.path(),
            route.methods(),
            route.allow().len(),
        );
    }
    let _ = review::review(&policy);
    let matrix = explain::matrix(&policy);
    let _ = (matrix.to_table(), matrix.to_mermaid());
    let same = diff::diff(&policy, &policy);
    assert!(
        same.is_empty() && !same.widens(),
        "a policy differs from itself"
    );
});
