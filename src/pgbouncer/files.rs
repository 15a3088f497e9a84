//! Writing PgBouncer's files so that it never reads a half-written one.
//!
//! Each file is written to a temporary file in the same directory (0600 from creation, so a
//! token is never readable by others even for a moment), flushed to disk, then renamed over
//! the old one. A failed write leaves the old file in place and PgBouncer keeps running on it.

use secrecy::SecretString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot write or read {path}: {source}")]
pub struct WriteError {
    path: PathBuf,
    source: std::io::Error,
}

/// Replaces `dir/name` with `contents` atomically, mode 0600.
pub fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<(), WriteError> {
    let path = dir.join(name);
    let error = |source| WriteError {
        path: path.clone(),
        source,
    };
    let mut temporary = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(error)?;
    temporary.write_all(contents).map_err(error)?;
    temporary.as_file().sync_all().map_err(error)?;
    temporary
        .persist(&path)
        .map_err(|persist| error(persist.error))?;
    // The rename itself is durable only once the directory is synced.
    fs::File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(error)
}

/// Creates the directory (0700) if needed and proves it writable, so that a bad directory is
/// reported at start, before any token is minted.
pub fn prepare_dir(dir: &Path) -> Result<(), WriteError> {
    let error = |source| WriteError {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(error)?;
    tempfile::Builder::new()
        .prefix(".write-check.")
        .tempfile_in(dir)
        .map(drop)
        .map_err(error)
}

/// A random secret kept in `dir/name` (0600), created on first use. It survives daemon
/// restarts: a PgBouncer that keeps running holds the old userlist until it reloads, and
/// only the old secret can make it reload.
pub fn load_or_create_secret(dir: &Path, name: &str) -> Result<SecretString, WriteError> {
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            return Ok(SecretString::from(text.trim().to_owned()));
        }
        Ok(_) => {}
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
            return Err(WriteError { path, source });
        }
        Err(_) => {}
    }
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    write_atomically(dir, name, secret.as_bytes())?;
    Ok(SecretString::from(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_private_and_replace_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "a.ini", b"first").unwrap();
        write_atomically(dir.path(), "a.ini", b"second").unwrap();
        let path = dir.path().join("a.ini");
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files may remain");
    }

    #[test]
    fn a_failed_write_leaves_no_trace() {
        // A non-empty directory in the way makes the rename fail, even for root.
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a.ini")).unwrap();
        fs::write(dir.path().join("a.ini/keep"), b"old").unwrap();
        let error = write_atomically(dir.path(), "a.ini", b"new").unwrap_err();
        assert!(error.to_string().contains("a.ini"), "{error}");
        assert_eq!(fs::read(dir.path().join("a.ini/keep")).unwrap(), b"old");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "the temporary file must be removed");
    }

    #[test]
    fn a_secret_is_created_once_and_then_kept() {
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_secret(dir.path(), "s").unwrap();
        let again = load_or_create_secret(dir.path(), "s").unwrap();
        assert_eq!(first.expose_secret(), again.expose_secret());
        assert_eq!(first.expose_secret().len(), 64);
        let mode = fs::metadata(dir.path().join("s"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
