//! `policy explain --fleet` on the FinTech example: the text map names the three services with
//! their policy hashes, and the HTML map, opened in a real headless Chromium over the DevTools
//! protocol (`tests/browser/cdp_render.py`), renders the graph and every matrix with no console
//! error and no network request, prints on A4, and its matrices read cell for cell like the text.
//! The screenshot and the HTML are kept under `target/<profile>/fleet-map/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use gatehouse_tests::fintech::stack::{bin_dir, examples_dir};
use gatehouse_tests::harness::binary;
use serde_json::Value;
use sha2::{Digest, Sha256};

const SERVICES: [&str; 3] = ["api-gateway", "monolith", "report-service"];

fn policy(args: &[&str]) -> String {
    let out = Command::new(binary("policy"))
        .args(args)
        .output()
        .expect("run policy");
    assert!(
        out.status.success(),
        "policy {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn fintech() -> String {
    examples_dir().display().to_string()
}

fn artefacts() -> PathBuf {
    let dir = bin_dir().expect("bin dir").join("fleet-map");
    std::fs::create_dir_all(&dir).expect("create the artefact directory");
    dir
}

/// Renders `html` in Chromium and returns the script's report (see `cdp_render.py`).
fn render(html: &Path, screenshot: &Path) -> Value {
    let chromium = std::env::var("GATEHOUSE_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/cdp_render.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&chromium)
        .arg(html)
        .arg(screenshot)
        .output()
        .unwrap_or_else(|e| panic!("run python3 {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed (is `{chromium}` installed? `apt-get install chromium`, or set GATEHOUSE_CHROMIUM): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints one JSON object")
}

/// The matrix of `service` in `policy explain --fleet`'s text: the table after its `== service`
/// heading, one `Vec` of cells per line (cells are separated by two or more spaces).
fn text_matrix(text: &str, service: &str) -> Vec<Vec<String>> {
    let section = text
        .split("\n== ")
        .find(|s| s.starts_with(&format!("{service}  (")))
        .unwrap_or_else(|| panic!("no section for {service} in:\n{text}"));
    section
        .lines()
        .skip_while(|l| !l.starts_with("route  "))
        .take_while(|l| !l.is_empty())
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[test]
fn fleet_text_map_names_the_three_services_with_their_policy_hashes() {
    let text = policy(&["explain", "--fleet", &fintech()]);
    for svc in SERVICES {
        let file = examples_dir().join(svc).join("policy.toml");
        let sha = hex::encode(Sha256::digest(std::fs::read(&file).expect("read policy")));
        let section = text
            .split("\n== ")
            .find(|s| s.starts_with(&format!("{svc}  (spiffe://fintech.internal/{svc})")))
            .unwrap_or_else(|| panic!("no section for {svc} with its identity in:\n{text}"));
        assert!(section.contains(&format!("sha256: {sha}")), "{section}");
        // The matrix is `policy explain FILE`'s own table.
        let single = policy(&["explain", &file.display().to_string()]);
        assert!(section.contains(&single), "{svc}: {section}\nvs\n{single}");
    }
    assert!(text.contains(
        "report-service -> monolith: GET /api/data/reports (report data export)  [outbound monolith]"
    ));
    assert!(text.contains("api-gateway -> monolith: GET /api/dashboard (dashboard), POST /api/expenses (submit expense)  [outbound monolith]"));
    let json: Value = serde_json::from_str(&policy(&[
        "explain",
        "--fleet",
        &fintech(),
        "--format",
        "json",
    ]))
    .expect("json");
    assert_eq!(
        json["services"]
            .as_array()
            .expect("services")
            .iter()
            .filter(|s| !s["policy"].is_null())
            .count(),
        3
    );
    let mermaid = policy(&["explain", "--fleet", &fintech(), "--format", "mermaid"]);
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert_eq!(mermaid.matches("-->").count(), 4, "{mermaid}");
}

#[test]
fn fleet_html_map_renders_offline_in_chromium_and_matches_the_text() {
    let dir = artefacts();
    let html = dir.join("fintech-fleet.html");
    let png = dir.join("fintech-fleet.png");
    let _ = std::fs::remove_file(&png);
    std::fs::write(
        &html,
        policy(&["explain", "--fleet", &fintech(), "--format", "html"]),
    )
    .expect("write html");
    let report = render(&html, &png);

    assert_eq!(report["requests"], Value::Array(vec![]), "{report:#}");
    assert_eq!(report["console"], Value::Array(vec![]), "{report:#}");
    let svg = &report["svg"][0];
    assert_eq!(svg["nodes"], 4, "three services and the revoked sidecar");
    assert_eq!(svg["edges"], 5, "{svg}");
    assert!(svg["width"].as_f64().unwrap_or(0.0) > 300.0, "{svg}");
    // Printed on A4 (595 × 842 pt), more than one page.
    let size = report["pdf_page_size_pt"].as_array().expect("pdf size");
    assert!((size[0].as_f64().unwrap() - 595.0).abs() < 1.5, "{size:?}");
    assert!((size[1].as_f64().unwrap() - 842.0).abs() < 1.5, "{size:?}");
    assert!(report["pdf_pages"].as_u64().unwrap_or(0) >= 2, "{report:#}");

    let text = policy(&["explain", "--fleet", &fintech()]);
    let tables = report["tables"].as_array().expect("tables");
    for svc in SERVICES {
        let table = tables
            .iter()
            .find(|t| t["id"] == format!("matrix-{svc}"))
            .unwrap_or_else(|| panic!("no matrix table for {svc}"));
        assert_eq!(table["visible"], true);
        assert!(
            table["caption"]
                .as_str()
                .is_some_and(|c| c.contains(&format!("Who may call {svc}"))),
            "{table}"
        );
        let cells: Vec<Vec<String>> =
            serde_json::from_value(table["rows"].clone()).expect("rows of strings");
        let expected = text_matrix(&text, svc);
        assert!(expected.len() >= 2, "{svc}: {expected:?}");
        assert_eq!(
            cells, expected,
            "{svc}: the HTML matrix differs from the text"
        );
        // One column header per cell of the header row, one row header per route.
        assert_eq!(
            table["row_headers"].as_u64(),
            Some((expected[0].len() + expected.len() - 1) as u64)
        );
    }
    let shot = std::fs::read(&png).expect("the screenshot was written");
    assert!(
        shot.starts_with(b"\x89PNG") && shot.len() > 20_000,
        "{}",
        shot.len()
    );
}

/// The browser check itself can fail: a page with an outside image and an inline script (both
/// refused by the map's Content-Security-Policy) shows up as a request and console errors.
#[test]
fn browser_check_reports_network_requests_and_console_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let html = dir.path().join("bad.html");
    std::fs::write(
        &html,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\
         <title>bad</title></head><body><img src=\"http://127.0.0.1:9/x.png\" alt=\"\">\
         <script>console.error('boom')</script></body></html>",
    )
    .expect("write");
    let report = render(&html, &dir.path().join("bad.png"));
    let requests = report["requests"].as_array().expect("requests");
    assert!(
        requests
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains("127.0.0.1:9"))),
        "{report:#}"
    );
    assert!(
        report["console"].as_array().expect("console").len() >= 2,
        "{report:#}"
    );
}
