//! Lingering close (nginx's `lingering_close`): a server socket that is closed while its client
//! is still sending is not closed at once, or the kernel answers the client's next bytes with a
//! TCP reset, and a client that is still writing then sees "connection reset" or "broken pipe"
//! *before* it reads the last thing we sent it: the HTTP/2 GOAWAY that says why
//! (`ENHANCE_YOUR_CALM` to a rapid-reset client), a TLS alert, an error response.
//!
//! [`Linger`] wraps the accepted TCP socket beneath TLS. When the connection is dropped, the
//! socket goes to a small task that shuts down our sending side (the client reads everything we
//! wrote, then end-of-stream) and reads and discards what the client still sends, until it
//! closes too, for at most [`LINGER_FOR`] and [`LINGER_BYTES`]. The wrapper costs one branch per
//! read and write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long a closed connection's socket keeps reading what the client still sends.
pub(crate) const LINGER_FOR: Duration = Duration::from_secs(2);

/// How many bytes a closed connection's socket reads (and discards) at most.
pub(crate) const LINGER_BYTES: usize = 256 * 1024;

/// An accepted socket that closes lingering when dropped (see the module docs).
#[derive(Debug)]
pub(crate) struct Linger(Option<TcpStream>);

impl Linger {
    pub(crate) fn new(tcp: TcpStream) -> Self {
        Self(Some(tcp))
    }

    fn io(&mut self) -> Pin<&mut TcpStream> {
        // `None` only inside `drop`.
        Pin::new(self.0.as_mut().expect("socket present until drop"))
    }
}

impl Drop for Linger {
    fn drop(&mut self) {
        let Some(tcp) = self.0.take() else { return };
        // Outside a runtime (it is shutting down) the socket just closes.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain(tcp));
        }
    }
}

/// Sends our end-of-stream, then reads until the client's, an error, [`LINGER_FOR`] or
/// [`LINGER_BYTES`]; then the socket closes.
async fn drain(mut tcp: TcpStream) {
    let _ = tcp.shutdown().await;
    let _ = tokio::time::timeout(LINGER_FOR, async {
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < LINGER_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

impl AsyncRead for Linger {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Linger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Our side closes while the client keeps writing: the client reads what we wrote and our
    /// end-of-stream, and its writes after that still go through (no reset). A plain close
    /// answers the first of them with a reset, failing the next write.
    #[tokio::test]
    async fn the_client_reads_our_last_bytes_and_may_keep_writing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut server = Linger::new(tcp);
        // Unread bytes in our receive buffer: a plain close would reset at once.
        client.write_all(b"more requests").await.expect("write");
        server.write_all(b"goaway").await.expect("write");
        drop(server);
        let mut got = Vec::new();
        client
            .read_to_end(&mut got)
            .await
            .expect("read to our end-of-stream");
        assert_eq!(got, b"goaway");
        for i in 0..20 {
            client
                .write_all(&[0u8; 1024])
                .await
                .unwrap_or_else(|e| panic!("write {i} after our close: {e}"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
