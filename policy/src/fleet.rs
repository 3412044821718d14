//! `policy explain --fleet DIR…`: who can call what across a fleet of services.
//!
//! A service is a directory holding a `policy.toml` and/or a `sidecar.toml`. Each given
//! directory is a service itself when it holds one of them, else every immediate subdirectory
//! that does is one (so `deploy/examples/fintech` and `deploy/examples/fintech/monolith` both
//! work). The policy file is the sidecar config's `[inbound] policy` when set, else
//! `policy.toml` next to it.
//!
//! From each policy the map takes [`explain::matrix`] (no second matcher: the cells are the
//! ones `policy explain FILE` prints) and [`review::review`]'s findings; from each sidecar config
//! only the keys it needs (`[identity] spiffe_id`, `[inbound] listen/policy`, `[[outbound]]` and
//! `[[tcp_outbound]]` `name/connect/server_id`), tolerating every other key, because this crate
//! cannot depend on the proxy's config types.
//!
//! A service's identity is its `[identity] spiffe_id` when set, else the `server_id` another
//! sidecar pins when it connects to this service's inbound `listen` address; when neither says,
//! it is unknown and the caller columns naming it stay separate identity nodes. An outbound
//! listener's target is the service whose inbound `listen` equals its `connect`, else the one
//! whose identity is its `server_id`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::compile::{Policy, toml_diagnostic};
use crate::explain::{self, Matrix};
use crate::review;
use crate::source::{Diagnostic, SourceFile};

/// The file names a service directory is recognised by.
pub const POLICY_FILE: &str = "policy.toml";
/// See [`POLICY_FILE`].
pub const SIDECAR_FILE: &str = "sidecar.toml";

/// The whole map.
#[derive(Debug, Clone, Serialize)]
pub struct Fleet {
    /// Every service directory found, in the order given (subdirectories sorted by name).
    pub services: Vec<Service>,
    /// The graph's nodes: every service, then every caller identity that is no service.
    pub nodes: Vec<Node>,
    /// Who can call whom: one edge per (caller node, service) with a grant or an outbound
    /// listener, sorted by caller then target.
    pub edges: Vec<Edge>,
    /// Review findings of every policy, then the fleet's own (see [`Finding::code`]).
    pub findings: Vec<Finding>,
}

/// One service directory.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    /// The directory's name.
    pub name: String,
    /// The directory as found.
    pub dir: String,
    /// Its SPIFFE ID, when the configs say (see the module documentation).
    pub identity: Option<String>,
    /// The sidecar config, when there is one.
    pub sidecar: Option<String>,
    /// The inbound policy, when there is one (an outbound-only sidecar has none).
    pub policy: Option<PolicyInfo>,
    /// The sidecar's outbound listeners.
    pub outbound: Vec<Outbound>,
}

/// A service's inbound policy.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyInfo {
    /// The file.
    pub file: String,
    /// SHA-256 of the file's bytes, lowercase hex: what was reviewed.
    pub sha256: String,
    /// The caller × route matrix, exactly as `policy explain FILE` computes it.
    pub matrix: Matrix,
}

/// One `[[outbound]]` or `[[tcp_outbound]]` listener of a sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct Outbound {
    /// `"http"` (`[[outbound]]`) or `"tcp"` (`[[tcp_outbound]]`).
    pub kind: &'static str,
    /// The listener's name.
    pub name: String,
    /// Where it connects.
    pub connect: String,
    /// The identity it requires of the server.
    pub server_id: Option<String>,
    /// The node it reaches: a service of the map, else its `server_id` (or `connect`).
    pub target: String,
}

/// A node of the graph.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// A service's name, or the identity (pattern) a caller column stands for.
    pub key: String,
    /// What to print: the service's name, or the alias the policies use.
    pub label: String,
    /// `"service"`, `"identity"` (a caller that is no service of the map) or `"wildcard"`.
    pub kind: &'static str,
    /// The SPIFFE ID or pattern, when known.
    pub identity: Option<String>,
}

/// One arrow: what `from` may call on `to`, and whether `from`'s sidecar has a listener for it.
#[derive(Debug, Clone, Serialize)]
pub struct Edge {
    /// A node key.
    pub from: String,
    /// A node key (a service, unless an outbound listener reaches outside the map).
    pub to: String,
    /// The routes of `to`'s policy that admit `from`: `METHODS PATH (route name)`.
    pub granted: Vec<String>,
    /// `from`'s outbound listeners toward `to`.
    pub outbound: Vec<String>,
}

