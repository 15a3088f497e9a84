//! The daemon's directory and the files in it, so that PgBouncer never reads a half-written
//! file and nothing another local user planted is ever trusted.
//!
//! Each file is written to a temporary file in the same directory (an unpredictable name,
//! created with `O_EXCL` so that nothing planted under that name is followed, 0600 from
//! creation so that a token is never readable by others even for a moment), flushed to disk,
//! then renamed over the old one. A failed write leaves the old file in place and PgBouncer
//! keeps running on it.
//!
//! **Which directory.** The daemon writes only into a directory that no other user can write:
//! one owned by its own uid, writable by nobody else. A directory others may write (a
//! Kubernetes `emptyDir` is created 0777, `/tmp` is 1777) or that another uid owns is not
//! used itself: the daemon makes its own 0700 subdirectory [`PRIVATE_SUBDIR`] there and uses
//! only that, after checking that a subdirectory found under that name is a real directory
//! that it owns and nobody else can enter. Anything else stops the daemon at start.

use secrecy::SecretString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The subdirectory the daemon makes for itself in a directory that others may write.
pub const PRIVATE_SUBDIR: &str = "private";

#[derive(Debug, thiserror::Error)]
#[error("cannot write or read {path}: {source}")]
pub struct WriteError {
    path: PathBuf,
    source: std::io::Error,
}

impl WriteError {
    fn refused(path: &Path, why: String) -> Self {
        Self {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        }
    }
}

/// Replaces `dir/name` with `contents` atomically, mode 0600.
pub fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<(), WriteError> {
    write_with_mode(dir, name, contents, 0o600)
}

/// As [`write_atomically`], mode 0644: for what is meant to be read by anyone (a CA
/// certificate).
pub fn write_public_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<(), WriteError> {
    write_with_mode(dir, name, contents, 0o644)
}

fn write_with_mode(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), WriteError> {
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
    // On the open file, so neither the umask nor a path swap can change what is widened.
    if mode != 0o600 {
        temporary
            .as_file()
            .set_permissions(fs::Permissions::from_mode(mode))
            .map_err(error)?;
    }
    temporary.as_file().sync_all().map_err(error)?;
    temporary
        .persist(&path)
        .map_err(|persist| error(persist.error))?;
    // The rename itself is durable only once the directory is synced.
    fs::File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(error)
}

/// The directory the daemon will write into: `dir` itself when only the daemon can write it
/// (created 0700 if missing), else its private subdirectory there. Proven writable, so that
/// a bad directory is reported at start, before any token is minted.
pub fn prepare_dir(dir: &Path) -> Result<PathBuf, WriteError> {
    let error = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(error(dir))?;
    let metadata = fs::metadata(dir).map_err(error(dir))?;
    let chosen = if is_private(&metadata) {
        dir.to_owned()
    } else {
        let private = dir.join(PRIVATE_SUBDIR);
        match fs::DirBuilder::new().mode(0o700).create(&private) {
            Ok(()) => {}
            Err(source) if source.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(WriteError::refused(
                    dir,
                    format!(
                        "{}, and the daemon cannot make its private subdirectory there ({source}); \
                         give it a directory of its own",
                        describe_shared(&metadata)
                    ),
                ));
            }
        }
        // Not following a symlink: whatever is there must itself be the daemon's.
        let found = fs::symlink_metadata(&private).map_err(error(&private))?;
        if !found.is_dir() || found.uid() != effective_uid() || found.mode() & 0o077 != 0 {
            return Err(WriteError::refused(
                &private,
                format!(
                    "{} is used through its subdirectory {PRIVATE_SUBDIR}, which is not the \
                     daemon's ({}); remove it",
                    dir.display(),
                    describe(&found)
                ),
            ));
        }
        tracing::info!(
            dir = %dir.display(),
            "{}: using the private subdirectory {PRIVATE_SUBDIR} there",
            describe_shared(&metadata)
        );
        if metadata.mode() & STICKY == 0 {
            tracing::warn!(
                dir = %dir.display(),
                "the directory has no sticky bit, so any user who can write it can rename \
                 {PRIVATE_SUBDIR} away and put files of their own where PgBouncer reads; share it \
                 only with PgBouncer (in Kubernetes, mount the emptyDir only into the daemon's \
                 and PgBouncer's containers), or make it 1777 or the daemon's own"
            );
        }
        private
    };
    tempfile::Builder::new()
        .prefix(".write-check.")
        .tempfile_in(&chosen)
        .map(drop)
        .map_err(error(&chosen))?;
    Ok(chosen)
}

/// The sticky bit: in a directory that has it (such as /tmp), only an entry's owner may
/// rename or remove it, so nobody can swap the daemon's private subdirectory for their own.
const STICKY: u32 = 0o1000;

