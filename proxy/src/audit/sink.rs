//! The process's audit sink: lines formatted into a buffer on the request path, written in
//! batches by a flusher thread (or at once with a zero flush interval), the hash chain's
//! `prev` filled in just before each write.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::chain::{GENESIS, PREV_FROM_END, anchor_path, last_line_hash, read_anchor};
use super::line::{AuditRecord, OutboundRecord};
use super::line::{push_json_str, push_millis, push_trace_id, push_u64};
use crate::config::AuditConfig;
use crate::hexdigits;
use sha2::{Digest, Sha256};

/// Buffered bytes past which the flusher thread is woken at once instead of at the interval.
/// 128 KiB, not 32: with the chain's ~500-byte lines a 32 KiB batch woke the writer every
/// ~60 lines, and on two busy CPUs its context switches cost the event loops more than the
/// bytes (issue 19).
pub(super) const FLUSH_BYTES: usize = 128 * 1024;
/// Buffered bytes past which a request path writes the buffer itself (the flusher is behind).
pub(super) const MAX_BUFFERED: usize = 1024 * 1024;
/// Writes to a pipe up to this size are atomic (POSIX `PIPE_BUF` on Linux).
const PIPE_BUF: usize = 4096;
#[cfg(test)]
#[path = "tests.rs"]
mod tests;

/// Where audit lines go, buffered: see the module documentation.
pub struct Sink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("flush_interval", &self.inner.interval)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Lines not yet written; request paths append here.
    buf: Mutex<Buffers>,
    /// The output; held for the whole of a write, so batches are written in the order they
    /// were swapped out. Request paths take it only past `MAX_BUFFERED` or with interval 0.
    out: Mutex<Output>,
    interval: Duration,
    /// The buffer passed `FLUSH_BYTES`: the flusher writes without waiting for the interval.
    urgent: AtomicBool,
    /// The flusher is counting down an interval (it will write without being woken); false
    /// while it is parked on an empty buffer, so the next line wakes it.
    armed: AtomicBool,
    flusher: OnceLock<Thread>,
}

struct Buffers {
    /// A line was buffered since the sink was made: later lines do not start the chain.
    started: bool,
    clock: Clock,
    cur: Vec<u8>,
    /// The other buffer, kept between writes so swapping allocates nothing.
    spare: Vec<u8>,
}

struct Output {
    w: Box<dyn Write + Send>,
    /// SHA-256 of the last line written (or [`GENESIS`]): the next line's `prev`.
    last: [u8; 32],
    /// `<path>.chain`: `last` in hex, rewritten after each batch, so a sidecar starting on a
    /// new or emptied file (after rotation) continues the chain of the file before it.
    anchor: Option<File>,
    /// A pipe or socket: write at most `PIPE_BUF` bytes at a time, cut at line ends.
    pipe: bool,
}

