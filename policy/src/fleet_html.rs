//! `policy explain --fleet … --format html`: the fleet map as one self-contained HTML file for
//! a reviewer's browser and printer.
//!
//! No script, font, stylesheet or image is loaded: the style is inline, the graph is an inline
//! SVG laid out here (nodes on a circle, arrows curved so that A→B and B→A never overlap), and a
//! Content-Security-Policy meta tag (`default-src 'none'`) makes the browser refuse any load
//! that a later edit might add. The matrices are real `<table>`s with a caption and scoped
//! header cells; their cells are [`Matrix::cells`], the same text `policy explain` prints.
//! `@page { size: A4 }` and a print stylesheet keep each service's section on its own page.

use std::f64::consts::PI;
use std::fmt::Write as _;

use crate::explain::Matrix;
use crate::fleet::{Fleet, Node};

const CSS: &str = r#"
:root { --fg:#1a1a1a; --muted:#555; --line:#999; --allow:#0b6b2e; --allow-bg:#e3f4e8; --warn:#b00020; --warn-bg:#fdecee; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg); margin: 2rem auto; max-width: 72rem; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; } h2 { font-size: 1.25rem; margin: 2rem 0 .4rem; border-bottom: 2px solid #ddd; padding-bottom: .2rem; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .88em; }
.meta { color: var(--muted); margin: .2rem 0; } .meta dt { font-weight: 600; float: left; clear: left; width: 7rem; } .meta dd { margin: 0 0 .1rem 7.5rem; word-break: break-all; }
table { border-collapse: collapse; margin: .6rem 0 1rem; min-width: 50%; }
caption { text-align: left; font-weight: 600; padding: .3rem 0; }
th, td { border: 1px solid #bbb; padding: .3rem .6rem; text-align: left; vertical-align: top; }
thead th { background: #f1f1f1; } th[scope=row] { font-weight: 600; background: #fafafa; }
td.allow { background: var(--allow-bg); color: var(--allow); font-weight: 700; text-align: center; }
td.deny { color: #888; text-align: center; }
th.wildcard, td.wildcard { outline: 3px solid var(--warn); outline-offset: -3px; }
.badge { display: inline-block; border-radius: .3rem; padding: 0 .4rem; font-size: .8rem; font-weight: 700; border: 1px solid; }
.badge.enforce { color: var(--allow); border-color: var(--allow); } .badge.audit { color: #fff; background: var(--warn); border-color: var(--warn); }
.findings li { margin: .3rem 0; } .findings li.hl { background: var(--warn-bg); border-left: 4px solid var(--warn); padding: .2rem .5rem; list-style: none; margin-left: -1.2rem; }
.findings .code { font-weight: 700; }
figure { margin: 1rem 0; } figcaption { color: var(--muted); font-size: .9rem; }
svg { max-width: 100%; height: auto; }
svg .node rect { fill: #fff; stroke: #333; stroke-width: 1.5; } svg .node.service rect { fill: #eef3fb; stroke: #1f4e8c; }
svg .node.wildcard rect { stroke: var(--warn); stroke-width: 3; fill: var(--warn-bg); }
svg .node text { font: 600 14px system-ui, "DejaVu Sans", sans-serif; fill: #111; } svg .node text.id { font: 11px ui-monospace, "DejaVu Sans Mono", monospace; fill: #444; }
svg .edge path { fill: none; stroke: #333; stroke-width: 1.6; } svg .edge.nogrant path { stroke: var(--warn); stroke-dasharray: 6 4; }
svg .edge.noout path { stroke: #777; stroke-dasharray: 2 4; }
svg .edge text { font: 12px system-ui, "DejaVu Sans", sans-serif; fill: #111; paint-order: stroke; stroke: #fff; stroke-width: 4px; }
.legend span { margin-right: 1.2rem; }
@page { size: A4; margin: 14mm; }
@media print {
  body { margin: 0; max-width: none; font-size: 10.5pt; }
  section.service { break-before: page; } table, figure, li { break-inside: avoid; }
  td.allow, .badge.audit, .findings li.hl, thead th { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"#;

/// Escapes text for HTML element content and quoted attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

impl Fleet {
    /// The map as one self-contained HTML document.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>Gatehouse fleet access map</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        );
        let with_policy = self.with_policy().count();
        let highlighted = self.findings.iter().filter(|f| f.is_highlighted()).count();
        let _ = writeln!(
            h,
            "<header><h1>Gatehouse fleet access map</h1>\n<p class=\"meta\">{with_policy} service(s) with an inbound policy, {} sidecar config(s) without one; {} finding(s), {highlighted} highlighted. Generated by <code>policy explain --fleet --format html</code>.</p></header>\n<main>",
            self.services.len() - with_policy,
            self.findings.len()
        );
        h.push_str("<section id=\"graph\" aria-labelledby=\"graph-h\">\n<h2 id=\"graph-h\">Who can call whom</h2>\n");
        h.push_str(&self.svg());
        h.push_str(&self.edge_table());
        h.push_str("</section>\n");
        h.push_str(&self.findings_html());
        for s in &self.services {
            let _ = writeln!(
                h,
                "<section class=\"service\" id=\"svc-{}\" aria-labelledby=\"svc-{}-h\">\n<h2 id=\"svc-{}-h\">{}</h2>\n<dl class=\"meta\">",
                esc(&s.name),
                esc(&s.name),
                esc(&s.name),
                esc(&s.name)
            );
            let _ = writeln!(
                h,
                "<dt>identity</dt><dd><code>{}</code></dd>",
                esc(s.identity.as_deref().unwrap_or("unknown"))
            );
            if let Some(sidecar) = &s.sidecar {
                let _ = writeln!(h, "<dt>sidecar</dt><dd><code>{}</code></dd>", esc(sidecar));
            }
            for o in &s.outbound {
                let _ = writeln!(
                    h,
                    "<dt>outbound</dt><dd><code>{}</code> ({}) → <code>{}</code> at <code>{}</code>{}</dd>",
                    esc(&o.name),
                    o.kind,
                    esc(&o.target),
                    esc(&o.connect),
                    o.server_id
                        .as_ref()
                        .map(|id| format!(", pins <code>{}</code>", esc(id)))
                        .unwrap_or_default()
                );
            }
            match &s.policy {
                Some(p) => {
                    let _ = writeln!(
                        h,
                        "<dt>policy</dt><dd><code>{}</code> <span class=\"badge {}\">{}</span></dd>\n<dt>SHA-256</dt><dd><code class=\"sha\">{}</code></dd>\n</dl>",
                        esc(&p.file),
                        p.matrix.mode,
                        if p.matrix.mode == "audit" {
                            "AUDIT MODE: denials not enforced"
                        } else {
                            "enforce"
                        },
                        p.sha256
                    );
                    h.push_str(&matrix_table(&s.name, &p.matrix));
                    h.push_str("<p class=\"meta\">Identities:</p>\n<ul class=\"mono\">\n");
                    for c in &p.matrix.callers {
                        let _ = writeln!(
                            h,
                            "<li>{} = {}{}</li>",
                            esc(&c.name),
                            esc(&c.identity),
                            if c.wildcard {
                                " <strong class=\"badge audit\">wildcard</strong>"
                            } else {
                                ""
                            }
                        );
                    }
                    h.push_str("</ul>\n");
                }
                None => h.push_str(
                    "<dt>policy</dt><dd>none: no inbound listener, nothing can call it</dd>\n</dl>\n",
                ),
            }
            h.push_str("</section>\n");
        }
        h.push_str("</main>\n</body>\n</html>\n");
        h
    }

    fn edge_table(&self) -> String {
        let mut h = String::from(
            "<table id=\"edges\">\n<caption>Every caller → service pair: the routes granted by the service's policy, and the caller's outbound listeners toward it</caption>\n<thead><tr><th scope=\"col\">caller</th><th scope=\"col\">service</th><th scope=\"col\">routes granted</th><th scope=\"col\">outbound listener</th></tr></thead>\n<tbody>\n",
        );
        for e in &self.edges {
            let granted = if self.caller_unknown(e) {
                "unknown: the caller's identity is unknown".to_owned()
            } else if e.granted.is_empty() {
                "<strong>none</strong>".to_owned()
            } else {
                e.granted
                    .iter()
                    .map(|g| esc(g))
                    .collect::<Vec<_>>()
                    .join("<br>")
            };
            let _ = writeln!(
                h,
                "<tr><th scope=\"row\">{}</th><td>{}</td><td>{granted}</td><td>{}</td></tr>",
                esc(self.label(&e.from)),
                esc(&e.to),
                if e.outbound.is_empty() {
                    "-".to_owned()
                } else {
                    esc(&e.outbound.join(", "))
                }
            );
        }
        h.push_str("</tbody>\n</table>\n");
        h
    }

    fn findings_html(&self) -> String {
        let mut h = String::from(
            "<section id=\"findings\" aria-labelledby=\"findings-h\">\n<h2 id=\"findings-h\">Findings</h2>\n",
        );
        if self.findings.is_empty() {
            h.push_str("<p>None: no wildcard identity, no policy in audit mode, every outbound listener is granted something.</p>\n");
        } else {
            h.push_str("<ul class=\"findings\">\n");
            for f in &self.findings {
                let _ = writeln!(
                    h,
                    "<li{}><span class=\"code\">{}{}</span> ({}): {}<br><small>help: {}</small></li>",
                    if f.is_highlighted() {
                        " class=\"hl\""
                    } else {
                        ""
                    },
                    if f.is_highlighted() { "⚠ " } else { "" },
                    f.code,
                    esc(&f.service),
                    esc(&f.message),
                    esc(&f.help)
                );
            }
            h.push_str("</ul>\n");
        }
        h.push_str("</section>\n");
        h
    }

    /// The graph: nodes on a circle, one curved arrow per edge.
    fn svg(&self) -> String {
        const W: f64 = 250.0;
        const H: f64 = 50.0;
        let n = self.nodes.len().max(1);
        let r = (90.0 + 45.0 * n as f64).min(320.0);
        let (width, height) = (2.0 * r + W + 120.0, 2.0 * r + H + 80.0);
        let (cx, cy) = (width / 2.0, height / 2.0);
        let pos: Vec<(f64, f64)> = (0..n)
            .map(|i| {
                let a = -PI / 2.0 + 2.0 * PI * i as f64 / n as f64;
                (cx + r * a.cos(), cy + r * a.sin())
            })
            .collect();
        let at = |key: &str| {
            self.nodes
                .iter()
                .position(|nd| nd.key == key)
                .map_or((cx, cy), |i| pos[i])
        };
        let mut s = format!(
            "<figure>\n<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width:.0} {height:.0}\" width=\"{width:.0}\" height=\"{height:.0}\" role=\"img\" aria-labelledby=\"graph-title graph-desc\">\n<title id=\"graph-title\">Fleet graph</title>\n<desc id=\"graph-desc\">{}</desc>\n<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#333\"/></marker>\
             <marker id=\"arrow-warn\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#b00020\"/></marker></defs>\n",
            esc(&self
                .edges
                .iter()
                .map(|e| format!(
                    "{} calls {}: {} route(s)",
                    self.label(&e.from),
                    e.to,
                    e.granted.len()
                ))
                .collect::<Vec<_>>()
                .join("; "))
        );
        for e in &self.edges {
            let (a, b) = (at(&e.from), at(&e.to));
            let (dx, dy) = (b.0 - a.0, b.1 - a.1);
            let len = dx.hypot(dy).max(1.0);
            let (ux, uy) = (dx / len, dy / len);
            // Leave each box where the straight line crosses its border.
            let clip = |ux: f64, uy: f64| {
                let tx = if ux.abs() > 1e-9 {
                    W / 2.0 / ux.abs()
                } else {
                    f64::MAX
                };
                let ty = if uy.abs() > 1e-9 {
                    H / 2.0 / uy.abs()
                } else {
                    f64::MAX
                };
                tx.min(ty) + 4.0
            };
            let t = clip(ux, uy);
            let (sx, sy) = (a.0 + ux * t, a.1 + uy * t);
            let (ex, ey) = (b.0 - ux * t, b.1 - uy * t);
            // Bend to the right of the direction of travel: the reverse edge bends the other way.
            let bend = 64.0;
            let (mx, my) = ((sx + ex) / 2.0 - uy * bend, (sy + ey) / 2.0 + ux * bend);
            // The label sits a third of the way along the curve, nearer the caller, so the labels
            // of A→B and B→A (and of an edge crossing the centre) do not land on each other.
            let t = 0.33_f64;
            let at_t = |p0: f64, p1: f64, p2: f64| {
                (1.0 - t).powi(2) * p0 + 2.0 * t * (1.0 - t) * p1 + t * t * p2
            };
            let (lx, ly) = (at_t(sx, mx, ex), at_t(sy, my, ey));
            let (class, marker, label) = match (e.granted.len(), e.outbound.is_empty()) {
                (0, _) if self.caller_unknown(e) => {
                    ("edge noout", "arrow", "caller identity unknown".to_owned())
                }
                (0, _) => ("edge nogrant", "arrow-warn", "no route granted".to_owned()),
                (k, true) => ("edge noout", "arrow", format!("{k} route(s), no listener")),
                (k, false) => ("edge", "arrow", format!("{k} route(s)")),
            };
            let _ = writeln!(
                s,
                "<g class=\"{class}\"><path d=\"M{sx:.1},{sy:.1} Q{mx:.1},{my:.1} {ex:.1},{ey:.1}\" marker-end=\"url(#{marker})\"/><text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"middle\">{}</text></g>",
                esc(&label)
            );
        }
        for (node, (x, y)) in self.nodes.iter().zip(&pos) {
            s.push_str(&svg_node(node, *x, *y, W, H));
        }
        s.push_str("</svg>\n<figcaption class=\"legend\"><span>Boxes: services (blue), outside callers (white), wildcard identities (red).</span><span>Solid arrow: routes granted and an outbound listener configured.</span><span>Dotted grey: granted, no listener in the map.</span><span>Dashed red: a listener whose calls the target's policy denies.</span></figcaption>\n</figure>\n");
        s
    }
}

fn svg_node(node: &Node, x: f64, y: f64, w: f64, h: f64) -> String {
    let id = node.identity.as_deref().unwrap_or("identity unknown");
    let short = if id.chars().count() > 36 {
        format!(
            "…{}",
            id.chars().skip(id.chars().count() - 35).collect::<String>()
        )
    } else {
        id.to_owned()
    };
    format!(
        "<g class=\"node {}\"><title>{}</title><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w}\" height=\"{h}\" rx=\"8\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text><text class=\"id\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text></g>\n",
        node.kind,
        esc(id),
        x - w / 2.0,
        y - h / 2.0,
        y - 4.0,
        esc(&node.label),
        y + 14.0,
        esc(&short)
    )
}

/// One service's matrix as an accessible table: the route name heads each row.
fn matrix_table(service: &str, m: &Matrix) -> String {
    let cells = m.cells();
    let mut h = format!(
        "<table class=\"matrix\" id=\"matrix-{}\">\n<caption>Who may call {}: callers (columns) × routes (rows), {} mode</caption>\n<thead><tr>",
        esc(service),
        esc(service),
        m.mode
    );
    for (i, c) in cells[0].iter().enumerate() {
        let wildcard = i >= 3 && m.callers[i - 3].wildcard;
        let _ = write!(
            h,
            "<th scope=\"col\"{}>{}</th>",
            if wildcard { " class=\"wildcard\"" } else { "" },
            esc(c)
        );
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for row in &cells[1..] {
        h.push_str("<tr>");
        for (i, c) in row.iter().enumerate() {
            match i {
                0 => {
                    let _ = write!(h, "<th scope=\"row\">{}</th>", esc(c));
                }
                1 | 2 => {
                    let _ = write!(h, "<td><code>{}</code></td>", esc(c));
                }
                _ => {
                    let wildcard = m.callers[i - 3].wildcard;
                    let _ = write!(
                        h,
                        "<td class=\"{}{}\">{}</td>",
                        if c == "allow" { "allow" } else { "deny" },
                        if wildcard { " wildcard" } else { "" },
                        esc(c)
                    );
                }
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");
    h
}
