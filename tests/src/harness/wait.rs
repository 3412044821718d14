//! Waiting on a condition instead of a fixed sleep: poll a check until it holds or a deadline
//! passes. Every wait in the test crate goes through [`until`] (or [`eventually`], which turns
//! the timeout into an error naming what was awaited).

use std::time::{Duration, Instant};

use anyhow::bail;

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `check` every [`POLL`] until it returns `Some`, for at most `within`; `None` on timeout.
/// `check` runs at least once, and once more after the deadline has passed.
pub async fn until<T>(within: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
///
/// # Errors
/// `what` with the timeout when `check` never succeeded.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    match until(timeout, check).await {
        Some(v) => Ok(v),
        None => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// [`until`] for synchronous code (a plain thread, a `Drop`): polls `check` every [`POLL`] until
/// it returns `Some`, for at most `within`; `None` on timeout.
pub fn until_blocking<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits up to `within` for `child` to exit; its status, or `None` when it is still running.
///
/// # Panics
/// When the child's status cannot be read.
pub fn child_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    until_blocking(within, || child.try_wait().expect("wait"))
}

/// Waits for the peer to close `stream` (EOF or reset) and returns how long that took from the
/// call; panics if it is still open after `within` or sends data instead.
pub async fn closed_by_peer(stream: &mut tokio::net::TcpStream, within: Duration) -> Duration {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(within, stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("the peer did not close the connection within {within:?}"));
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the peer to close, read {read:?}"
    );
    started.elapsed()
}
