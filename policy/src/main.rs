//! `policy`: the reviewers' tool for Gatehouse policy files. Parses arguments, calls the
//! library, renders the result; every command takes `--format json`.
//!
//! Exit codes: `check` 0 clean, 1 warnings with `--deny-warnings`, 2 errors; `test` 0 allow,
//! 1 deny (or a failing case), 2 error; `diff` 1 with `--fail-on-widen` when access is granted;
//! 2 whenever a file cannot be loaded.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use gatehouse_policy::cases::{self, CaseResult, Outcome};
use gatehouse_policy::diff::{self, Change, PolicyDiff};
use gatehouse_policy::limit::LimitChangeKind;
use gatehouse_policy::path::NormalizeOptions;
use gatehouse_policy::review::{self, Warning};
use gatehouse_policy::{Diagnostic, Policy, SourceFile, TcpDecision, explain, fleet};
use gatehouse_policy::{out, outln, stdout};
use serde_json::json;

/// Check, test, explain and diff Gatehouse policy files.
#[derive(Parser)]
#[command(name = "policy", version)]
struct Cli {
    /// Output format. `mermaid` and `html` apply to `explain` only (`html`: with `--fleet`).
    #[arg(long, value_enum, default_value_t = Format::Human, global = true)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Human,
    Json,
    Mermaid,
    Html,
}

