//! The HTTP/1.1 server: hyper's connection, let go of while the connection waits for its
//! next request.
//!
//! hyper holds, for as long as its connection lives, a read and a write buffer (8 KiB each,
//! its minimum; no server option makes them smaller), its state and a box for the request
//! future in flight. For a keep-alive connection that only waits for its next request (the
//! usual state of a connection in a caller's pool) that is most of what the connection
//! costs. [`H1Conn`] serves through hyper and, when its driver asks it to
//! [`park`](H1Conn::park) because the connection has been idle for [`PARK_AFTER`], takes hyper's
//! connection apart (`into_parts`) and drops it. What stays is the socket (the TLS stream) and
//! the service. A read of at most [`WAKE_BYTES`] waits for the client's next bytes, which go to
//! a new hyper connection ahead of the socket ([`Rewind`]). nginx does the same with its
//! keep-alive connections: it frees the request's buffers and waits with a 1 KiB one.
//!
//! Parking is safe only between two messages: hyper's state is then a new connection's, and
//! what it had read past the last message (a pipelined request's first bytes) is handed back
//! by `into_parts` and rewound. The driver parks only with no request in flight and no write
//! stalled ([`super::activity::Activity`]); `park` itself declines while a request body has
//! not been read to its end (`Activity::bodies_read`): hyper would still read and discard the
//! rest of that body, and a new connection would take those bytes for a request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::activity::Activity;
use super::body::BoxError;
use crate::metrics::GaugeGuard;

/// How long a keep-alive connection waits for its next request before it lets go of hyper
/// (nginx lets go at once). A caller that sends its requests back to back never pays the
/// microsecond or two of a new hyper connection; one that pauses pays it once per pause, and
/// holds no HTTP buffer in between. The driver looks at a busy connection once a second, so
/// after a run of back-to-back requests the connection parks within a second of the last.
pub(crate) const PARK_AFTER: Duration = Duration::from_millis(100);

/// The most a parked connection reads at once when its client writes again (nginx's
/// `client_header_buffer_size`); the rest stays in the TLS session for hyper's first read.
const WAKE_BYTES: usize = 1024;

/// The socket an [`H1Conn`] serves on.
pub(crate) trait H1Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> H1Io for T {}

/// What an [`H1Conn`] serves with: hyper's bounds on a service, named once.
pub(crate) trait H1Service:
    HttpService<Incoming, Error: Into<BoxError>, ResBody: Body<Error: Into<BoxError>> + 'static> + Unpin
{
}
impl<S> H1Service for S where
    S: HttpService<Incoming, Error: Into<BoxError>, ResBody: Body<Error: Into<BoxError>> + 'static>
        + Unpin
{
}

/// A socket with bytes already read from it in front: they are read first.
#[derive(Debug)]
pub(crate) struct Rewind<T> {
    prefix: Bytes,
    io: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// hyper's connection over the socket `T`, serving with `S`.
type Hyper<T, S> = http1::Connection<TokioIo<Rewind<T>>, S>;

/// An HTTP/1.1 server connection that lets go of hyper while parked (see the module docs).
pub(crate) struct H1Conn<T: H1Io, S: H1Service> {
    builder: http1::Builder,
    state: State<T, S>,
    activity: Arc<Activity>,
    /// `gatehouse_inbound_parked_connections`.
    parked: IntGauge,
}

enum State<T: H1Io, S: H1Service> {
    /// hyper serves (boxed: a parked connection carries none of it).
    Serving(Box<Hyper<T, S>>),
    /// Waiting for the client's next bytes, holding no HTTP state.
    Parked {
        io: T,
        service: S,
        /// Counted in `gatehouse_inbound_parked_connections` while parked.
        _counted: GaugeGuard,
    },
    /// Asked to finish while parked: our TLS close, then done.
    Closing(T),
    /// Finished (or between two states).
    Done,
}

impl<T: H1Io, S: H1Service> H1Conn<T, S> {
    /// Serves `io` with `service`, hyper configured by `builder`; `activity` is the one the
    /// service's requests and bodies are counted in, `parked` the gauge of parked connections.
    pub(crate) fn new(
        builder: http1::Builder,
        io: T,
        service: S,
        activity: Arc<Activity>,
        parked: IntGauge,
    ) -> Self {
        let mut conn = Self {
            builder,
            state: State::Done,
            activity,
            parked,
        };
        conn.serve(io, service, Bytes::new());
        conn
    }

