//! Bodies on the sidecar-to-sidecar HTTP/2 hop, spoken with the `h2` crate directly.
//!
//! hyper's HTTP/2 client and server wrap `h2` with a task spawned per request, a request
//! channel and a response oneshot; on the hop between two sidecars that wrapper cost about as
//! much as everything of our own per request. Both directions use `h2` directly instead, and
//! need the two adapters hyper had in between:
//!
//! - [`RecvBody`]: a received stream as an [`http_body::Body`], giving flow-control capacity
//!   back as each chunk is handed on (so the peer can send more only once we passed it on);
//! - [`pipe`]: a body written to a send stream, waiting for the peer's flow-control window
//!   instead of buffering without bound, and stopping when the peer resets the stream;
//!   [`pipe_within`] also gives up on a peer that opens no window for a send timeout (a slow
//!   reader must not pin the body's producer, the app's connection, for as long as it likes).
//!
//! [`HttpBody`] is a body as either protocol delivers it: what the inbound side forwards to
//! the app, and what the outbound side hands the app back.
//!
//! Both adapters follow hyper 1.12's `h2` glue (`Incoming::h2` and `PipeToSendStream`), including its
//! fix for hyperium/hyper#4003: capacity is claimed only once a chunk is in hand.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::activity::BodyWatch;

/// A boxed error, what the HTTP/1.1 side accepts from a body.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A received HTTP/2 stream's data and trailers as a [`Body`].
///
/// A `RST_STREAM` with `NO_ERROR` ends the body without an error: the peer needs no more of
/// it, having answered already (RFC 9113 §8.1), as hyper has it.
#[derive(Debug)]
pub(crate) struct RecvBody {
    stream: RecvStream,
    /// Every DATA frame has been read; trailers (if any) are next.
    data_done: bool,
}

impl RecvBody {
    /// Wraps a stream `h2` handed us (a request's or a response's).
    pub(crate) fn new(stream: RecvStream) -> Self {
        Self {
            stream,
            data_done: false,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The chunk is ours now: let the peer send as much again. Fails only if
                    // the stream is gone, which the next poll reports.
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(early_end_or(e)),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(early_end_or(e)),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

/// A body received on HTTP/1.1 (from hyper) or HTTP/2 (from `h2`), streamed on as it
/// arrives.
#[derive(Debug)]
pub(crate) enum HttpBody {
    /// HTTP/1.1, from hyper.
    H1(Incoming),
    /// HTTP/1.1, from hyper's server: its end is noted, for parking the connection
    /// ([`super::h1_server`]).
    H1Watched(Incoming, BodyWatch),
    /// HTTP/2, from the `h2` crate.
    H2(RecvBody),
}

impl Body for HttpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::H1Watched(b, watch) => {
                let polled = Pin::new(&mut *b).poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => watch.ended(),
                    Poll::Ready(Some(Ok(_))) if b.is_end_stream() => watch.ended(),
                    _ => {}
                }
                polled.map_err(Into::into)
            }
            Self::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(b) | Self::H1Watched(b, _) => b.is_end_stream(),
            Self::H2(b) => b.is_end_stream(),
        }
    }

    /// HTTP/2: unknown. The next hop goes by the `content-length` header, which is forwarded.
    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(b) | Self::H1Watched(b, _) => b.size_hint(),
            Self::H2(b) => b.size_hint(),
        }
    }
}

/// The peer gave a response stream no flow-control window for the send timeout; the stream
/// was reset (`CANCEL`).
#[derive(Debug, thiserror::Error)]
#[error("the peer opened no flow-control window for {0:?}: stream reset")]
pub(crate) struct SendTimedOut(pub Duration);

/// Writes `body` to `tx` to its end (data, then trailers or an empty end-of-stream frame).
///
/// Each chunk waits for flow-control capacity before it is queued, so a slow reader holds
/// back the body's producer rather than growing our buffers. A body error resets the stream
/// (`INTERNAL_ERROR`), and a reset from the peer stops the copy. The wait for capacity is not
/// bounded: see [`pipe_within`].
///
/// # Errors
/// The body's error, the peer's reset, or the connection's error.
pub(crate) fn pipe<B>(body: B, tx: SendStream<Bytes>) -> impl Future<Output = Result<(), BoxError>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    pipe_within(body, tx, None)
}

