//! The HTTP/2 client to a peer sidecar, on the `h2` crate directly (bodies:
//! [`crate::http::body`]): hyper's HTTP/2 client spawned a task per request and passed each
//! request and response through a channel and a oneshot, which cost about a tenth of this
//! sidecar's instructions per request. The request's own task now opens the stream and awaits
//! the response head. The connection's driver sends a PING every 30 s and ends a connection
//! whose peer does not answer within 20 s, so a peer that vanished mid-response is noticed.

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::http::body::{BoxError, pipe};

/// How often an HTTP/2 connection to an upstream is PINGed, and how long the answer may take
/// before the connection is dropped.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A handle on a shared HTTP/2 connection.
#[derive(Clone, Debug)]
pub(crate) struct H2Sender {
    tx: h2::client::SendRequest<Bytes>,
    /// Set when the connection ended or refused a new stream: it takes no more requests.
    closed: Arc<AtomicBool>,
}

impl H2Sender {
    /// The connection ended or refused a new stream: it takes no more requests.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The HTTP/2 handshake on `io`: a sender to share, and the connection's driver (to spawn;
/// it ends with the connection, or when a PING goes unanswered).
///
/// # Errors
/// The handshake failed.
pub(crate) async fn handshake<T>(
    io: T,
) -> Result<(H2Sender, impl Future<Output = Result<(), BoxError>> + Send), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut conn) = h2_builder().handshake::<_, Bytes>(io).await?;
    let closed = Arc::new(AtomicBool::new(false));
    let ping = conn.ping_pong();
    let ended = Arc::clone(&closed);
    let driver = async move {
        let result = tokio::select! {
            r = conn => r.map_err(BoxError::from),
            e = keep_alive(ping) => Err(e),
        };
        ended.store(true, Ordering::Release);
        result
    };
    Ok((H2Sender { tx, closed }, driver))
}

/// Opens a stream for `req` on a shared HTTP/2 connection and waits for the response head;
/// the request body (if any) is copied by a task of its own. The request comes back with the
/// error when the connection refused new streams before any of it was queued; the connection
/// is then marked closed, so the retry opens a new one.
pub(crate) async fn send_h2<B>(
    s: &mut H2Sender,
    req: Request<B>,
) -> Result<Response<h2::RecvStream>, (h2::Error, Option<Request<B>>)>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    if let Err(e) = poll_fn(|cx| s.tx.poll_ready(cx)).await {
        s.closed.store(true, Ordering::Release);
        return Err((e, Some(req)));
    }
    let (head, body) = req.into_parts();
    let end_of_stream = body.is_end_stream();
    let (response, send) =
        s.tx.send_request(Request::from_parts(head, ()), end_of_stream)
            .map_err(|e| (e, None))?;
    if !end_of_stream {
        tokio::spawn(async move {
            if let Err(e) = pipe(body, send).await {
                debug!(error = %e, "request body to the upstream ended early");
            }
        });
    }
    response.await.map_err(|e| (e, None))
}

/// The peer provably did not process the stream, so the request never reached its app: it
/// reset the stream with `REFUSED_STREAM` (RFC 9113 §8.7), or sent a GOAWAY whose last
/// processed stream is below this one (h2 0.4 fails a stream with the peer's GOAWAY error only
/// then, in `recv_go_away`; streams at or below it end with the connection's own error).
pub(crate) fn refused_unprocessed(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// Opens an RFC 8441 extended-CONNECT stream (a WebSocket tunnel, issue 17) for `head`
/// (method `CONNECT`, `h2::ext::Protocol` set) and returns the response future and our half
/// of the stream. The peer allows it in its SETTINGS, which arrive a round trip after the
/// handshake: on a fresh connection this waits for them, up to `within`.
///
/// # Errors
/// The connection failed, or the peer does not allow extended CONNECT.
pub(crate) async fn open_extended_connect(
    s: &mut H2Sender,
    head: Request<()>,
    within: Duration,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), BoxError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Err(e) = poll_fn(|cx| s.tx.poll_ready(cx)).await {
            s.closed.store(true, Ordering::Release);
            return Err(e.into());
        }
        if s.tx.is_extended_connect_protocol_enabled() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(
                "the peer does not accept WebSocket tunnels (RFC 8441 extended CONNECT \
                 is not enabled in its SETTINGS): is it a Gatehouse inbound sidecar with HTTP/2?"
                    .into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(s.tx.send_request(head, false)?)
}

/// hyper 1.12's HTTP/2 client settings, which this pool used before it spoke `h2` directly.
fn h2_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_max_send_streams(100)
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(1024 * 1024)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false);
    b
}

/// PINGs the peer every [`KEEP_ALIVE_INTERVAL`]; returns (and so ends the connection) when
/// an answer does not come within [`KEEP_ALIVE_TIMEOUT`].
async fn keep_alive(ping: Option<h2::PingPong>) -> BoxError {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return e.into(),
            Err(_elapsed) => {
                warn!(timeout = ?KEEP_ALIVE_TIMEOUT, "upstream did not answer a PING: dropping the connection");
                return "the upstream did not answer a PING in time".into();
            }
        }
    }
}