/// A finding a reviewer should look at.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// A [`review::Warning`] code (`wildcard-identity`, `audit-mode`, …) or one of the fleet's:
    /// `outbound-without-grant` (a sidecar connects to a service whose policy grants it
    /// nothing: every request will be denied), `outbound-outside-map` (it connects to no
    /// service of the map), `unknown-identity` (a service's identity cannot be determined, so
    /// its outbound listeners cannot be checked against the policies).
    pub code: &'static str,
    /// The service it is about.
    pub service: String,
    /// What and where (`file:line:col` for policy findings).
    pub message: String,
    /// What to do.
    pub help: String,
}

impl Finding {
    /// Findings a reviewer must see first: a wildcard identity, audit mode, `*` on write.
    pub fn is_highlighted(&self) -> bool {
        matches!(
            self.code,
            "wildcard-identity" | "audit-mode" | "star-on-write" | "outbound-without-grant"
        )
    }
}

/// The keys of a sidecar config the map needs; every other key is ignored.
#[derive(Debug, Default, Deserialize)]
struct RawSidecar {
    identity: Option<RawIdentity>,
    inbound: Option<RawInbound>,
    #[serde(default)]
    outbound: Vec<RawOutbound>,
    #[serde(default)]
    tcp_outbound: Vec<RawOutbound>,
}

#[derive(Debug, Default, Deserialize)]
struct RawIdentity {
    spiffe_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawInbound {
    listen: Option<String>,
    policy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawOutbound {
    name: Option<String>,
    connect: Option<String>,
    server_id: Option<String>,
}

/// What was read from one directory before the services are linked.
struct Found {
    name: String,
    dir: PathBuf,
    sidecar: Option<(String, RawSidecar)>,
    policy: Option<(String, String, Policy)>,
}

/// Finds the service directories under `dirs` (see the module documentation).
///
/// # Errors
/// One diagnostic per directory that cannot be read or holds no service.
pub fn discover(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, Vec<Diagnostic>> {
    let is_service = |d: &Path| d.join(POLICY_FILE).is_file() || d.join(SIDECAR_FILE).is_file();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for dir in dirs {
        if is_service(dir) {
            out.push(dir.clone());
            continue;
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(Diagnostic::whole_file(
                    dir.display().to_string(),
                    format!("cannot read the directory: {e}"),
                    "pass a directory holding service directories, or one service's directory",
                ));
                continue;
            }
        };
        let mut subs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir() && is_service(p))
            .collect();
        if subs.is_empty() {
            errors.push(Diagnostic::whole_file(
                dir.display().to_string(),
                format!("no {POLICY_FILE} or {SIDECAR_FILE} here or in a subdirectory"),
                "pass the directory that holds one directory per service (each with policy.toml and/or sidecar.toml)",
            ));
        }
        subs.sort();
        out.extend(subs);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Reads every service under `dirs` and links them into the map.
///
/// # Errors
/// Every problem found in every file (policy load errors, sidecar config syntax errors,
/// unreadable files), all at once.
pub fn load(dirs: &[PathBuf]) -> Result<Fleet, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut found = Vec::new();
    for dir in discover(dirs)? {
        match read_service(&dir) {
            Ok(f) => found.push(f),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(link(found))
    } else {
        Err(errors)
    }
}

fn read_service(dir: &Path) -> Result<Found, Vec<Diagnostic>> {
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    let mut errors = Vec::new();
    let sidecar_path = dir.join(SIDECAR_FILE);
    let sidecar = if sidecar_path.is_file() {
        match SourceFile::read(&sidecar_path) {
            Ok(src) => match toml::from_str::<RawSidecar>(src.text()) {
                Ok(raw) => Some((src.name().to_owned(), raw)),
                Err(e) => {
                    errors.push(toml_diagnostic(&src, &e));
                    None
                }
            },
            Err(d) => {
                errors.push(d);
                None
            }
        }
    } else {
        None
    };
    let policy_path = match sidecar
        .as_ref()
        .and_then(|(_, s)| s.inbound.as_ref()?.policy.as_ref())
    {
        Some(p) => Some(dir.join(p)),
        None => Some(dir.join(POLICY_FILE)).filter(|p| p.is_file()),
    };
    let policy = match policy_path {
        Some(path) => match read_policy(&path) {
            Ok(p) => Some(p),
            Err(mut e) => {
                errors.append(&mut e);
                None
            }
        },
        None => None,
    };
    if errors.is_empty() {
        Ok(Found {
            name,
            dir: dir.to_path_buf(),
            sidecar,
            policy,
        })
    } else {
        Err(errors)
    }
}

/// Reads the bytes once, so the hash is of exactly what was compiled.
fn read_policy(path: &Path) -> Result<(String, String, Policy), Vec<Diagnostic>> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| {
        vec![Diagnostic::whole_file(
            &name,
            format!("cannot read the policy file: {e}"),
            "check the path (a sidecar config's `[inbound] policy` is relative to the config)",
        )]
    })?;
    let sha = hex::encode(Sha256::digest(&bytes));
    let text = String::from_utf8(bytes).map_err(|_| {
        vec![Diagnostic::whole_file(
            &name,
            "the policy file is not UTF-8 text",
            "save it as UTF-8",
        )]
    })?;
    let policy = Policy::compile(&SourceFile::new(&name, text))?;
    Ok((name, sha, policy))
}

/// A sidecar's `[[outbound]]` then `[[tcp_outbound]]` listeners, with their kind.
fn outbounds(f: &Found) -> Vec<(&'static str, &RawOutbound)> {
    f.sidecar
        .iter()
        .flat_map(|(_, s)| {
            s.outbound
                .iter()
                .map(|o| ("http", o))
                .chain(s.tcp_outbound.iter().map(|o| ("tcp", o)))
        })
        .collect()
}

fn edge<'a>(edges: &'a mut BTreeMap<(String, String), Edge>, from: &str, to: &str) -> &'a mut Edge {
    edges
        .entry((from.to_owned(), to.to_owned()))
        .or_insert_with(|| Edge {
            from: from.to_owned(),
            to: to.to_owned(),
            granted: Vec::new(),
            outbound: Vec::new(),
        })
}