/// [`pipe`], giving up when one wait for the peer's flow-control window lasts `send_timeout`:
/// the stream is reset (`CANCEL`) and the body dropped. The timer is armed only when a
/// chunk has to wait (boxed, so it costs the future nothing otherwise) and re-armed for each
/// wait, so a reader that keeps opening its window, however slowly, is never cut off.
///
/// # Errors
/// As [`pipe`], and [`SendTimedOut`].
pub(crate) async fn pipe_within<B>(
    body: B,
    mut tx: SendStream<Bytes>,
    send_timeout: Option<Duration>,
) -> Result<(), BoxError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut stall: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        // The next frame; registered for the peer's RST_STREAM while waiting for it.
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reset) = tx.poll_reset(cx) {
                return Poll::Ready(Err(reset_error(reset)));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => return Ok(tx.send_data(Bytes::new(), true)?),
            Some(Err(e)) => {
                tx.send_reset(Reason::INTERNAL_ERROR);
                return Err(e.into());
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if !data.is_empty() {
                    // A minimal claim, raised to the chunk's length by `send_data`: claiming
                    // a whole chunk up front pins connection window for a stream that may wait.
                    tx.reserve_capacity(1);
                    if tx.capacity() == 0
                        && let Some(limit) = send_timeout
                    {
                        arm(&mut stall, limit);
                    }
                    while tx.capacity() == 0 {
                        let waited = poll_fn(|cx| {
                            if let Poll::Ready(c) = tx.poll_capacity(cx) {
                                return Poll::Ready(Some(c));
                            }
                            match &mut stall {
                                Some(s) => s.as_mut().poll(cx).map(|()| None),
                                None => Poll::Pending,
                            }
                        })
                        .await;
                        match waited {
                            Some(Some(Ok(_))) => {}
                            Some(Some(Err(e))) => return Err(e.into()),
                            Some(None) => {
                                return Err("the HTTP/2 stream closed while sending".into());
                            }
                            None => {
                                tx.send_reset(Reason::CANCEL);
                                let limit = send_timeout.unwrap_or_default();
                                return Err(SendTimedOut(limit).into());
                            }
                        }
                    }
                }
                tx.send_data(data, eos)?;
                if eos {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tx.reserve_capacity(0);
                    return Ok(tx.send_trailers(trailers)?);
                }
            }
        }
    }
}

/// Sets `stall` to go off `limit` from now (boxed once per body, then reset per wait).
fn arm(stall: &mut Option<Pin<Box<tokio::time::Sleep>>>, limit: Duration) {
    let at = tokio::time::Instant::now() + limit;
    match stall {
        Some(s) => s.as_mut().reset(at),
        None => *stall = Some(Box::pin(tokio::time::sleep_until(at))),
    }
}

/// The end of the body for the peer's `RST_STREAM(NO_ERROR)`, else the error.
fn early_end_or(e: h2::Error) -> Option<Result<Frame<Bytes>, h2::Error>> {
    (e.reason() != Some(Reason::NO_ERROR)).then_some(Err(e))
}

