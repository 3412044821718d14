//! `docs/CONFIG.md` and `docs/POLICY.md` list every key the real parsers accept (and no other):
//! the keys are asked from the `sidecar` and `policy` binaries themselves (see
//! `gatehouse_tests::docs`), so a key added to the code fails here until its row is written.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use gatehouse_tests::docs::{compare, discover_keys, documented_keys};
use gatehouse_tests::harness::binary;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

fn read_doc(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Runs a command and returns stdout + stderr.
fn output(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run the binary");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every key `sidecar check` accepts.
fn sidecar_keys() -> BTreeSet<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("sidecar.toml");
    let sidecar = binary("sidecar");
    discover_keys(&mut |text| {
        std::fs::write(&file, text).expect("write probe");
        output(
            Command::new(&sidecar)
                .arg("check")
                .arg("--config")
                .arg(&file),
        )
    })
}

/// Every key `policy check` accepts in a policy file, and `policy test --cases` in a cases file.
fn policy_keys() -> BTreeSet<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("probe.toml");
    let policy = binary("policy");
    let mut keys = discover_keys(&mut |text| {
        std::fs::write(&file, text).expect("write probe");
        output(Command::new(&policy).arg("check").arg(&file))
    });
    let good = repo().join("deploy/examples/fintech/monolith/policy.toml");
    keys.extend(discover_keys(&mut |text| {
        std::fs::write(&file, text).expect("write probe");
        output(
            Command::new(&policy)
                .arg("test")
                .arg(&good)
                .arg("--cases")
                .arg(&file),
        )
    }));
    keys
}

fn assert_documented(doc: &str, code: &BTreeSet<String>) {
    let (missing, stale) = compare(code, &documented_keys(&read_doc(doc)));
    assert!(
        missing.is_empty() && stale.is_empty(),
        "{doc} is out of date.\n  keys the parser accepts that {doc} does not document: {missing:?}\n  \
         keys {doc} documents that the parser refuses: {stale:?}\n  help: add a row \
         \"| `key` | type | default | effect |\" under the heading that names the key's table \
         (e.g. ## `[inbound]`), or remove the stale row"
    );
}

#[test]
fn every_sidecar_config_key_is_in_docs_config_md() {
    let code = sidecar_keys();
    // The probe found the keys of every table, nested and array ones included.
    for k in [
        "min_tls",
        "inbound.listen",
        "outbound.server_id",
        "reload.watch",
        "runtime.worker_threads",
    ] {
        assert!(code.contains(k), "the probe missed {k}: {code:?}");
    }
    assert_documented("docs/CONFIG.md", &code);
}

#[test]
fn every_policy_and_cases_key_is_in_docs_policy_md() {
    let code = policy_keys();
    for k in ["trust_domain", "identities", "route.allow", "case.expect"] {
        assert!(code.contains(k), "the probe missed {k}: {code:?}");
    }
    assert_documented("docs/POLICY.md", &code);
}

#[test]
fn a_key_without_its_row_is_reported() {
    // The check itself: drop one row from the real document and it must name that key.
    let code = sidecar_keys();
    let doc = read_doc("docs/CONFIG.md");
    let without: String = doc
        .lines()
        .filter(|l| !l.starts_with("| `max_h2_streams`"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, doc, "docs/CONFIG.md has a max_h2_streams row");
    let (missing, _) = compare(&code, &documented_keys(&without));
    assert_eq!(missing, vec!["inbound.max_h2_streams".to_owned()]);
}

/// Every metric family the sidecar's source registers: the name string passed to a prometheus
/// constructor (`Opts::new("…"`, `HistogramOpts::new("…"`, `IntGauge::new("…"`, …), prefixed
/// with the registry's `gatehouse_`.
fn registered_metrics() -> BTreeSet<String> {
    const CTORS: [&str; 6] = [
        "HistogramOpts::new(",
        "Opts::new(",
        "IntGauge::new(",
        "Gauge::new(",
        "IntCounter::new(",
        "Counter::new(",
    ];
    let mut out = BTreeSet::new();
    let mut stack = vec![repo().join("proxy/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read proxy/src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            for ctor in CTORS {
                for (at, _) in text.match_indices(ctor) {
                    let rest = text[at + ctor.len()..].trim_start();
                    let Some(lit) = rest.strip_prefix('"') else {
                        continue;
                    };
                    let name: String = lit
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if !name.is_empty() && lit[name.len()..].starts_with('"') {
                        out.insert(format!("gatehouse_{name}"));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_metric_is_in_the_operations_metrics_reference() {
    let code = registered_metrics();
    for m in [
        "gatehouse_inbound_requests_total",
        "gatehouse_reloads_total",
        "gatehouse_outbound_requests_total",
    ] {
        assert!(code.contains(m), "the scan missed {m}: {code:?}");
    }
    let doc = read_doc("docs/OPERATIONS.md");
    let missing: Vec<&String> = code
        .iter()
        .filter(|m| !doc.contains(&format!("| `{m}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/OPERATIONS.md \"Metrics reference\" lacks {missing:?}\n  help: add a row \
         \"| `name` | type | labels | meaning |\" to its table"
    );
}
