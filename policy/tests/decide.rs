//! `Policy::decide`: specificity order, methods, allow-lists, audit mode, caller labels.

use gatehouse_policy::{Decision, DenyReason, Policy, SpiffeId};

const POLICY: &str = r#"
version = 1
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
allow = ["api-gateway", "ops"]

[[route]]
name  = "one below api"
path  = "/api/*"
allow = ["ops"]

[[route]]
name    = "write one below api"
methods = ["POST", "PUT"]
path    = "/api/*"
allow   = ["report-service"]

[[route]]
name  = "api root"
path  = "/api"
allow = ["report-service"]

[[route]]
name  = "health"
path  = "/healthz"
allow = ["*"]

[[route]]
name  = "root"
path  = "/"
allow = ["api-gateway"]
"#;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://fintech.internal/{s}")).unwrap()
}

#[test]
fn most_specific_route_decides_then_method() {
    let p = Policy::parse("p.toml", POLICY).unwrap();
    assert_eq!(p.route_count(), 7);
    // (caller, method, path, deciding route, allowed)
    let cases: &[(&str, &str, &str, Option<&str>, bool)] = &[
        (
            "report-service",
            "GET",
            "/api/data/reports",
            Some("report data export"),
            true,
        ),
        // Literal beats `**`: the gateway's `/api/**` does not reach the export.
        (
            "api-gateway",
            "GET",
            "/api/data/reports",
            Some("report data export"),
            false,
        ),
        // The export route names GET only: a POST is decided by the next most specific route.
        (
            "api-gateway",
            "POST",
            "/api/data/reports",
            Some("dashboard API"),
            true,
        ),
        (
            "api-gateway",
            "GET",
            "/api/data/other",
            Some("dashboard API"),
            true,
        ),
        // `*` beats `**`; a route naming the method beats one that does not.
        ("api-gateway", "GET", "/api/x", Some("one below api"), false),
        ("ns/ops/alice", "GET", "/api/x", Some("one below api"), true),
        (
            "report-service",
            "POST",
            "/api/x",
            Some("write one below api"),
            true,
        ),
        (
            "ns/ops/alice",
            "POST",
            "/api/x",
            Some("write one below api"),
            false,
        ),
        // An extension method only matches routes that name no method.
        (
            "ns/ops/alice",
            "PROPFIND",
            "/api/x",
            Some("one below api"),
            true,
        ),
        // The exact end beats `/**` matching zero segments.
        ("report-service", "GET", "/api", Some("api root"), true),
        ("api-gateway", "GET", "/api", Some("api root"), false),
        // A trailing slash is ignored: `/api/` is decided by `/api`, not by `/api/**`, as
        // frameworks route `/api/` to `/api`'s handler.
        ("api-gateway", "GET", "/api/", Some("api root"), false),
        ("report-service", "GET", "/api/", Some("api root"), true),
        (
            "report-service",
            "GET",
            "/api/data/reports/",
            Some("report data export"),
            true,
        ),
        (
            "api-gateway",
            "GET",
            "/api/data/reports/",
            Some("report data export"),
            false,
        ),
        ("ns/ops/a/b", "GET", "/api/x", Some("one below api"), false),
        ("anyone", "GET", "/healthz", Some("health"), true),
        ("api-gateway", "GET", "/", Some("root"), true),
        ("api-gateway", "GET", "/nothing", None, false),
        ("api-gateway", "GET", "/healthz/x", None, false),
        ("api-gateway", "GET", "", None, false),
    ];
    for &(caller, method, path, route, allowed) in cases {
        let d = p.decide(&id(caller), method, path);
        assert_eq!(d.route_name(), route, "{caller} {method} {path}");
        assert_eq!(d.is_allowed(), allowed, "{caller} {method} {path}");
        let want = match (allowed, route) {
            (true, _) => ("allow", "allowed"),
            (false, None) => ("deny", "no_route"),
            (false, Some(_)) => ("deny", "not_allowed"),
        };
        assert_eq!((d.label(), d.reason()), want, "{caller} {method} {path}");
    }
}

#[test]
fn allow_names_the_route_and_the_matching_pattern() {
    let p = Policy::parse("p.toml", POLICY).unwrap();
    match p.decide(&id("ns/ops/bob"), "GET", "/api/a/b") {
        Decision::Allow { route, matched } => {
            assert_eq!(route.name(), "dashboard API");
            assert_eq!(matched.to_string(), "spiffe://fintech.internal/ns/ops/*");
        }
        other => panic!("expected allow, got {other:?}"),
    }
    match p.decide(&id("intruder"), "GET", "/api/data/reports") {
        Decision::Deny {
            reason: DenyReason::NotAllowed { route },
        } => assert_eq!(route.name(), "report data export"),
        other => panic!("expected not_allowed, got {other:?}"),
    }
}

#[test]
fn star_caller_pattern_admits_only_our_trust_domain() {
    let p = Policy::parse("p.toml", POLICY).unwrap();
    let foreign = SpiffeId::parse("spiffe://evil.example/x").unwrap();
    assert!(!p.decide(&foreign, "GET", "/healthz").is_allowed());
}

