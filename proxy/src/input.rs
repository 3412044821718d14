//! Reading the files a sidecar is configured with: the one function ([`read`]) that startup,
//! `sidecar check` and hot reload all use, and the set of watched [`Inputs`] a snapshot is
//! built from.
//!
//! A watched directory is writable by whoever rotates certificates or edits the policy, so a
//! file there is not trusted to be a file: [`read`] opens with `O_NONBLOCK` (opening a FIFO
//! cannot block), `fstat`s the opened descriptor (after every symlink was followed, so a link
//! to `/dev/zero` is seen as the device it is) and refuses anything but a regular file, and
//! refuses a file larger than its kind's limit before reading it, reading at most the limit
//! even if it grows meanwhile. Parsing lives with the kinds' owners (`tls`, `state`,
//! `config`); nothing here knows PEM or TOML.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Largest sidecar configuration file read (a config of a few hundred outbound entries is
/// under 100 KiB).
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest certificate chain file read (leaf and intermediates: an SVID is about 1 KiB).
pub(crate) const MAX_CERT_BYTES: u64 = 256 << 10;
/// Largest private key file read (an RSA-4096 PKCS#8 PEM is about 3.3 KiB).
pub(crate) const MAX_KEY_BYTES: u64 = 64 << 10;
/// Largest trust bundle read (several hundred roots).
pub(crate) const MAX_BUNDLE_BYTES: u64 = 1 << 20;
/// Largest CRL file read (about 300,000 revoked serials in PEM).
pub(crate) const MAX_CRL_BYTES: u64 = 16 << 20;
/// Largest policy file read (about 40,000 routes).
pub(crate) const MAX_POLICY_BYTES: u64 = 4 << 20;

/// What a file is for: its name in messages and metrics, and its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The sidecar configuration (`sidecar.toml`).
    Config,
    /// `[identity] cert`.
    Cert,
    /// `[identity] key`.
    Key,
    /// `[identity] bundle`.
    Bundle,
    /// `[identity] crl`.
    Crl,
    /// `[inbound] policy`.
    Policy,
}

impl FileKind {
    /// The size limit.
    pub const fn max_bytes(self) -> u64 {
        match self {
            Self::Config => MAX_CONFIG_BYTES,
            Self::Cert => MAX_CERT_BYTES,
            Self::Key => MAX_KEY_BYTES,
            Self::Bundle => MAX_BUNDLE_BYTES,
            Self::Crl => MAX_CRL_BYTES,
            Self::Policy => MAX_POLICY_BYTES,
        }
    }

    /// The `gatehouse_reloads_total{what}` spelling.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Cert => "cert",
            Self::Key => "key",
            Self::Bundle => "bundle",
            Self::Crl => "crl",
            Self::Policy => "policy",
        }
    }

    /// Where the path is configured.
    const fn key(self) -> &'static str {
        match self {
            Self::Config => "--config",
            Self::Cert => "[identity] cert",
            Self::Key => "[identity] key",
            Self::Bundle => "[identity] bundle",
            Self::Crl => "[identity] crl",
            Self::Policy => "[inbound] policy",
        }
    }
}

/// Why a file was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileProblem {
    /// The operating system refused (missing, no permission, ...).
    Io(std::io::ErrorKind, String),
    /// Not a regular file (after following links): a FIFO, device, socket or directory.
    NotRegular(&'static str),
    /// Larger than the kind's limit.
    TooLarge {
        /// Bytes found (at least).
        size: u64,
        /// The limit.
        limit: u64,
    },
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(_, e) => write!(f, "cannot read the file: {e}"),
            Self::NotRegular(t) => write!(f, "not a regular file but a {t}; refusing to read it"),
            Self::TooLarge { size, limit } => write!(
                f,
                "the file is {size} bytes, more than the limit of {limit} bytes; refusing to read it"
            ),
        }
    }
}

/// A configured file that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// What it is for.
    pub kind: FileKind,
    /// Why it was not read.
    pub problem: FileProblem,
}

impl FileError {
    /// The `help:` line.
    pub fn help(&self) -> String {
        let key = self.kind.key();
        match &self.problem {
            FileProblem::Io(..) => {
                let make = match self.kind {
                    FileKind::Cert | FileKind::Key | FileKind::Bundle => {
                        "; issue certificates with `ca issue --dir CA --spiffe-id ID --out DIR`"
                    }
                    FileKind::Crl => "; write the CRL with `ca crl --dir CA --out FILE`",
                    FileKind::Config | FileKind::Policy => "",
                };
                format!("check the path given by {key} and that the sidecar may read it{make}")
            }
            FileProblem::NotRegular(_) => format!(
                "{key} must name a regular file (a symlink to one is fine); replace it with the file's content"
            ),
            FileProblem::TooLarge { .. } => {
                format!("{key} names a file larger than any valid one; point it at the right file")
            }
        }
    }
}

