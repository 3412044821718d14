//! The `policy` binary, run for real: exit codes, human and JSON output, `diff` semantics, and
//! the FinTech fixtures in deploy/examples/fintech.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const POLICY: &str = r#"version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"
api-gateway    = "spiffe://fintech.internal/api-gateway"

[[route]]
name    = "report data export"
methods = ["GET"]
path    = "/api/data/reports"
allow   = ["report-service"]

[[route]]
name    = "dashboard"
methods = ["GET"]
path    = "/api/dashboard"
allow   = ["api-gateway"]
"#;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_policy"))
        .args(args)
        .output()
        .expect("the policy binary runs")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// Writes `text` as `name` in a fresh temp dir kept alive by the returned guard.
fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fintech(service: &str, file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/fintech")
        .join(service)
        .join(file)
}

#[test]
fn check_clean_file_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "policy.toml", POLICY);
    let o = run(&["check", "--deny-warnings", s(&p)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("ok, 2 route(s)"));
}

#[test]
fn check_warnings_exit_1_only_with_deny_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "policy.toml",
        &POLICY.replace("allow   = [\"api-gateway\"]", "allow   = [\"*\"]"),
    );
    let o = run(&["check", s(&p)]);
    assert_eq!(code(&o), 0);
    assert!(
        stdout(&o).contains("warning[unused-alias]"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("policy.toml:18:12: route `dashboard` admits a wildcard identity `*`"),
        "{}",
        stdout(&o)
    );
    let o = run(&["check", "--deny-warnings", s(&p)]);
    assert_eq!(code(&o), 1);
    let o = run(&["check", "--deny-warnings", "--format", "json", s(&p)]);
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["warnings"], 2);
    let codes: Vec<&str> = v["files"][0]["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["unused-alias", "wildcard-identity"]);
    assert_eq!(v["files"][0]["warnings"][1]["line"], 18);
}

#[test]
fn check_errors_exit_2_and_lists_all_of_them_in_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        &dir,
        "bad.toml",
        &POLICY
            .replace("[\"report-service\"]", "[\"reports-service\"]")
            .replace(
                "\"GET\"]\npath    = \"/api/dashboard\"",
                "\"get\"]\npath    = \"/api/dashboard\"",
            ),
    );
    let good = write(&dir, "good.toml", POLICY);
    let o = run(&["check", s(&good), s(&bad)]);
    assert_eq!(code(&o), 2);
    let out = stdout(&o);
    assert!(out.contains("good.toml: ok"), "{out}");
    assert!(out.contains("bad.toml:12:12: unknown identity alias `reports-service`\n  help: define it under [identities]"), "{out}");
    assert!(
        out.contains("bad.toml:16:12: method `get` must be upper case"),
        "{out}"
    );
    let v = json(&run(&["check", "--format", "json", s(&bad)]));
    assert_eq!(v["errors"], 2);
    assert_eq!(v["files"][0]["errors"][0]["line"], 12);
    assert_eq!(v["files"][0]["errors"][0]["col"], 12);
}

#[test]
fn test_exit_codes_follow_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "policy.toml", POLICY);
    let o = run(&[
        "test",
        s(&p),
        "--caller",
        "report-service",
        "--method",
        "GET",
        "--path",
        "/api/data/reports?since=1",
    ]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    assert!(out.starts_with("allow (allowed)"), "{out}");
    assert!(out.contains("route: report data export"), "{out}");
    assert!(
        out.contains("matched: spiffe://fintech.internal/report-service"),
        "{out}"
    );

    let o = run(&[
        "test",
        s(&p),
        "--caller",
        "spiffe://fintech.internal/api-gateway",
        "--method",
        "GET",
        "--path",
        "/api/data/reports",
        "--format",
        "json",
    ]);
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_eq!(v["outcome"]["decision"], "deny");
    assert_eq!(v["outcome"]["reason"], "not_allowed");
    assert_eq!(v["outcome"]["route"], "report data export");

    let o = run(&[
        "test",
        s(&p),
        "--caller",
        "api-gateway",
        "--method",
        "GET",
        "--path",
        "/public/..;/admin",
    ]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).starts_with("refused"), "{}", stdout(&o));

    let o = run(&[
        "test",
        s(&p),
        "--caller",
        "nobody",
        "--method",
        "GET",
        "--path",
        "/",
    ]);
    assert_eq!(code(&o), 2);
    let o = run(&[
        "test",
        "/nonexistent.toml",
        "--caller",
        "a",
        "--method",
        "GET",
        "--path",
        "/",
    ]);
    assert_eq!(code(&o), 2);
}