#[test]
fn audit_mode_allows_would_be_denials_and_says_so() {
    let text = POLICY.replace("version = 1", "version = 1\nmode = \"audit\"");
    let p = Policy::parse("p.toml", &text).unwrap();
    assert!(p.is_audit_mode());
    let d = p.decide(&id("intruder"), "GET", "/api/data/reports");
    assert!(d.is_allowed());
    assert_eq!((d.label(), d.reason()), ("audit_deny", "not_allowed"));
    assert_eq!(d.route_name(), Some("report data export"));
    let d = p.decide(&id("intruder"), "GET", "/nothing");
    assert_eq!((d.label(), d.reason()), ("audit_deny", "no_route"));
    let d = p.decide(&id("report-service"), "GET", "/api/data/reports");
    assert_eq!(d.label(), "allow");
}

#[test]
fn caller_label_is_an_exact_alias_or_other() {
    let p = Policy::parse("p.toml", POLICY).unwrap();
    assert_eq!(p.caller_label(&id("report-service")), "report-service");
    assert_eq!(p.caller_label(&id("ns/ops/alice")), "other");
    assert_eq!(p.caller_label(&id("stranger")), "other");
}

#[test]
fn policy_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
}

/// `decide` is on every request's path: it must not touch the heap, whatever it decides.
#[test]
fn decide_makes_no_heap_allocation() {
    let p = Policy::parse("p.toml", POLICY).unwrap();
    let audit = Policy::parse(
        "p.toml",
        &POLICY.replace("version = 1", "version = 1\nmode = \"audit\""),
    )
    .unwrap();
    let callers = [id("report-service"), id("ns/ops/alice"), id("intruder")];
    let requests = [
        ("GET", "/api/data/reports"),
        ("POST", "/api/data/reports"),
        ("GET", "/api/x"),
        ("PROPFIND", "/api/x"),
        ("GET", "/api/a/b/c/d/e/f"),
        ("GET", "/api/"),
        ("GET", "/nothing/here"),
        ("GET", "/"),
    ];
    let info = allocation_counter::measure(|| {
        for policy in [&p, &audit] {
            for caller in &callers {
                for (method, path) in requests {
                    let d = policy.decide(caller, method, path);
                    std::hint::black_box((d.is_allowed(), d.label(), d.reason(), d.route_name()));
                    std::hint::black_box(policy.caller_label(caller));
                }
            }
        }
    });
    assert_eq!(info.count_total, 0, "decide allocated");
}

/// `normalize` borrows the input when it is already normal (the common case).
#[test]
fn normalize_of_a_normal_path_makes_no_heap_allocation() {
    use gatehouse_policy::path::{NormalizeOptions, normalize};
    let opts = NormalizeOptions::default();
    let info = allocation_counter::measure(|| {
        for path in [
            "/api/data/reports",
            "/api/data/reports?since=2024-01-01",
            "/",
            "/a/b/",
            "/caf%C3%A9",
        ] {
            std::hint::black_box(normalize(path, &opts).unwrap());
        }
    });
    assert_eq!(info.count_total, 0, "normalize allocated");
}

/// gRPC paths (issue 17): `/package.Service/Method` exactly, and `/package.Service/*` for every
/// method of a service; dots in a segment are plain characters and survive normalization.
#[test]
fn grpc_method_and_service_routes_decide_grpc_paths() {
    let p = Policy::parse(
        "grpc.toml",
        r#"
version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"
api-gateway    = "spiffe://fintech.internal/api-gateway"

[[route]]
name    = "ledger get"
methods = ["POST"]
path    = "/fintech.ledger.v1.Ledger/GetBalance"
allow   = ["api-gateway"]

[[route]]
name    = "ledger service"
methods = ["POST"]
path    = "/fintech.ledger.v1.Ledger/*"
allow   = ["report-service"]
"#,
    )
    .unwrap();
    let opts = gatehouse_policy::path::NormalizeOptions::default();
    let cases = [
        (
            "api-gateway",
            "/fintech.ledger.v1.Ledger/GetBalance",
            Some("ledger get"),
            true,
        ),
        (
            "report-service",
            "/fintech.ledger.v1.Ledger/GetBalance",
            Some("ledger get"),
            false,
        ),
        (
            "report-service",
            "/fintech.ledger.v1.Ledger/ListEntries",
            Some("ledger service"),
            true,
        ),
        (
            "api-gateway",
            "/fintech.ledger.v1.Ledger/ListEntries",
            Some("ledger service"),
            false,
        ),
        (
            "report-service",
            "/fintech.ledger.v1.Admin/Purge",
            None,
            false,
        ),
        // One segment only: a nested path is not a method of the service.
        (
            "report-service",
            "/fintech.ledger.v1.Ledger/a/b",
            None,
            false,
        ),
    ];
    for (caller, path, route, allowed) in cases {
        let normalized = gatehouse_policy::path::normalize(path, &opts).unwrap();
        assert_eq!(normalized, path, "gRPC paths are already normal");
        let d = p.decide(&id(caller), "POST", &normalized);
        assert_eq!(d.route_name(), route, "{caller} {path}");
        assert_eq!(d.is_allowed(), allowed, "{caller} {path}");
    }
}