fn link(found: Vec<Found>) -> Fleet {
    let listen_of = |f: &Found| {
        f.sidecar
            .as_ref()
            .and_then(|(_, s)| s.inbound.as_ref()?.listen.clone())
    };
    // Identities: declared, else pinned by whoever connects to the inbound listener.
    let identities: Vec<Option<String>> = found
        .iter()
        .map(|f| {
            let declared = f
                .sidecar
                .as_ref()
                .and_then(|(_, s)| s.identity.as_ref()?.spiffe_id.clone());
            declared.or_else(|| {
                let listen = listen_of(f)?;
                found.iter().flat_map(outbounds).find_map(|(_, o)| {
                    (o.connect.as_deref() == Some(listen.as_str()))
                        .then(|| o.server_id.clone())
                        .flatten()
                })
            })
        })
        .collect();
    let mut nodes: Vec<Node> = found
        .iter()
        .zip(&identities)
        .map(|(f, id)| Node {
            key: f.name.clone(),
            label: f.name.clone(),
            kind: "service",
            identity: id.clone(),
        })
        .collect();
    let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
    let mut services = Vec::new();
    let mut findings = Vec::new();
    for (f, identity) in found.iter().zip(&identities) {
        let policy = f.policy.as_ref().map(|(file, sha, p)| {
            for w in review::review(p) {
                findings.push(Finding {
                    code: w.code,
                    service: f.name.clone(),
                    message: format!(
                        "{}:{}:{}: {}",
                        w.diagnostic.file,
                        w.diagnostic.line,
                        w.diagnostic.col,
                        w.diagnostic.message
                    ),
                    help: w.diagnostic.help,
                });
            }
            PolicyInfo {
                file: file.clone(),
                sha256: sha.clone(),
                matrix: explain::matrix(p),
            }
        });
        if let Some(info) = &policy {
            for (ci, caller) in info.matrix.callers.iter().enumerate() {
                let from = match identities
                    .iter()
                    .position(|id| !caller.wildcard && id.as_deref() == Some(&caller.identity))
                {
                    Some(i) => found[i].name.clone(),
                    None => {
                        if !nodes.iter().any(|n| n.key == caller.identity) {
                            nodes.push(Node {
                                key: caller.identity.clone(),
                                label: caller.name.clone(),
                                kind: if caller.wildcard {
                                    "wildcard"
                                } else {
                                    "identity"
                                },
                                identity: Some(caller.identity.clone()),
                            });
                        }
                        caller.identity.clone()
                    }
                };
                let granted: Vec<String> = info
                    .matrix
                    .routes
                    .iter()
                    .filter(|r| r.allowed_by[ci].is_some())
                    .map(|r| format!("{} {} ({})", r.methods_text(), r.path, r.name))
                    .collect();
                if !granted.is_empty() {
                    edge(&mut edges, &from, &f.name).granted.extend(granted);
                }
            }
        }
        let mut outbound = Vec::new();
        for (kind, o) in outbounds(f) {
            let connect = o.connect.clone().unwrap_or_default();
            let target = found
                .iter()
                .position(|t| listen_of(t).is_some_and(|l| l == connect))
                .or_else(|| {
                    identities
                        .iter()
                        .position(|id| id.is_some() && *id == o.server_id)
                })
                .map(|i| found[i].name.clone())
                .unwrap_or_else(|| o.server_id.clone().unwrap_or_else(|| connect.clone()));
            let name = o.name.clone().unwrap_or_else(|| connect.clone());
            edge(&mut edges, &f.name, &target)
                .outbound
                .push(name.clone());
            outbound.push(Outbound {
                kind,
                name,
                connect,
                server_id: o.server_id.clone(),
                target,
            });
        }
        if identity.is_none() && !outbound.is_empty() {
            findings.push(Finding {
                code: "unknown-identity",
                service: f.name.clone(),
                message: format!(
                    "the identity of `{}` is unknown (no `[identity] spiffe_id`, and no sidecar of the map connects to its inbound listener), so its outbound listeners cannot be checked against the policies",
                    f.name
                ),
                help: "its identity is in its certificate (`ca inspect CERT`); set `[identity] spiffe_id`, or remove the config if the sidecar is not part of the fleet (a leftover, or the example's attacker)".to_owned(),
            });
        }
        services.push(Service {
            name: f.name.clone(),
            dir: f.dir.display().to_string(),
            identity: identity.clone(),
            sidecar: f.sidecar.as_ref().map(|(n, _)| n.clone()),
            policy,
            outbound,
        });
    }
    for e in edges.values() {
        if e.outbound.is_empty() || !e.granted.is_empty() {
            continue;
        }
        let from_known = services
            .iter()
            .any(|s| s.name == e.from && s.identity.is_some());
        match services.iter().find(|s| s.name == e.to) {
            Some(target) if target.policy.is_some() && from_known => findings.push(Finding {
                code: "outbound-without-grant",
                service: e.from.clone(),
                message: format!(
                    "`{}` has outbound listener(s) {} toward `{}`, whose policy grants it no route: every request through them is denied",
                    e.from,
                    e.outbound.join(", "),
                    e.to
                ),
                help: "grant the routes it needs in the target's policy, or remove the listener".to_owned(),
            }),
            Some(_) => {}
            None => findings.push(Finding {
                code: "outbound-outside-map",
                service: e.from.clone(),
                message: format!(
                    "`{}` has outbound listener(s) {} toward `{}`, which is no service of this map",
                    e.from,
                    e.outbound.join(", "),
                    e.to
                ),
                help: "pass that service's directory too, to see what its policy grants".to_owned(),
            }),
        }
    }
    for e in edges.values() {
        if !nodes.iter().any(|n| n.key == e.to) {
            nodes.push(Node {
                key: e.to.clone(),
                label: e.to.clone(),
                kind: "identity",
                identity: e.to.starts_with("spiffe://").then(|| e.to.clone()),
            });
        }
    }
    Fleet {
        services,
        nodes,
        edges: edges.into_values().collect(),
        findings,
    }
}

