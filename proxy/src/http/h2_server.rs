//! The HTTP/2 server the inbound side serves: served with the `h2` crate directly.
//!
//! `H2Server` runs an HTTP/2 connection: each stream's future (made by the caller, e.g. the
//! inbound side's `serve_stream`) runs inside the connection's task, in a
//! `FuturesUnordered` polled in turn with the connection itself: no task, request channel or
//! response oneshot per request (what hyper's HTTP/2 server spent on each), and a slow stream
//! holds up no other, each being polled only when woken. A response head is made fit for
//! HTTP/2 as hyper did (`fit_for_h2`: no connection-specific headers; `date` and an exactly
//! known `content-length` added when missing), and its body is written with
//! [`crate::http::body::pipe_within`] under the peer's flow control.
//!
//! Two limits guard the app against abusive clients:
//! - **Client resets** (rapid reset, CVE-2023-44487): a stream reset while it is served
//!   frees its slot under `max_h2_streams` at once, so resets are what let a client start
//!   requests without bound. Each connection counts them (`ResetBudget`): past
//!   `max_h2_resets` within `h2_reset_window` it gets `GOAWAY(ENHANCE_YOUR_CALM)` and is closed.
//!   `h2`'s own `max_pending_accept_reset_streams` only counts streams reset while they wait in
//!   its accept queue, which our loop empties at every poll, so it only catches large bursts.
//!   A stream already reset when it is first polled (`HEADERS` and `RST_STREAM` read together)
//!   is not forwarded at all (the caller's stream future checks `reset_end` first).
//! - **Slow readers**: a response body waits for the client's flow-control window at most
//!   `send_timeout` per wait; then the stream is reset (`StreamEnd::SendTimedOut`). A client
//!   that reads nothing off the socket at all is caught a level down, by the connection's
//!   write-progress deadline ([`crate::http::activity`]).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use h2::RecvStream;
use h2::server::{Connection, Handshake, SendResponse};
use http::Request;
use http::header::{self, HeaderMap, HeaderValue};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::http::body::{BoxError, SendTimedOut};
use crate::metrics::Metrics;

/// Initial stream and connection flow-control windows: hyper 1.12's server defaults (the
/// HTTP/2 default of 64 KiB holds back uploads on any link with latency).
const H2_WINDOW: u32 = 1024 * 1024;
/// Largest DATA frame the peer may send us (hyper's default, the protocol's minimum).
const H2_MAX_FRAME: u32 = 16 * 1024;
/// Response bytes queued per stream ahead of the peer's window (hyper's default).
const H2_MAX_SEND_BUFFER: usize = 400 * 1024;
/// Streams we reset for protocol errors before the connection is closed (hyper's default).
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The HTTP/2 server settings: ours (`max_h2_streams`, `max_header_bytes`), the rest as hyper
/// 1.12's server had them (the reset-stream limits are `h2`'s defaults, as hyper left them).
pub(crate) fn h2_builder(max_streams: u32, max_header_bytes: usize) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(H2_WINDOW)
        .initial_connection_window_size(H2_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .max_send_buffer_size(H2_MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_ERROR_RESETS))
        .max_concurrent_streams(max_streams)
        // Over the limit, `h2` answers 431 itself; the stream never reaches us.
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    b
}

enum H2State<T> {
    Handshaking(Handshake<T, Bytes>),
    Serving(Connection<T, Bytes>),
}

/// An HTTP/2 connection served with `h2`: completes the handshake, accepts streams and runs
/// each one's future (`serve`) inside this future, ending when the connection has closed.
///
/// `h2` does its socket I/O only when the connection is polled, so the connection is polled
/// whenever it was woken, whatever the streams do; the stream futures are polled when theirs
/// were. Both get wakers of their own ([`Wakeups`]), so one poll goes round (streams, then
/// the connection, which writes what they queued and hands out new streams) until neither
/// has anything left to do: a wake-up from inside the poll (a stream queueing a frame wakes
/// the connection, a new stream wants its first poll) costs a round, not another poll of the
/// connection's whole task.
pub(crate) struct H2Server<T, S, F> {
    state: H2State<T>,
    streams: FuturesUnordered<F>,
    serve: S,
    resets: ResetBudget,
    wakeups: Arc<Wakeups>,
    conn_waker: Waker,
    streams_waker: Waker,
    /// Asked to close before the handshake completed.
    close_early: bool,
}

