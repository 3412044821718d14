//! The audit line of a TCP connection (issue 17), one per connection, written when it ends
//! (or at once when it is refused), through the same [`super::Sink`] and hash chain as the
//! HTTP lines: `{"time","direction":"tcp_inbound"|"tcp_outbound","listener","peer",
//! "peer_serial","policy_sha256","decision","reason","bytes_client_to_server",
//! "bytes_server_to_client","duration_ms",["chain_start",]"prev"}`.
//!
//! `peer` is the verified caller (inbound) or the pinned server identity (outbound; `null`
//! when no TLS connection was made), `policy_sha256` the policy that decided (inbound only),
//! `decision` is `allow`, `deny` or `error`, and `reason` how the connection ended: `closed`
//! (both sides finished), `idle_timeout`, `peer_not_trusted` (revoked or no longer allowed
//! after a reload), `shutdown`, `io_error`, `not_allowed`, `no_entry`, `app_unreachable` or
//! `connect_failed`. Bytes are counted from the point of view of who opened the connection.
//!
//! Beside `line` and `sink`: it writes with the sink's own line builder; it holds no state.

use std::time::Duration;

use super::line::{push_json_str, push_millis, push_u64};
use super::{SINK, Sink};

/// One TCP connection, as logged.
#[derive(Debug)]
pub(crate) struct TcpRecord<'a> {
    /// `tcp_inbound` or `tcp_outbound`.
    pub direction: &'a str,
    /// The listener's name.
    pub listener: &'a str,
    /// The verified caller (inbound) or server (outbound), when known.
    pub peer: Option<&'a str>,
    /// The serial number of the peer's certificate, lowercase hex, when known.
    pub peer_serial: Option<&'a str>,
    /// SHA-256 of the policy file that decided (inbound).
    pub policy_sha256: Option<&'a str>,
    /// `allow`, `deny` or `error`.
    pub decision: &'a str,
    /// How the connection ended (see the module docs).
    pub reason: &'a str,
    /// Bytes from the side that opened the connection to the other.
    pub bytes_client_to_server: u64,
    /// Bytes the other way.
    pub bytes_server_to_client: u64,
    /// From accept to close.
    pub duration: Duration,
    /// The request that opened it: a WebSocket tunnel's upgrade (issue 17); `None` for TCP.
    pub request_id: Option<&'a str>,
}

/// Logs a TCP connection (nothing when no sink is installed).
pub(crate) fn record_tcp(r: &TcpRecord<'_>) {
    if let Some(sink) = SINK.get() {
        sink.record_tcp(r);
    }
}

fn push_opt(b: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(s) => push_json_str(b, s),
        None => b.extend_from_slice(b"null"),
    }
}

impl Sink {
    /// Buffers a TCP connection line.
    pub(crate) fn record_tcp(&self, r: &TcpRecord<'_>) {
        self.push(|b| {
            b.extend_from_slice(b",\"direction\":");
            push_json_str(b, r.direction);
            if let Some(id) = r.request_id {
                b.extend_from_slice(b",\"request_id\":");
                push_json_str(b, id);
            }
            b.extend_from_slice(b",\"listener\":");
            push_json_str(b, r.listener);
            b.extend_from_slice(b",\"peer\":");
            push_opt(b, r.peer);
            b.extend_from_slice(b",\"peer_serial\":");
            push_opt(b, r.peer_serial);
            b.extend_from_slice(b",\"policy_sha256\":");
            push_opt(b, r.policy_sha256);
            b.extend_from_slice(b",\"decision\":");
            push_json_str(b, r.decision);
            b.extend_from_slice(b",\"reason\":");
            push_json_str(b, r.reason);
            b.extend_from_slice(b",\"bytes_client_to_server\":");
            push_u64(b, r.bytes_client_to_server);
            b.extend_from_slice(b",\"bytes_server_to_client\":");
            push_u64(b, r.bytes_server_to_client);
            b.extend_from_slice(b",\"duration_ms\":");
            push_millis(b, r.duration);
        });
    }
}