impl Sink {
    /// The sink `[audit]` asks for, or `None` when the audit log is disabled.
    ///
    /// # Errors
    /// The I/O error opening the file (or duplicating stdout), or starting the flusher thread.
    pub fn from_config(config: &AuditConfig) -> io::Result<Option<Self>> {
        if !config.enabled {
            return Ok(None);
        }
        let file = match &config.path {
            Some(path) => open_append(path)?,
            // A duplicate of fd 1: raw writes, without std's line buffering and stdout lock.
            None => File::from(io::stdout().as_fd().try_clone_to_owned()?),
        };
        let pipe = file.metadata().map_or(true, |m| {
            let t = m.file_type();
            t.is_fifo() || t.is_socket()
        });
        let mut last = [0; 32];
        let mut anchor = None;
        if let Some(path) = config.path.as_deref().filter(|_| !pipe) {
            // The chain continues from the file's last line; in a new or emptied (rotated)
            // file, from the last line written before, which the anchor file remembers.
            let anchor_path = anchor_path(path);
            last = match last_line_hash(path)? {
                Some(h) => h,
                None => read_anchor(&anchor_path).unwrap_or([0; 32]),
            };
            anchor = Some(
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o640)
                    .open(&anchor_path)?,
            );
        }
        let sink = Self::with_chain(Box::new(file), pipe, config.flush_interval, last)?;
        lock(&sink.inner.out).anchor = anchor;
        Ok(Some(sink))
    }

    /// A sink writing to `out` (`pipe`: cut writes at line ends to at most `PIPE_BUF` bytes),
    /// flushed every `flush_interval` (zero: every line at once, no flusher thread).
    ///
    /// # Errors
    /// The flusher thread cannot be started.
    #[cfg(test)]
    pub(crate) fn new(
        out: Box<dyn Write + Send>,
        pipe: bool,
        flush_interval: Duration,
    ) -> io::Result<Self> {
        Self::with_chain(out, pipe, flush_interval, [0; 32])
    }

    /// A sink writing to `out` like the tests' `Sink::new`, the chain continuing from a line whose SHA-256 is `last` (zeros: a new
    /// chain).
    ///
    /// # Errors
    /// The flusher thread cannot be started.
    pub(crate) fn with_chain(
        out: Box<dyn Write + Send>,
        pipe: bool,
        flush_interval: Duration,
        last: [u8; 32],
    ) -> io::Result<Self> {
        let inner = Arc::new(Inner {
            buf: Mutex::new(Buffers {
                started: false,
                clock: Clock::default(),
                cur: Vec::with_capacity(FLUSH_BYTES + PIPE_BUF),
                spare: Vec::with_capacity(FLUSH_BYTES + PIPE_BUF),
            }),
            out: Mutex::new(Output {
                w: out,
                last,
                anchor: None,
                pipe,
            }),
            interval: flush_interval,
            urgent: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            flusher: OnceLock::new(),
        });
        if !flush_interval.is_zero() {
            let weak = Arc::downgrade(&inner);
            let handle = thread::Builder::new()
                .name("gatehouse-audit".into())
                .spawn(move || flusher(&weak, flush_interval))?;
            let _ = inner.flusher.set(handle.thread().clone());
        }
        Ok(Self { inner })
    }

    /// Buffers an inbound line.
    pub(crate) fn record(&self, r: &AuditRecord<'_>) {
        self.push(|b| {
            b.extend_from_slice(b",\"direction\":\"inbound\",\"request_id\":");
            push_json_str(b, r.request_id);
            b.extend_from_slice(b",\"trace_id\":");
            push_trace_id(b, r.trace_id);
            b.extend_from_slice(b",\"caller\":");
            push_json_str(b, r.caller.as_str());
            b.extend_from_slice(b",\"caller_serial\":");
            push_json_str(b, r.caller_serial);
            b.extend_from_slice(b",\"policy_sha256\":");
            push_json_str(b, r.policy_sha256);
            b.extend_from_slice(b",\"method\":");
            push_json_str(b, r.method);
            b.extend_from_slice(b",\"path\":");
            push_json_str(b, r.path);
            b.extend_from_slice(b",\"route\":");
            match r.route {
                Some(route) => push_json_str(b, route),
                None => b.extend_from_slice(b"null"),
            }
            b.extend_from_slice(b",\"decision\":");
            push_json_str(b, r.outcome.decision());
            b.extend_from_slice(b",\"reason\":");
            push_json_str(b, r.outcome.reason());
            b.extend_from_slice(b",\"status\":");
            push_u64(b, u64::from(r.outcome.status().as_u16()));
            b.extend_from_slice(b",\"duration_ms\":");
            push_millis(b, r.duration);
        });
    }

    /// Buffers an outbound line.
    pub(crate) fn record_outbound(&self, r: &OutboundRecord<'_>) {
        self.push(|b| {
            b.extend_from_slice(b",\"direction\":\"outbound\",\"request_id\":");
            push_json_str(b, r.request_id);
            b.extend_from_slice(b",\"trace_id\":");
            push_trace_id(b, r.trace_id);
            b.extend_from_slice(b",\"upstream\":");
            push_json_str(b, r.upstream);
            b.extend_from_slice(b",\"server_id\":");
            push_json_str(b, r.server_id);
            b.extend_from_slice(b",\"server_serial\":");
            match r.server_serial {
                Some(s) => push_json_str(b, s),
                None => b.extend_from_slice(b"null"),
            }
            b.extend_from_slice(b",\"method\":");
            push_json_str(b, r.method);
            b.extend_from_slice(b",\"path\":");
            push_json_str(b, r.path);
            b.extend_from_slice(b",\"status\":");
            push_u64(b, u64::from(r.outcome.status().as_u16()));
            b.extend_from_slice(b",\"reason\":");
            push_json_str(b, r.outcome.reason());
            b.extend_from_slice(b",\"duration_ms\":");
            push_millis(b, r.duration);
        });
    }

    /// Writes every buffered line now and waits for the write.
    pub(crate) fn flush(&self) {
        self.inner.flush();
    }

    /// Appends one line (`{"time":...` + `fields` + the `prev` placeholder + `}\n`) and wakes
    /// or writes as needed.
    pub(super) fn push(&self, fields: impl FnOnce(&mut Vec<u8>)) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let inner = &*self.inner;
        let (was_empty, len) = {
            let mut g = lock(&inner.buf);
            let was_empty = g.cur.is_empty();
            let Buffers { cur: b, clock, .. } = &mut *g;
            b.extend_from_slice(b"{\"time\":\"");
            clock.push_rfc3339(b, now);
            b.push(b'"');
            fields(b);
            if !g.started {
                g.started = true;
                g.cur.extend_from_slice(b",\"chain_start\":true");
            }
            let b = &mut g.cur;
            // The writer puts the previous line's hash in place of the zeros.
            b.extend_from_slice(b",\"prev\":\"");
            b.extend_from_slice(GENESIS.as_bytes());
            b.extend_from_slice(b"\"}\n");
            (was_empty, b.len())
        };
        if inner.interval.is_zero() || len >= MAX_BUFFERED {
            inner.flush();
        } else if len >= FLUSH_BYTES {
            if !inner.urgent.swap(true, Ordering::AcqRel) {
                inner.wake();
            }
        } else if was_empty && !inner.armed.load(Ordering::SeqCst) {
            // The first line since the flusher went idle starts the interval. (Under load the
            // flusher stays armed from one write to the next: one wake per batch, not two.)
            inner.wake();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.inner.flush();
        // The flusher sees the sink gone and exits.
        self.inner.wake();
    }
}

