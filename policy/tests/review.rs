//! `policy check` review warnings: each one fires where it should, with its line and column,
//! and a least-privilege policy gets none.

use gatehouse_policy::Policy;
use gatehouse_policy::review::review;

fn warnings(text: &str) -> Vec<(&'static str, usize, usize)> {
    let policy = Policy::parse("p.toml", text).unwrap();
    review(&policy)
        .into_iter()
        .map(|w| {
            assert!(!w.diagnostic.help.is_empty());
            (w.code, w.diagnostic.line, w.diagnostic.col)
        })
        .collect()
}

const HEAD: &str = r#"version = 1
trust_domain = "td"

[identities]
a = "spiffe://td/a"
b = "spiffe://td/b"
"#;

#[test]
fn least_privilege_policy_has_no_warnings() {
    let text = format!(
        "{HEAD}\n[[route]]\nname = \"r\"\nmethods = [\"GET\"]\npath = \"/r\"\nallow = [\"a\"]\n\n[[route]]\nname = \"s\"\npath = \"/s/*\"\nallow = [\"b\"]\n"
    );
    assert_eq!(warnings(&text), []);
}

#[test]
fn star_on_a_write_method_and_wildcard_identity() {
    let text = format!(
        "{HEAD}\n[[route]]\nname = \"health\"\nmethods = [\"GET\", \"HEAD\"]\npath = \"/healthz\"\nallow = [\"a\", \"b\", \"*\"]\n\n[[route]]\nname = \"w\"\nmethods = [\"GET\", \"POST\"]\npath = \"/w\"\nallow = [\"*\"]\n"
    );
    assert_eq!(
        warnings(&text),
        [
            ("wildcard-identity", 12, 20),
            ("star-on-write", 18, 10),
            ("wildcard-identity", 18, 10),
        ]
    );
}

#[test]
fn wildcard_identity_through_an_alias() {
    let text = "version = 1\ntrust_domain = \"td\"\n[identities]\nops = \"spiffe://td/ns/ops/**\"\n\n[[route]]\nname = \"r\"\npath = \"/r\"\nallow = [\"ops\"]\n";
    let policy = Policy::parse("p.toml", text).unwrap();
    let w = review(&policy);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!(w[0].code, "wildcard-identity");
    assert!(
        w[0].diagnostic.message.contains("(alias `ops`)"),
        "{:?}",
        w[0]
    );
    assert_eq!((w[0].diagnostic.line, w[0].diagnostic.col), (9, 10));
}

#[test]
fn root_wildcard_path() {
    let text =
        format!("{HEAD}\n[[route]]\nname = \"all\"\npath = \"/**\"\nallow = [\"a\", \"b\"]\n");
    assert_eq!(warnings(&text), [("root-wildcard-path", 10, 8)]);
}

#[test]
fn unused_alias() {
    let text = format!("{HEAD}\n[[route]]\nname = \"r\"\npath = \"/r\"\nallow = [\"a\"]\n");
    assert_eq!(warnings(&text), [("unused-alias", 6, 1)]);
}

#[test]
fn audit_mode_left_on() {
    let text = HEAD.replace(
        "trust_domain = \"td\"",
        "trust_domain = \"td\"\nmode = \"audit\"",
    ) + "\n[[route]]\nname = \"r\"\npath = \"/r\"\nallow = [\"a\", \"b\"]\n";
    assert_eq!(warnings(&text), [("audit-mode", 3, 8)]);
}

#[test]
fn route_covered_by_a_broader_route_granting_the_same() {
    // `/api/reports` allows exactly what `/api/**` would allow there: it changes nothing.
    let text = format!(
        "{HEAD}\n[[route]]\nname = \"api\"\npath = \"/api/**\"\nallow = [\"a\"]\n\n[[route]]\nname = \"reports\"\npath = \"/api/reports\"\nallow = [\"a\"]\n\n[[route]]\nname = \"b only\"\npath = \"/b\"\nallow = [\"b\"]\n"
    );
    assert_eq!(warnings(&text), [("redundant-route", 13, 1)]);
    // Narrowing is not redundant: the specific route takes access away from `b`.
    let text = text.replace(
        "name = \"api\"\npath = \"/api/**\"\nallow = [\"a\"]",
        "name = \"api\"\npath = \"/api/**\"\nallow = [\"a\", \"b\"]",
    );
    assert_eq!(warnings(&text), []);
}
