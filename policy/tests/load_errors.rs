//! Every load error of the policy file format, each asserting its line, column and help.

use gatehouse_policy::{Diagnostic, Policy};

const HEAD: &str = "version = 1\ntrust_domain = \"fintech.internal\"\n\n[identities]\nreport-service = \"spiffe://fintech.internal/report-service\"\n";

/// Compiles `HEAD` + `body` and returns the only diagnostic.
fn only_error(body: &str) -> Diagnostic {
    let errors = Policy::parse("policy.toml", &format!("{HEAD}{body}")).unwrap_err();
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.into_iter().next().unwrap()
}

#[track_caller]
fn assert_at(d: &Diagnostic, line: usize, col: usize, message: &str) {
    assert_eq!((d.line, d.col), (line, col), "{d}");
    assert!(d.message.contains(message), "{d}");
    assert!(!d.help.is_empty(), "{d}");
    assert!(
        d.to_string()
            .starts_with(&format!("policy.toml:{line}:{col}: ")),
        "{d}"
    );
    assert!(d.to_string().contains("\n  help: "), "{d}");
}

#[test]
fn unknown_top_level_key() {
    let text = "version = 1\ntrust_domain = \"td\"\nallow_all = true\n";
    let errors = Policy::parse("policy.toml", text).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_at(&errors[0], 3, 1, "unknown field `allow_all`");
}

#[test]
fn unknown_route_key() {
    let d = only_error(
        "\n[[route]]\nname = \"r\"\npath = \"/r\"\nallow = [\"report-service\"]\n  methds = [\"GET\"]\n",
    );
    assert_at(&d, 11, 3, "unknown field `methds`");
}

#[test]
fn unknown_alias() {
    let d = only_error("\n[[route]]\nname = \"r\"\npath = \"/r\"\nallow = [\"reports-service\"]\n");
    assert_at(&d, 10, 10, "unknown identity alias `reports-service`");
    assert!(d.help.contains("[identities]"), "{d}");
}

#[test]
fn identity_of_another_trust_domain_in_allow() {
    let d = only_error(
        "\n[[route]]\nname = \"r\"\npath = \"/r\"\nallow = [\"report-service\", \"spiffe://evil.example/x\"]\n",
    );
    assert_at(&d, 10, 28, "belongs to trust domain `evil.example`");
}

#[test]
fn identity_of_another_trust_domain_in_alias() {
    let d = only_error("evil = \"spiffe://evil.example/**\"\n");
    assert_at(&d, 6, 8, "belongs to trust domain `evil.example`");
}

#[test]
fn invalid_identity() {
    let d = only_error(
        "\n[[route]]\nname = \"r\"\npath = \"/r\"\nallow = [\"spiffe://fintech.internal/a//b\"]\n",
    );
    assert_at(&d, 10, 10, "invalid identity");
}

#[test]
fn empty_allow_list() {
    let d = only_error("\n[[route]]\nname = \"r\"\npath = \"/r\"\nallow = []\n");
    assert_at(&d, 10, 9, "empty allow-list");
}

#[test]
fn missing_allow_list_points_at_the_route() {
    let d = only_error("\n[[route]]\nname = \"r\"\npath = \"/r\"\n");
    assert_at(&d, 7, 1, "route has no `allow` list");
}

#[test]
fn bad_path_patterns() {
    let cases = [
        ("/api/**/x", "`**` must be the last segment"),
        ("/api//x", "empty segment"),
        ("/api/x/", "empty segment"),
        ("/api/../admin", "`.` and `..` segments are not allowed"),
        ("/api/./x", "`.` and `..` segments are not allowed"),
        ("api/x", "must start with `/`"),
        ("/api/x*", "`*` must be a whole segment"),
        (
            "/%61pi",
            "not in normal form; requests are matched as `/api`",
        ),
        ("/a%2Fb", "encoded slash"),
    ];
    for (pattern, message) in cases {
        let body = format!(
            "\n[[route]]\nname = \"r\"\npath = \"{pattern}\"\nallow = [\"report-service\"]\n"
        );
        let d = only_error(&body);
        assert_at(&d, 9, 8, message);
    }
}

#[test]
fn unknown_method() {
    let d = only_error(
        "\n[[route]]\nname = \"r\"\nmethods = [\"GET\", \"FETCH\"]\npath = \"/r\"\nallow = [\"report-service\"]\n",
    );
    assert_at(&d, 9, 19, "unknown method `FETCH`");
}

