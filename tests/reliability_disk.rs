//! The daemon's directory turning unwritable or full, in config mode on the stand-in with a
//! real PgBouncer and short tokens. A half-written file would hand PgBouncer a broken config,
//! so the old files must stay whole and in use, readiness must say when their token runs
//! out, and the next refresh after the disk mends must succeed.

mod support;

use std::path::Path;
use std::time::Duration;
use support::client::fresh_login_query;
use support::faults::start_supervised;
use support::{Standin, free_port, test_dir, wait_until};

/// Writing fails (read-only directory, or a full disk): the old files stay whole and in use,
/// the failure is logged, and the next refresh after writing works again succeeds.
/// `prepare` gets the daemon's directory before the daemon starts.
async fn survives_a_write_failure(
    prepare: impl FnOnce(&Path),
    break_writes: impl Fn(&Path),
    mend_writes: impl Fn(&Path),
) {
    let standin = Standin::start();
    let work = test_dir("write-failure");
    prepare(&work.path().join("pgbouncer"));
    let listen_port = free_port();
    let daemon = start_supervised(
        &standin,
        work.path(),
        listen_port,
        10,
        Some(&standin.static_creds()),
        &[],
        &[],
    );
    let dir = daemon.pgbouncer_dir.clone();
    let before = std::fs::read_to_string(dir.join("databases.ini")).unwrap();

    break_writes(&dir);
    assert!(
        wait_until(Duration::from_secs(15), || daemon
            .log()
            .contains("could not write the new tokens")),
        "{}",
        daemon.log()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("databases.ini")).unwrap(),
        before
    );
    // PgBouncer still logs in with the old token while it lives.
    fresh_login_query(&standin, listen_port)
        .await
        .expect("login on the old token");
    // Once it is about to die, readiness says PgBouncer has no valid token, though the
    // daemon has minted newer ones.
    assert!(
        wait_until(Duration::from_secs(15), || {
            daemon.http_get("/readyz").is_some_and(|(status, body)| {
                status == 503 && body.contains("PgBouncer has not yet loaded a valid token")
            })
        }),
        "{:?}\n{}",
        daemon.http_get("/readyz"),
        daemon.log()
    );

    mend_writes(&dir);
    assert!(
        wait_until(Duration::from_secs(15), || {
            std::fs::read_to_string(dir.join("databases.ini")).unwrap() != before
        }),
        "the daemon did not write again"
    );
    // Ready again once PgBouncer has reloaded the new token.
    assert!(
        wait_until(Duration::from_secs(15), || {
            daemon
                .http_get("/readyz")
                .is_some_and(|(status, _)| status == 200)
        }),
        "{:?}",
        daemon.http_get("/readyz")
    );
    fresh_login_query(&standin, listen_port)
        .await
        .expect("login on the new token");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            // PgBouncer's own socket (unix_socket_dir is the directory) is no leftover.
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with('.') && !name.starts_with(".s.PGSQL.")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_directory_keeps_the_old_files_and_recovers() {
    use std::os::unix::fs::PermissionsExt;
    let set_mode = |dir: &Path, mode: u32| {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // The daemon runs unprivileged, so directory permissions bind it.
    survives_a_write_failure(
        |_| {},
        |dir| set_mode(dir, 0o500),
        |dir| set_mode(dir, 0o700),
    )
    .await;
}

/// Unmounts a tmpfs when dropped, also when the test fails.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(at)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs at {}", at.display());
        support::chown_to_runner(at);
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_the_old_files_and_recovers() {
    assert!(
        support::is_root(),
        "this test mounts a small tmpfs and needs root (CI runs as root)"
    );
    let mut mounted = None;
    let filler = |dir: &Path| dir.join("filler");
    survives_a_write_failure(
        |dir| mounted = Some(Tmpfs::mount(dir, "256k")),
        |dir| {
            // Fill the disk to the last byte.
            let _ = std::process::Command::new("dd")
                .args(["if=/dev/zero", "bs=4k"])
                .arg(format!("of={}", filler(dir).display()))
                .stderr(std::process::Stdio::null())
                .status();
        },
        |dir| std::fs::remove_file(filler(dir)).unwrap(),
    )
    .await;
    drop(mounted);
}
