//! Standard output for the project's command-line tools (`ca`, `policy`, `sidecar`), through
//! [`outln!`](crate::outln), [`out!`](crate::out) and [`write`].
//!
//! Their output is often piped: `ca list | head -1`, `policy explain FILE > map.html`,
//! `sidecar check … | grep -q ok`. `print!` panics when the reader has gone; here a reader that
//! stopped reading is not an error: the rest of the output is dropped quietly and the command
//! keeps its own exit code. Any other write error (a full disk, `> /dev/full`) is reported once
//! on stderr, the rest of the output is dropped, and [`failed`] tells the binary to exit 2.

use std::fmt;
use std::io::{self, Write as _};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};

/// What the output has met so far: nothing yet, a reader that has gone, or a write error.
static STATE: AtomicU8 = AtomicU8::new(OPEN);
const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const FAILED: u8 = 2;

/// Writes `text` to stdout and flushes it (see the module documentation for errors).
pub fn write(text: &str) {
    write_fmt(format_args!("{text}"));
}

/// Writes formatted output to stdout and flushes it: the body of [`out!`](crate::out) and
/// [`outln!`](crate::outln).
pub fn write_fmt(args: fmt::Arguments<'_>) {
    if STATE.load(Ordering::Relaxed) != OPEN {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            STATE.store(CLOSED, Ordering::Relaxed);
        } else {
            STATE.store(FAILED, Ordering::Relaxed);
            eprintln!(
                "error: cannot write to stdout: {e}\n  help: check the file or pipe the output goes to (free space, permissions)"
            );
        }
    }
}

/// Whether a write to stdout failed other than by a reader that stopped reading: the command's
/// output is incomplete, and the binary exits 2.
#[must_use]
pub fn failed() -> bool {
    STATE.load(Ordering::Relaxed) == FAILED
}

/// The binary's exit status: `code`, or 2 when a write to stdout [`failed`] (a full disk, not a
/// closed pipe).
#[must_use]
pub fn exit_code(code: ExitCode) -> ExitCode {
    if failed() { ExitCode::from(2) } else { code }
}

/// `print!` for the command-line tools: a closed pipe is not a panic (see [`crate::stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::write_fmt(::std::format_args!($($arg)*))
    };
}

/// `println!` for the command-line tools: a closed pipe is not a panic (see [`crate::stdout`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::write("\n")
    };
    ($($arg:tt)*) => {
        $crate::stdout::write_fmt(::std::format_args!("{}\n", ::std::format_args!($($arg)*)))
    };
}