impl Fleet {
    /// The services that have an inbound policy.
    pub fn with_policy(&self) -> impl Iterator<Item = (&Service, &PolicyInfo)> {
        self.services
            .iter()
            .filter_map(|s| s.policy.as_ref().map(|p| (s, p)))
    }

    /// The plain-text map: per service its identity, files, policy hash and matrix (exactly
    /// `policy explain FILE`'s table), then every edge and every finding.
    pub fn to_text(&self) -> String {
        let with_policy = self.with_policy().count();
        let mut out = format!(
            "fleet access map: {with_policy} service(s) with an inbound policy, {} sidecar config(s) without one\n",
            self.services.len() - with_policy
        );
        for s in &self.services {
            let _ = writeln!(
                out,
                "\n== {}  ({})",
                s.name,
                s.identity.as_deref().unwrap_or("identity unknown")
            );
            if let Some(sidecar) = &s.sidecar {
                let _ = writeln!(out, "sidecar: {sidecar}");
            }
            for o in &s.outbound {
                let _ = writeln!(
                    out,
                    "outbound {} ({}): {} -> {}{}",
                    o.name,
                    o.kind,
                    o.connect,
                    o.target,
                    o.server_id
                        .as_ref()
                        .map(|id| format!(", server_id {id}"))
                        .unwrap_or_default()
                );
            }
            match &s.policy {
                Some(p) => {
                    let _ = writeln!(out, "policy: {}\nsha256: {}\n", p.file, p.sha256);
                    out.push_str(&p.matrix.to_table());
                }
                None => out.push_str("policy: none (no inbound listener: nothing can call it)\n"),
            }
        }
        out.push_str("\n== who can call what\n");
        for e in &self.edges {
            let granted = if self.caller_unknown(e) {
                "unknown (the caller's identity is unknown)".to_owned()
            } else if e.granted.is_empty() {
                "no route granted".to_owned()
            } else {
                e.granted.join(", ")
            };
            let outbound = if e.outbound.is_empty() {
                String::new()
            } else {
                format!("  [outbound {}]", e.outbound.join(", "))
            };
            let _ = writeln!(
                out,
                "{} -> {}: {granted}{outbound}",
                self.label(&e.from),
                e.to
            );
        }
        out.push_str("\n== findings\n");
        if self.findings.is_empty() {
            out.push_str("none\n");
        }
        for f in &self.findings {
            let _ = writeln!(
                out,
                "{}[{}] {}\n  help: {}",
                if f.is_highlighted() {
                    "WARNING"
                } else {
                    "note"
                },
                f.code,
                f.message,
                f.help
            );
        }
        out
    }

