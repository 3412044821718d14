//! `policy explain`: the caller × route matrix of a compiled policy, as data and as a Mermaid
//! graph a reviewer can read in a pull request.
//!
//! Callers are the policy's aliases (in file order) followed by every identity written
//! directly in an allow-list. A cell says whether the route's allow-list admits every identity
//! the caller stands for, and through which entry. The matrix shows what each route grants;
//! which route decides a given request is `policy test`'s job.

use std::fmt::Write as _;

use serde::Serialize;

use crate::compile::Policy;
use crate::identity::IdentityPattern;

/// The matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Matrix {
    /// The policy file.
    pub file: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// `"enforce"` or `"audit"`.
    pub mode: &'static str,
    /// The columns.
    pub callers: Vec<MatrixCaller>,
    /// The rows.
    pub routes: Vec<MatrixRoute>,
    /// The `[[limit]]` entries, in file order.
    pub limits: Vec<MatrixLimit>,
    /// One row per `[[tcp]]` entry (methods `TCP`, path `-`), after the routes (issue 17).
    pub tcp: Vec<MatrixRoute>,
}

/// One `[[limit]]` as `policy explain` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixLimit {
    /// The caller as written (alias, ID or pattern).
    pub caller: String,
    /// The identity or pattern it stands for.
    pub identity: String,
    /// Whether each identity the pattern admits gets its own budget (a wildcard pattern).
    pub per_identity: bool,
    /// The route it is restricted to; `None` for every route.
    pub route: Option<String>,
    /// In-flight requests per identity.
    pub concurrency: Option<u32>,
    /// Token-bucket rate per identity, e.g. `50/s`.
    pub rate: Option<String>,
    /// Bucket size.
    pub burst: Option<u32>,
    /// Line of the `[[limit]]` table.
    pub line: usize,
}

/// A column: an alias or an identity written in an allow-list.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixCaller {
    /// The alias name, or the identity as written.
    pub name: String,
    /// The SPIFFE ID or pattern it stands for.
    pub identity: String,
    /// Whether it stands for more than one identity (a `*` or `/**` pattern).
    pub wildcard: bool,
}

/// A row: one route and which callers it admits.
#[derive(Debug, Clone, Serialize)]
pub struct MatrixRoute {
    /// The route's name.
    pub name: String,
    /// The methods it names; empty for any method.
    pub methods: Vec<&'static str>,
    /// The path pattern.
    pub path: String,
    /// One entry per caller column, in the same order: the allow entry that admits the caller,
    /// or `None`.
    pub allowed_by: Vec<Option<String>>,
}

/// Builds the matrix of `policy`.
pub fn matrix(policy: &Policy) -> Matrix {
    let mut callers: Vec<(String, IdentityPattern)> = policy
        .aliases
        .iter()
        .map(|a| (a.name.clone(), a.pattern.clone()))
        .collect();
    let tcp_allow = policy.tcp.iter().flat_map(|t| t.allow.iter()); // issue 17
    for entry in policy
        .routes
        .iter()
        .flat_map(|r| r.allow.iter())
        .chain(tcp_allow)
    {
        if !callers.iter().any(|(n, _)| *n == entry.written) {
            callers.push((entry.written.clone(), entry.pattern.clone()));
        }
    }
    let routes = policy
        .routes
        .iter()
        .map(|r| MatrixRoute {
            name: r.name.clone(),
            methods: r.methods(),
            path: r.path.clone(),
            allowed_by: callers
                .iter()
                .map(|(_, who)| {
                    r.allow
                        .iter()
                        .find(|a| a.pattern.covers(who))
                        .map(|a| a.written.clone())
                })
                .collect(),
        })
        .collect();
    let tcp = crate::tcp::matrix_rows(policy, &callers); // issue 17
    Matrix {
        file: policy.source_name.clone(),
        trust_domain: policy.trust_domain.to_string(),
        mode: if policy.audit { "audit" } else { "enforce" },
        callers: callers
            .into_iter()
            .map(|(name, p)| MatrixCaller {
                name,
                identity: p.to_string(),
                wildcard: p.is_wildcard(),
            })
            .collect(),
        routes,
        limits: policy
            .limits()
            .iter()
            .map(|l| MatrixLimit {
                caller: l.caller_written().to_owned(),
                identity: l.caller().to_string(),
                per_identity: l.caller().is_wildcard(),
                route: l.route_name().map(str::to_owned),
                concurrency: l.concurrency(),
                rate: l.rate().map(|r| r.to_string()),
                burst: l.rate().map(|r| r.burst),
                line: l.line(),
            })
            .collect(),
        tcp,
    }
}