/// Issue 21 finding 2: `get` is not `GET`. Decided as an extension method it skipped the
/// GET-only route that denies the caller and was allowed by the any-method route; `policy test`
/// refuses it as the sidecar does (400 there), and still allows `GET` where the policy does.
#[test]
fn issue_21_lower_case_method_is_refused_not_matched_as_an_extension_method() {
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"version = 1
trust_domain = "fintech.internal"

[identities]
api-gateway = "spiffe://fintech.internal/api-gateway"
reports     = "spiffe://fintech.internal/report-service"

[[route]]
name    = "export"
methods = ["GET"]
path    = "/v2/export"
allow   = ["reports"]

[[route]]
name  = "v2 api"
path  = "/v2/**"
allow = ["api-gateway"]
"#;
    let p = write(&dir, "policy.toml", policy);
    let ask = |method: &str| {
        run(&[
            "test",
            s(&p),
            "--caller",
            "api-gateway",
            "--method",
            method,
            "--path",
            "/v2/export",
            "--format",
            "json",
        ])
    };
    let o = ask("GET");
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert_eq!(json(&o)["outcome"]["reason"], "not_allowed");
    for spelling in ["get", "Get"] {
        let o = ask(spelling);
        assert_eq!(code(&o), 1, "{spelling}: {}", stdout(&o));
        let v = json(&o);
        assert_eq!(v["outcome"]["decision"], "refused", "{spelling}: {v}");
        let reason = v["outcome"]["reason"].as_str().unwrap();
        assert!(reason.contains("`GET`"), "{reason}");
    }
    // An extension method still matches the any-method route only.
    let o = ask("PURGE");
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert_eq!(json(&o)["outcome"]["route"], "v2 api");
}

#[test]
fn test_cases_pass_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "policy.toml", POLICY);
    let cases = "[[case]]\ncaller = \"report-service\"\nmethod = \"GET\"\npath = \"/api/data/reports\"\nexpect = \"allow\"\nroute = \"report data export\"\n\n[[case]]\nname = \"wrong on purpose\"\ncaller = \"api-gateway\"\nmethod = \"GET\"\npath = \"/api/data/reports\"\nexpect = \"allow\"\n";
    let c = write(&dir, "CASES.toml", cases);
    let o = run(&["test", s(&p), "--cases", s(&c)]);
    assert_eq!(code(&o), 1);
    let out = stdout(&o);
    assert!(
        out.contains("ok    GET /api/data/reports as report-service"),
        "{out}"
    );
    assert!(out.contains("FAIL  wrong on purpose"), "{out}");
    assert!(out.contains("1 passed, 1 failed"), "{out}");
    let v = json(&run(&["test", s(&p), "--cases", s(&c), "--format", "json"]));
    assert_eq!(v["failed"], 1);
    assert_eq!(v["cases"][1]["line"], 8);

    let bad = write(
        &dir,
        "BAD.toml",
        "[[case]]\ncaller = \"ghost\"\nmethod = \"GET\"\npath = \"/\"\nexpect = \"allow\"\n",
    );
    let o = run(&["test", s(&p), "--cases", s(&bad)]);
    assert_eq!(code(&o), 2);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("BAD.toml:2:10: caller `ghost`"),
        "{:?}",
        o
    );
}

#[test]
fn explain_matrix_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "policy.toml", POLICY);
    let o = run(&["explain", s(&p)]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    assert!(
        out.contains("route               methods  path               report-service  api-gateway"),
        "{out}"
    );
    assert!(
        out.contains("report data export  GET      /api/data/reports  allow           -"),
        "{out}"
    );
    let v = json(&run(&["explain", s(&p), "--format", "json"]));
    assert_eq!(
        v["routes"][1]["allowed_by"],
        serde_json::json!([null, "api-gateway"])
    );
    let o = run(&["explain", s(&p), "--format", "mermaid"]);
    let out = stdout(&o);
    assert!(out.starts_with("flowchart LR\n"), "{out}");
    assert!(out.contains("  c0([\"report-service\"])"), "{out}");
    assert!(
        out.contains("  r1[\"dashboard<br/>GET /api/dashboard\"]"),
        "{out}"
    );
    assert!(out.contains("  c1 --> r1\n"), "{out}");
    assert!(!out.contains("c1 --> r0"), "{out}");
    assert_eq!(code(&run(&["check", s(&p), "--format", "mermaid"])), 2);
}