/// Reads a configured file: only a regular file (links followed), at most `kind`'s limit,
/// never blocking on a FIFO.
///
/// # Errors
/// [`FileError`] naming the file and the problem.
pub(crate) fn read(path: &Path, kind: FileKind) -> Result<Vec<u8>, FileError> {
    let err = |problem| FileError {
        path: path.to_path_buf(),
        kind,
        problem,
    };
    let io = |e: std::io::Error| err(FileProblem::Io(e.kind(), e.to_string()));
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. Reads of a
    // regular file ignore the flag.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?; // fstat of what was opened
    let limit = kind.max_bytes();
    if !meta.file_type().is_file() {
        return Err(err(FileProblem::NotRegular(describe(&meta.file_type()))));
    }
    if meta.len() > limit {
        return Err(err(FileProblem::TooLarge {
            size: meta.len(),
            limit,
        }));
    }
    read_at_most(file, meta.len(), limit).map_err(|e| match e {
        ReadLimit::Io(e) => io(e),
        ReadLimit::Grew(size) => err(FileProblem::TooLarge { size, limit }),
    })
}

enum ReadLimit {
    Io(std::io::Error),
    Grew(u64),
}

/// Reads up to `limit` bytes; a file that grew past it since `fstat` is refused too.
fn read_at_most(file: File, len: u64, limit: u64) -> Result<Vec<u8>, ReadLimit> {
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(ReadLimit::Io)?;
    let size = buf.len() as u64;
    if size > limit {
        return Err(ReadLimit::Grew(size));
    }
    Ok(buf)
}