    /// Whether `e`'s caller is a service whose identity is unknown, so what the target's
    /// policy grants it cannot be told.
    pub fn caller_unknown(&self, e: &Edge) -> bool {
        self.nodes
            .iter()
            .any(|n| n.key == e.from && n.kind == "service" && n.identity.is_none())
    }

    /// A node's label (a caller's alias, or the service name).
    pub fn label<'a>(&'a self, key: &'a str) -> &'a str {
        self.nodes
            .iter()
            .find(|n| n.key == key)
            .map_or(key, |n| n.label.as_str())
    }

    /// A Mermaid flowchart: one node per service and outside caller, an arrow per edge
    /// labelled with the routes granted; a dashed arrow for an outbound listener with no grant.
    pub fn to_mermaid(&self) -> String {
        let mut out = String::from("flowchart LR\n");
        let id = |key: &str| {
            format!(
                "n{}",
                self.nodes.iter().position(|n| n.key == key).unwrap_or(0)
            )
        };
        for (i, n) in self.nodes.iter().enumerate() {
            let label = match (&n.identity, n.kind) {
                (Some(identity), "service") => format!(
                    "{}<br/><small>{}</small>",
                    explain::escape(&n.label),
                    explain::escape(identity)
                ),
                (Some(identity), _) if *identity != n.label => format!(
                    "{}<br/><small>{}</small>",
                    explain::escape(&n.label),
                    explain::escape(identity)
                ),
                _ => explain::escape(&n.label),
            };
            let _ = match n.kind {
                "service" => writeln!(out, "  n{i}[\"{label}\"]"),
                _ => writeln!(out, "  n{i}([\"{label}\"])"),
            };
        }
        for e in &self.edges {
            if e.granted.is_empty() {
                let _ = writeln!(
                    out,
                    "  {} -. \"outbound {}, {}\" .-> {}",
                    id(&e.from),
                    explain::escape(&e.outbound.join(", ")),
                    if self.caller_unknown(e) {
                        "caller identity unknown"
                    } else {
                        "no route granted"
                    },
                    id(&e.to)
                );
            } else {
                let routes: Vec<String> = e.granted.iter().map(|g| explain::escape(g)).collect();
                let _ = writeln!(
                    out,
                    "  {} -->|\"{}\"| {}",
                    id(&e.from),
                    routes.join("<br/>"),
                    id(&e.to)
                );
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.kind == "wildcard" {
                let _ = writeln!(out, "  style n{i} stroke:#b00020,stroke-width:3px");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    const ORDERS: &str = r#"
version = 1
trust_domain = "t.internal"
mode = "audit"
[identities]
web = "spiffe://t.internal/web"
any-batch = "spiffe://t.internal/batch/*"
[[route]]
name = "list"
methods = ["GET"]
path = "/orders"
allow = ["web", "any-batch"]
"#;

    #[test]
    fn links_services_by_listen_address_and_flags_wildcards_audit_mode_and_dead_listeners() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            &[
                ("orders/policy.toml", ORDERS),
                (
                    "orders/sidecar.toml",
                    "future_key = 1\n[inbound]\nlisten = \"10.0.0.1:8443\"\npolicy = \"policy.toml\"\nunknown = true\n",
                ),
                (
                    "web/sidecar.toml",
                    "[[outbound]]\nname = \"orders\"\nconnect = \"10.0.0.1:8443\"\nserver_id = \"spiffe://t.internal/orders\"\n[identity]\nspiffe_id = \"spiffe://t.internal/web\"\n",
                ),
                (
                    "cron/sidecar.toml",
                    "[identity]\nspiffe_id = \"spiffe://t.internal/cron\"\n[[tcp_outbound]]\nname = \"orders\"\nconnect = \"10.0.0.1:8443\"\n",
                ),
            ],
        );
        let fleet = load(&[d.path().to_path_buf()]).unwrap();
        let names: Vec<&str> = fleet.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["cron", "orders", "web"]);
        assert_eq!(
            fleet.services[1].identity.as_deref(),
            Some("spiffe://t.internal/orders")
        );
        let web = fleet
            .edges
            .iter()
            .find(|e| e.from == "web" && e.to == "orders")
            .unwrap();
        assert_eq!(web.granted, ["GET /orders (list)"]);
        assert_eq!(web.outbound, ["orders"]);
        let codes: Vec<&str> = fleet.findings.iter().map(|f| f.code).collect();
        for code in ["audit-mode", "wildcard-identity", "outbound-without-grant"] {
            assert!(codes.contains(&code), "{code} missing from {codes:?}");
        }
        assert!(
            fleet
                .findings
                .iter()
                .any(|f| f.service == "cron" && f.code == "outbound-without-grant")
        );
        assert!(
            fleet
                .nodes
                .iter()
                .any(|n| n.kind == "wildcard" && n.key == "spiffe://t.internal/batch/*")
        );
        let html = fleet.to_html();
        assert!(html.contains("AUDIT MODE"));
        assert!(html.contains("<th scope=\"col\" class=\"wildcard\">any-batch</th>"));
        assert!(!html.contains("<script"));
        let text = fleet.to_text();
        assert!(text.contains("WARNING[outbound-without-grant]"), "{text}");
    }

    #[test]
    fn names_from_the_files_are_escaped_in_the_html() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            &[(
                "svc/policy.toml",
                &ORDERS.replace("name = \"list\"", "name = \"<img src=x onerror=alert(1)>\""),
            )],
        );
        let html = load(&[d.path().to_path_buf()]).unwrap().to_html();
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
        assert!(!html.contains("<img"));
    }

    #[test]
    fn a_directory_without_services_and_a_broken_config_are_reported_with_help() {
        let d = tempfile::tempdir().unwrap();
        let errors = load(&[d.path().to_path_buf()]).unwrap_err();
        assert!(errors[0].message.contains("no policy.toml or sidecar.toml"));
        write(d.path(), &[("a/sidecar.toml", "[inbound\n")]);
        let errors = load(&[d.path().to_path_buf()]).unwrap_err();
        assert_eq!(errors[0].line, 1, "{errors:?}");
        write(
            d.path(),
            &[("a/sidecar.toml", "[inbound]\npolicy = \"missing.toml\"\n")],
        );
        let errors = load(&[d.path().to_path_buf()]).unwrap_err();
        assert!(errors[0].message.contains("cannot read the policy file"));
    }
}
