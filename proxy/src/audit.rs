//! The audit log: one JSON line per inbound decision, emitted as a `tracing` event with target
//! [`TARGET`] and written by [`AuditLayer`] to stdout (default) or an append-only file.
//!
//! An inbound line has exactly these fields, `time` first:
//! `{"time","direction":"inbound","request_id","caller","method","path","route","decision",
//! "reason","status","duration_ms"}`. Outbound lines (see `outbound::listener`) go through the
//! same layer with their own fields.
//! `path` is the normalized path (the raw one when normalization refused it), `route` is `null`
//! when no route matched. Operational logs go to stderr, never into the audit stream.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use gatehouse_policy::SpiffeId;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// The `tracing` target of audit events.
pub const TARGET: &str = "gatehouse::audit";

/// One decision, as logged.
#[derive(Debug)]
pub struct AuditRecord<'a> {
    /// The request id (also sent to the app and in error bodies).
    pub request_id: &'a str,
    /// The verified caller.
    pub caller: &'a SpiffeId,
    /// HTTP method.
    pub method: &'a str,
    /// Normalized path (raw when refused).
    pub path: &'a str,
    /// Deciding route, if any.
    pub route: Option<&'a str>,
    /// `allow`, `deny`, `audit_deny` or `reject` (path refused before the policy).
    pub decision: &'a str,
    /// `allowed`, `no_route`, `not_allowed` or `bad_path`.
    pub reason: &'a str,
    /// Response status sent to the caller.
    pub status: u16,
    /// Time from request head to response head.
    pub duration: Duration,
}

/// Emits the audit event.
pub fn record(r: &AuditRecord<'_>) {
    tracing::info!(
        target: TARGET,
        direction = "inbound",
        request_id = r.request_id,
        caller = r.caller.as_str(),
        method = r.method,
        path = r.path,
        route = r.route,
        decision = r.decision,
        reason = r.reason,
        status = r.status,
        duration_ms = r.duration.as_secs_f64() * 1000.0,
    );
}

/// Writes audit events as JSON lines; ignores every other event.
pub struct AuditLayer {
    out: Mutex<Box<dyn Write + Send>>,
}

impl AuditLayer {
    /// Audit lines to stdout.
    pub fn stdout() -> Self {
        Self {
            out: Mutex::new(Box::new(std::io::stdout())),
        }
    }

    /// Audit lines appended to `path` (created 0640 if missing).
    ///
    /// # Errors
    /// The I/O error opening the file.
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        Ok(Self {
            out: Mutex::new(Box::new(f)),
        })
    }
}

impl<S: Subscriber> Layer<S> for AuditLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut line = JsonLine {
            buf: String::with_capacity(320),
            saw_route: false,
            saw_decision: false,
        };
        line.buf.push_str("{\"time\":\"");
        let now = OffsetDateTime::now_utc();
        let _ = write!(line.buf, "{}", now.format(&Rfc3339).unwrap_or_default());
        line.buf.push('"');
        event.record(&mut line);
        if line.saw_decision && !line.saw_route {
            // tracing skips `None` fields; a decision line always has `route`, null when no
            // route matched.
            line.buf.push_str(",\"route\":null");
        }
        line.buf.push_str("}\n");
        // One write per line on an unbuffered stdout lock or O_APPEND file: lines never
        // interleave. A failed write cannot be reported anywhere better than stderr.
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out
            .write_all(line.buf.as_bytes())
            .and_then(|()| out.flush())
        {
            eprintln!("gatehouse: cannot write the audit log: {e}");
        }
    }
}

struct JsonLine {
    buf: String,
    saw_route: bool,
    saw_decision: bool,
}

impl JsonLine {
    fn key(&mut self, field: &Field) {
        self.saw_route |= field.name() == "route";
        self.saw_decision |= field.name() == "decision";
        self.buf.push_str(",\"");
        self.buf.push_str(field.name());
        self.buf.push_str("\":");
    }
}

impl Visit for JsonLine {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_str(&mut self.buf, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        let _ = write!(self.buf, "{value:.3}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // Formatted straight into the line, then escaped in place: no intermediate String.
        self.key(field);
        let start = self.buf.len();
        let _ = write!(self.buf, "{value:?}");
        if needs_escape(&self.buf.as_bytes()[start..]) {
            let raw = self.buf.split_off(start);
            push_json_str(&mut self.buf, &raw);
        } else {
            self.buf.insert(start, '"');
            self.buf.push('"');
        }
    }
}

/// Appends `s` as a JSON string literal (RFC 8259 §7: quote, backslash and control characters
/// escaped), without an intermediate allocation.
fn push_json_str(buf: &mut String, s: &str) {
    buf.push('"');
    if !needs_escape(s.as_bytes()) {
        // The common case (ids, paths, route names): one branch-free scan, one copy.
        buf.push_str(s);
        buf.push('"');
        return;
    }
    // Runs of bytes that need no escape are copied whole; every escaped character is ASCII, so
    // the run boundaries are always char boundaries.
    let mut run = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            b if b < 0x20 => "",
            _ => continue,
        };
        buf.push_str(&s[run..i]);
        if esc.is_empty() {
            let _ = write!(buf, "\\u{:04x}", b);
        } else {
            buf.push_str(esc);
        }
        run = i + 1;
    }
    buf.push_str(&s[run..]);
    buf.push('"');
}

/// Whether any byte of `s` must be escaped in a JSON string.
fn needs_escape(s: &[u8]) -> bool {
    // A fold without early exit, so the compiler can vectorize it; audit fields are short.
    s.iter().fold(false, |acc, &b| {
        acc | (b == b'"') | (b == b'\\') | (b < 0x20)
    })
}

#[cfg(test)]
mod tests {
    use super::push_json_str;

    #[test]
    fn json_strings_are_escaped() {
        for s in [
            "plain",
            "quo\"te",
            "back\\slash",
            "ctl\u{1}\n\t",
            "ünï",
            "\"ü\u{1f}é\\",
            "",
        ] {
            let mut buf = String::new();
            push_json_str(&mut buf, s);
            let back: String = serde_json::from_str(&buf).expect("valid JSON string");
            assert_eq!(back, s);
        }
    }
}
