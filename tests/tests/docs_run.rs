//! The READMEs run as written: every ```` ```sh ```` block of `README.md`, `ca/README.md`,
//! `deploy/examples/fintech/README.md` and `docs/OPERATIONS.md` is executed, in order, by one
//! `bash -euo pipefail` per document (so `cd` and variables carry over from block to block, as in
//! a reader's terminal), in a scratch copy of the repository as a fresh clone has it, with the
//! binaries of this build first on `PATH`. A block that must not run is preceded by
//! `<!-- not-run: why -->`. Background processes a document starts are killed with its process
//! group at the end.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use gatehouse_tests::harness::{binary, wait};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// One runnable block: the line of its opening fence and its text.
struct Block {
    line: usize,
    text: String,
}

/// The shell blocks of a Markdown document that are meant to run.
///
/// # Panics
/// On a `not-run` marker without a reason.
fn runnable_blocks(doc: &str, markdown: &str) -> Vec<Block> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_end();
        if !fence.starts_with("```") {
            i += 1;
            continue;
        }
        let lang = fence.trim_start_matches('`').trim();
        let start = i;
        let mut end = i + 1;
        while end < lines.len() && lines[end].trim_end() != "```" {
            end += 1;
        }
        if lang == "sh" || lang == "bash" {
            // The HTML comments (and blank lines) right above the fence.
            let mut skip = false;
            let mut j = start;
            while j > 0 {
                let above = lines[j - 1].trim();
                if above.is_empty() {
                    j -= 1;
                    continue;
                }
                if !(above.starts_with("<!--") && above.ends_with("-->")) {
                    break;
                }
                if let Some(reason) = above.strip_prefix("<!-- not-run:") {
                    let reason = reason.trim_end_matches("-->").trim();
                    assert!(
                        !reason.is_empty(),
                        "{doc}:{j}: a not-run marker needs a reason: <!-- not-run: why -->"
                    );
                    skip = true;
                }
                j -= 1;
            }
            if !skip {
                out.push(Block {
                    line: start + 1,
                    text: lines[start + 1..end.min(lines.len())].join("\n"),
                });
            }
        }
        i = end + 1;
    }
    out
}

