//! What an audit line records ([`AuditRecord`], [`OutboundRecord`]) and the JSON pieces it
//! is made of, written straight into the line's buffer (no `serde`, no
//! allocation): strings escaped, numbers and durations in decimal, trace ids in hex.

use std::time::Duration;

use gatehouse_policy::SpiffeId;

use crate::hexdigits;
use crate::outcome::Outcome;

/// One inbound decision, as logged.
#[derive(Debug)]
pub(crate) struct AuditRecord<'a> {
    /// The request id (also sent to the app and in error bodies).
    pub request_id: &'a str,
    /// The W3C trace id of the request's `traceparent` (logged as 32 lowercase hex digits), if
    /// valid.
    pub trace_id: Option<&'a [u8; 16]>,
    /// The verified caller.
    pub caller: &'a SpiffeId,
    /// The serial number of the caller's certificate, lowercase hex.
    pub caller_serial: &'a str,
    /// SHA-256 of the policy file that decided, lowercase hex.
    pub policy_sha256: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Normalized path (raw when refused).
    pub path: &'a str,
    /// Deciding route, if any.
    pub route: Option<&'a str>,
    /// What became of it: `decision` (`allow`, `deny`, `audit_deny` or `reject`: refused
    /// before or without the policy's say), `reason` (`allowed`, `no_route`, `not_allowed`,
    /// `bad_path`, `bad_method`, `bad_transfer_encoding`, `unsupported_transfer_coding` or
    /// `peer_not_trusted`) and the status sent to the caller.
    pub outcome: Outcome,
    /// Time from request head to response head.
    pub duration: Duration,
}

/// One outbound request, as logged.
#[derive(Debug)]
pub(crate) struct OutboundRecord<'a> {
    /// The request id (the app's or the one the sidecar assigned; the peer logs the same).
    pub request_id: &'a str,
    /// The W3C trace id sent upstream (the app's, or the one the sidecar created).
    pub trace_id: Option<&'a [u8; 16]>,
    /// The `[[outbound]]` entry's name.
    pub upstream: &'a str,
    /// The peer's pinned SPIFFE ID.
    pub server_id: &'a str,
    /// The serial number of the server's certificate, lowercase hex, when a connection was
    /// made.
    pub server_serial: Option<&'a str>,
    /// HTTP method.
    pub method: &'a str,
    /// Request path as the app sent it.
    pub path: &'a str,
    /// What became of it: the status sent to the app, and `reason`: `forwarded`, or why the
    /// sidecar answered itself.
    pub outcome: Outcome,
    /// Time from request head to response head.
    pub duration: Duration,
}

/// Appends a trace id as a JSON string, or `null`.
pub(super) fn push_trace_id(buf: &mut Vec<u8>, id: Option<&[u8; 16]>) {
    match id {
        Some(id) => {
            let mut text = [b'"'; 34];
            hexdigits::encode_into(&mut text[1..33], id);
            buf.extend_from_slice(&text);
        }
        None => buf.extend_from_slice(b"null"),
    }
}

/// Appends `n` in decimal.
pub(super) fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        // Invariant: n % 10 < 10.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

/// Appends `d` in milliseconds with three decimals (rounded to the microsecond).
pub(super) fn push_millis(buf: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_nanos().saturating_add(500) / 1000).unwrap_or(u64::MAX);
    push_u64(buf, micros / 1000);
    let frac = micros % 1000;
    // Invariant: each digit is < 10.
    buf.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// Appends `s` as a JSON string literal (RFC 8259 §7: quote, backslash and control characters
/// escaped), without an intermediate allocation.
pub(super) fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    let bytes = s.as_bytes();
    if !needs_escape(bytes) {
        // The common case (ids, paths, route names): one branch-free scan, one copy.
        buf.extend_from_slice(bytes);
        buf.push(b'"');
        return;
    }
    // Runs of bytes that need no escape are copied whole; every escaped byte is ASCII, so the
    // output stays UTF-8.
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            b if b < 0x20 => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[run..i]);
        if esc.is_empty() {
            let [hi, lo] = hexdigits::pair(b);
            buf.extend_from_slice(&[b'\\', b'u', b'0', b'0', hi, lo]);
        } else {
            buf.extend_from_slice(esc);
        }
        run = i + 1;
    }
    buf.extend_from_slice(&bytes[run..]);
    buf.push(b'"');
}

/// Whether any byte of `s` must be escaped in a JSON string.
fn needs_escape(s: &[u8]) -> bool {
    // Sixteen bytes at a time, without early exit inside a block: the compiler turns each block
    // into a few SIMD compares (a byte-at-a-time fold cost about five instructions a byte, and
    // a line scans some 250 bytes). The tail is padded with a byte that needs no escape.
    fn block(b: &[u8; 16]) -> bool {
        b.iter().fold(false, |acc, &c| {
            acc | (c == b'"') | (c == b'\\') | (c < 0x20)
        })
    }
    let (blocks, tail) = s.as_chunks::<16>();
    let mut last = [b' '; 16];
    last[..tail.len()].copy_from_slice(tail);
    blocks.iter().any(block) || block(&last)
}
