//! The binary's code pages, handed back a few seconds after each burst of work.
//!
//! Measured on the idle daemon with one user (docs/BENCHMARKS.md, "Memory"): of its 12.6-14.2
//! MiB VmRSS only 1.2-1.8 MiB is anonymous; the rest is mostly the binary's own read-only
//! pages, mapped by start-up (flags, TOML, the AWS configuration loader, TLS configs) and
//! later by token refreshes and the relay's TLS logins to the server, 64-128 KiB per fault by
//! the kernel's fault-around. They stay in the resident set though the idle daemon never
//! touches them until the next burst. Unmapping them with `MADV_DONTNEED` costs nothing to
//! correctness: they are clean file pages, still in the page cache (and charged to a
//! container's memory cgroup either way), and any the daemon touches again come back with a
//! minor fault. What drops is the process's RSS, not the machine's memory use.

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

/// Unmaps the daemon binary's read-only, never-written segments: its code (`r-xp`) and the
/// segment at file offset 0 (headers, constants, unwind tables). The RELRO segment is left
/// alone: it is `r--p` too, but its pages hold relocations written at load time, which
/// `MADV_DONTNEED` would throw away. Returns the bytes unmapped.
fn release() -> io::Result<usize> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut released = 0;
    for (start, end) in maps.lines().filter_map(|line| clean_segment(line, &exe)) {
        // SAFETY: the range is a whole mapping of the binary that is never written (code, or
        // the read-only segment at offset 0), so dropping its pages loses nothing: the next
        // access reads the same bytes back from the file.
        let result =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        released += end - start;
    }
    Ok(released)
}

/// The address range of a `/proc/self/maps` line if it maps `exe` and is never written.
fn clean_segment(line: &str, exe: &str) -> Option<(usize, usize)> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let path = fields.nth(2)?;
    let never_written =
        perms == "r-xp" || (perms == "r--p" && u64::from_str_radix(offset, 16) == Ok(0));
    if path != exe || !never_written || fields.next().is_some() {
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
    use super::clean_segment;

    const EXE: &str = "/usr/bin/aws-pgbouncer";

    #[test]
    fn takes_code_and_the_first_read_only_segment_only() {
        let line = |perms: &str, offset: &str, path: &str| {
            format!("55d0a0000000-55d0a0010000 {perms} {offset} 08:01 1234   {path}")
        };
        let range = Some((0x55d0a0000000, 0x55d0a0010000));
        assert_eq!(clean_segment(&line("r-xp", "00345000", EXE), EXE), range);
        assert_eq!(clean_segment(&line("r--p", "00000000", EXE), EXE), range);
        // RELRO: read-only now, but written by the dynamic loader.
        assert_eq!(clean_segment(&line("r--p", "00cf8000", EXE), EXE), None);
        assert_eq!(clean_segment(&line("rw-p", "00d62000", EXE), EXE), None);
        assert_eq!(
            clean_segment(&line("r-xp", "00028000", "/usr/lib/libc.so.6"), EXE),
            None
        );
        assert_eq!(
            clean_segment(&line("r-xp", "00345000", &format!("{EXE} (deleted)")), EXE),
            None
        );
        assert_eq!(
            clean_segment("7ffd1000-7ffd2000 r-xp 00000000 00:00 0   [vdso]", EXE),
            None
        );
        assert_eq!(
            clean_segment("7f0000000000-7f0000001000 rw-p 00000000 00:00 0", EXE),
            None
        );
    }
}