fn reset_error(reset: Result<Reason, h2::Error>) -> BoxError {
    match reset {
        Ok(reason) => h2::Error::from(reason).into(),
        Err(e) => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::time::Duration;

    use super::*;
    use http_body_util::{BodyExt, Full};

    type Server = h2::server::Connection<tokio::io::DuplexStream, Bytes>;

    /// A real h2 client/server pair over an in-memory duplex pipe.
    async fn pair() -> (h2::client::SendRequest<Bytes>, Server) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { h2::server::handshake(s).await.expect("server") });
        let (tx, conn) = h2::client::handshake(c).await.expect("client");
        tokio::spawn(conn);
        (tx, server.await.expect("join"))
    }

    /// Frames handed out one per poll; then the end, or (`endless`) nothing ever again.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        endless: bool,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.frames.pop_front() {
                Some(f) => Poll::Ready(Some(Ok(f))),
                None if self.endless => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    #[tokio::test]
    async fn a_body_larger_than_the_window_arrives_whole_with_trailers() {
        let (mut tx, mut server) = pair().await;
        // 200 KiB: more than the default 64 KiB stream window, so the copy has to wait for
        // capacity that only the reader's release gives back.
        let mut frames: VecDeque<Frame<Bytes>> = (0..50u8)
            .map(|i| Frame::data(Bytes::from(vec![i; 4096])))
            .collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        frames.push_back(Frame::trailers(trailers));
        let req = http::Request::post("https://peer/upload").body(()).unwrap();
        let (resp, send) = tx.send_request(req, false).unwrap();
        let body = Frames {
            frames,
            endless: false,
        };
        let writer = tokio::spawn(pipe(body, send));
        let (req, mut respond) = server.accept().await.expect("a stream").expect("ok");
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let collected = RecvBody::new(req.into_body())
            .collect()
            .await
            .expect("body");
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        let bytes = collected.to_bytes();
        assert_eq!(bytes.len(), 50 * 4096);
        for (i, chunk) in bytes.chunks(4096).enumerate() {
            assert!(chunk.iter().all(|b| usize::from(*b) == i), "chunk {i}");
        }
        writer.await.unwrap().expect("pipe finished");
        let send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        pipe(Full::new(Bytes::from_static(b"done")), send)
            .await
            .unwrap();
        let body = RecvBody::new(resp.await.unwrap().into_body());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "done");
    }

    #[tokio::test]
    async fn a_reset_with_no_error_ends_a_body_and_any_other_fails_it() {
        for (reason, fails) in [(Reason::NO_ERROR, false), (Reason::INTERNAL_ERROR, true)] {
            let (mut tx, mut server) = pair().await;
            let req = http::Request::get("https://peer/x").body(()).unwrap();
            let (resp, _send) = tx.send_request(req, true).unwrap();
            let (_req, mut respond) = server.accept().await.expect("a stream").expect("ok");
            tokio::spawn(async move { while server.accept().await.is_some() {} });
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(Bytes::from_static(b"partial"), false)
                .unwrap();
            let body = RecvBody::new(resp.await.unwrap().into_body());
            send.send_reset(reason);
            let collected = body.collect().await;
            assert_eq!(collected.is_err(), fails, "{reason:?}: {collected:?}");
        }
    }

    #[tokio::test]
    async fn a_reader_that_opens_no_window_is_reset_after_the_send_timeout() {
        // The reader's stream window is zero: not one byte may be sent.
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { h2::server::handshake(s).await.expect("server") });
        let (mut tx, conn) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(c)
            .await
            .expect("client");
        tokio::spawn(conn);
        let mut server = server.await.expect("join");
        let req = http::Request::get("https://peer/x").body(()).unwrap();
        let (resp, _send) = tx.send_request(req, true).unwrap();
        let (_req, mut respond) = server.accept().await.expect("a stream").expect("ok");
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let started = std::time::Instant::now();
        let limit = Duration::from_millis(300);
        let body = Full::new(Bytes::from_static(b"never sent"));
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            pipe_within(body, send, Some(limit)),
        )
        .await
        .expect("the copy gives up")
        .expect_err("a send timeout is an error");
        assert!(err.is::<SendTimedOut>(), "{err}");
        assert!(started.elapsed() >= limit);
        // The reader learns of it: its body fails with CANCEL.
        let body = RecvBody::new(resp.await.unwrap().into_body());
        let e = body.collect().await.expect_err("reset");
        assert_eq!(e.reason(), Some(Reason::CANCEL), "{e}");
    }

    #[tokio::test]
    async fn a_reset_from_the_reader_stops_the_copy() {
        let (mut tx, mut server) = pair().await;
        let req = http::Request::post("https://peer/upload").body(()).unwrap();
        let (_resp, send) = tx.send_request(req, false).unwrap();
        // A body that never ends: only the reset can stop the copy.
        let endless = Frames {
            frames: VecDeque::from([Frame::data(Bytes::from_static(b"first"))]),
            endless: true,
        };
        let writer = tokio::spawn(pipe(endless, send));
        let (_req, mut respond) = server.accept().await.expect("a stream").expect("ok");
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        respond.send_reset(Reason::CANCEL);
        let err = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the copy stops")
            .unwrap()
            .expect_err("a reset is an error");
        let reason = err.downcast_ref::<h2::Error>().and_then(h2::Error::reason);
        assert_eq!(reason, Some(Reason::CANCEL), "{err}");
    }
}