#[derive(Subcommand)]
enum Command {
    /// Report every error and review warning in each file.
    Check {
        /// Policy files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Exit 1 when there are warnings (and no errors).
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Decide one request, or run a table of expected decisions.
    Test {
        /// Policy file.
        file: PathBuf,
        /// The caller: a spiffe:// ID or an alias of the policy.
        #[arg(long, required_unless_present = "cases", conflicts_with = "cases")]
        caller: Option<String>,
        /// The HTTP method.
        #[arg(long, required_unless_present_any = ["cases", "tcp"], conflicts_with = "cases")]
        method: Option<String>,
        /// The request path as sent (normalized like the sidecar does; a query is ignored).
        #[arg(long, required_unless_present_any = ["cases", "tcp"], conflicts_with = "cases")]
        path: Option<String>,
        /// A CASES.toml file: one `[[case]]` table (caller, method, path, expect, optional route)
        /// per expected decision.
        #[arg(long)]
        cases: Option<PathBuf>,
        /// Accept `;` in path segments, as a sidecar configured for matrix parameters does.
        #[arg(long)]
        allow_matrix_params: bool,
        /// Issue 17: decide a connection to the TCP listener NAME (its `[[tcp]]` entry) instead
        /// of an HTTP request; takes --caller, not --method/--path.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["method", "path", "cases"])]
        tcp: Option<String>,
    },
    /// Show the caller × route matrix (`--format mermaid` for a graph), or with `--fleet` the
    /// map of who can call what across every service under the given directories.
    Explain {
        /// Policy file; with `--fleet`, directories (each a service directory holding
        /// policy.toml and/or sidecar.toml, or a directory of service directories).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Read every service's policy.toml and sidecar.toml under the directories and print
        /// the fleet's access map (`--format html` for one self-contained file).
        #[arg(long)]
        fleet: bool,
    },
    /// Show access granted and revoked, per caller and route, from OLD to NEW.
    Diff {
        /// The policy before the change.
        old: PathBuf,
        /// The policy after the change.
        new: PathBuf,
        /// Exit 1 when NEW grants anything OLD did not.
        #[arg(long)]
        fail_on_widen: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.format == Format::Json;
    if cli.format == Format::Mermaid && !matches!(cli.command, Command::Explain { .. }) {
        eprintln!(
            "error: --format mermaid applies to `policy explain` only\n  help: use --format human or --format json"
        );
        return ExitCode::from(2);
    }
    if cli.format == Format::Html && !matches!(cli.command, Command::Explain { fleet: true, .. }) {
        eprintln!(
            "error: --format html applies to `policy explain --fleet` only\n  help: add --fleet DIR…, or use --format human, json or mermaid"
        );
        return ExitCode::from(2);
    }
    let code = match cli.command {
        Command::Check {
            files,
            deny_warnings,
        } => check(&files, deny_warnings, json),
        Command::Test {
            file,
            caller,
            method,
            path,
            cases,
            allow_matrix_params,
            tcp,
        } => {
            let opts = NormalizeOptions {
                allow_matrix_params,
            };
            match cases {
                Some(cases) => test_cases(&file, &cases, json),
                None if tcp.is_some() => test_tcp(
                    &file,
                    tcp.as_deref().unwrap_or_default(),
                    caller.as_deref().unwrap_or_default(),
                    json,
                ),
                None => test_one(
                    &file,
                    caller.as_deref().unwrap_or_default(),
                    method.as_deref().unwrap_or_default(),
                    path.as_deref().unwrap_or_default(),
                    &opts,
                    json,
                ),
            }
        }
        Command::Explain { paths, fleet: true } => fleet_cmd(&paths, cli.format),
        Command::Explain {
            paths,
            fleet: false,
        } => match paths.as_slice() {
            [file] => explain_cmd(file, cli.format),
            _ => {
                eprintln!(
                    "error: `policy explain` takes one policy file\n  help: run it once per file, or pass directories with --fleet"
                );
                2
            }
        },
        Command::Diff {
            old,
            new,
            fail_on_widen,
        } => diff_cmd(&old, &new, fail_on_widen, json),
    };
    stdout::exit_code(ExitCode::from(code))
}

/// Prints load errors (all of them) and returns exit code 2.
fn render_errors(errors: &[Diagnostic], json: bool) -> u8 {
    if json {
        outln!("{}", json!({ "errors": errors }));
    } else {
        for e in errors {
            eprintln!("error: {e}");
        }
    }
    2
}

fn load(path: &Path, json: bool) -> Result<Policy, u8> {
    Policy::load(path).map_err(|errors| render_errors(&errors, json))
}

fn check(files: &[PathBuf], deny_warnings: bool, json: bool) -> u8 {
    let mut reports = Vec::new();
    let (mut errors, mut warnings) = (0, 0);
    for file in files {
        let (errs, warns, routes, tcp_count): (Vec<Diagnostic>, Vec<Warning>, usize, usize) =
            match Policy::load(file) {
                Ok(p) => (
                    Vec::new(),
                    review::review(&p),
                    p.route_count(),
                    p.tcp_entries().len(),
                ),
                Err(e) => (e, Vec::new(), 0, 0),
            };
        errors += errs.len();
        warnings += warns.len();
        if !json {
            // The findings are this command's output, so they go to stdout.
            for e in &errs {
                outln!("error: {e}");
            }
            for w in &warns {
                outln!("warning[{}]: {}", w.code, w.diagnostic);
            }
            let tcp = match tcp_count {
                0 => String::new(),
                n => format!(", {n} [[tcp]] entr{}", if n == 1 { "y" } else { "ies" }),
            }; // issue 17
            let status = if !errs.is_empty() {
                format!("{} error(s)", errs.len())
            } else if !warns.is_empty() {
                format!("ok, {routes} route(s), {} warning(s)", warns.len())
            } else {
                format!("ok, {routes} route(s)")
            };
            outln!("{}: {status}{tcp}", file.display());
        }
        reports.push(json!({
            "file": file.display().to_string(),
            "ok": errs.is_empty(),
            "routes": routes,
            "tcp": tcp_count,
            "errors": errs,
            "warnings": warns,
        }));
    }
    if json {
        outln!(
            "{}",
            json!({ "files": reports, "errors": errors, "warnings": warnings })
        );
    }
    match (errors, warnings) {
        (0, 0) => 0,
        (0, _) if deny_warnings => 1,
        (0, _) => 0,
        _ => 2,
    }
}

fn test_one(
    file: &Path,
    caller: &str,
    method: &str,
    path: &str,
    opts: &NormalizeOptions,
    json: bool,
) -> u8 {
    let policy = match load(file, json) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let id = match resolve(&policy, caller, json) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let outcome = cases::evaluate(&policy, &id, method, path, opts);
    if json {
        outln!(
            "{}",
            json!({ "caller": id.as_str(), "method": method, "path": path, "outcome": outcome })
        );
    } else {
        out!("{}", describe(&outcome));
    }
    if outcome.allowed { 0 } else { 1 }
}

/// `--caller`: an exact-ID alias of `policy` or a SPIFFE ID; else the error is rendered.
fn resolve(policy: &Policy, caller: &str, json: bool) -> Result<gatehouse_policy::SpiffeId, u8> {
    policy.resolve_caller(caller).map_err(|e| {
        let d = Diagnostic::whole_file(
            "--caller",
            format!("caller `{caller}`: {e}"),
            "pass a spiffe:// ID, or an alias of the policy that stands for one exact ID",
        );
        render_errors(&[d], json)
    })
}

/// `policy test FILE --tcp NAME --caller ID` (issue 17): exit 0 allow, 1 deny, 2 error.
fn test_tcp(file: &Path, name: &str, caller: &str, json: bool) -> u8 {
    let policy = match load(file, json) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let id = match resolve(&policy, caller, json) {
        Ok(id) => id,
        Err(code) => return code,
    };
    let d = policy.decide_tcp(name, &id);
    let (decision, matched, line) = match d {
        TcpDecision::Allow { entry, matched } => {
            ("allow", Some(matched.written()), Some(entry.line()))
        }
        TcpDecision::NotAllowed { entry } => ("deny", None, Some(entry.line())),
        _ => ("deny", None, None),
    };
    if json {
        let out = json!({ "caller": id.as_str(), "tcp": name, "decision": decision,
            "reason": d.reason(), "matched": matched, "line": line });
        outln!("{out}");
    } else {
        outln!("{decision} ({})", d.reason());
        match line {
            Some(l) => outln!("  [[tcp]] `{name}` (line {l})"),
            None => outln!("  [[tcp]] `{name}`: no such entry (nobody may connect)"),
        }
        if let Some(m) = matched {
            outln!("  matched: {m}");
        }
    }
    if d.is_allowed() { 0 } else { 1 }
}

fn describe(o: &Outcome) -> String {
    let mut s = format!("{} ({})\n", o.decision, o.reason);
    if let Some(p) = &o.normalized_path {
        s += &format!("  normalized path: {p}\n");
    }
    s += &format!(
        "  route: {}\n",
        o.route.as_deref().unwrap_or("(none matches)")
    );
    if let Some(m) = &o.matched {
        s += &format!("  matched: {m}\n");
    }
    s
}

fn test_cases(file: &Path, cases_file: &Path, json: bool) -> u8 {
    let policy = match load(file, json) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let results = match SourceFile::read(cases_file)
        .map_err(|d| vec![d])
        .and_then(|src| cases::run_cases(&policy, &src))
    {
        Ok(r) => r,
        Err(errors) => return render_errors(&errors, json),
    };
    let failed = results.iter().filter(|r| !r.passed).count();
    if json {
        outln!(
            "{}",
            json!({ "cases": results, "passed": results.len() - failed, "failed": failed })
        );
    } else {
        for r in &results {
            print_case(cases_file, r);
        }
        outln!("{} passed, {failed} failed", results.len() - failed);
    }
    if failed == 0 { 0 } else { 1 }
}

fn print_case(cases_file: &Path, r: &CaseResult) {
    if r.passed {
        outln!("ok    {}", r.name);
        return;
    }
    let want_route = r
        .expect_route
        .as_ref()
        .map(|route| format!(" by route `{route}`"))
        .unwrap_or_default();
    outln!(
        "FAIL  {} ({}:{})\n  expected {}{want_route}, got {}",
        r.name,
        cases_file.display(),
        r.line,
        r.expect,
        describe(&r.outcome).trim_end().replace('\n', "\n  ")
    );
}

fn explain_cmd(file: &Path, format: Format) -> u8 {
    let policy = match load(file, format == Format::Json) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let m = explain::matrix(&policy);
    let out = match format {
        Format::Json => format!("{}\n", json!(m)),
        Format::Mermaid => m.to_mermaid(),
        Format::Human | Format::Html => m.to_table(),
    };
    stdout::write(&out);
    0
}

fn fleet_cmd(dirs: &[PathBuf], format: Format) -> u8 {
    let fleet = match fleet::load(dirs) {
        Ok(f) => f,
        Err(errors) => return render_errors(&errors, format == Format::Json),
    };
    let out = match format {
        Format::Json => format!("{}\n", json!(fleet)),
        Format::Mermaid => fleet.to_mermaid(),
        Format::Html => fleet.to_html(),
        Format::Human => fleet.to_text(),
    };
    stdout::write(&out);
    0
}

fn diff_cmd(old: &Path, new: &Path, fail_on_widen: bool, json: bool) -> u8 {
    let (old_p, new_p) = match (Policy::load(old), Policy::load(new)) {
        (Ok(o), Ok(n)) => (o, n),
        (o, n) => {
            let errors: Vec<Diagnostic> =
                [o.err(), n.err()].into_iter().flatten().flatten().collect();
            return render_errors(&errors, json);
        }
    };
    let d = diff::diff(&old_p, &new_p);
    let out = if json {
        format!("{}\n", json!({ "diff": d, "widens": d.widens() }))
    } else {
        render_diff(&d)
    };
    stdout::write(&out);
    u8::from(fail_on_widen && d.widens())
}

fn render_diff(d: &PolicyDiff) -> String {
    if d.is_empty() {
        return "no change in access\n".to_owned();
    }
    let mut s = String::new();
    match d.audit_mode_turned_on {
        Some(true) => s += "! audit mode turned on: denials are no longer enforced\n",
        Some(false) => s += "  audit mode turned off: denials are enforced again\n",
        None => {}
    }
    for l in &d.limits {
        let sign = match l.change {
            LimitChangeKind::Added => "  limit added",
            LimitChangeKind::Removed => "! limit removed",
            LimitChangeKind::Raised => "! limit raised",
            LimitChangeKind::Lowered => "  limit lowered",
        };
        s += &format!(
            "{sign}  {}: {} -> {}\n",
            l.limit,
            l.old.as_deref().unwrap_or("none"),
            l.new.as_deref().unwrap_or("none")
        );
    }
    for c in &d.changes {
        let sign = match c.change {
            Change::Granted => "+ granted",
            Change::Revoked => "- revoked",
        };
        s += &format!(
            "{sign}  {}  {} {}  (route `{}`)\n",
            c.caller,
            c.methods.join(","),
            c.path,
            c.route
        );
    }
    s
}
