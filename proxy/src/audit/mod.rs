//! The audit log: one JSON line per decision, written to stdout (default) or an append-only
//! file by a process-wide [`Sink`] that `sidecar run` [`install`]s at startup. Audit lines do
//! not go through `tracing` (no dispatch, per-layer filters or field visitors); operational
//! logs stay on `tracing` and stderr, and never enter the audit stream.
//!
//! An inbound line ([`record`]) has exactly these fields, in this order:
//! `{"time","direction":"inbound","request_id","trace_id","caller","caller_serial",
//! "policy_sha256","method","path","route","decision","reason","status","duration_ms",
//! ["chain_start",]"prev"}`; `path` is the normalized path (the raw one when normalization
//! refused it), `route` is `null` when no route matched, `trace_id` is the W3C trace id of the
//! request's valid `traceparent`, or else the one both sides derive from the request id, `caller_serial` the serial number of
//! the caller's certificate (lowercase hex) and `policy_sha256` the SHA-256 of the policy file
//! that decided. An outbound line ([`record_outbound`]): `{"time","direction":"outbound",
//! "request_id","trace_id","upstream","server_id","server_serial","method","path","status",
//! "reason","duration_ms",["chain_start",]"prev"}` (`server_serial` is `null` when no TLS
//! connection was made). `time` is RFC 3339 UTC, `duration_ms` has three decimals.
//!
//! Hash chain: `prev` is the SHA-256 (lowercase hex) of the previous line's bytes, without its
//! newline. The first line a sink writes carries `"chain_start":true`; its `prev` is the hash
//! of the last line already in the file it appends to, or [`GENESIS`] (64 zeros) for a new
//! file or a pipe. Request paths write `prev` as 64 zeros, a placeholder at a fixed distance
//! from the line's end; the writer, which sees batches in order under the output lock, fills
//! it in place just before the write, so hashing costs the request path nothing.
//! [`verify`] checks a chain (`sidecar audit verify FILE…`).
//!
//! Writing (`[audit] flush_interval`, default [`crate::config::DEFAULT_AUDIT_FLUSH_INTERVAL`]):
//! lines are formatted into an in-memory buffer and written in batches, by a small dedicated
//! thread (no async runtime needed) when the buffer passes [`FLUSH_BYTES`] or the oldest line
//! has waited the flush interval, and by [`flush`] at the end of a graceful shutdown. A batch is
//! one `write` to a file; to a pipe it is cut at line ends into writes of at most `PIPE_BUF`
//! bytes, which the kernel never interleaves with another writer's. Request paths only take
//! the buffer's lock to append a line; the write happens outside it (the buffer is swapped
//! out), and a request path waits for a write only when [`MAX_BUFFERED`] bytes are pending
//! (the output is stalled: back-pressure rather than unbounded memory or lost lines). A flush
//! interval of zero writes every line at once, from the request path (one `write` per line).
//! With `[audit] enabled = false` nothing is installed and [`record`] returns at once.

mod chain;
mod line;
mod sink;
mod tcp; // issue 17: the TCP connection line

use std::sync::OnceLock;

pub use chain::{Verified, verify};
pub(crate) use line::{AuditRecord, OutboundRecord};
pub use sink::Sink;
pub(crate) use tcp::{TcpRecord, record_tcp};

static SINK: OnceLock<Sink> = OnceLock::new();

/// Makes `sink` the process's audit sink. Only the first call installs; later ones hand their
/// sink back.
///
/// # Errors
/// The sink, when one is already installed.
pub fn install(sink: Sink) -> Result<(), Sink> {
    SINK.set(sink)
}

/// Whether an audit sink is installed (`[audit] enabled`, in `sidecar run`).
pub(crate) fn enabled() -> bool {
    SINK.get().is_some()
}

/// Logs an inbound decision (nothing when no sink is installed).
pub(crate) fn record(r: &AuditRecord<'_>) {
    if let Some(sink) = SINK.get() {
        sink.record(r);
    }
}

/// Logs an outbound request (nothing when no sink is installed).
pub(crate) fn record_outbound(r: &OutboundRecord<'_>) {
    if let Some(sink) = SINK.get() {
        sink.record_outbound(r);
    }
}

/// Writes every buffered line now and waits for the write: call at the end of a graceful
/// shutdown (after the drain), or lines of the last flush interval are lost.
pub(crate) fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush();
    }
}
