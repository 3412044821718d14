//! The hash chain of audit lines: checking a chain ([`verify`]), and reading where a file's
//! chain ends (its last line's hash, or the anchor file kept beside it).

use std::fs::File;
use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The `prev` of a chain's first line when it follows no line: 64 zeros.
pub(super) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// How every line ends: `"prev":"` + 64 hex digits + `"}\n`; the digits start this many
/// bytes before the end of the line (its newline included).
pub(super) const PREV_FROM_END: usize = 64 + 3;

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
                Some((hash, _)) if prev == crate::hexdigits::of_hash(hash) => {}
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
pub(super) fn anchor_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".chain");
    p.into()
}

/// The hash an anchor file holds (64 hex digits), if it holds one.
pub(super) fn read_anchor(path: &Path) -> Option<[u8; 32]> {
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
pub(super) fn last_line_hash(path: &Path) -> io::Result<Option<[u8; 32]>> {
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