/// Runs `policy diff --format json OLD NEW` and returns (exit code with --fail-on-widen,
/// changes as "granted|revoked caller methods path").
fn diff(old: &str, new: &str) -> (i32, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let (o, n) = (write(&dir, "old.toml", old), write(&dir, "new.toml", new));
    let out = run(&["diff", "--format", "json", "--fail-on-widen", s(&o), s(&n)]);
    let v = json(&out);
    let changes = v["diff"]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let methods: Vec<&str> = c["methods"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap())
                .collect();
            format!(
                "{} {} {} {}",
                c["change"].as_str().unwrap(),
                c["caller"].as_str().unwrap(),
                methods.join(","),
                c["path"].as_str().unwrap()
            )
        })
        .collect();
    (code(&out), changes)
}

#[test]
fn diff_grant() {
    let new = POLICY.replace(
        "allow   = [\"api-gateway\"]",
        "allow   = [\"api-gateway\", \"report-service\"]",
    );
    let (code, changes) = diff(POLICY, &new);
    assert_eq!(changes, ["granted report-service GET /api/dashboard"]);
    assert_eq!(code, 1, "--fail-on-widen fails on a grant");
}

#[test]
fn diff_revoke() {
    let new = POLICY.replace(
        "methods = [\"GET\"]\npath    = \"/api/dashboard\"",
        "methods = [\"GET\"]\npath    = \"/api/dashboard/*\"",
    );
    let (code, changes) = diff(POLICY, &new);
    assert_eq!(
        changes,
        [
            "granted api-gateway GET /api/dashboard/*",
            "revoked api-gateway GET /api/dashboard",
        ]
    );
    assert_eq!(code, 1);
    let new = POLICY.replace(
        "methods = [\"GET\"]\npath    = \"/api/dashboard\"",
        "methods = [\"HEAD\"]\npath    = \"/api/dashboard\"",
    );
    let (code, changes) = diff(POLICY, &new);
    assert_eq!(
        changes,
        [
            "granted api-gateway HEAD /api/dashboard",
            "revoked api-gateway GET /api/dashboard"
        ]
    );
    assert_eq!(code, 1);
    let new = POLICY.replace(
        "allow   = [\"api-gateway\"]",
        "allow   = [\"report-service\"]",
    );
    let (code, changes) = diff(POLICY, &new);
    assert_eq!(
        changes,
        [
            "granted report-service GET /api/dashboard",
            "revoked api-gateway GET /api/dashboard"
        ]
    );
    assert_eq!(code, 1);
    let only_revoke = POLICY
        .split("\n[[route]]\nname    = \"dashboard\"")
        .next()
        .unwrap()
        .to_owned();
    let (code, changes) = diff(POLICY, &only_revoke);
    assert_eq!(changes, ["revoked api-gateway GET /api/dashboard"]);
    assert_eq!(code, 0, "a pure revocation does not widen");
}

#[test]
fn diff_alias_and_route_renames_change_nothing() {
    let new = POLICY
        .replace("api-gateway    =", "frontend-gateway =")
        .replace("[\"api-gateway\"]", "[\"frontend-gateway\"]")
        .replace(
            "name    = \"dashboard\"",
            "name    = \"frontend dashboard\"",
        );
    assert!(new.contains("allow   = [\"frontend-gateway\"]") && !new.contains("\"api-gateway\""));
    let (code, changes) = diff(POLICY, &new);
    assert_eq!(changes, Vec::<String>::new());
    assert_eq!(code, 0);
    let dir = tempfile::tempdir().unwrap();
    let (o, n) = (
        write(&dir, "old.toml", POLICY),
        write(&dir, "new.toml", &new),
    );
    let out = run(&["diff", s(&o), s(&n)]);
    assert_eq!(stdout(&out), "no change in access\n");
}

#[test]
fn diff_widening_to_a_wildcard_is_a_grant() {
    let new = POLICY.replace(
        "allow   = [\"api-gateway\"]",
        "allow   = [\"spiffe://fintech.internal/*\"]",
    );
    let (code, changes) = diff(POLICY, &new);
    assert_eq!(
        changes,
        [
            "granted report-service GET /api/dashboard",
            "granted any identity matching spiffe://fintech.internal/* GET /api/dashboard",
        ]
    );
    assert_eq!(code, 1);
}

