//! Files on disk: atomic writes, private key modes, the directory lock, and the versioned
//! certificate directory.
//!
//! # Certificate directories (`ca issue --out`, `ca rotate`)
//! A certificate directory is laid out like a Kubernetes projected volume, so that the key and the
//! certificate always change together:
//!
//! ```text
//! OUT/..2026_11_25_06_30_00.123456789_1a2b3c/   cert.pem  key.pem (0600)  bundle.pem
//! OUT/..data      -> ..2026_11_25_06_30_00.123456789_1a2b3c
//! OUT/cert.pem    -> ..data/cert.pem
//! OUT/key.pem     -> ..data/key.pem
//! OUT/bundle.pem  -> ..data/bundle.pem
//! ```
//!
//! A write creates a new version directory, writes and fsyncs all three files, then replaces the
//! `..data` symlink with one `rename(2)`: at every instant `..data` names a complete, matching set.
//! Old version directories are removed afterwards. A process killed at any point leaves either the
//! old set or the new one (and possibly an unused version directory, removed by the next write).
//! Readers open `OUT/cert.pem`, `OUT/key.pem`, `OUT/bundle.pem` as usual; a watcher should watch
//! `OUT` and react to any event in it (the swap renames `..data`, not `cert.pem`). Writers hold
//! an flock on `OUT/.lock`, so concurrent `ca issue --out OUT` / `ca rotate OUT` runs take turns.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::CaError;

/// Mode of private key files.
pub const KEY_MODE: u32 = 0o600;
/// Mode of public files (certificates, bundles, CRLs, inventory).
pub const PUBLIC_MODE: u32 = 0o644;
/// Name of the symlink that designates the current version of a certificate directory.
pub const DATA_LINK: &str = "..data";
/// Lock file of a certificate directory: writers (`ca issue`, `ca rotate`) serialize on it, so
/// one writer's cleanup never removes the version another is about to publish.
pub const CERT_DIR_LOCK: &str = ".lock";
/// The files of a certificate directory.
pub const SVID_FILES: [&str; 3] = ["cert.pem", "key.pem", "bundle.pem"];

/// `n` bytes from the operating system's CSPRNG (`/dev/urandom`).
///
/// # Errors
/// [`CaError::Io`] when the device cannot be read.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, CaError> {
    let path = Path::new("/dev/urandom");
    let mut buf = vec![0u8; n];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(CaError::io("cannot read", path))?;
    Ok(buf)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, created with `mode`,
/// written, fsynced, then renamed over `path`, and the directory fsynced.
///
/// # Errors
/// [`CaError::Io`] naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", hex::encode(random_bytes(6)?)));
    let res = write_new(&tmp, bytes, mode)
        .and_then(|()| fs::rename(&tmp, path).map_err(CaError::io("cannot rename into", path)));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res?;
    sync_dir(dir)
}

/// Creates `path` (which must not exist) with `mode`, writes and fsyncs it.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(CaError::io("cannot create", path))?;
    // The umask may have narrowed the mode; public files must stay readable.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(CaError::io("cannot set permissions on", path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(CaError::io("cannot write", path))
}

/// Appends one line (a `\n` is added) and fsyncs. Callers hold the CA directory lock.
pub(crate) fn append_line(path: &Path, line: &str) -> Result<(), CaError> {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(PUBLIC_MODE)
        .open(path)
        .map_err(CaError::io("cannot open", path))?;
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    // One write(2) of the whole line on an O_APPEND file.
    f.write_all(&buf)
        .and_then(|()| f.sync_data())
        .map_err(CaError::io("cannot append to", path))
}

/// Reads a file to a string, naming it on error.
pub(crate) fn read_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(CaError::io("cannot read", path))
}

/// Fsyncs a directory so renames inside it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(CaError::io("cannot sync directory", dir))
}

