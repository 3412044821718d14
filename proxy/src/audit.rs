//! The audit log: one JSON line per decision, written to stdout (default) or an append-only
//! file by a process-wide [`Sink`] that `sidecar run` [`install`]s at startup. Audit lines do
//! not go through `tracing` (no dispatch, per-layer filters or field visitors); operational
//! logs stay on `tracing` and stderr, and never enter the audit stream.
//!
//! An inbound line ([`record`]) has exactly these fields, in this order:
//! `{"time","direction":"inbound","request_id","trace_id","caller","caller_serial",
//! "policy_sha256","method","path","route","decision","reason","status","duration_ms",
//! ["chain_start",]"prev"}`; `path` is the normalized path (the raw one when normalization
//! refused it), `route` is `null` when no route matched, `trace_id` is the W3C trace id of the
//! request's `traceparent` (`null` without a valid one), `caller_serial` the serial number of
//! the caller's certificate (lowercase hex) and `policy_sha256` the SHA-256 of the policy file
//! that decided. An outbound line ([`record_outbound`]): `{"time","direction":"outbound",
//! "request_id","trace_id","upstream","server_id","server_serial","method","path","status",
//! "reason","duration_ms",["chain_start",]"prev"}` (`server_serial` is `null` when no TLS
//! connection was made). `time` is RFC 3339 UTC, `duration_ms` has three decimals.
//!
//! Hash chain: `prev` is the SHA-256 (lowercase hex) of the previous line's bytes, without its
//! newline. The first line a sink writes carries `"chain_start":true`; its `prev` is the hash
//! of the last line already in the file it appends to, or [`GENESIS`] (64 zeros) for a new
//! file or a pipe. Request paths write `prev` as 64 zeros, a placeholder at a fixed distance
//! from the line's end; the writer, which sees batches in order under the output lock, fills
//! it in place just before the write, so hashing costs the request path nothing.
//! [`verify`] checks a chain (`sidecar audit verify FILE…`).
//!
//! Writing (`[audit] flush_interval`, default [`crate::config::DEFAULT_AUDIT_FLUSH_INTERVAL`]):
//! lines are formatted into an in-memory buffer and written in batches, by a small dedicated
//! thread (no async runtime needed) when the buffer passes [`FLUSH_BYTES`] or the oldest line
//! has waited the flush interval, and by [`flush`] at the end of a graceful shutdown. A batch is
//! one `write` to a file; to a pipe it is cut at line ends into writes of at most `PIPE_BUF`
//! bytes, which the kernel never interleaves with another writer's. Request paths only take
//! the buffer's lock to append a line; the write happens outside it (the buffer is swapped
//! out), and a request path waits for a write only when [`MAX_BUFFERED`] bytes are pending
//! (the output is stalled: back-pressure rather than unbounded memory or lost lines). A flush
//! interval of zero writes every line at once, from the request path (one `write` per line).
//! With `[audit] enabled = false` nothing is installed and [`record`] returns at once.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use gatehouse_policy::SpiffeId;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::AuditConfig;

// issue 17: the TCP connection line (a child module: it uses the sink's line builder).
#[path = "audit_tcp.rs"]
mod tcp;
use sha2::{Digest, Sha256};
pub use tcp::{TcpRecord, record_tcp};

/// Buffered bytes past which the flusher thread is woken at once instead of at the interval.
pub const FLUSH_BYTES: usize = 32 * 1024;
/// Buffered bytes past which a request path writes the buffer itself (the flusher is behind).
pub const MAX_BUFFERED: usize = 1024 * 1024;
/// Writes to a pipe up to this size are atomic (POSIX `PIPE_BUF` on Linux).
const PIPE_BUF: usize = 4096;
/// The `prev` of a chain's first line when it follows no line: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// How every line ends: `"prev":"` + 64 hex digits + `"}\n`; the digits start this many
/// bytes before the end of the line (its newline included).
const PREV_FROM_END: usize = 64 + 3;