#[test]
fn diff_reports_audit_mode_as_widening() {
    let new = POLICY.replace("version = 1", "version = 1\nmode = \"audit\"");
    let dir = tempfile::tempdir().unwrap();
    let (o, n) = (
        write(&dir, "old.toml", POLICY),
        write(&dir, "new.toml", &new),
    );
    let out = run(&["diff", "--fail-on-widen", s(&o), s(&n)]);
    assert_eq!(code(&out), 1);
    assert!(
        stdout(&out).contains("audit mode turned on"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn fintech_policies_pass_check_with_no_warnings() {
    let files: Vec<PathBuf> = ["monolith", "report-service", "api-gateway"]
        .iter()
        .map(|s| fintech(s, "policy.toml"))
        .collect();
    let mut args = vec!["check", "--deny-warnings", "--format", "json"];
    args.extend(files.iter().map(|f| s(f)));
    let o = run(&args);
    let v = json(&o);
    assert_eq!(
        (v["errors"].clone(), v["warnings"].clone()),
        (0.into(), 0.into()),
        "{v:#}"
    );
    assert_eq!(code(&o), 0);
}

#[test]
fn fintech_cases_pass() {
    for service in ["monolith", "report-service", "api-gateway"] {
        let (p, c) = (
            fintech(service, "policy.toml"),
            fintech(service, "CASES.toml"),
        );
        let o = run(&["test", s(&p), "--cases", s(&c), "--format", "json"]);
        let v = json(&o);
        assert_eq!(code(&o), 0, "{service}: {v:#}");
        assert_eq!(v["failed"], 0);
        assert!(v["passed"].as_u64().unwrap() >= 4, "{service}: {v:#}");
    }
}

#[test]
fn fintech_monolith_grants_exactly_what_the_brief_says() {
    let p = fintech("monolith", "policy.toml");
    let v = json(&run(&["explain", s(&p), "--format", "json"]));
    let rows: Vec<String> = v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let who: Vec<&str> = r["allowed_by"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|a| a.as_str())
                .collect();
            format!(
                "{} {} {}",
                r["methods"][0].as_str().unwrap(),
                r["path"].as_str().unwrap(),
                who.join(",")
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            "GET /api/data/reports report-service",
            "GET /api/dashboard api-gateway",
            "POST /api/expenses api-gateway",
        ]
    );
}

/// `policy explain FILE | head -1`, `policy diff … | head -1` or `policy test --cases … | head`
/// (a reader that stops reading) are not a crash: the command's own exit code and nothing on
/// stderr. The pipe's read end is closed before `policy` starts, so every write meets the broken
/// pipe (`print!` panicked). Output that cannot be written for another reason (`> /dev/full`)
/// is exit 2, with the error on stderr.
#[test]
fn output_into_a_closed_pipe_keeps_the_exit_code_and_into_a_full_disk_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "policy.toml", POLICY);
    let wider = write(
        &dir,
        "wider.toml",
        &POLICY.replace(
            r#"allow   = ["api-gateway"]"#,
            r#"allow   = ["api-gateway", "report-service"]"#,
        ),
    );
    let case = "[[case]]\ncaller = \"report-service\"\nmethod = \"GET\"\npath = \"/api/data/reports\"\nexpect = \"allow\"\n\n";
    let c = write(&dir, "CASES.toml", &case.repeat(50));
    let ask = |caller| {
        let path = "/api/data/reports";
        vec![
            "test",
            s(&p),
            "--caller",
            caller,
            "--method",
            "GET",
            "--path",
            path,
        ]
    };
    let cases = [
        (vec!["explain", s(&p)], 0),
        (vec!["--format", "json", "explain", s(&p)], 0),
        (vec!["--format", "mermaid", "explain", s(&p)], 0),
        (vec!["diff", s(&p), s(&wider), "--fail-on-widen"], 1),
        (vec!["check", s(&p)], 0),
        (vec!["test", s(&p), "--cases", s(&c)], 0),
        (vec!["--format", "json", "test", s(&p), "--cases", s(&c)], 0),
        (ask("api-gateway"), 1),
        (ask("report-service"), 0),
    ];
    let run_into = |args: &[&str], out: std::process::Stdio| {
        Command::new(env!("CARGO_BIN_EXE_policy"))
            .args(args)
            .stdout(out)
            .output()
            .expect("the policy binary runs")
    };
    for (args, want) in cases {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let o = run_into(&args, writer.into());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            code(&o) == want && stderr.is_empty(),
            "{args:?}: {} {stderr}",
            o.status
        );
    }
    for args in [&["explain", s(&p)][..], &["test", s(&p), "--cases", s(&c)]] {
        let full = std::fs::File::create("/dev/full").expect("/dev/full");
        let o = run_into(args, full.into());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(code(&o), 2, "{args:?}: {stderr}");
        assert_eq!(
            stderr.matches("cannot write to stdout").count(),
            1,
            "{args:?}: reported once: {stderr}"
        );
    }
}