/// Owned by the daemon's uid and writable by nobody else.
fn is_private(metadata: &fs::Metadata) -> bool {
    metadata.uid() == effective_uid() && metadata.mode() & 0o022 == 0
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn describe(metadata: &fs::Metadata) -> String {
    let kind = if metadata.is_symlink() {
        "a symbolic link"
    } else if metadata.is_dir() {
        "a directory"
    } else if metadata.is_file() {
        "a file"
    } else {
        "not a regular file"
    };
    format!(
        "{kind} owned by uid {}, mode {:04o}; the daemon runs as uid {}",
        metadata.uid(),
        metadata.mode() & 0o7777,
        effective_uid()
    )
}

fn describe_shared(metadata: &fs::Metadata) -> String {
    if metadata.uid() != effective_uid() {
        format!("owned by another user ({})", describe(metadata))
    } else {
        format!("writable by other users ({})", describe(metadata))
    }
}

/// A random secret kept in `dir/name` (0600), created on first use. It survives daemon
/// restarts: a PgBouncer that keeps running holds the old userlist until it reloads, and
/// only the old secret can make it reload. A file the daemon cannot have written (a symlink,
/// another owner, readable or writable by others) is refused, never adopted: its planter
/// would know the secret.
pub fn load_or_create_secret(dir: &Path, name: &str) -> Result<SecretString, WriteError> {
    let path = dir.join(name);
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path);
    match opened {
        Ok(file) => {
            let text = read_own_secret(&path, file)?;
            if !text.trim().is_empty() {
                return Ok(SecretString::from(text.trim().to_owned()));
            }
        }
        Err(source) if source.raw_os_error() == Some(libc::ELOOP) => {
            let found = fs::symlink_metadata(&path).map_err(|source| WriteError {
                path: path.clone(),
                source,
            })?;
            return Err(not_written_by_us(&path, &found));
        }
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

/// Reads an opened secret file after checking, on the open file itself, that the daemon
/// could have written it.
fn read_own_secret(path: &Path, mut file: fs::File) -> Result<String, WriteError> {
    let error = |source| WriteError {
        path: path.to_owned(),
        source,
    };
    let metadata = file.metadata().map_err(error)?;
    if !metadata.is_file() || metadata.uid() != effective_uid() || metadata.mode() & 0o077 != 0 {
        return Err(not_written_by_us(path, &metadata));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(error)?;
    Ok(text)
}

fn not_written_by_us(path: &Path, metadata: &fs::Metadata) -> WriteError {
    WriteError::refused(
        path,
        format!(
            "not a secret this daemon wrote ({}; it writes regular files, mode 0600); \
             remove it and restart",
            describe(metadata)
        ),
    )
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
    fn a_directory_others_may_write_is_used_through_a_private_subdirectory() {
        let shared = tempfile::tempdir().unwrap();
        fs::set_permissions(shared.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let chosen = prepare_dir(shared.path()).unwrap();
        assert_eq!(chosen, shared.path().join(PRIVATE_SUBDIR));
        let mode = fs::metadata(&chosen).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(
            prepare_dir(shared.path()).unwrap(),
            chosen,
            "kept across restarts"
        );

        let own = tempfile::tempdir().unwrap();
        assert_eq!(prepare_dir(own.path()).unwrap(), own.path());
    }

    #[test]
    fn a_private_subdirectory_that_is_not_the_daemons_stops_it() {
        let shared = tempfile::tempdir().unwrap();
        fs::set_permissions(shared.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let private = shared.path().join(PRIVATE_SUBDIR);
        fs::create_dir(&private).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o777)).unwrap();
        let error = prepare_dir(shared.path()).unwrap_err().to_string();
        assert!(error.contains("not the daemon's"), "{error}");

        fs::remove_dir(&private).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &private).unwrap();
        let error = prepare_dir(shared.path()).unwrap_err().to_string();
        assert!(error.contains("a symbolic link"), "{error}");
    }

    #[test]
    fn a_secret_the_daemon_did_not_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join("planted");
        fs::write(&planted, "known-to-the-planter").unwrap();
        std::os::unix::fs::symlink(&planted, dir.path().join("linked")).unwrap();
        let error = load_or_create_secret(dir.path(), "linked").unwrap_err();
        assert!(error.to_string().contains("a symbolic link"), "{error}");

        fs::set_permissions(&planted, fs::Permissions::from_mode(0o644)).unwrap();
        let error = load_or_create_secret(dir.path(), "planted").unwrap_err();
        assert!(error.to_string().contains("mode 0644"), "{error}");
        assert_eq!(
            fs::read_to_string(&planted).unwrap(),
            "known-to-the-planter"
        );
    }

    #[test]
    fn public_files_are_readable_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        write_public_atomically(dir.path(), "ca.pem", b"cert").unwrap();
        let mode = fs::metadata(dir.path().join("ca.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
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