impl Inner {
    fn wake(&self) {
        if let Some(t) = self.flusher.get() {
            t.unpark();
        }
    }

    fn flush(&self) {
        let mut out = lock(&self.out);
        let mut batch = {
            let mut g = lock(&self.buf);
            let spare = std::mem::take(&mut g.spare);
            std::mem::replace(&mut g.cur, spare)
        };
        if !batch.is_empty() {
            out.chain(&mut batch);
            if let Err(e) = out.write_batch(&batch) {
                // The chain went on over the lost lines: the next written line's `prev` names
                // a line that is not there, and `audit verify` shows the gap.
                let lines = batch.iter().filter(|&&b| b == b'\n').count();
                tracing::error!(error = %e, lines, "cannot write the audit log: lines lost");
            }
            if let Some(a) = &out.anchor {
                use std::os::unix::fs::FileExt;
                let mut text = [b'\n'; 65];
                text[..64].copy_from_slice(&hexdigits::of_hash(&out.last));
                if let Err(e) = a.write_all_at(&text, 0) {
                    tracing::warn!(error = %e, "cannot update the audit chain anchor file");
                }
            }
            batch.clear();
            if batch.capacity() > 4 * FLUSH_BYTES {
                // A backlog grew it: do not keep a large buffer around for good.
                batch.shrink_to(FLUSH_BYTES + PIPE_BUF);
            }
        }
        lock(&self.buf).spare = batch;
    }
}