/// One inbound decision, as logged.
#[derive(Debug)]
pub struct AuditRecord<'a> {
    /// The request id (also sent to the app and in error bodies).
    pub request_id: &'a str,
    /// The W3C trace id of the request's `traceparent` (logged as 32 lowercase hex digits), if
    /// valid.
    pub trace_id: Option<&'a [u8; 16]>,
    /// The verified caller.
    pub caller: &'a SpiffeId,
    /// The serial number of the caller's certificate, lowercase hex.
    pub caller_serial: &'a str,
    /// SHA-256 of the policy file that decided, lowercase hex.
    pub policy_sha256: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Normalized path (raw when refused).
    pub path: &'a str,
    /// Deciding route, if any.
    pub route: Option<&'a str>,
    /// `allow`, `deny`, `audit_deny` or `reject` (refused before or without the policy's say:
    /// path, method spelling, framing, a peer no longer trusted).
    pub decision: &'a str,
    /// `allowed`, `no_route`, `not_allowed`, `bad_path`, `bad_method`,
    /// `bad_transfer_encoding`, `unsupported_transfer_coding` or `peer_not_trusted`.
    pub reason: &'a str,
    /// Response status sent to the caller.
    pub status: u16,
    /// Time from request head to response head.
    pub duration: Duration,
}

/// One outbound request, as logged.
#[derive(Debug)]
pub struct OutboundRecord<'a> {
    /// The request id (the app's or the one the sidecar assigned; the peer logs the same).
    pub request_id: &'a str,
    /// The W3C trace id sent upstream (the app's, or the one the sidecar created).
    pub trace_id: Option<&'a [u8; 16]>,
    /// The `[[outbound]]` entry's name.
    pub upstream: &'a str,
    /// The peer's pinned SPIFFE ID.
    pub server_id: &'a str,
    /// The serial number of the server's certificate, lowercase hex, when a connection was
    /// made.
    pub server_serial: Option<&'a str>,
    /// HTTP method.
    pub method: &'a str,
    /// Request path as the app sent it.
    pub path: &'a str,
    /// Response status sent to the app.
    pub status: u16,
    /// `forwarded`, or why the sidecar answered itself.
    pub reason: &'a str,
    /// Time from request head to response head.
    pub duration: Duration,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Makes `sink` the process's audit sink. Only the first call installs; later ones hand their
/// sink back.
///
/// # Errors
/// The sink, when one is already installed.
pub fn install(sink: Sink) -> Result<(), Sink> {
    SINK.set(sink)
}

/// Whether an audit sink is installed (`[audit] enabled`, in `sidecar run`).
pub fn enabled() -> bool {
    SINK.get().is_some()
}

/// Logs an inbound decision (nothing when no sink is installed).
pub fn record(r: &AuditRecord<'_>) {
    if let Some(sink) = SINK.get() {
        sink.record(r);
    }
}

/// Logs an outbound request (nothing when no sink is installed).
pub fn record_outbound(r: &OutboundRecord<'_>) {
    if let Some(sink) = SINK.get() {
        sink.record_outbound(r);
    }
}

/// Writes every buffered line now and waits for the write: call at the end of a graceful
/// shutdown (after the drain), or lines of the last flush interval are lost.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.flush();
    }
}

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
    flusher: OnceLock<Thread>,
}

struct Buffers {
    /// A line was buffered since the sink was made: later lines do not start the chain.
    started: bool,
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
    pub fn new(
        out: Box<dyn Write + Send>,
        pipe: bool,
        flush_interval: Duration,
    ) -> io::Result<Self> {
        Self::with_chain(out, pipe, flush_interval, [0; 32])
    }