/// Rounds in one poll of an [`H2Server`] before it lets the other tasks run (streams that keep
/// waking themselves, or a spent tokio budget, must not keep the thread).
const H2_MAX_ROUNDS: usize = 16;

impl<T, S, F> H2Server<T, S, F>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F + Unpin,
    F: Future<Output = StreamEnd>,
{
    pub(crate) fn new(handshake: Handshake<T, Bytes>, serve: S, resets: ResetBudget) -> Self {
        let wakeups = Arc::new(Wakeups::default());
        wakeups.conn.store(true, Ordering::SeqCst);
        Self {
            state: H2State::Handshaking(handshake),
            streams: FuturesUnordered::new(),
            serve,
            resets,
            conn_waker: PartWaker::waker(&wakeups, true),
            streams_waker: PartWaker::waker(&wakeups, false),
            wakeups,
            close_early: false,
        }
    }

    /// GOAWAY: streams already open (or arriving within a round trip) are served, no new ones
    /// are accepted, and the connection closes once they are done. Before the handshake has
    /// completed nothing can be in flight, and the connection just closes.
    pub(crate) fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            H2State::Handshaking(_) => this.close_early = true,
            H2State::Serving(conn) => conn.graceful_shutdown(),
        }
        // The next poll sends the GOAWAY.
        this.wakeups.conn.store(true, Ordering::SeqCst);
    }

    fn poll_rounds(&mut self) -> Poll<Result<(), h2::Error>> {
        let w = &*self.wakeups;
        let mut conn_cx = Context::from_waker(&self.conn_waker);
        let mut streams_cx = Context::from_waker(&self.streams_waker);
        let conn = loop {
            match &mut self.state {
                H2State::Handshaking(_) if self.close_early => return Poll::Ready(Ok(())),
                H2State::Handshaking(hs) => {
                    if !w.conn.swap(false, Ordering::SeqCst) {
                        return Poll::Pending;
                    }
                    let conn = ready!(Pin::new(hs).poll(&mut conn_cx))?;
                    self.state = H2State::Serving(conn);
                    w.conn.store(true, Ordering::SeqCst);
                }
                H2State::Serving(conn) => break conn,
            }
        };
        for _ in 0..H2_MAX_ROUNDS {
            // The streams first: what they queue is written by the connection's poll below.
            let streams = w.streams.swap(false, Ordering::SeqCst);
            if streams {
                while let Poll::Ready(Some(end)) = self.streams.poll_next_unpin(&mut streams_cx) {
                    if self.resets.count(end) {
                        conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                        // The next poll of the connection sends the GOAWAY and closes.
                        w.conn.store(true, Ordering::SeqCst);
                    }
                }
            }
            let polled_conn = w.conn.swap(false, Ordering::SeqCst);
            if polled_conn {
                loop {
                    match conn.poll_accept(&mut conn_cx) {
                        Poll::Ready(Some(Ok((req, respond)))) => {
                            self.streams.push((self.serve)(req, respond));
                            w.streams.store(true, Ordering::SeqCst);
                        }
                        Poll::Ready(Some(Err(e))) => {
                            self.resets.connection_error(&e);
                            return Poll::Ready(Err(e));
                        }
                        // Closed (after GOAWAY, once every stream is done, or by the peer,
                        // which also ends any stream still open).
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Pending => break,
                    }
                }
            }
            if !streams && !polled_conn {
                return Poll::Pending;
            }
        }
        // Still busy: the flags stay set, and `poll` wakes the task to go on.
        Poll::Pending
    }
}

impl<T, S, F> Future for H2Server<T, S, F>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F + Unpin,
    F: Future<Output = StreamEnd>,
{
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.wakeups.task.register(cx.waker());
        this.wakeups.polling.store(true, Ordering::SeqCst);
        let res = this.poll_rounds();
        this.wakeups.polling.store(false, Ordering::SeqCst);
        // Woken after the last look (from another thread), or still busy: poll again.
        if res.is_pending() && this.wakeups.any() {
            cx.waker().wake_by_ref();
        }
        res
    }
}

/// What an [`H2Server`] has to poll, and the task to wake when something needs it outside
/// the server's own poll (inside it, a wake-up only sets the flag, for another round).
#[derive(Default)]
struct Wakeups {
    task: AtomicWaker,
    polling: AtomicBool,
    /// The connection was woken (socket ready, a frame queued, a stream released).
    conn: AtomicBool,
    /// A stream future was woken (or added).
    streams: AtomicBool,
}

