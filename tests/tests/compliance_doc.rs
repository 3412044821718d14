//! `docs/COMPLIANCE.md` cannot go stale: every `sh` block in it runs, in order, as one bash script
//! from the repository root with the built binaries on `PATH` (the doc's setup block copies the
//! FinTech example into a scratch directory and mints its certificates there). A line starting
//! with `! ` must fail; any other failing line fails the test, naming the line.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse_tests::fintech::stack::bin_dir;
use gatehouse_tests::harness::wait;

/// The controls the document must address (with a command, or by saying what is not covered).
const CONTROLS: [&str; 13] = [
    "1.3", "1.4", "4.2.1", "7.2", "8.3", "10.2", "10.3", "3.6", "3.7", "CC6.1", "CC6.6", "CC6.7",
    "CC7.2",
];

/// The `sh` blocks of a Markdown text, as one script; `! CMD` lines become a check that CMD fails.
fn script(markdown: &str) -> (String, usize) {
    let mut out = String::from(
        "set -euo pipefail\ntrap 'echo \"compliance: FAILED: $BASH_COMMAND\" >&2' ERR\n",
    );
    let mut commands = 0;
    let mut in_block = false;
    for line in markdown.lines() {
        if !in_block {
            in_block = line.trim_end() == "```sh";
            continue;
        }
        if line.trim_end() == "```" {
            in_block = false;
            continue;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        commands += 1;
        match trimmed.strip_prefix("! ") {
            Some(cmd) => {
                let quoted = cmd.replace('\'', "'\\''");
                out.push_str(&format!(
                    "if {cmd}; then echo 'compliance: FAILED: expected to fail: {quoted}' >&2; exit 1; fi\n"
                ));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    (out, commands)
}

#[test]
fn every_command_in_compliance_md_runs_against_the_fintech_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/COMPLIANCE.md")).expect("read the doc");
    for control in CONTROLS.iter().chain(&["CC8.1"]) {
        assert!(
            doc.contains(control),
            "docs/COMPLIANCE.md does not address {control}"
        );
    }
    let (script, commands) = script(&doc);
    assert!(commands >= 30, "only {commands} commands found:\n{script}");

    let scratch = tempfile::tempdir().expect("scratch dir");
    let path = format!(
        "{}:{}",
        bin_dir().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&root)
        .env("PATH", path)
        .env("TMPDIR", scratch.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so whatever it started in the background goes down with it.
        .process_group(0)
        .spawn()
        .expect("run bash");
    let pid = child.id();
    let start = Instant::now();
    let status = wait::child_exit(&mut child, Duration::from_secs(90));
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some_and(|s| s.success()),
        "docs/COMPLIANCE.md's commands failed ({status:?}) after {:?}\n--- stderr (tail)\n{}\n--- stdout (tail)\n{}",
        start.elapsed(),
        tail(&stderr, 40),
        tail(&stdout, 40)
    );
    // The evidence is what the doc says it is.
    assert!(stdout.contains("fleet access map: 3 service(s) with an inbound policy"));
    // `New, TLSv1.3, …` is printed by every s_client; its `Protocol :` line only when a session
    // ticket arrived before stdin closed (a race under load).
    assert!(stdout.contains("New, TLSv1.3, Cipher is"));
}

/// The runner itself can fail: a `! ` line whose command succeeds, and a plain failing line.
#[test]
fn the_doc_runner_fails_on_a_wrong_expectation() {
    for doc in ["```sh\n! true\n```\n", "```sh\nfalse\necho never\n```\n"] {
        let (script, _) = script(doc);
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("bash");
        assert!(!out.status.success(), "{doc}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("compliance: FAILED"),
            "{doc}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("never"));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
