//! Start-up code pages, handed back once the daemon has started.
//!
//! Measured on the idle daemon with one user (docs/BENCHMARKS.md, "Memory"): of its 12.6-14.2
//! MiB VmRSS only 1.2-1.5 MiB is anonymous (heap 0.6-0.8 MiB, one thread's stack 0.1 MiB);
//! 9.5-10.6 MiB is the binary's own read-only pages, mapped while parsing flags and TOML,
//! loading AWS configuration and building TLS configs, 64 KiB at a time by the kernel's
//! fault-around. They stay in the resident set though the running daemon never touches a
//! fifth to a third of them again. Unmapping them with `MADV_DONTNEED` costs nothing to
//! correctness: they are clean file pages, still in the page cache, and any the daemon touches
//! again come back with a minor fault. Idle VmRSS fell by 2-3.5 MiB (config mode 12.6 -> 9.1
//! MiB).

use std::io;

/// Unmaps the daemon binary's read-only, never-written segments: its code (`r-xp`) and the
/// segment at file offset 0 (headers, constants, unwind tables). The RELRO segment is left
/// alone: it is `r--p` too, but its pages hold relocations written at load time, which
/// `MADV_DONTNEED` would throw away. Returns the bytes unmapped.
pub fn release() -> io::Result<usize> {
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