/// Copies the files a fresh clone has (tracked, plus new files not ignored) into `dest`. Without
/// git (a source tarball), copies the tree minus what a build or a run leaves behind.
fn fresh_clone(dest: &Path) {
    let root = repo();
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success());
    let files: Vec<PathBuf> = match listed {
        Some(out) => out
            .stdout
            .split(|b| *b == 0)
            .filter(|r| !r.is_empty())
            .map(|r| PathBuf::from(std::str::from_utf8(r).expect("utf-8 path")))
            .collect(),
        None => {
            let mut files = Vec::new();
            walk_tree(&root, Path::new(""), &mut files);
            files
        }
    };
    for rel in files {
        let from = root.join(&rel);
        if !from.is_file() {
            continue; // deleted in the work tree but not yet in the index
        }
        let to = dest.join(&rel);
        std::fs::create_dir_all(to.parent().expect("has a parent")).expect("mkdir");
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

/// Every file under `root/rel`, skipping build output, tool caches and generated example files.
fn walk_tree(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    const SKIP: [&str; 7] = [
        ".git",
        "target",
        "deploy/.tools",
        "deploy/tools/node_modules",
        "bench/work",
        "deploy/examples/fintech/certs",
        ".terraform",
    ];
    let Ok(entries) = std::fs::read_dir(root.join(rel)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = rel.join(entry.file_name());
        let skip = SKIP
            .iter()
            .any(|s| path == Path::new(s) || path.file_name() == Some(std::ffi::OsStr::new(s)));
        if skip || path.extension().is_some_and(|e| e == "jsonl") {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk_tree(root, &path, out),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
}

/// The outcome of running a document's blocks.
struct Run {
    ok: bool,
    /// `doc:line` of the block that was running when the script stopped.
    last_block: String,
    log: String,
}

/// Runs every runnable block of `markdown` (named `doc`) in a fresh clone.
fn run_doc(doc: &str, markdown: &str, timeout: Duration) -> Run {
    let blocks = runnable_blocks(doc, markdown);
    assert!(!blocks.is_empty(), "{doc} has no runnable shell block");
    let scratch = tempfile::tempdir().expect("temp dir");
    let clone = scratch.path().join("gatehouse");
    fresh_clone(&clone);
    let status = scratch.path().join("block");
    let mut script = String::from("set -euo pipefail\n");
    for b in &blocks {
        script.push_str(&format!(
            "printf '%s' '{doc}:{}' > '{}'\nprintf '\\n==> {doc}:{}\\n'\n{}\n",
            b.line,
            status.display(),
            b.line,
            b.text
        ));
    }
    script.push_str(&format!("printf '%s' done > '{}'\n", status.display()));
    let script_path = scratch.path().join("doc.sh");
    std::fs::File::create(&script_path)
        .and_then(|mut f| f.write_all(script.as_bytes()))
        .expect("write script");
    let bin_dir = binary("ca").parent().expect("bin dir").to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log_path = scratch.path().join("log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new("bash")
        .arg(&script_path)
        .current_dir(&clone)
        .env("PATH", path)
        .env_remove("CA")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("run bash");
    let exit = wait::child_exit(&mut child, timeout);
    // Whatever the document left running (`cmd &`), and the script itself on a timeout.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let last = std::fs::read_to_string(&status).unwrap_or_default();
    let mut log = std::fs::read_to_string(&log_path).unwrap_or_default();
    if exit.is_none() {
        log.push_str(&format!("\n(timed out after {timeout:?})\n"));
    }
    Run {
        ok: exit.is_some_and(|s| s.success()) && last == "done",
        last_block: last,
        log,
    }
}

fn assert_runs(doc: &str) {
    let markdown = std::fs::read_to_string(repo().join(doc)).expect("read doc");
    let run = run_doc(doc, &markdown, Duration::from_secs(120));
    assert!(
        run.ok,
        "{doc}: the block at {} failed (or hung); what it printed:\n{}\n  help: fix the command in {doc} \
         (or the code it documents); a block that must not run gets <!-- not-run: why --> above it",
        run.last_block, run.log
    );
}

#[test]
fn readme_blocks_run_as_written() {
    assert_runs("README.md");
}

#[test]
fn ca_readme_blocks_run_as_written() {
    assert_runs("ca/README.md");
}

#[test]
fn fintech_readme_blocks_run_as_written() {
    assert_runs("deploy/examples/fintech/README.md");
}

#[test]
fn operations_runbook_blocks_run_as_written() {
    assert_runs("docs/OPERATIONS.md");
}

#[test]
fn a_broken_command_in_a_readme_fails_the_run_at_its_block() {
    let doc = "ca/README.md";
    let markdown = std::fs::read_to_string(repo().join(doc)).expect("read doc");
    let good = "ca inspect ./certs/report-service/cert.pem --bundle ./pki/bundle.pem";
    assert!(markdown.contains(good), "{doc} changed: update this test");
    // A drifted doc: the option was renamed in the code but not in the README.
    let broken = markdown.replace(good, &good.replace("--bundle", "--trust-bundle"));
    let run = run_doc(doc, &broken, Duration::from_secs(60));
    assert!(!run.ok, "the broken command passed:\n{}", run.log);
    let first = runnable_blocks(doc, &markdown)[0].line;
    assert_eq!(run.last_block, format!("{doc}:{first}"), "{}", run.log);
    assert!(run.log.contains("--trust-bundle"), "{}", run.log);
}

#[test]
fn not_run_markers_skip_a_block_and_need_a_reason() {
    let md = "a\n<!-- not-run: needs a cluster -->\n```sh\nfalse\n```\n\n```sh\ntrue\n```\n```text\nx\n```\n";
    let blocks = runnable_blocks("t.md", md);
    assert_eq!(blocks.len(), 1);
    assert_eq!((blocks[0].line, blocks[0].text.as_str()), (7, "true"));
    let no_reason = std::panic::catch_unwind(|| {
        runnable_blocks("t.md", "<!-- not-run: -->\n```sh\ntrue\n```\n")
    });
    assert!(no_reason.is_err());
}
