//! The code pages of the binary and its shared libraries, handed back a few seconds after each
//! burst of work.
//!
//! Measured on the idle daemon with one user (docs/BENCHMARKS.md, "Memory"): of its 12.6-14.2
//! MiB VmRSS only 1.2-1.8 MiB is anonymous; the rest is mostly the binary's own read-only
//! pages, mapped by start-up (flags, TOML, the AWS configuration loader, TLS configs) and
//! later by token refreshes and the relay's TLS logins to the server, 64-128 KiB per fault by
//! the kernel's fault-around. They stay in the resident set though the idle daemon never
//! touches them until the next burst. Unmapping them with `MADV_DONTNEED` costs nothing to
//! correctness: they are clean file pages, still in the page cache (and charged to a
//! container's memory cgroup either way), and any the daemon touches again come back with a
//! minor fault. What drops is the process's RSS, not the machine's memory use. glibc's,
//! libm's and the dynamic loader's pages are the same kind (~2 MiB resident at idle before
//! they were released too, docs/BENCHMARKS.md).

use std::future::Future;
use std::io;
use std::time::Duration;
use tokio::sync::watch;

/// How long the releaser lets a burst of work settle: one token refresh or relay login is
/// over in milliseconds; a burst of many shares one release. It is also the shortest time
/// between two releases, which bounds the minor faults they cost.
const SETTLE: Duration = Duration::from_secs(3);

/// Tells the releaser that work ran which touched code the idle daemon does not need.
#[derive(Clone)]
pub struct CodePages {
    work_ran: watch::Sender<()>,
}

impl CodePages {
    /// Spawns the releaser: it releases the pages once `started` resolves, then `SETTLE`
    /// after each burst of work. It ends when the last `CodePages` is dropped.
    pub fn spawn(started: impl Future<Output = ()> + Send + 'static) -> Self {
        let (work_ran, work) = watch::channel(());
        tokio::spawn(release_after_work(started, work));
        Self { work_ran }
    }

    /// Work ran (a token refresh, a relay login): release the pages once it has settled.
    pub fn work_ran(&self) {
        self.work_ran.send_replace(());
    }
}

/// Work done before a release (during `SETTLE`, or before start) is covered by it: only work
/// after it asks for another, so an idle daemon releases nothing.
async fn release_after_work(started: impl Future<Output = ()>, mut work: watch::Receiver<()>) {
    started.await;
    loop {
        work.mark_unchanged();
        match release() {
            Ok(bytes) => tracing::debug!(bytes, "code pages released"),
            Err(error) => tracing::debug!(%error, "cannot release code pages"),
        }
        if work.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(SETTLE).await;
    }
}

/// Unmaps every private file mapping that is never written: the binary's code and constants,
/// and those of the shared libraries (glibc's code alone is ~1.2 MiB resident once the
/// runtime has run, for the few functions an idle daemon calls). A mapping qualifies only if
/// it holds no anonymous page: RELRO segments are read-only now but hold the relocations the
/// dynamic loader wrote, copied-on-write into anonymous pages, which `MADV_DONTNEED` would
/// throw away. Returns the bytes unmapped.
fn release() -> io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for (start, end) in clean_file_mappings(&smaps) {
        // SAFETY: the range is a whole private file mapping that cannot be written (no write
        // permission) and holds no anonymous page, so every resident page is an unmodified
        // copy of the file: the next access reads the same bytes back.
        let result =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        released += end - start;
    }
    Ok(released)
}

/// The address ranges of `/proc/self/smaps` mappings that are private, read-only, backed by a
/// file that still exists, resident in part, and hold no anonymous page.
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut clean = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    let mut resident = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if !first.ends_with(':') {
            current = candidate(first, fields);
            resident = false;
            continue;
        }
        let kib = fields.next().and_then(|value| value.parse::<u64>().ok());
        match (first, kib) {
            ("Rss:", Some(kib)) => resident = kib > 0,
            ("Anonymous:", Some(0)) if resident => clean.extend(current.take()),
            ("Anonymous:", _) => current = None,
            _ => {}
        }
    }
    clean
}

/// The range of a smaps header line (`start-end perms offset dev inode path`) whose mapping
/// could be clean: private, readable, not writable, of a file that is not deleted.
fn candidate<'a>(range: &str, mut fields: impl Iterator<Item = &'a str>) -> Option<(usize, usize)> {
    let perms = fields.next()?.as_bytes();
    let path = fields.nth(3)?;
    let deleted = fields.next().is_some();
    if perms.len() != 4 || perms[0] != b'r' || perms[1] != b'-' || perms[3] != b'p' {
        return None;
    }
    if !path.starts_with('/') || deleted {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::clean_file_mappings;

    fn mapping(range: &str, perms: &str, path: &str, rss: u64, anonymous: u64) -> String {
        format!(
            "{range} {perms} 00028000 08:01 1234   {path}\nSize:  64 kB\nRss:  {rss} kB\n\
             Pss:  {rss} kB\nAnonymous:  {anonymous} kB\nVmFlags: rd mr mw me\n"
        )
    }

    const EXE: &str = "/usr/bin/aws-pgbouncer";
    const LIBC: &str = "/usr/lib/libc.so.6";

    #[test]
    fn takes_the_read_only_file_mappings_that_hold_no_anonymous_page() {
        let smaps = [
            mapping("1000-2000", "r-xp", EXE, 8, 0),
            mapping("2000-3000", "r--p", LIBC, 4, 0),
            // RELRO: read-only now, but written by the dynamic loader.
            mapping("3000-4000", "r--p", EXE, 8, 8),
            mapping("4000-5000", "rw-p", LIBC, 4, 0),
            mapping("5000-6000", "r--s", "/dev/shm/shared", 4, 0),
            mapping("6000-7000", "r-xp", "[vdso]", 4, 0),
            mapping("7000-8000", "r-xp", &format!("{EXE} (deleted)"), 4, 0),
            mapping("8000-9000", "rw-p", "", 4, 4),
            // Nothing resident: nothing to release.
            mapping("9000-a000", "r-xp", LIBC, 0, 0),
        ]
        .concat();
        assert_eq!(
            clean_file_mappings(&smaps),
            vec![(0x1000, 0x2000), (0x2000, 0x3000)]
        );
    }
}