impl Output {
    /// Fills in each line's `prev` with the hash of the line before it (the last line of the
    /// previous batch for the first), in place, and remembers the last line's hash.
    fn chain(&mut self, batch: &mut [u8]) {
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &batch[start..]) {
            let end = start + nl;
            let line = &mut batch[start..end];
            // Every line this sink formats ends with the placeholder; guard anyway.
            if let Some(at) = line.len().checked_sub(PREV_FROM_END - 1) {
                line[at..at + 64].copy_from_slice(&hexdigits::of_hash(&self.last));
            }
            self.last = Sha256::digest(&*line).into();
            start = end + 1;
        }
    }

    fn write_batch(&mut self, mut b: &[u8]) -> io::Result<()> {
        if !self.pipe {
            // One write: O_APPEND makes it land whole after any other appender's.
            return self.w.write_all(b).and_then(|()| self.w.flush());
        }
        while !b.is_empty() {
            let n = if b.len() <= PIPE_BUF {
                b.len()
            } else {
                match b[..PIPE_BUF].iter().rposition(|&c| c == b'\n') {
                    Some(i) => i + 1,
                    // One line longer than PIPE_BUF: written whole, it cannot be atomic.
                    None => b
                        .iter()
                        .position(|&c| c == b'\n')
                        .map_or(b.len(), |i| i + 1),
                }
            };
            self.w.write_all(&b[..n])?;
            b = &b[n..];
        }
        self.w.flush()
    }
}

/// The `time` of audit lines: RFC 3339 in UTC, as `time`'s `Rfc3339` writes it (fraction
/// digits without trailing zeros, none at a whole second), with the date and time of day
/// formatted once per second instead of once per line.
struct Clock {
    /// Seconds since the Unix epoch of `text`; `u64::MAX` before the first line.
    secs: u64,
    /// `YYYY-MM-DDTHH:MM:SS` of `secs`.
    text: [u8; 19],
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            secs: u64::MAX,
            text: *b"1970-01-01T00:00:00",
        }
    }
}

impl Clock {
    /// Appends the instant `since_epoch` after the Unix epoch.
    fn push_rfc3339(&mut self, b: &mut Vec<u8>, since_epoch: Duration) {
        let secs = since_epoch.as_secs();
        if secs != self.secs {
            self.secs = secs;
            let mut text = Vec::with_capacity(32);
            // Years 0..=9999 always format; past them the epoch's text stays (not reached).
            let whole = i64::try_from(secs)
                .ok()
                .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok());
            if let Some(t) = whole
                && t.format_into(&mut text, &Rfc3339).is_ok()
                && let Some(head) = text.get(..19)
            {
                self.text.copy_from_slice(head);
            }
        }
        b.extend_from_slice(&self.text);
        let nanos = since_epoch.subsec_nanos();
        if nanos != 0 {
            let mut frac = *b".000000000";
            let mut n = nanos;
            for d in frac[1..].iter_mut().rev() {
                // Invariant: n % 10 < 10.
                *d = b'0' + (n % 10) as u8;
                n /= 10;
            }
            let digits = frac.iter().rposition(|&d| d != b'0').unwrap_or(0);
            b.extend_from_slice(&frac[..=digits]);
        }
        b.push(b'Z');
    }
}

/// The flusher thread: parked while the buffer is empty; woken by the first line, it writes
/// once the interval has passed since (or at once when the buffer passes `FLUSH_BYTES`). Lines
/// that arrived during a write start the next interval at once, without a wake; it disarms
/// and parks only on an empty buffer (disarm first, then look: a line pushed in between either
/// is seen here or sees `armed` false and wakes it). Exits when the sink is dropped.
fn flusher(sink: &Weak<Inner>, interval: Duration) {
    loop {
        thread::park();
        match sink.upgrade() {
            Some(inner) => inner.armed.store(true, Ordering::SeqCst),
            None => return,
        }
        let mut deadline = Instant::now() + interval;
        loop {
            let Some(inner) = sink.upgrade() else { return };
            let now = Instant::now();
            if now >= deadline || inner.urgent.swap(false, Ordering::AcqRel) {
                inner.flush();
                inner.armed.store(false, Ordering::SeqCst);
                if lock(&inner.buf).cur.is_empty() {
                    break;
                }
                inner.armed.store(true, Ordering::SeqCst);
                deadline = Instant::now() + interval;
                continue;
            }
            drop(inner);
            thread::park_timeout(deadline - now);
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; should it, the data is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}
