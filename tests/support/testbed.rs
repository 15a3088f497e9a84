//! The provisioned test bed (`scripts/provision.sh`) and the unprivileged user children run
//! as, with the directories and files that user must be able to read.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use tempfile::TempDir;

use super::child::run_checked;
use super::repo_root;

/// The provisioned test bed: `$AWS_PGBOUNCER_TESTBED` (default `/opt/aws-pgbouncer-testbed`).
#[derive(Debug)]
pub struct Testbed {
    pub dir: PathBuf,
    /// PgBouncer binary (>= 1.24).
    pub pgbouncer: PathBuf,
    pub pgbouncer_version: String,
    /// Directory of PostgreSQL's server binaries (postgres, initdb, pg_ctl, psql, pgbench).
    pub pg_bindir: PathBuf,
    pub postgres_version: String,
    /// The venv's python (botocore, moto[server]).
    pub python: PathBuf,
    pub botocore_version: String,
    /// `tests/standin/mint.py` as installed.
    pub mint: PathBuf,
    /// `moto_server` in the venv.
    pub moto_server: PathBuf,
    /// The unprivileged user that runs PgBouncer and PostgreSQL when tests run as root;
    /// `None` when tests run unprivileged (then everything runs as the current user).
    pub run_as: Option<RunAs>,
    /// A second unprivileged user, distinct from `run_as`: the "other local process" that
    /// attack tests run as. Those tests need root to switch to it and panic without it.
    intruder: String,
}

/// An OS user that children run as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `sh -c script` as this user, waited for; panics with its output if it fails.
    pub fn sh(&self, script: &str) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).uid(self.uid).gid(self.gid);
        run_checked(&mut cmd, &format!("sh as {}: {script}", self.name))
    }
}

fn missing(why: &str) -> ! {
    panic!(
        "test bed missing: run scripts/provision.sh (as root or with sudo). {why}. \
         Test-bed directory: $AWS_PGBOUNCER_TESTBED or /opt/aws-pgbouncer-testbed."
    )
}

impl Testbed {
    /// Finds the test bed, checks it is complete and matches this checkout's stand-in
    /// sources; panics with what to run otherwise. Cached for the process.
    pub fn locate() -> &'static Testbed {
        static TB: OnceLock<Testbed> = OnceLock::new();
        TB.get_or_init(Self::locate_uncached)
    }

    fn locate_uncached() -> Testbed {
        let dir = PathBuf::from(
            std::env::var_os("AWS_PGBOUNCER_TESTBED")
                .unwrap_or_else(|| "/opt/aws-pgbouncer-testbed".into()),
        );
        let ready = dir.join("ready");
        let text = fs::read_to_string(&ready).unwrap_or_else(|e| {
            missing(&format!(
                "{} unreadable ({e}): provisioning never finished",
                ready.display()
            ))
        });
        let get = |key: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
                .unwrap_or_else(|| missing(&format!("{} lacks {key}=", ready.display())))
        };
        let tb = Testbed {
            pgbouncer: PathBuf::from(get("pgbouncer")),
            pgbouncer_version: get("pgbouncer_version"),
            pg_bindir: PathBuf::from(get("pg_bindir")),
            postgres_version: get("postgres_version"),
            python: PathBuf::from(get("python")),
            botocore_version: get("botocore_version"),
            mint: PathBuf::from(get("mint")),
            moto_server: dir.join("venv/bin/moto_server"),
            run_as: if is_root() {
                Some(lookup_user(&get("run_as")))
            } else {
                None
            },
            intruder: get("intruder"),
            dir,
        };
        for p in [
            &tb.pgbouncer,
            &tb.pg_bindir.join("postgres"),
            &tb.pg_bindir.join("psql"),
            &tb.python,
            &tb.mint,
            &tb.moto_server,
            &tb.dir.join("lib/pam_standin.so"),
            &PathBuf::from("/etc/pam.d/aws-pgbouncer-standin"),
            &PathBuf::from("/etc/pam.d/aws-pgbouncer-standin-dsql"),
        ] {
            if !p.exists() {
                missing(&format!("{} does not exist", p.display()));
            }
        }
        // The installed stand-in must be this checkout's: a stale one tests the wrong thing.
        for (installed, source) in [
            ("bin/verifier.py", "tests/standin/verifier.py"),
            ("bin/dsql_verifier.py", "tests/standin/dsql_verifier.py"),
            ("bin/mint.py", "tests/standin/mint.py"),
            ("src/pam_standin.c", "tests/standin/pam_standin.c"),
        ] {
            let a = fs::read(tb.dir.join(installed)).ok();
            let b = fs::read(repo_root().join(source)).ok();
            if a.is_none() || a != b {
                panic!(
                    "test bed out of date: {} differs from {source}: run scripts/provision.sh",
                    tb.dir.join(installed).display()
                );
            }
        }
        tb
    }

    /// The second local user attack tests run as. Panics unless tests run as root, since
    /// only root can start a process as another user.
    pub fn intruder(&self) -> RunAs {
        assert!(
            is_root(),
            "attack tests run processes as a second uid and so need root (CI runs as root)"
        );
        lookup_user(&self.intruder)
    }

    /// `(uid, gid)` children run as, if tests run as root.
    pub fn ids(&self) -> Option<(u32, u32)> {
        self.run_as.as_ref().map(|r| (r.uid, r.gid))
    }

    /// Path of a PostgreSQL program (psql, pgbench, pg_isready, ...).
    pub fn pg_bin(&self, name: &str) -> PathBuf {
        self.pg_bindir.join(name)
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn lookup_user(name: &str) -> RunAs {
    let c = CString::new(name).expect("user name");
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        missing(&format!("OS user {name} does not exist"));
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    RunAs {
        name: name.to_owned(),
        uid,
        gid,
    }
}

/// Gives `path` to the unprivileged runner (no-op when tests are not root).
pub fn chown_to_runner(path: &Path) {
    if let Some((uid, gid)) = Testbed::locate().ids() {
        let c = CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: c is a valid NUL-terminated path.
        let rc = unsafe { libc::chown(c.as_ptr(), uid, gid) };
        assert_eq!(
            rc,
            0,
            "chown {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// A temporary directory the unprivileged runner owns (0755), removed on drop. Under /tmp so
/// that the runner can reach it and unix socket paths stay short.
pub fn test_dir(prefix: &str) -> TempDir {
    let parent = if is_root() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix(&format!("awspgb-{prefix}-"))
        .tempdir_in(parent)
        .expect("create temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    chown_to_runner(dir.path());
    dir
}

/// Writes a file readable by the runner (0644); `mode` 0600 files are also given to it.
pub fn write_file(path: &Path, contents: &str, mode: u32) {
    let tmp = path.with_extension("tmp-write");
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).expect("chmod");
    chown_to_runner(&tmp);
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}