#[test]
fn lowercase_method() {
    let d = only_error(
        "\n[[route]]\nname = \"r\"\nmethods = [\"get\"]\npath = \"/r\"\nallow = [\"report-service\"]\n",
    );
    assert_at(&d, 9, 12, "method `get` must be upper case");
    assert!(d.help.contains("\"GET\""), "{d}");
}

#[test]
fn version_missing() {
    let errors = Policy::parse("policy.toml", "trust_domain = \"td\"\n").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_at(&errors[0], 1, 1, "`version` is missing");
}

#[test]
fn version_unsupported() {
    let errors = Policy::parse(
        "policy.toml",
        "# policy\nversion = 2\ntrust_domain = \"td\"\n",
    )
    .unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_at(&errors[0], 2, 11, "unsupported policy version 2");
}

#[test]
fn unknown_mode() {
    let errors = Policy::parse(
        "policy.toml",
        "version = 1\ntrust_domain = \"td\"\nmode = \"dry-run\"\n",
    )
    .unwrap_err();
    assert_at(&errors[0], 3, 8, "unknown mode `dry-run`");
}

#[test]
fn routes_that_could_never_be_told_apart() {
    let body = "\n[[route]]\nname = \"a\"\nmethods = [\"GET\", \"POST\"]\npath = \"/r/*\"\nallow = [\"report-service\"]\n\n[[route]]\nname = \"b\"\nmethods = [\"POST\"]\npath = \"/r/*\"\nallow = [\"report-service\"]\n";
    let d = only_error(body);
    assert_at(
        &d,
        16,
        8,
        "route `b` can never be told apart from route `a` (line 7)",
    );
    assert!(d.message.contains("both name POST"), "{d}");
    let any_twice = "\n[[route]]\nname = \"a\"\npath = \"/r\"\nallow = [\"report-service\"]\n\n[[route]]\nname = \"b\"\npath = \"/r\"\nallow = [\"report-service\"]\n";
    assert_at(&only_error(any_twice), 14, 8, "both match any method");
}

#[test]
fn method_specific_and_any_method_routes_can_share_a_path() {
    let body = "\n[[route]]\nname = \"a\"\nmethods = [\"GET\"]\npath = \"/r\"\nallow = [\"report-service\"]\n\n[[route]]\nname = \"b\"\npath = \"/r\"\nallow = [\"report-service\"]\n\n[[route]]\nname = \"c\"\nmethods = [\"POST\"]\npath = \"/r\"\nallow = [\"report-service\"]\n";
    Policy::parse("policy.toml", &format!("{HEAD}{body}")).unwrap();
}

#[test]
fn duplicate_route_name() {
    let body = "\n[[route]]\nname = \"a\"\npath = \"/r\"\nallow = [\"report-service\"]\n\n[[route]]\nname = \"a\"\npath = \"/s\"\nallow = [\"report-service\"]\n";
    assert_at(
        &only_error(body),
        12,
        1,
        "route name `a` is already used on line 7",
    );
}

#[test]
fn syntax_error() {
    let errors =
        Policy::parse("policy.toml", "version = 1\ntrust_domain = = \"td\"\n").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!((errors[0].line, errors[0].col), (2, 16), "{}", errors[0]);
}

#[test]
fn every_problem_is_reported_at_once_in_file_order() {
    let text = "trust_domain = \"fintech.internal\"\nmode = \"loud\"\n\n[[route]]\nname = \"a\"\nmethods = [\"get\"]\npath = \"/a/**/b\"\nallow = [\"nobody\"]\n\n[[route]]\nname = \"b\"\npath = \"/b\"\nallow = []\n";
    let errors = Policy::parse("policy.toml", text).unwrap_err();
    let at: Vec<_> = errors.iter().map(|d| (d.line, d.col)).collect();
    assert_eq!(
        at,
        [(1, 1), (2, 8), (6, 12), (7, 8), (8, 10), (13, 9)],
        "{errors:#?}"
    );
}

#[test]
fn unreadable_file_is_one_whole_file_diagnostic() {
    let errors = Policy::load(std::path::Path::new("/nonexistent/policy.toml")).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].line, errors[0].col), (0, 0));
    assert!(
        errors[0]
            .to_string()
            .starts_with("/nonexistent/policy.toml: cannot read")
    );
}