/// Creates a directory with `mode` (one level; the parent must exist).
pub(crate) fn create_dir(path: &Path, mode: u32) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(CaError::io("cannot create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(CaError::io("cannot set permissions on", path))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Where writing `path` would land: the nearest existing ancestor with every symlink and `..`
/// resolved by the kernel (`realpath(3)`), followed by the not-yet-existing rest, resolved
/// lexically (those components are created as plain directories when the output is written, so
/// `missing/../x` lands on `x`). An existing `path` that is a symlink resolves to its target.
///
/// # Errors
/// [`CaError::Io`] when the current directory cannot be read (relative `path`).
pub fn resolve_output(path: &Path) -> Result<PathBuf, CaError> {
    let abs = std::path::absolute(path).map_err(CaError::io("cannot resolve", path))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    let mut resolved = loop {
        if let Ok(real) = fs::canonicalize(existing) {
            break real;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            // `..` as the last component, or the root: climb lexically
            (Some(parent), None) => {
                rest.push(std::ffi::OsString::from(".."));
                existing = parent;
            }
            (None, _) => break PathBuf::from("/"),
        }
    };
    for name in rest.iter().rev() {
        match name.to_str() {
            Some("..") => {
                resolved.pop();
            }
            Some(".") => {}
            _ => resolved.push(name),
        }
    }
    Ok(resolved)
}

/// An exclusive lock on a CA directory, held until dropped (std `File::lock`, `flock(2)`).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Blocks until the exclusive lock on `dir/.lock` is held.
    ///
    /// # Errors
    /// [`CaError::Io`] when the lock file cannot be opened or locked.
    pub fn acquire(dir: &Path) -> Result<Self, CaError> {
        Self::acquire_named(dir, ".lock")
    }

    /// Blocks until the exclusive lock on `dir/name` is held (the file is created if missing).
    ///
    /// # Errors
    /// [`CaError::Io`] when the lock file cannot be opened or locked.
    pub fn acquire_named(dir: &Path, name: &str) -> Result<Self, CaError> {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(KEY_MODE)
            .open(&path)
            .map_err(CaError::io("cannot open lock file", &path))?;
        file.lock().map_err(CaError::io("cannot lock", &path))?;
        Ok(Self { _file: file })
    }
}

/// Writes a certificate directory (`cert.pem`, `key.pem` 0600, `bundle.pem`) as a new version and
/// swaps the `..data` symlink to it. See the module docs for the layout and its guarantees.
///
/// `out` is created (mode 0755, with missing parents) if needed.
///
/// # Errors
/// [`CaError::Io`] naming the file; on error the previous version stays current.
pub fn write_cert_dir(
    out: &Path,
    cert_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<(), CaError> {
    if !out.is_dir() {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(CaError::io("cannot create directory", parent))?;
        }
        match create_dir(out, 0o755) {
            Err(CaError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists && out.is_dir() => {}
            other => other?,
        }
    }
    let _lock = DirLock::acquire_named(out, CERT_DIR_LOCK)?;
    write_cert_dir_locked(out, cert_pem, key_pem, bundle_pem)
}

/// [`write_cert_dir`] for a caller that already holds `out/.lock` (and `out` exists).
pub(crate) fn write_cert_dir_locked(
    out: &Path,
    cert_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
) -> Result<(), CaError> {
    let stamp = time::OffsetDateTime::now_utc();
    let version = format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}_{}",
        stamp.year(),
        u8::from(stamp.month()),
        stamp.day(),
        stamp.hour(),
        stamp.minute(),
        stamp.second(),
        stamp.nanosecond(),
        hex::encode(random_bytes(3)?)
    );
    let vdir = out.join(&version);
    create_dir(&vdir, 0o755)?;
    let written = (|| {
        write_new(&vdir.join("cert.pem"), cert_pem.as_bytes(), PUBLIC_MODE)?;
        write_new(&vdir.join("key.pem"), key_pem.as_bytes(), KEY_MODE)?;
        write_new(&vdir.join("bundle.pem"), bundle_pem.as_bytes(), PUBLIC_MODE)?;
        sync_dir(&vdir)
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&vdir);
        return Err(e);
    }
    replace_symlink(out, Path::new(&version), DATA_LINK)?;
    for name in SVID_FILES {
        let target = Path::new(DATA_LINK).join(name);
        if fs::read_link(out.join(name)).ok().as_deref() != Some(target.as_path()) {
            replace_symlink(out, &target, name)?;
        }
    }
    sync_dir(out)?;
    remove_old_versions(out, &version);
    Ok(())
}

/// Atomically makes `dir/name` a symlink to `target` (symlink at a temp name, then rename).
fn replace_symlink(dir: &Path, target: &Path, name: &str) -> Result<(), CaError> {
    let tmp = dir.join(format!(".{name}.tmp-{}", hex::encode(random_bytes(6)?)));
    std::os::unix::fs::symlink(target, &tmp).map_err(CaError::io("cannot create symlink", &tmp))?;
    let dest = dir.join(name);
    fs::rename(&tmp, &dest).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        CaError::io("cannot rename symlink onto", &dest)(e)
    })
}

/// Removes version directories other than `keep` (best effort: a leftover is harmless).
fn remove_old_versions(out: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(out) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_version = name.starts_with("..") && name != DATA_LINK && name != keep;
        if is_version && entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The current files of a certificate directory: (cert.pem, key.pem, bundle.pem) paths.
pub fn cert_dir_paths(out: &Path) -> [PathBuf; 3] {
    SVID_FILES.map(|n| out.join(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(p: &Path) -> PathBuf {
        fs::read_link(p).expect("symlink")
    }

    #[test]
    fn cert_dir_swaps_all_files_together_and_cleans_old_versions() {
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("a/b/svc");
        write_cert_dir(&out, "cert1", "key1", "bundle1").expect("first write");
        let v1 = link(&out.join(DATA_LINK));
        for name in SVID_FILES {
            assert_eq!(link(&out.join(name)), Path::new(DATA_LINK).join(name));
        }
        assert_eq!(
            fs::read_to_string(out.join("key.pem")).expect("key"),
            "key1"
        );
        let mode = fs::metadata(out.join("key.pem"))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, KEY_MODE);

        write_cert_dir(&out, "cert2", "key2", "bundle2").expect("second write");
        assert_ne!(link(&out.join(DATA_LINK)), v1);
        assert!(!out.join(&v1).exists(), "old version removed");
        for (name, want) in SVID_FILES.iter().zip(["cert2", "key2", "bundle2"]) {
            assert_eq!(fs::read_to_string(out.join(name)).expect("read"), want);
        }
        let names: Vec<_> = fs::read_dir(&out)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names.len(),
            6,
            "one version dir, ..data, three links, .lock: {names:?}"
        );
    }

    #[test]
    fn cert_dir_replaces_plain_files_with_links() {
        let tmp = tempfile::tempdir().expect("tmp");
        for name in SVID_FILES {
            fs::write(tmp.path().join(name), "old").expect("write");
        }
        write_cert_dir(tmp.path(), "c", "k", "b").expect("write");
        assert_eq!(
            fs::read_to_string(tmp.path().join("cert.pem")).expect("read"),
            "c"
        );
        assert!(
            fs::symlink_metadata(tmp.path().join("cert.pem"))
                .expect("meta")
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn write_atomic_leaves_no_temp_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("f");
        write_atomic(&p, b"one", PUBLIC_MODE).expect("write");
        write_atomic(&p, b"two", PUBLIC_MODE).expect("overwrite");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::read_dir(tmp.path()).expect("dir").count(), 1);
    }
}