impl Wakeups {
    fn wake(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }

    fn any(&self) -> bool {
        self.conn.load(Ordering::SeqCst) || self.streams.load(Ordering::SeqCst)
    }
}

/// The waker of one part of an [`H2Server`]: the `h2` connection, or the stream futures' set.
struct PartWaker {
    wakeups: Arc<Wakeups>,
    conn: bool,
}

impl PartWaker {
    fn waker(wakeups: &Arc<Wakeups>, conn: bool) -> Waker {
        Waker::from(Arc::new(Self {
            wakeups: wakeups.clone(),
            conn,
        }))
    }
}

impl Wake for PartWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let w = &*self.wakeups;
        w.wake(if self.conn { &w.conn } else { &w.streams });
    }
}

/// How a stream's service ended, for its connection's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// Answered, or ended by something other than the client's reset or our send timeout
    /// (the app's body failed, the connection broke).
    Done,
    /// The client reset the stream before it was served to its end.
    ClientReset,
    /// The client opened no flow-control window for the send timeout: we reset the stream.
    SendTimedOut,
}

/// Client resets one connection may send within a window before it is closed with
/// `GOAWAY(ENHANCE_YOUR_CALM)`; counted only when a stream ends (no timer, nothing per
/// request), the window starting at the first reset after the previous one ran out.
pub(crate) struct ResetBudget {
    max: u32,
    window: Duration,
    spent: u32,
    since: Option<Instant>,
    /// The GOAWAY was sent: streams ending now are the connection's, not the client's, doing.
    exhausted: bool,
    metrics: Metrics,
}

impl ResetBudget {
    pub(crate) fn new(max: u32, window: Duration, metrics: Metrics) -> Self {
        Self {
            max,
            window,
            spent: 0,
            since: None,
            exhausted: false,
            metrics,
        }
    }

    /// Accounts for a stream's end; `true` once the connection must be closed (exactly once).
    fn count(&mut self, end: StreamEnd) -> bool {
        match end {
            StreamEnd::Done => return false,
            StreamEnd::SendTimedOut => {
                self.metrics
                    .inbound_send_timeouts
                    .with_label_values(&["h2"])
                    .inc();
                return false;
            }
            StreamEnd::ClientReset if self.exhausted => return false,
            StreamEnd::ClientReset => {}
        }
        self.metrics.inbound_h2_client_resets.inc();
        let now = Instant::now();
        match self.since {
            Some(since) if now.duration_since(since) < self.window => self.spent += 1,
            _ => {
                self.since = Some(now);
                self.spent = 1;
            }
        }
        if self.spent <= self.max {
            return false;
        }
        self.exhausted = true;
        self.metrics
            .inbound_h2_goaways
            .with_label_values(&["too_many_resets"])
            .inc();
        warn!(
            resets = self.spent,
            window = ?self.window,
            "closing HTTP/2 connection with GOAWAY(ENHANCE_YOUR_CALM): too many client resets (max_h2_resets)"
        );
        true
    }

    /// `h2` closed the connection itself: with `ENHANCE_YOUR_CALM` one of its own limits
    /// tripped (more reset streams in its accept queue at once than the budget, resets it
    /// had to send for protocol errors, DATA frame overhead).
    fn connection_error(&mut self, e: &h2::Error) {
        if e.is_library() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) && !self.exhausted {
            self.exhausted = true;
            self.metrics
                .inbound_h2_goaways
                .with_label_values(&["excessive_load"])
                .inc();
            warn!(error = %e, "HTTP/2 connection closed with GOAWAY(ENHANCE_YOUR_CALM) by h2's own limits");
        }
    }
}

/// A stream reset before its response: the client's doing, or (an error) the connection's.
pub(crate) fn reset_end(reset: Result<h2::Reason, h2::Error>) -> StreamEnd {
    debug!(
        ?reset,
        "HTTP/2 stream reset by the client before its response"
    );
    match reset {
        Ok(_) => StreamEnd::ClientReset,
        Err(_) => StreamEnd::Done,
    }
}

/// Why a response body was not sent whole: the client's reset, our send timeout, or
/// something else (the app's body failed, the connection broke).
pub(crate) fn end_of(e: &BoxError) -> StreamEnd {
    if e.is::<SendTimedOut>() {
        return StreamEnd::SendTimedOut;
    }
    match e.downcast_ref::<h2::Error>() {
        Some(h2) if h2.reason().is_some() && !h2.is_go_away() && !h2.is_library() => {
            StreamEnd::ClientReset
        }
        _ => StreamEnd::Done,
    }
}

