//! Keeping the reference documentation true to the code.
//!
//! [`discover_keys`] asks the real parser which keys a TOML file may hold: it feeds it a file with
//! one unknown key (`zz_undocumented_probe`) in each table, and reads the list serde puts in its
//! `unknown field …, expected one of …` error (every config and policy struct is
//! `deny_unknown_fields`). A key whose value is itself a table (or array of tables) is explored the
//! same way. So a key added to the code is found without touching this file or the test; it only
//! needs its row in the document.
//!
//! [`documented_keys`] reads a Markdown reference laid out as: a heading naming the TOML table in
//! backticks (`` ## `[inbound]` ``, `` ## `[[outbound]]` ``; a heading with "top level" in it for
//! keys outside any table), followed by a table whose rows start with the key in backticks
//! (`` | `listen` | … ``).

use std::collections::BTreeSet;

/// The unknown key the probes use.
pub const PROBE_KEY: &str = "zz_undocumented_probe";

/// The keys a parser accepts, as dotted paths (`inbound.listen`, `outbound.name`, `min_tls`).
///
/// `probe` parses a TOML text and returns the parser's error messages (empty when it accepted the
/// text). Keys whose value is a table or an array of tables are not listed themselves; their keys
/// are.
///
/// # Panics
/// When the top-level probe gets no `unknown field` error: the parser does not deny unknown keys.
pub fn discover_keys(probe: &mut dyn FnMut(&str) -> String) -> BTreeSet<String> {
    let top = expected_fields(&probe(&format!("{PROBE_KEY} = 1\n")));
    assert!(
        !top.is_empty(),
        "the parser did not list its top-level keys for an unknown key"
    );
    let mut out = BTreeSet::new();
    walk(probe, &[], &top, &mut out);
    out
}

/// A table on the way to a key: its name, and whether it is an array of tables.
#[derive(Clone)]
struct Segment {
    name: String,
    array: bool,
}

fn walk(
    probe: &mut dyn FnMut(&str) -> String,
    path: &[Segment],
    fields: &[String],
    out: &mut BTreeSet<String>,
) {
    for field in fields {
        let mut sub = None;
        for array in [false, true] {
            let mut p = path.to_vec();
            p.push(Segment {
                name: field.clone(),
                array,
            });
            let inner = expected_fields(&probe(&table_probe(&p)));
            if !inner.is_empty() {
                sub = Some((p, inner));
                break;
            }
        }
        match sub {
            Some((p, inner)) => walk(probe, &p, &inner, out),
            None => {
                let mut key: Vec<&str> = path.iter().map(|s| s.name.as_str()).collect();
                key.push(field);
                out.insert(key.join("."));
            }
        }
    }
}

/// A TOML text that opens each table of `path` and puts the probe key in the last one.
fn table_probe(path: &[Segment]) -> String {
    let mut text = String::new();
    for i in 0..path.len() {
        let name: Vec<&str> = path[..=i].iter().map(|s| s.name.as_str()).collect();
        let name = name.join(".");
        if path[i].array {
            text.push_str(&format!("[[{name}]]\n"));
        } else {
            text.push_str(&format!("[{name}]\n"));
        }
    }
    text.push_str(&format!("{PROBE_KEY} = 1\n"));
    text
}

/// The field names of serde's ``unknown field `x`, expected one of `a`, `b` `` (also
/// ``expected `a` `` and ``expected `a` or `b` ``); empty when the message is not about the
/// probe key.
fn expected_fields(messages: &str) -> Vec<String> {
    let marker = format!("unknown field `{PROBE_KEY}`, expected ");
    let Some(start) = messages.find(&marker) else {
        return Vec::new();
    };
    let rest = &messages[start + marker.len()..];
    let line = rest.lines().next().unwrap_or_default();
    line.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The keys a Markdown reference documents, as dotted paths (see the module docs for the layout).
pub fn documented_keys(markdown: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut section: Option<String> = None;
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        if line.starts_with('#') {
            section = heading_section(line);
            continue;
        }
        let Some(sec) = &section else { continue };
        let Some(cell) = line.strip_prefix("| `") else {
            continue;
        };
        let Some(end) = cell.find('`') else { continue };
        let key = &cell[..end];
        out.insert(if sec.is_empty() {
            key.to_owned()
        } else {
            format!("{sec}.{key}")
        });
    }
    out
}

/// `` ## `[inbound]` `` → `inbound`, `` ## `[[outbound]]` `` → `outbound`, a "top level" heading →
/// the empty string, any other heading → `None` (its tables document no keys).
fn heading_section(line: &str) -> Option<String> {
    if line.to_ascii_lowercase().contains("top level") {
        return Some(String::new());
    }
    let start = line.find("`[")?;
    let rest = &line[start + 1..];
    let end = rest.find('`')?;
    Some(
        rest[..end]
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}

/// What differs between the code and a document: keys the code has that the document lacks,
/// and keys the document lists that the code does not accept.
pub fn compare(code: &BTreeSet<String>, doc: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (
        code.difference(doc).cloned().collect(),
        doc.difference(code).cloned().collect(),
    )
}