    fn serve(&mut self, io: T, service: S, prefix: Bytes) {
        let io = TokioIo::new(Rewind { prefix, io });
        self.state = State::Serving(Box::new(self.builder.serve_connection(io, service)));
    }

    /// The connection has been idle (no request in flight, no write stalled) for
    /// [`PARK_AFTER`]: drops hyper's connection unless a request body is still unread. Bytes
    /// hyper had read past the last request go to a new hyper connection at once.
    pub(crate) fn park(&mut self) {
        if !self.activity.bodies_read() {
            return;
        }
        let conn = match std::mem::replace(&mut self.state, State::Done) {
            State::Serving(conn) => conn,
            other => {
                self.state = other;
                return;
            }
        };
        let http1::Parts {
            io,
            read_buf,
            service,
            ..
        } = conn.into_parts();
        let Rewind { prefix, io } = io.into_inner();
        // hyper read `read_buf` out of `prefix` (or the socket): it comes first.
        let unread = if prefix.is_empty() {
            read_buf
        } else if read_buf.is_empty() {
            prefix
        } else {
            Bytes::from([&read_buf[..], &prefix[..]].concat())
        };
        if unread.is_empty() {
            self.state = State::Parked {
                io,
                service,
                _counted: GaugeGuard::new(&self.parked),
            };
        } else {
            self.serve(io, service, unread);
        }
    }

    /// Asks the connection to finish: hyper's graceful shutdown (after the request in flight),
    /// or, parked, our TLS close at once.
    pub(crate) fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Serving(conn) => Pin::new(&mut **conn).graceful_shutdown(),
            State::Parked { .. } => {
                if let State::Parked { io, .. } = std::mem::replace(&mut self.state, State::Done) {
                    self.state = State::Closing(io);
                }
            }
            State::Closing(_) | State::Done => {}
        }
    }

    /// The parked connection's client wrote `woke` (empty at end of stream: hyper sees it and
    /// closes as it would have): hyper serves again.
    fn wake(&mut self, woke: Bytes) {
        if let State::Parked { io, service, .. } = std::mem::replace(&mut self.state, State::Done) {
            self.serve(io, service, woke);
        }
    }

    /// Whether hyper's connection is let go of.
    #[cfg(test)]
    pub(crate) fn is_parked(&self) -> bool {
        matches!(self.state, State::Parked { .. })
    }
}

