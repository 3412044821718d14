//! `[[limit]]`: parsing with `file:line:col` errors, the per-caller lookup, `explain` and
//! `diff --fail-on-widen` (a raised or removed limit widens).

use std::process::Command;

use gatehouse_policy::limit::LimitChangeKind;
use gatehouse_policy::{Diagnostic, Policy, SpiffeId, diff, explain};

const HEAD: &str = r#"version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"
api-gateway    = "spiffe://fintech.internal/api-gateway"
ops            = "spiffe://fintech.internal/ns/ops/*"

[[route]]
name    = "report data export"
methods = ["GET"]
path    = "/api/data/reports"
allow   = ["report-service"]

[[route]]
name  = "dashboard API"
path  = "/api/**"
allow = ["api-gateway", "ops", "report-service"]
"#;
// HEAD has 18 lines; a body starts on line 19.

fn compile(body: &str) -> Policy {
    Policy::parse("policy.toml", &format!("{HEAD}{body}")).unwrap_or_else(|e| {
        panic!(
            "{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn only_error(body: &str) -> Diagnostic {
    let errors = Policy::parse("policy.toml", &format!("{HEAD}{body}")).unwrap_err();
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.into_iter().next().unwrap()
}

#[track_caller]
fn assert_at(d: &Diagnostic, line: usize, col: usize, message: &str) {
    assert_eq!((d.line, d.col), (line, col), "{d}");
    assert!(d.message.contains(message), "{d}");
    assert!(
        d.to_string()
            .starts_with(&format!("policy.toml:{line}:{col}: ")),
        "{d}"
    );
    assert!(d.to_string().contains("\n  help: "), "{d}");
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// The limits that apply, as `(index, caller as written)`.
fn applying(p: &Policy, caller: &str, route: Option<&str>) -> Vec<(usize, String)> {
    let route = route.map(|n| p.routes().iter().find(|r| r.name() == n).unwrap());
    p.limits_for(&id(caller), route)
        .map(|(i, l)| (i, l.caller_written().to_owned()))
        .collect()
}

const LIMITS: &str = r#"
[[limit]]
caller      = "report-service"
route       = "report data export"
concurrency = 2
rate        = "5/s"

[[limit]]
caller = "report-service"
rate   = "100/m"
burst  = 10

[[limit]]
caller      = "ops"
concurrency = 4
"#;

#[test]
fn limits_compile_with_their_bounds() {
    let p = compile(LIMITS);
    let l = p.limits();
    assert_eq!(l.len(), 3);
    assert_eq!(l[0].route_name(), Some("report data export"));
    assert_eq!(l[0].concurrency(), Some(2));
    let r = l[0].rate().unwrap();
    assert_eq!(
        (r.tokens, r.burst, r.per.as_secs()),
        (5, 5, 1),
        "burst defaults to N"
    );
    let r = l[1].rate().unwrap();
    assert_eq!((r.tokens, r.burst, r.per.as_secs()), (100, 10, 60));
    assert_eq!(l[1].concurrency(), None);
    assert_eq!(l[2].rate(), None);
    assert_eq!(l[0].line(), 20);
}

#[test]
fn lookup_by_caller_and_route() {
    let p = compile(LIMITS);
    let rs = "spiffe://fintech.internal/report-service";
    // The export route: its own limit and the every-route one.
    assert_eq!(
        applying(&p, rs, Some("report data export")),
        vec![
            (0, "report-service".to_owned()),
            (1, "report-service".to_owned())
        ]
    );
    // Another route: only the every-route limit.
    assert_eq!(
        applying(&p, rs, Some("dashboard API")),
        vec![(1, "report-service".to_owned())]
    );
    assert_eq!(
        applying(&p, rs, None),
        vec![(1, "report-service".to_owned())]
    );
    // Another caller is never bound by report-service's limits.
    assert!(
        applying(
            &p,
            "spiffe://fintech.internal/api-gateway",
            Some("report data export")
        )
        .is_empty()
    );
    // A pattern limit applies to each identity it admits (the sidecar keys budgets by identity).
    for who in [
        "spiffe://fintech.internal/ns/ops/a",
        "spiffe://fintech.internal/ns/ops/b",
    ] {
        assert_eq!(
            applying(&p, who, Some("dashboard API")),
            vec![(2, "ops".to_owned())]
        );
    }
    assert!(
        applying(
            &p,
            "spiffe://fintech.internal/ns/ops/a/deeper",
            Some("dashboard API")
        )
        .is_empty()
    );
}

#[test]
fn limit_errors_point_at_the_value() {
    let d = only_error("\n[[limit]]\ncaller = \"reporting\"\nrate = \"5/s\"\n");
    assert_at(&d, 21, 10, "unknown identity alias `reporting`");
    let d = only_error(
        "\n[[limit]]\ncaller = \"report-service\"\nroute = \"exports\"\nrate = \"5/s\"\n",
    );
    assert_at(&d, 22, 9, "unknown route `exports`");
    assert!(d.help.contains("report data export"), "{d}");
    let d = only_error("\n[[limit]]\ncaller = \"report-service\"\nconcurrency = 0\n");
    assert_at(&d, 22, 15, "`concurrency` must be from 1");
    let d = only_error("\n[[limit]]\ncaller = \"report-service\"\nrate = \"0/s\"\n");
    assert_at(&d, 22, 8, "a rate of 0");
    let d = only_error("\n[[limit]]\ncaller = \"report-service\"\nrate = \"5/h\"\n");
    assert_at(&d, 22, 8, "the unit must be");
    let d = only_error("\n[[limit]]\ncaller = \"report-service\"\nrate = \"five/s\"\n");
    assert_at(&d, 22, 8, "whole number");
    let d = only_error("\n[[limit]]\ncaller = \"report-service\"\nburst = 3\nconcurrency = 1\n");
    assert_at(&d, 22, 9, "`burst` without `rate`");
    let d = only_error("\n[[limit]]\ncaller = \"report-service\"\n");
    assert_at(&d, 20, 1, "bounds nothing");
    let d = only_error("\n[[limit]]\nrate = \"1/s\"\n");
    assert_at(&d, 20, 1, "no `caller`");
    let d =
        only_error("\n[[limit]]\ncaller = \"report-service\"\nrate = \"1/s\"\nconcurency = 2\n");
    assert_at(&d, 23, 1, "unknown field `concurency`");
    let d = only_error("\n[[limit]]\ncaller = \"spiffe://other.org/x\"\nrate = \"1/s\"\n");
    assert_at(&d, 21, 10, "trust domain `other.org`");
}

#[test]
fn duplicate_limit_for_the_same_caller_and_route_is_an_error() {
    // The alias and the ID it stands for are the same caller.
    let d = only_error(
        "\n[[limit]]\ncaller = \"report-service\"\nrate = \"1/s\"\n\n[[limit]]\ncaller = \"spiffe://fintech.internal/report-service\"\nconcurrency = 1\n",
    );
    assert_at(&d, 24, 1, "already declared on line 20");
    // Same caller, different routes: fine.
    compile(
        "\n[[limit]]\ncaller = \"report-service\"\nrate = \"1/s\"\n\n[[limit]]\ncaller = \"report-service\"\nroute = \"dashboard API\"\nconcurrency = 1\n",
    );
}

#[test]
fn explain_shows_limits() {
    let p = compile(LIMITS);
    let m = explain::matrix(&p);
    assert_eq!(m.limits.len(), 3);
    assert!(
        m.limits[2].per_identity,
        "a pattern gives each identity its own budget"
    );
    let table = m.to_table();
    assert!(
        table.contains("report-service on route `report data export`: concurrency 2, rate 5/s (burst 5)  (line 20)"),
        "{table}"
    );
    assert!(
        table.contains("ops: concurrency 4; each matching identity has its own budget"),
        "{table}"
    );
}

fn change(old: &str, new: &str) -> Vec<LimitChangeKind> {
    let d = diff::diff(&compile(old), &compile(new));
    assert!(d.changes.is_empty(), "limits never change access: {d:?}");
    d.limits.iter().map(|l| l.change).collect()
}

const ONE: &str = "\n[[limit]]\ncaller = \"report-service\"\nconcurrency = 4\nrate = \"50/s\"\n";

#[test]
fn diff_raised_or_removed_limit_widens() {
    let raised = ONE.replace("concurrency = 4", "concurrency = 5");
    assert_eq!(change(ONE, &raised), [LimitChangeKind::Raised]);
    let per_minute_is_higher = ONE
        .replace("50/s", "6000/m")
        .replace("concurrency = 4", "concurrency = 1");
    // 6000/m = 100/s: higher rate even though concurrency went down.
    assert_eq!(
        change(ONE, &per_minute_is_higher),
        [LimitChangeKind::Raised]
    );
    let dropped_rate = ONE.replace("rate = \"50/s\"\n", "");
    assert_eq!(change(ONE, &dropped_rate), [LimitChangeKind::Raised]);
    assert_eq!(change(ONE, ""), [LimitChangeKind::Removed]);
    for (old, new) in [(ONE, raised.as_str()), (ONE, "")] {
        assert!(diff::diff(&compile(old), &compile(new)).widens());
    }
}

#[test]
fn diff_lowered_or_added_limit_narrows() {
    let lowered = ONE.replace("50/s", "10/s");
    assert_eq!(change(ONE, &lowered), [LimitChangeKind::Lowered]);
    assert_eq!(change("", ONE), [LimitChangeKind::Added]);
    assert_eq!(change(ONE, ONE), []);
    for (old, new) in [(ONE, lowered.as_str()), ("", ONE)] {
        let d = diff::diff(&compile(old), &compile(new));
        assert!(!d.widens() && !d.is_empty(), "{d:?}");
    }
}

#[test]
fn cli_diff_fail_on_widen_and_explain() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.toml");
    let new = dir.path().join("new.toml");
    std::fs::write(&old, format!("{HEAD}{ONE}")).unwrap();
    std::fs::write(&new, format!("{HEAD}{}", ONE.replace("50/s", "80/s"))).unwrap();
    let run = |args: &[&std::path::Path]| {
        Command::new(env!("CARGO_BIN_EXE_policy"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["diff".as_ref(), "--fail-on-widen".as_ref(), &old, &new]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("! limit raised  spiffe://fintech.internal/report-service: concurrency 4, rate 50/s (burst 50) -> concurrency 4, rate 80/s (burst 80)"), "{text}");
    let out = run(&["diff".as_ref(), "--fail-on-widen".as_ref(), &new, &old]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = run(&["explain".as_ref(), &old]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("limits (per caller identity):"));
    let out = run(&["check".as_ref(), &old]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