    /// [`Sink::new`], the chain continuing from a line whose SHA-256 is `last` (zeros: a new
    /// chain).
    ///
    /// # Errors
    /// The flusher thread cannot be started.
    pub fn with_chain(
        out: Box<dyn Write + Send>,
        pipe: bool,
        flush_interval: Duration,
        last: [u8; 32],
    ) -> io::Result<Self> {
        let inner = Arc::new(Inner {
            buf: Mutex::new(Buffers {
                started: false,
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
    pub fn record(&self, r: &AuditRecord<'_>) {
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
            push_json_str(b, r.decision);
            b.extend_from_slice(b",\"reason\":");
            push_json_str(b, r.reason);
            b.extend_from_slice(b",\"status\":");
            push_u64(b, u64::from(r.status));
            b.extend_from_slice(b",\"duration_ms\":");
            push_millis(b, r.duration);
        });
    }

    /// Buffers an outbound line.
    pub fn record_outbound(&self, r: &OutboundRecord<'_>) {
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
            push_u64(b, u64::from(r.status));
            b.extend_from_slice(b",\"reason\":");
            push_json_str(b, r.reason);
            b.extend_from_slice(b",\"duration_ms\":");
            push_millis(b, r.duration);
        });
    }

    /// Writes every buffered line now and waits for the write.
    pub fn flush(&self) {
        self.inner.flush();
    }

    /// Appends one line (`{"time":...` + `fields` + the `prev` placeholder + `}\n`) and wakes
    /// or writes as needed.
    fn push(&self, fields: impl FnOnce(&mut Vec<u8>)) {
        let now = OffsetDateTime::now_utc();
        let inner = &*self.inner;
        let (was_empty, len) = {
            let mut g = lock(&inner.buf);
            let was_empty = g.cur.is_empty();
            let b = &mut g.cur;
            b.extend_from_slice(b"{\"time\":\"");
            // Into a Vec this cannot fail for years 0..=9999.
            let _ = now.format_into(b, &Rfc3339);
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
        } else if was_empty {
            // The first line since the last write starts the interval.
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
                push_hex_into(&mut text[..64], &out.last);
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
        while let Some(nl) = batch[start..].iter().position(|&c| c == b'\n') {
            let end = start + nl;
            let line = &mut batch[start..end];
            // Every line this sink formats ends with the placeholder; guard anyway.
            if let Some(at) = line.len().checked_sub(PREV_FROM_END - 1) {
                push_hex_into(&mut line[at..at + 64], &self.last);
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

/// The flusher thread: parked while the buffer is empty; woken by the first line, it writes
/// once the interval has passed since (or at once when the buffer passes `FLUSH_BYTES`).
/// Exits when the sink is dropped.
fn flusher(sink: &Weak<Inner>, interval: Duration) {
    loop {
        thread::park();
        let deadline = Instant::now() + interval;
        loop {
            let Some(inner) = sink.upgrade() else { return };
            let now = Instant::now();
            if now >= deadline || inner.urgent.swap(false, Ordering::AcqRel) {
                inner.flush();
                break;
            }
            drop(inner);
            thread::park_timeout(deadline - now);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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

/// What [`verify`] found in a chain that holds.
#[derive(Debug)]
pub struct Verified {
    /// Lines verified.
    pub lines: u64,
    /// Lines that start a chain (`"chain_start":true`): a new file, or a sidecar (re)start.
    pub starts: u64,
    /// The first line's `prev` when it names a line of a file not given (not [`GENESIS`]).
    pub continues_from: Option<String>,
    /// SHA-256 of the last line: record it elsewhere to detect the tail being cut later.
    pub last: String,
}

/// Checks the hash chain of `files`, read in order as one sequence of lines.
///
/// # Errors
/// A message naming the first broken, missing or reordered line by file and line number, or
/// the file that cannot be read.
pub fn verify(files: &[std::path::PathBuf]) -> Result<Verified, String> {
    use std::io::BufRead;
    const START: &[u8] = b",\"chain_start\":true,\"prev\":\"";
    const PREV: &[u8] = b",\"prev\":\"";
    let mut last: Option<([u8; 32], String)> = None;
    let mut v = Verified {
        lines: 0,
        starts: 0,
        continues_from: None,
        last: String::new(),
    };
    let mut line = Vec::with_capacity(1024);
    for path in files {
        let name = path.display();
        let f = File::open(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
        let mut r = io::BufReader::with_capacity(256 * 1024, f);
        let mut n: u64 = 0;
        loop {
            line.clear();
            let got = r
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("{name}: cannot read after line {n}: {e}"))?;
            if got == 0 {
                break;
            }
            n += 1;
            if line.last() == Some(&b'\n') {
                line.pop();
            }
            let at = format!("{name}:{n}");
            // `…,"prev":"<64 hex>"}`: the placeholder the sink fills in.
            let prev = line
                .len()
                .checked_sub(PREV_FROM_END - 1)
                .filter(|&i| {
                    line.ends_with(b"\"}")
                        && line[..i].ends_with(PREV)
                        && line[i..i + 64]
                            .iter()
                            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
                })
                .map(|i| &line[i..i + 64])
                .ok_or_else(|| {
                    format!(
                        "{at}: not a chained audit line (it must end with ,\"prev\":\"<64 hex \
                         digits>\"}}): the line was changed, or the file is not a Gatehouse \
                         audit log"
                    )
                })?;
            let start = line[..line.len() - (PREV_FROM_END - 1)].ends_with(START);
            let genesis = prev == GENESIS.as_bytes();
            match &last {
                Some((_, before)) if start && genesis && n == 1 => {
                    return Err(format!(
                        "{at}: starts a new chain (\"prev\" is 64 zeros), but it follows \
                         {before}: give the files in the order they were written, oldest first, \
                         each once"
                    ));
                }
                // A sidecar (re)started on a pipe, or a new file: a new chain.
                _ if start && genesis => {}
                Some((hash, _)) if prev == hex_of(hash) => {}
                Some((_, before)) => {
                    return Err(format!(
                        "{at}: broken chain: its \"prev\" is not the SHA-256 of the line before \
                         it ({before}): that line was changed, or lines between them were removed \
                         or reordered"
                    ));
                }
                None if start => {
                    v.continues_from = Some(String::from_utf8_lossy(prev).into_owned());
                }
                None => {
                    return Err(format!(
                        "{at}: the chain does not start here (the line has no \"chain_start\" and \
                         its \"prev\" names a line not given): the lines before it were removed, \
                         or give the earlier files first"
                    ));
                }
            }
            if start {
                v.starts += 1;
            }
            v.lines += 1;
            last = Some((Sha256::digest(&line).into(), at));
        }
    }
    match last {
        Some((hash, _)) => {
            v.last = hex::encode(hash);
            Ok(v)
        }
        None => Err("no audit lines to verify: the files are empty".into()),
    }
}

/// The anchor file of the audit file at `path`: `<path>.chain`.
pub fn anchor_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".chain");
    p.into()
}

/// The hash an anchor file holds (64 hex digits), if it holds one.
fn read_anchor(path: &Path) -> Option<[u8; 32]> {
    let text = std::fs::read(path).ok()?;
    let digits = text.get(..64)?;
    let mut out = [0; 32];
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// SHA-256 of the last line of the file at `path`, `None` when it is empty or missing: the
/// `prev` of the first line appended to it. Reads only the file's tail.
fn last_line_hash(path: &Path) -> io::Result<Option<[u8; 32]>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Lines are short; read backwards in growing windows until a line start is found.
    let mut window: u64 = 64 * 1024;
    loop {
        let from = len.saturating_sub(window);
        f.seek(SeekFrom::Start(from))?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail)?;
        let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
        match body.iter().rposition(|&c| c == b'\n') {
            Some(i) => return Ok(Some(Sha256::digest(&body[i + 1..]).into())),
            None if from == 0 => {
                return Ok((!body.is_empty()).then(|| Sha256::digest(body).into()));
            }
            None => window *= 4,
        }
    }
}

/// A hash as lowercase hex.
fn hex_of(hash: &[u8; 32]) -> [u8; 64] {
    let mut out = [0; 64];
    push_hex_into(&mut out, hash);
    out
}

/// Writes `bytes` as lowercase hex into `out` (twice as long).
fn push_hex_into(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// Appends a trace id as a JSON string, or `null`.
fn push_trace_id(buf: &mut Vec<u8>, id: Option<&[u8; 16]>) {
    match id {
        Some(id) => {
            let mut text = [b'"'; 34];
            push_hex_into(&mut text[1..33], id);
            buf.extend_from_slice(&text);
        }
        None => buf.extend_from_slice(b"null"),
    }
}

/// Appends `n` in decimal.
fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        // Invariant: n % 10 < 10.
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

/// Appends `d` in milliseconds with three decimals (rounded to the microsecond).
fn push_millis(buf: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_nanos().saturating_add(500) / 1000).unwrap_or(u64::MAX);
    push_u64(buf, micros / 1000);
    let frac = micros % 1000;
    // Invariant: each digit is < 10.
    buf.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// Appends `s` as a JSON string literal (RFC 8259 §7: quote, backslash and control characters
/// escaped), without an intermediate allocation.
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(b'"');
    let bytes = s.as_bytes();
    if !needs_escape(bytes) {
        // The common case (ids, paths, route names): one branch-free scan, one copy.
        buf.extend_from_slice(bytes);
        buf.push(b'"');
        return;
    }
    // Runs of bytes that need no escape are copied whole; every escaped byte is ASCII, so the
    // output stays UTF-8.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            b if b < 0x20 => b"",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[run..i]);
        if esc.is_empty() {
            buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            buf.extend_from_slice(esc);
        }
        run = i + 1;
    }
    buf.extend_from_slice(&bytes[run..]);
    buf.push(b'"');
}

/// Whether any byte of `s` must be escaped in a JSON string.
fn needs_escape(s: &[u8]) -> bool {
    // A fold without early exit, so the compiler can vectorize it; audit fields are short.
    s.iter().fold(false, |acc, &b| {
        acc | (b == b'"') | (b == b'\\') | (b < 0x20)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into shared memory that counts its `write` calls.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut g = lock(&self.0);
            g.0.extend_from_slice(b);
            g.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).0.clone()).expect("UTF-8")
        }
        fn writes(&self) -> usize {
            lock(&self.0).1
        }
    }

    fn caller() -> SpiffeId {
        "spiffe://fintech.internal/gateway".parse().expect("id")
    }

    fn inbound<'a>(caller: &'a SpiffeId, path: &'a str, route: Option<&'a str>) -> AuditRecord<'a> {
        AuditRecord {
            request_id: "id-1",
            trace_id: Some(&[
                0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80,
                0x31, 0x9c,
            ]),
            caller,
            caller_serial: "01ab",
            policy_sha256: "ff00",
            method: "GET",
            path,
            route,
            decision: "allow",
            reason: "allowed",
            status: 200,
            duration: Duration::from_micros(1_234_567),
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        for s in [
            "plain",
            "quo\"te",
            "back\\slash",
            "ctl\u{1}\n\t\r\u{1f}",
            "ünï",
            "\"ü\u{1f}é\\",
            "",
        ] {
            let mut buf = Vec::new();
            push_json_str(&mut buf, s);
            let back: String = serde_json::from_slice(&buf).expect("valid JSON string");
            assert_eq!(back, s);
        }
    }

    #[test]
    fn numbers_and_durations() {
        for (n, s) in [
            (0, "0"),
            (7, "7"),
            (200, "200"),
            (u64::MAX, "18446744073709551615"),
        ] {
            let mut b = Vec::new();
            push_u64(&mut b, n);
            assert_eq!(b, s.as_bytes());
        }
        for (d, s) in [
            (Duration::ZERO, "0.000"),
            (Duration::from_nanos(499), "0.000"),
            (Duration::from_nanos(500), "0.001"),
            (Duration::from_micros(1_234_567), "1234.567"),
            (Duration::from_micros(45_020), "45.020"),
        ] {
            let mut b = Vec::new();
            push_millis(&mut b, d);
            assert_eq!(String::from_utf8(b).expect("ascii"), s);
        }
    }

    #[test]
    fn lines_have_every_field_in_order_and_parse() {
        let out = Shared::default();
        let sink = Sink::new(Box::new(out.clone()), false, Duration::ZERO).expect("sink");
        let id = caller();
        sink.record(&inbound(&id, "/a\"b\n", Some("report")));
        sink.record(&inbound(&id, "/x", None));
        sink.record_outbound(&OutboundRecord {
            request_id: "id-2",
            trace_id: None,
            upstream: "monolith",
            server_id: "spiffe://fintech.internal/monolith",
            server_serial: None,
            method: "POST",
            path: "/api",
            status: 502,
            reason: "connect_failed",
            duration: Duration::from_micros(3_000),
        });
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(out.writes(), 3, "flush interval 0: one write per line");
        let keys = |l: &str| -> Vec<String> {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            // Field order as written (serde_json's Map keeps insertion order only with a
            // feature), so read the keys off the text.
            let obj = v.as_object().expect("object");
            let mut ks: Vec<(usize, String)> = obj
                .keys()
                .map(|k| (l.find(&format!("\"{k}\":")).expect("key"), k.clone()))
                .collect();
            ks.sort();
            ks.into_iter().map(|(_, k)| k).collect()
        };
        let inbound_keys = [
            "time",
            "direction",
            "request_id",
            "trace_id",
            "caller",
            "caller_serial",
            "policy_sha256",
            "method",
            "path",
            "route",
            "decision",
            "reason",
            "status",
            "duration_ms",
            "prev",
        ];
        let mut first = inbound_keys.to_vec();
        first.insert(first.len() - 1, "chain_start");
        assert_eq!(
            keys(lines[0]),
            first,
            "the sink's first line starts the chain"
        );
        assert_eq!(keys(lines[1]), inbound_keys);
        assert_eq!(
            keys(lines[2]),
            [
                "time",
                "direction",
                "request_id",
                "trace_id",
                "upstream",
                "server_id",
                "server_serial",
                "method",
                "path",
                "status",
                "reason",
                "duration_ms",
                "prev"
            ]
        );
        let l0: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON");
        assert_eq!(l0["path"], "/a\"b\n");
        assert_eq!(l0["caller"], "spiffe://fintech.internal/gateway");
        assert_eq!(l0["status"], 200);
        assert_eq!(l0["duration_ms"].as_f64(), Some(1234.567));
        let time = l0["time"].as_str().expect("time");
        let parsed = OffsetDateTime::parse(time, &Rfc3339).expect("RFC 3339");
        assert!((OffsetDateTime::now_utc() - parsed).whole_seconds().abs() < 60);
        assert!(time.ends_with('Z'), "{time}");
        let l1: serde_json::Value = serde_json::from_str(lines[1]).expect("JSON");
        assert!(l1["route"].is_null());
        assert!(
            lines[1].contains("\"route\":null,\"decision\""),
            "{}",
            lines[1]
        );
        assert!(
            lines[2]
                .contains("\"status\":502,\"reason\":\"connect_failed\",\"duration_ms\":3.000,"),
            "{}",
            lines[2]
        );
        assert_eq!(l0["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(l0["caller_serial"], "01ab");
        assert_eq!(l0["policy_sha256"], "ff00");
        assert_eq!(l0["prev"], GENESIS);
        assert!(lines[2].contains("\"trace_id\":null,"), "{}", lines[2]);
    }

    #[test]
    fn buffered_lines_wait_for_the_interval_then_go_in_one_write() {
        let out = Shared::default();
        let sink =
            Sink::new(Box::new(out.clone()), false, Duration::from_millis(500)).expect("sink");
        let id = caller();
        for _ in 0..10 {
            sink.record(&inbound(&id, "/x", None));
        }
        assert_eq!(out.writes(), 0, "nothing written before the interval");
        let start = Instant::now();
        while out.writes() == 0 && start.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(5));
        }
        let waited = start.elapsed();
        assert!(waited < Duration::from_secs(2), "flushed after {waited:?}");
        assert_eq!(out.writes(), 1, "one write for the batch");
        assert_eq!(out.text().lines().count(), 10);
    }

    #[test]
    fn a_full_buffer_is_written_without_waiting_for_the_interval() {
        let out = Shared::default();
        let sink =
            Sink::new(Box::new(out.clone()), false, Duration::from_secs(3600)).expect("sink");
        let id = caller();
        let path = "/p".repeat(100);
        let mut n = 0;
        // Until the line that takes the buffer past FLUSH_BYTES (the flusher may already have
        // taken it by the time we look).
        while !sink.inner.urgent.load(Ordering::Acquire) && out.writes() == 0 {
            sink.record(&inbound(&id, &path, None));
            n += 1;
        }
        let start = Instant::now();
        while out.writes() == 0 && start.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.writes(), 1, "the flusher wrote the full buffer at once");
        assert!(out.text().len() >= FLUSH_BYTES);
        // What is still buffered is written by `flush` (shutdown) and by dropping the sink.
        sink.record(&inbound(&id, "/last", None));
        sink.flush();
        assert_eq!(out.text().lines().count(), n + 1);
        assert_eq!(out.writes(), 2);
        sink.record(&inbound(&id, "/after", None));
        drop(sink);
        assert_eq!(out.text().lines().count(), n + 2);
        assert!(out.text().contains(
            "\"/after\",\"route\":null,\"decision\":\"allow\",\"reason\":\"allowed\",\"status\":200,\"duration_ms\":1234.567,\"prev\":\""
        ));
    }

    /// Each line's `prev` is the SHA-256 of the line before it, across batches.
    fn assert_chained(text: &str, first_prev: &str) {
        let mut prev = first_prev.to_owned();
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            assert_eq!(v["prev"], prev.as_str(), "line {}: {line}", i + 1);
            assert_eq!(v.get("chain_start").is_some(), i == 0, "line {}", i + 1);
            prev = hex::encode(Sha256::digest(line.as_bytes()));
        }
    }