impl<T: H1Io, S: H1Service> Future for H1Conn<T, S> {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Serving(conn) => return Pin::new(&mut **conn).poll(cx).map_err(Into::into),
                State::Parked { io, .. } => {
                    let mut buf = [0u8; WAKE_BYTES];
                    let mut read = ReadBuf::new(&mut buf);
                    if let Err(e) = ready!(Pin::new(io).poll_read(cx, &mut read)) {
                        this.state = State::Done;
                        return Poll::Ready(Err(e.into()));
                    }
                    this.wake(Bytes::copy_from_slice(read.filled()));
                }
                State::Closing(io) => {
                    let res = ready!(Pin::new(io).poll_shutdown(cx));
                    this.state = State::Done;
                    return Poll::Ready(res.map_err(Into::into));
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::pin::pin;
    use std::sync::Mutex;

    use futures_util::poll;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::http::body::HttpBody;

    /// Paths the service was asked for, in order.
    type Seen = Arc<Mutex<Vec<String>>>;

    /// An `H1Conn` on one end of an in-memory pipe, its service noting each path and
    /// answering `ok`: after reading the request body to its end on `/read`, without reading
    /// it (as a refusal does) elsewhere. Bodies are watched as the inbound side watches them.
    fn pair() -> (
        DuplexStream,
        H1Conn<DuplexStream, impl H1Service>,
        Seen,
        Arc<Activity>,
        IntGauge,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let seen = Seen::default();
        let activity = Arc::new(Activity::new());
        let (noted, watched) = (seen.clone(), activity.clone());
        let svc = service_fn(move |req: Request<Incoming>| {
            let path = req.uri().path().to_owned();
            noted.lock().expect("seen").push(path.clone());
            let body = req.into_body();
            let mut body = match body.is_end_stream() {
                true => HttpBody::H1(body),
                false => HttpBody::H1Watched(body, watched.watch_body()),
            };
            async move {
                // As hyper's client reads a body it forwards: until its end of stream shows,
                // through `is_end_stream` after a frame (a sized body) or no frame (chunked).
                if path == "/read" {
                    while let Some(frame) = body.frame().await {
                        frame.expect("frame");
                        if body.is_end_stream() {
                            break;
                        }
                    }
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        });
        let parked = IntGauge::new("inbound_parked_connections", "parked").expect("gauge");
        let conn = H1Conn::new(
            http1::Builder::new(),
            server,
            svc,
            activity.clone(),
            parked.clone(),
        );
        (client, conn, seen, activity, parked)
    }

    /// Runs `conn` until `client` has read one whole response (`ok` is its body); hyper may
    /// close the connection after it.
    async fn response(conn: &mut H1Conn<DuplexStream, impl H1Service>, client: &mut DuplexStream) {
        let mut read = pin!(async {
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\nok") {
                let mut buf = [0u8; 512];
                let n = client.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
        });
        tokio::select! {
            () = &mut read => {}
            res = &mut *conn => {
                res.expect("no connection error");
                read.await;
            }
        }
    }

    /// Sends `request` and runs `conn` until its response is read.
    async fn exchange(
        conn: &mut H1Conn<DuplexStream, impl H1Service>,
        client: &mut DuplexStream,
        request: &[u8],
    ) {
        client.write_all(request).await.expect("write");
        response(conn, client).await;
    }

    const GET_A: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    const GET_B: &[u8] = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn a_parked_connection_lets_go_of_hyper_and_serves_the_next_request() {
        let (mut client, mut conn, seen, _, parked) = pair();
        exchange(&mut conn, &mut client, GET_A).await;
        conn.park();
        assert!(conn.is_parked());
        assert_eq!(parked.get(), 1);
        // Nothing to read: it stays parked.
        assert!(poll!(&mut conn).is_pending());
        assert!(conn.is_parked());
        exchange(&mut conn, &mut client, GET_B).await;
        assert!(!conn.is_parked());
        assert_eq!(parked.get(), 0);
        assert_eq!(*seen.lock().expect("seen"), ["/a", "/b"]);
    }

    #[tokio::test]
    async fn bytes_hyper_had_read_past_the_last_request_are_served_not_lost() {
        let (mut client, mut conn, seen, _, parked) = pair();
        exchange(&mut conn, &mut client, GET_A).await;
        // Half of the next request's head, read by hyper.
        client.write_all(&GET_B[..12]).await.expect("write");
        assert!(poll!(&mut conn).is_pending());
        conn.park();
        assert!(
            !conn.is_parked(),
            "hyper had bytes of a request: served again at once"
        );
        assert_eq!(parked.get(), 0);
        exchange(&mut conn, &mut client, &GET_B[12..]).await;
        assert_eq!(*seen.lock().expect("seen"), ["/a", "/b"]);
    }

    #[tokio::test]
    async fn a_connection_with_an_unread_request_body_is_not_parked() {
        let (mut client, mut conn, seen, activity, _) = pair();
        // The rest of the body, when it comes, looks like a request: a new hyper connection
        // would serve it.
        let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        let head = format!(
            "POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n0123456789",
            10 + smuggled.len()
        );
        exchange(&mut conn, &mut client, head.as_bytes()).await;
        assert!(!activity.bodies_read());
        conn.park();
        assert!(!conn.is_parked());
        let _ = client.write_all(smuggled.as_bytes()).await;
        let _ = poll!(&mut conn);
        let _ = poll!(&mut conn);
        assert_eq!(*seen.lock().expect("seen"), ["/c"]);
    }

    #[tokio::test]
    async fn a_request_body_read_to_its_end_lets_the_connection_park() {
        let (mut client, mut conn, seen, activity, _) = pair();
        let sized = b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let chunked = b"POST /read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                        5\r\nhello\r\n0\r\n\r\n";
        for request in [&sized[..], &chunked[..]] {
            exchange(&mut conn, &mut client, request).await;
            assert!(activity.bodies_read());
            conn.park();
            assert!(conn.is_parked());
        }
        exchange(&mut conn, &mut client, GET_A).await;
        assert_eq!(*seen.lock().expect("seen"), ["/read", "/read", "/a"]);
    }

    #[tokio::test]
    async fn a_parked_connection_asked_to_finish_closes() {
        let (mut client, mut conn, _, _, parked) = pair();
        exchange(&mut conn, &mut client, GET_A).await;
        conn.park();
        conn.graceful_shutdown();
        assert_eq!(parked.get(), 0);
        (&mut conn).await.expect("closed cleanly");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("end of stream");
        assert!(rest.is_empty());
    }
}