impl MatrixRoute {
    /// The methods joined with `,`, or `*` for any method.
    pub fn methods_text(&self) -> String {
        if self.methods.is_empty() {
            "*".to_owned()
        } else {
            self.methods.join(",")
        }
    }
}

impl Matrix {
    /// The table's cells as text, header row first: `route`, `methods`, `path`, then one column
    /// per caller holding `allow` or `-`. Every rendering (text, HTML) shows exactly these.
    pub fn cells(&self) -> Vec<Vec<String>> {
        let mut header = vec!["route".to_owned(), "methods".to_owned(), "path".to_owned()];
        header.extend(self.callers.iter().map(|c| c.name.clone()));
        let mut rows = vec![header];
        for r in self.routes.iter().chain(&self.tcp) {
            let mut row = vec![r.name.clone(), r.methods_text(), r.path.clone()];
            row.extend(r.allowed_by.iter().map(|a| match a {
                Some(_) => "allow".to_owned(),
                None => "-".to_owned(),
            }));
            rows.push(row);
        }
        rows
    }

    /// A plain-text table: one row per route, one column per caller.
    pub fn to_table(&self) -> String {
        let rows = self.cells();
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = format!(
            "{}: trust domain {}, mode {}, {} routes\n\n",
            self.file,
            self.trust_domain,
            self.mode,
            self.routes.len()
        );
        for row in rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out.push_str("\nidentities:\n");
        for c in &self.callers {
            let _ = writeln!(out, "  {} = {}", c.name, c.identity);
        }
        if !self.limits.is_empty() {
            out.push_str("\nlimits (per caller identity):\n");
            for l in &self.limits {
                let mut bounds = Vec::new();
                if let Some(c) = l.concurrency {
                    bounds.push(format!("concurrency {c}"));
                }
                if let (Some(r), Some(b)) = (&l.rate, l.burst) {
                    bounds.push(format!("rate {r} (burst {b})"));
                }
                let _ = writeln!(
                    out,
                    "  {}{}: {}{}  (line {})",
                    l.caller,
                    l.route
                        .as_ref()
                        .map_or(String::new(), |r| format!(" on route `{r}`")),
                    bounds.join(", "),
                    if l.per_identity {
                        "; each matching identity has its own budget"
                    } else {
                        ""
                    },
                    l.line
                );
            }
        }
        out
    }

    /// A Mermaid flowchart: callers on the left, an arrow to each route that admits them.
    /// Paste it inside a ```` ```mermaid ```` block.
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        for (i, c) in self.callers.iter().enumerate() {
            let _ = writeln!(out, "  c{i}([\"{}\"])", escape(&c.name));
        }
        for (i, r) in self.routes.iter().chain(&self.tcp).enumerate() {
            let _ = writeln!(
                out,
                "  r{i}[\"{}<br/>{} {}\"]",
                escape(&r.name),
                escape(&r.methods_text()),
                escape(&r.path)
            );
        }
        for (ri, r) in self.routes.iter().chain(&self.tcp).enumerate() {
            for (ci, a) in r.allowed_by.iter().enumerate() {
                if a.is_some() {
                    let _ = writeln!(out, "  c{ci} --> r{ri}");
                }
            }
        }
        out
    }
}

/// Mermaid labels are quoted strings; entity codes keep quotes and markup characters literal.
pub(crate) fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' => "#quot;".to_owned(),
            '<' => "#lt;".to_owned(),
            '>' => "#gt;".to_owned(),
            '#' => "#35;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}