    #[test]
    fn lines_are_hash_chained_across_batches_in_file_and_pipe_mode() {
        for pipe in [false, true] {
            let out = Shared::default();
            let sink = Sink::with_chain(
                Box::new(out.clone()),
                pipe,
                Duration::from_secs(3600),
                [7; 32],
            )
            .expect("sink");
            let id = caller();
            let long = "/l".repeat(900);
            for round in 0..3 {
                for i in 0..(10 + round) {
                    let path = if i % 4 == 0 { long.as_str() } else { "/x" };
                    sink.record(&inbound(&id, path, None));
                }
                sink.flush();
            }
            let text = out.text();
            assert_eq!(text.lines().count(), 33);
            assert!(
                out.writes() > 3 || !pipe,
                "pipe batches cut: {}",
                out.writes()
            );
            assert_chained(&text, &hex::encode([7u8; 32]));
        }
    }

    #[test]
    fn a_sink_appending_to_a_file_continues_its_chain_and_verify_checks_it() {
        let dir = std::env::temp_dir().join(format!("gh-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.log");
        let _ = std::fs::remove_file(&path);
        let config = |p: &Path| AuditConfig {
            enabled: true,
            path: Some(p.to_owned()),
            flush_interval: Duration::ZERO,
        };
        let id = caller();
        for _run in 0..2 {
            let sink = Sink::from_config(&config(&path))
                .expect("open")
                .expect("enabled");
            for _ in 0..3 {
                sink.record(&inbound(&id, "/x", None));
            }
        }
        let v = verify(std::slice::from_ref(&path)).expect("verifies");
        assert_eq!((v.lines, v.starts), (6, 2));
        assert!(v.continues_from.is_none());
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let l3: serde_json::Value = serde_json::from_str(lines[3]).expect("JSON");
        assert_eq!(l3["chain_start"], true);
        assert_eq!(l3["prev"], hex::encode(Sha256::digest(lines[2].as_bytes())));
        // Rotated away (moved): the next sidecar starts a new file that continues the chain
        // from the anchor file.
        let rotated = dir.join("audit.log.1");
        std::fs::rename(&path, &rotated).expect("rotate");
        {
            let sink = Sink::from_config(&config(&path))
                .expect("open")
                .expect("enabled");
            sink.record(&inbound(&id, "/x", None));
        }
        let v = verify(&[rotated.clone(), path.clone()]).expect("verifies across rotation");
        assert_eq!((v.lines, v.starts), (7, 3));
        let v = verify(std::slice::from_ref(&path)).expect("continues");
        assert_eq!(
            v.continues_from.as_deref(),
            Some(&*hex::encode(Sha256::digest(lines[5].as_bytes())))
        );
        std::fs::rename(&rotated, &path).expect("back");
        // Edit line 2: line 3 no longer names it.
        let edited = text
            .replacen("\"/x\"", "\"/y\"", 2)
            .replacen("\"/y\"", "\"/x\"", 1);
        std::fs::write(&path, edited).expect("write");
        let e = verify(std::slice::from_ref(&path)).expect_err("edited");
        assert!(
            e.contains("audit.log:3: broken chain") && e.contains("audit.log:2)"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn pipe_writes_are_cut_at_line_ends_within_pipe_buf() {
        let out = Shared::default();
        let mut o = Output {
            w: Box::new(out.clone()),
            last: [0; 32],
            anchor: None,
            pipe: true,
        };
        let line = format!("{}\n", "x".repeat(99));
        let long = format!("{}\n", "y".repeat(PIPE_BUF + 10));
        let batch = format!("{}{long}{}", line.repeat(50), line.repeat(3));
        o.write_batch(batch.as_bytes()).expect("write");
        assert_eq!(out.text(), batch);
        // 50 short lines (5000 bytes): 40 + 10 lines; the long line alone; 3 lines.
        assert_eq!(out.writes(), 4);
    }
}