/// What hyper's HTTP/2 server did to a response head: connection-specific headers dropped
/// (`transfer-encoding` is the one an HTTP/1.1 app response still has here), `date` added when
/// missing, and `content-length` set from an exactly known body length when missing.
pub(crate) fn fit_for_h2(h: &mut HeaderMap, body: &impl Body) {
    crate::http::headers::strip_for_h2(h);
    if let header::Entry::Vacant(date) = h.entry(header::DATE) {
        date.insert(http_date());
    }
    if !body.is_end_stream()
        && let Some(len) = body.size_hint().exact()
        && let header::Entry::Vacant(cl) = h.entry(header::CONTENT_LENGTH)
    {
        cl.insert(HeaderValue::from(len));
    }
}

/// The current time as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`), rendered at most once
/// a second per thread (hyper's cache, which the HTTP/2 path no longer goes through).
fn http_date() -> HeaderValue {
    thread_local! {
        static CACHED: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, value)| {
        if *at != secs {
            *value = render_http_date(now);
            *at = secs;
        }
        value.clone()
    })
}

fn render_http_date(now: SystemTime) -> HeaderValue {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from(now)
        .format(FORMAT)
        .ok()
        .and_then(|s| HeaderValue::try_from(s).ok())
        .unwrap_or_else(|| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::pin::pin;

    use http_body_util::{Empty, Full};
    use tokio::sync::{Notify, oneshot};

    use http::Response;

    use super::*;
    use crate::http::body::{RecvBody, pipe};

    type Client = h2::client::SendRequest<Bytes>;

    /// An `H2Server` on one end of an in-memory pipe, serving with `serve` until it ends or
    /// is asked (`stop`) to shut down gracefully; an `h2` client on the other end.
    fn pair<S, F>(
        serve: S,
    ) -> (
        impl Future<Output = Client>,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    )
    where
        S: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F + Unpin + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut serve = serve;
            let serve = move |req, respond| {
                let stream = serve(req, respond);
                async move {
                    stream.await;
                    StreamEnd::Done
                }
            };
            let metrics = Metrics::register().expect("metrics");
            let resets = ResetBudget::new(200, Duration::from_secs(10), metrics);
            let mut server = pin!(H2Server::new(
                h2_builder(100, 16 * 1024).handshake(s),
                serve,
                resets
            ));
            tokio::select! {
                r = server.as_mut() => return r,
                _ = stopped => {}
            }
            server.as_mut().graceful_shutdown();
            server.await
        });
        let client = async move {
            let (tx, conn) = h2::client::handshake(c).await.expect("client handshake");
            tokio::spawn(conn);
            tx
        };
        (client, stop, server)
    }

    async fn get(client: &mut Client, path: &str) -> Result<(http::StatusCode, Bytes), BoxError> {
        use http_body_util::BodyExt;
        let req = Request::get(format!("https://peer{path}")).body(())?;
        let (resp, _) = client.clone().ready().await?.send_request(req, true)?;
        let resp = resp.await?;
        let status = resp.status();
        let body = RecvBody::new(resp.into_body()).collect().await?.to_bytes();
        Ok((status, body))
    }

    #[tokio::test]
    async fn a_slow_stream_holds_up_no_other_and_a_graceful_shutdown_waits_for_it() {
        let gate = Arc::new(Notify::new());
        let released = gate.clone();
        let (client, stop, server) = pair(move |req, mut respond| {
            let gate = gate.clone();
            async move {
                if req.uri().path() == "/slow" {
                    gate.notified().await;
                }
                let tx = respond
                    .send_response(Response::new(()), false)
                    .expect("head");
                let body = Full::new(Bytes::from(req.uri().path().to_owned()));
                pipe(body, tx).await.expect("body");
            }
        });
        let mut client = client.await;
        let mut slow_client = client.clone();
        let slow = tokio::spawn(async move { get(&mut slow_client, "/slow").await });
        // Many streams while the slow one waits, some at once.
        for round in 0..10 {
            let mut tasks = Vec::new();
            for i in 0..5 {
                let mut c = client.clone();
                tasks.push(tokio::spawn(async move {
                    get(&mut c, &format!("/fast/{round}/{i}")).await
                }));
            }
            let mut seen = HashSet::new();
            for t in tasks {
                let (status, body) = t.await.unwrap().expect("a fast stream");
                assert_eq!(status, 200);
                seen.insert(body);
            }
            assert_eq!(seen.len(), 5);
        }
        assert!(!slow.is_finished());
        // GOAWAY: the open stream goes on, the connection stays until it is done.
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!server.is_finished(), "closed with a stream in flight");
        assert!(
            get(&mut client, "/after").await.is_err(),
            "a new stream after GOAWAY"
        );
        released.notify_one();
        let (status, body) = slow.await.unwrap().expect("the slow stream completes");
        assert_eq!((status, &body[..]), (http::StatusCode::OK, &b"/slow"[..]));
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the connection closes once its streams are done")
            .unwrap()
            .expect("a clean end");
    }

    #[tokio::test]
    async fn bodies_larger_than_the_windows_go_both_ways_at_once() {
        // An echo: the request body streamed back as the response body while it arrives.
        let (client, _stop, _server) = pair(|req, mut respond| async move {
            let tx = respond
                .send_response(Response::new(()), false)
                .expect("head");
            pipe(RecvBody::new(req.into_body()), tx)
                .await
                .expect("echo");
        });
        let client = client.await;
        const LEN: usize = 3 * 1024 * 1024 + 17;
        let mut tasks = Vec::new();
        for seed in 0..3u8 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8 ^ seed).collect();
                let req = Request::post("https://peer/echo").body(()).unwrap();
                let (resp, tx) = client
                    .ready()
                    .await
                    .unwrap()
                    .send_request(req, false)
                    .unwrap();
                let chunks: Vec<_> = data
                    .chunks(100_000)
                    .map(|c| {
                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                            Bytes::copy_from_slice(c),
                        ))
                    })
                    .collect();
                let upload = tokio::spawn(pipe(
                    http_body_util::StreamBody::new(futures_util::stream::iter(chunks)),
                    tx,
                ));
                let resp = resp.await.unwrap();
                use http_body_util::BodyExt;
                let echoed = RecvBody::new(resp.into_body())
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes();
                upload.await.unwrap().expect("upload");
                assert!(
                    echoed == data,
                    "stream {seed}: {} bytes back of {LEN}",
                    echoed.len()
                );
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("no stall")
                .unwrap();
        }
    }

    #[tokio::test]
    async fn shutdown_before_the_handshake_closes_at_once() {
        let (_client, stop, server) = pair(|_, _| async {});
        // The client never sends its preface.
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("closed")
            .unwrap()
            .expect("a clean end");
    }

    #[test]
    fn client_resets_past_the_budget_close_the_connection_once_and_the_window_renews_it() {
        let metrics = Metrics::register().expect("metrics");
        let mut budget = ResetBudget::new(3, Duration::from_millis(300), metrics.clone());
        // Served streams and send timeouts cost nothing.
        for _ in 0..10 {
            assert!(!budget.count(StreamEnd::Done));
            assert!(!budget.count(StreamEnd::SendTimedOut));
        }
        for _ in 0..3 {
            assert!(!budget.count(StreamEnd::ClientReset));
        }
        // A new window: three more are fine.
        std::thread::sleep(Duration::from_millis(350));
        for _ in 0..3 {
            assert!(!budget.count(StreamEnd::ClientReset));
        }
        assert!(
            budget.count(StreamEnd::ClientReset),
            "the fourth in a window"
        );
        assert!(!budget.count(StreamEnd::ClientReset), "closing already");
        assert_eq!(metrics.inbound_h2_client_resets.get(), 7);
        let goaways = metrics
            .inbound_h2_goaways
            .with_label_values(&["too_many_resets"]);
        assert_eq!(goaways.get(), 1);
        let timeouts = metrics.inbound_send_timeouts.with_label_values(&["h2"]);
        assert_eq!(timeouts.get(), 10);
    }

    #[test]
    fn response_heads_are_made_fit_for_http2() {
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        fit_for_h2(&mut h, &Full::new(Bytes::from_static(b"12345")));
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["x-app"], "kept");
        assert_eq!(h[header::CONTENT_LENGTH], "5");
        assert_eq!(h[header::DATE].len(), 29);
        // An existing `date` and `content-length` are kept; an empty body gets no length.
        let mut h = HeaderMap::new();
        h.insert(header::DATE, HeaderValue::from_static("then"));
        fit_for_h2(&mut h, &Empty::<Bytes>::new());
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::DATE], "then");
    }

    #[test]
    fn http_dates_are_imf_fixdate() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(render_http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(), http_date());
    }
}
