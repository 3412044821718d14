//! Streams bytes both ways between the side that opened a connection (the client) and the
//! other (the server) until both directions are done, one fails, the idle timeout passes, or
//! `stop` says why the sidecar cuts it.
//!
//! Half-close: end of stream on one side's read shuts down the write side of the other (a
//! TLS `close_notify`, or a TCP FIN), and the other direction carries on until it ends too. A
//! TLS peer that closes without `close_notify` counts as an end of stream: a truncation
//! attack is not a concern for a protocol that frames its own messages (PostgreSQL does).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The byte counters a pump adds to, one per direction (the TCP listener's, or the WebSocket
/// tunnel's: issue 17).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counters<'a> {
    /// Client to server.
    pub client_to_server: &'a IntCounter,
    /// Server to client.
    pub server_to_client: &'a IntCounter,
}

impl<'a> From<&'a super::metrics::ListenerMetrics> for Counters<'a> {
    fn from(m: &'a super::metrics::ListenerMetrics) -> Self {
        Self {
            client_to_server: &m.client_to_server,
            server_to_client: &m.server_to_client,
        }
    }
}

/// Bytes read (then written) per call; one buffer per direction per connection.
const CHUNK: usize = 16 * 1024;

/// How a pumped connection went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flow {
    /// Bytes from client to server.
    pub client_to_server: u64,
    /// Bytes from server to client.
    pub server_to_client: u64,
    /// `closed`, `io_error`, `idle_timeout`, or what `stop` returned.
    pub end: &'static str,
}

/// When either direction last moved a byte (milliseconds since `start`).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Pumps until the connection ends; see the module docs.
pub(crate) async fn pump<C, S>(
    client: C,
    server: S,
    idle: Duration,
    metrics: impl Into<Counters<'_>>,
    stop: impl Future<Output = &'static str>,
) -> Flow
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = metrics.into();
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = tokio::io::split(server);
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        tokio::try_join!(
            copy(&mut cr, &mut sw, &up, metrics.client_to_server, &activity),
            copy(&mut sr, &mut cw, &down, metrics.server_to_client, &activity),
        )
    };
    let idle_out = async {
        loop {
            let deadline = activity.last() + idle;
            tokio::time::sleep_until(deadline.into()).await;
            if activity.last() + idle <= Instant::now() {
                return;
            }
        }
    };
    let end = tokio::select! {
        r = both => if r.is_ok() { "closed" } else { "io_error" },
        () = idle_out => "idle_timeout",
        why = stop => why,
    };
    Flow {
        client_to_server: up.load(Ordering::Relaxed),
        server_to_client: down.load(Ordering::Relaxed),
        end,
    }
}

async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    total: &AtomicU64,
    metric: &IntCounter,
    activity: &Activity,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer gone without close_notify: its end of stream.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // Half-close: the other side reads end of stream, and may still answer.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        let n = n as u64;
        total.fetch_add(n, Ordering::Relaxed);
        metric.inc_by(n);
        activity.touch();
    }
}
