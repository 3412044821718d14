//! The TLS alert tap: what a peer that refused us said, kept for the error we report.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::AlertDescription;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client::received_alert;

/// Passes I/O through and remembers the first fatal TLS alert a read returns, before hyper
/// reduces the error to a message (HTTP/2 stringifies connection errors for its streams).
///
/// A server that refuses our certificate sends its alert and closes; if we write before we
/// read (HTTP/2 writes its preface and settings right away), the write fails with a reset
/// while the alert still sits unread in the socket buffer. So a failed write is held back
/// until a read has collected what the peer sent before it went away.
pub(crate) struct AlertTap<T> {
    inner: T,
    alert: Arc<OnceLock<AlertDescription>>,
    /// A write error waiting for the read that may explain it.
    held: Option<io::Error>,
}

impl<T> AlertTap<T> {
    pub(crate) fn new(inner: T, alert: Arc<OnceLock<AlertDescription>>) -> Self {
        Self {
            inner,
            alert,
            held: None,
        }
    }

    fn note(&self, result: &io::Result<()>) {
        if let Err(e) = result
            && let Some(alert) = received_alert(e)
        {
            let _ = self.alert.set(alert);
        }
    }
}

impl<T: AsyncRead + Unpin> AlertTap<T> {
    /// A write failed with `err`: read until the peer's last words (an alert, EOF or an
    /// error) arrive, then report `err`. The peer is gone, so the read completes promptly.
    fn settle(&mut self, cx: &mut Context<'_>, err: io::Error) -> Poll<io::Error> {
        let mut scratch = [0u8; 512];
        while self.alert.get().is_none() {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    self.held = Some(err);
                    return Poll::Pending;
                }
                // Data after a failed write is of no use to anyone: keep looking for the alert.
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                Poll::Ready(result) => {
                    self.note(&result);
                    break;
                }
            }
        }
        Poll::Ready(err)
    }

    /// Runs a write-side operation, holding back its error until [`Self::settle`] is done.
    fn guard<R>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(&mut T, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if let Some(err) = self.held.take() {
            return self.settle(cx, err).map(Err);
        }
        match op(&mut self.inner, cx) {
            // Only a peer that went away has last words to read; any other write error (the
            // socket still open) is reported at once rather than waiting on a read.
            Poll::Ready(Err(err))
                if matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                self.settle(cx, err).map(Err)
            }
            other => other,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AlertTap<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(result) = &polled {
            self.note(result);
        }
        polled
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AlertTap<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, |io, cx| Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, |io, cx| Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard(cx, |io, cx| Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
