//! A WebSocket tunnel's HTTP/2 leg (issue 17): one RFC 8441 extended-CONNECT stream between
//! the sidecars as a byte stream ([`H2Io`]: `AsyncRead` + `AsyncWrite`), so the tunnel is
//! pumped by the same code as a TCP connection ([`crate::tcp::pump`]: both directions,
//! half-close, byte counts, idle timeout), and the `gatehouse_websocket_*` metrics.
//!
//! Reads hand flow-control capacity back as the bytes are consumed (the peer can send more
//! only once we passed them on); writes wait for the peer's window, never buffering beyond
//! it; `shutdown` ends our half of the stream (END_STREAM); a reset from the peer is an error
//! (`NO_ERROR`: an end of stream).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An HTTP/2 stream's two halves as one byte stream.
pub(crate) struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
}

impl H2Io {
    /// Our half (`send`) and the peer's (`recv`) of one stream.
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Ours now: the peer may send as much again (fails only once the stream is
                // gone, which the next read reports).
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.send.reserve_capacity(buf.len());
        // As hyper's own CONNECT tunnels (`H2Upgraded`): wait for window, send what fits.
        let sent = match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(0)) | None => None,
            Some(Ok(n)) => {
                let n = n.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .ok()
                    .map(|()| n)
            }
            Some(Err(_)) => None,
        };
        if let Some(n) = sent {
            return Poll::Ready(Ok(n));
        }
        Poll::Ready(Err(match ready!(this.send.poll_reset(cx)) {
            Ok(reason) => io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the tunnel's stream was reset: {reason:?}"),
            ),
            Err(e) => h2_io(e),
        }))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Ends our half; the peer's half carries on until it ends too (half-close).
        let _ = self.get_mut().send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// `result` values of `gatehouse_websocket_upgrades_total`.
pub(crate) const RESULTS: [&str; 5] = ["upgraded", "denied", "limited", "not_upgraded", "failed"];

/// The `gatehouse_websocket_*` families (registered without the prefix), labels bounded:
/// `side` is `inbound` or `outbound`, `result` one of [`RESULTS`], `direction`
/// `client_to_server` or `server_to_client`.
#[derive(Clone, Debug)]
pub(crate) struct WebSocketMetrics {
    upgrades: IntCounterVec,
    bytes: IntCounterVec,
    active: IntGaugeVec,
}

/// One side's handles, label values bound once.
#[derive(Clone, Debug)]
pub(crate) struct SideMetrics {
    families: WebSocketMetrics,
    side: &'static str,
    /// Bytes from the client (the app that asked for the upgrade) to the server.
    pub client_to_server: IntCounter,
    /// Bytes back.
    pub server_to_client: IntCounter,
    /// Open tunnels.
    pub active: IntGauge,
}

impl WebSocketMetrics {
    /// Creates the families and registers them on `registry`.
    ///
    /// # Errors
    /// A family of the same name is already registered.
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let upgrades = IntCounterVec::new(
            Opts::new(
                "websocket_upgrades_total",
                "WebSocket upgrade requests by side (inbound|outbound) and result (upgraded, denied, limited, not_upgraded, failed)",
            ),
            &["side", "result"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "websocket_bytes_total",
                "Bytes through WebSocket tunnels by side and direction (client_to_server, server_to_client)",
            ),
            &["side", "direction"],
        )?;
        let active = IntGaugeVec::new(
            Opts::new("websocket_active_tunnels", "Open WebSocket tunnels by side"),
            &["side"],
        )?;
        registry.register(Box::new(upgrades.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(active.clone()))?;
        Ok(Self {
            upgrades,
            bytes,
            active,
        })
    }

    /// The handles of `side` (`inbound` or `outbound`).
    pub(crate) fn side(&self, side: &'static str) -> SideMetrics {
        for r in RESULTS {
            self.upgrades.with_label_values(&[side, r]);
        }
        SideMetrics {
            families: self.clone(),
            side,
            client_to_server: self.bytes.with_label_values(&[side, "client_to_server"]),
            server_to_client: self.bytes.with_label_values(&[side, "server_to_client"]),
            active: self.active.with_label_values(&[side]),
        }
    }
}

impl SideMetrics {
    /// Counts an upgrade request with `result` (one of [`RESULTS`]).
    pub(crate) fn upgrade(&self, result: &'static str) {
        self.families
            .upgrades
            .with_label_values(&[self.side, result])
            .inc();
    }
}

impl<'a> From<&'a SideMetrics> for crate::tcp::pump::Counters<'a> {
    fn from(m: &'a SideMetrics) -> Self {
        Self {
            client_to_server: &m.client_to_server,
            server_to_client: &m.server_to_client,
        }
    }
}

/// Whether an HTTP/1.1 request asks for a WebSocket upgrade (`Upgrade: websocket`, any case;
/// hyper already required `Connection: upgrade` to offer it the upgrade).
pub(crate) fn wants_websocket(h: &http::HeaderMap) -> bool {
    h.get(http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_h2_stream_carries_bytes_both_ways_and_half_closes() {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { h2::server::handshake(s).await.expect("server") });
        let (mut tx, conn) = h2::client::handshake(c).await.expect("client");
        tokio::spawn(conn);
        let mut server = server.await.expect("join");
        let req = http::Request::post("https://peer/t").body(()).unwrap();
        let (resp, send) = tx.send_request(req, false).unwrap();
        let (req, mut respond) = server.accept().await.expect("a stream").expect("ok");
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let ssend = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let mut server_io = H2Io::new(ssend, req.into_body());
        let mut client_io = H2Io::new(send, resp.await.unwrap().into_body());
        // More than a stream window (64 KiB): flow control must be handed back as read.
        let big = vec![7u8; 300 * 1024];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                client_io.write_all(&big).await.unwrap();
                client_io.shutdown().await.unwrap();
                let mut back = Vec::new();
                client_io.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        server_io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        server_io.write_all(b"bye").await.unwrap();
        server_io.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"bye");
    }
}