fn describe(t: &std::fs::FileType) -> &'static str {
    if t.is_fifo() {
        "FIFO (named pipe)"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else if t.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// The watched kinds, in [`Inputs`] order.
pub(crate) const WATCHED: [FileKind; 5] = [
    FileKind::Cert,
    FileKind::Key,
    FileKind::Bundle,
    FileKind::Crl,
    FileKind::Policy,
];

/// One watched file as read: its content or why it could not be read, and a digest of that
/// (SHA-256 of the content; of the problem when unreadable, so a vanished file is a change).
#[derive(Debug, Clone)]
pub struct Input {
    /// The file.
    pub path: PathBuf,
    /// The content, or why it could not be read.
    pub content: Result<Vec<u8>, FileError>,
    /// Digest of `content`.
    pub digest: [u8; 32],
}

impl Input {
    /// Reads `path` with [`read`].
    pub fn read(path: &Path, kind: FileKind) -> Self {
        let content = read(path, kind);
        let digest = match &content {
            Ok(bytes) => Sha256::digest(bytes).into(),
            Err(e) => Sha256::digest(format!("unreadable: {}", e.problem).as_bytes()).into(),
        };
        Self {
            path: path.to_path_buf(),
            content,
            digest,
        }
    }

    /// An input whose content is held in memory (the online identity's SVID, key, bundle and
    /// CRLs: never written to disk); `path` names it in messages.
    pub(crate) fn from_memory(path: PathBuf, content: Vec<u8>) -> Self {
        let digest = Sha256::digest(&content).into();
        Self {
            path,
            content: Ok(content),
            digest,
        }
    }

    /// The content.
    ///
    /// # Errors
    /// Why the file could not be read.
    pub fn bytes(&self) -> Result<&[u8], FileError> {
        self.content.as_deref().map_err(Clone::clone)
    }
}

/// The watched files a snapshot is built from, in [`WATCHED`] order (`None`: not
/// configured: no CRL, or no `[inbound]` policy).
#[derive(Debug, Clone)]
pub(crate) struct Inputs(pub [Option<Input>; 5]);

impl Inputs {
    /// Reads every configured path (index `i` is of kind `WATCHED[i]`).
    pub(crate) fn read(paths: &[Option<PathBuf>; 5]) -> Self {
        Self(std::array::from_fn(|i| {
            paths[i].as_deref().map(|p| Input::read(p, WATCHED[i]))
        }))
    }

    /// The digest of input `i` (`None`: not configured).
    pub(crate) fn digest(&self, i: usize) -> Option<[u8; 32]> {
        self.0[i].as_ref().map(|x| x.digest)
    }

    /// The digests of all inputs.
    pub(crate) fn digests(&self) -> [Option<[u8; 32]>; 5] {
        std::array::from_fn(|i| self.digest(i))
    }

    /// These inputs, with those whose bit is set in `mask` taken from `other`.
    pub(crate) fn with(&self, other: &Self, mask: u8) -> Self {
        Self(std::array::from_fn(|i| {
            if mask & (1 << i) != 0 {
                other.0[i].clone()
            } else {
                self.0[i].clone()
            }
        }))
    }

    /// Input `kind`, which startup and reload always configure for cert, key and bundle.
    pub(crate) fn get(&self, kind: FileKind) -> Option<&Input> {
        let i = WATCHED.iter().position(|k| *k == kind)?;
        self.0[i].as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_file_is_read_and_others_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tmp");
        let ok = dir.path().join("ok.toml");
        std::fs::write(&ok, "version = 1\n").expect("write");
        assert_eq!(
            read(&ok, FileKind::Policy).expect("regular"),
            b"version = 1\n"
        );

        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let e = read(&fifo, FileKind::Policy).expect_err("fifo");
        assert_eq!(e.problem, FileProblem::NotRegular("FIFO (named pipe)"));
        assert!(e.to_string().contains("fifo: not a regular file"), "{e}");
        assert!(e.help().contains("[inbound] policy"), "{}", e.help());

        let link = dir.path().join("zero.pem");
        std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
        let e = read(&link, FileKind::Crl).expect_err("device");
        assert_eq!(e.problem, FileProblem::NotRegular("character device"));

        let e = read(dir.path(), FileKind::Config).expect_err("directory");
        assert_eq!(e.problem, FileProblem::NotRegular("directory"));

        let e = read(&dir.path().join("missing"), FileKind::Key).expect_err("missing");
        assert!(matches!(
            e.problem,
            FileProblem::Io(std::io::ErrorKind::NotFound, _)
        ));
    }

    #[test]
    fn each_kind_has_a_size_limit_checked_before_reading() {
        let dir = tempfile::tempdir().expect("tmp");
        let big = dir.path().join("big.pem");
        // Sparse: the limit is checked on the size, nothing is read.
        let f = File::create(&big).expect("create");
        f.set_len(MAX_KEY_BYTES + 1).expect("set_len");
        let e = read(&big, FileKind::Key).expect_err("too large");
        assert_eq!(
            e.problem,
            FileProblem::TooLarge {
                size: MAX_KEY_BYTES + 1,
                limit: MAX_KEY_BYTES
            }
        );
        assert_eq!(
            read(&big, FileKind::Crl)
                .expect("under the CRL limit")
                .len() as u64,
            MAX_KEY_BYTES + 1
        );
        for kind in [
            FileKind::Config,
            FileKind::Cert,
            FileKind::Key,
            FileKind::Bundle,
            FileKind::Crl,
            FileKind::Policy,
        ] {
            assert!(kind.max_bytes() >= 64 << 10 && kind.max_bytes() <= 16 << 20);
        }
        // A file that grows past the limit while it is read is refused too.
        let grown = read_at_most(File::open("/dev/zero").expect("zero"), 0, 100);
        assert!(matches!(grown, Err(ReadLimit::Grew(101))));
    }

    #[test]
    fn inputs_digest_content_and_problems() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = |n: &str| dir.path().join(n);
        for n in ["c", "k", "b", "p"] {
            std::fs::write(f(n), n).expect("write");
        }
        let paths = [Some(f("c")), Some(f("k")), Some(f("b")), None, Some(f("p"))];
        let a = Inputs::read(&paths);
        assert_eq!(a.digests(), Inputs::read(&paths).digests());
        assert!(a.digest(3).is_none());
        std::fs::write(f("k"), "new").expect("write");
        std::fs::remove_file(f("p")).expect("rm");
        let b = Inputs::read(&paths);
        assert_ne!(a.digest(1), b.digest(1));
        assert_ne!(a.digest(4), b.digest(4));
        assert!(b.0[4].as_ref().expect("configured").bytes().is_err());
        let mixed = a.with(&b, 1 << 1);
        assert_eq!(mixed.digest(1), b.digest(1));
        assert_eq!(mixed.digest(4), a.digest(4));
    }
}
