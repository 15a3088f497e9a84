//! Keeps the relay's thread on the CPU that PgBouncer last ran on.
//!
//! Every relayed statement passes PgBouncer → relay → RDS → relay → PgBouncer, so each one
//! wakes the relay and PgBouncer in turn. A wake-up of a task on the other CPU costs far more
//! than one on the waker's own (about 45 µs against 4 µs on a VM whose idle CPUs halt,
//! docs/BENCHMARKS.md), and the scheduler does not know that the two processes work as a pair.
//! So the relay's thread is pinned to PgBouncer's last CPU (field 39 of `/proc/PID/stat`),
//! read again every [`SAMPLE_EVERY`], and moves when PgBouncer moves. PgBouncer itself is
//! left alone: the scheduler may move it, and the relay follows.
//!
//! Only within the thread's own CPUs at start: a PgBouncer on a CPU the daemon may not use
//! gives the thread its own mask back. Where PgBouncer's CPU cannot be read (another pid
//! namespace, where `SO_PEERCRED` gives pid 0; no `/proc` entry), the thread keeps its own
//! mask and one info line says so.
//!
//! `sched_setaffinity(0, ..)` pins the calling thread, so the follower must run on the thread
//! that runs the relay: the daemon's runtime has one thread (`main.rs`), which runs both.
//! Through `libc`, already a dependency for `getrlimit` and `kill`: the crates that wrap
//! it either pin to one core without reading the mask back (`core_affinity`) or would be a
//! new dependency for three calls (`nix`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// How often PgBouncer's CPU is read again: one small `/proc` read (a few µs) five times a
/// second is nothing against the relay's work, and the scheduler moves a busy process
/// rarely.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Where the kernel's process table is.
pub const PROC: &str = "/proc";

/// The CPU process `pid` last ran on: field 39 ("processor") of `PROC/PID/stat`.
pub fn last_cpu(proc_root: &Path, pid: u32) -> io::Result<usize> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))?;
    // Field 2, the command name, is in parentheses and may itself hold spaces and ')'.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest);
    after_name
        .and_then(|rest| rest.split_whitespace().nth(39 - 3))
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no processor field"))
}

/// A set of CPUs, as `sched_{get,set}affinity` take it.
#[derive(Clone, Copy)]
struct CpuMask(libc::cpu_set_t);

impl CpuMask {
    fn of_this_thread() -> io::Result<Self> {
        // SAFETY: an all-zero cpu_set_t is the empty set; the kernel writes at most its size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `set` is a valid cpu_set_t of `size` bytes; pid 0 is the calling thread.
        if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(set))
    }

    /// The set of `cpu` alone; `cpu` comes from [`Self::contains`], so it is in range.
    fn only(cpu: usize) -> Self {
        // SAFETY: an all-zero cpu_set_t is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` < CPU_SETSIZE, the set's size in bits (see above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
        Self(set)
    }

    fn contains(&self, cpu: usize) -> bool {
        // SAFETY: CPU_ISSET only reads the bit, and `cpu` < CPU_SETSIZE, the set's size.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &self.0) }
    }

    fn apply_to_this_thread(&self) -> io::Result<()> {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `self.0` is a valid cpu_set_t of `size` bytes; pid 0 is the calling thread.
        if unsafe { libc::sched_setaffinity(0, size, &self.0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Pins the thread that calls it to a process's last CPU, within the thread's mask at start.
pub struct Follower {
    proc_root: PathBuf,
    own: CpuMask,
    /// The CPU the thread is pinned to, or `None` while it has its own mask.
    pinned: Option<usize>,
}

impl Follower {
    /// Remembers the calling thread's CPUs, to stay within them and to give them back.
    pub fn new(proc_root: impl Into<PathBuf>) -> io::Result<Self> {
        Ok(Self {
            proc_root: proc_root.into(),
            own: CpuMask::of_this_thread()?,
            pinned: None,
        })
    }

    /// Pins the calling thread to `pid`'s last CPU; returns that CPU, or `None` when it is
    /// not one of the thread's own (which it then has back). When `pid`'s CPU cannot be
    /// read, the thread has its own mask back and the error says why.
    pub fn follow(&mut self, pid: u32) -> io::Result<Option<usize>> {
        let cpu = match pid {
            0 => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "PgBouncer is in another pid namespace",
            )),
            pid => last_cpu(&self.proc_root, pid),
        };
        let cpu = match cpu {
            Ok(cpu) if self.own.contains(cpu) => cpu,
            Ok(_) => return self.release().map(|()| None),
            Err(error) => {
                self.release()?;
                return Err(error);
            }
        };
        if self.pinned != Some(cpu) {
            CpuMask::only(cpu).apply_to_this_thread()?;
            self.pinned = Some(cpu);
        }
        Ok(Some(cpu))
    }

    /// Gives the calling thread its own mask back.
    pub fn release(&mut self) -> io::Result<()> {
        if self.pinned.take().is_some() {
            self.own.apply_to_this_thread()?;
        }
        Ok(())
    }
}

/// Follows the pid in `pids` from the thread this task runs on, until the sender is gone;
/// then gives the thread its own mask back. `None` means no PgBouncer known yet.
pub async fn follow(mut pids: watch::Receiver<Option<u32>>, proc_root: PathBuf, every: Duration) {
    let mut follower = match Follower::new(proc_root) {
        Ok(follower) => follower,
        Err(error) => {
            tracing::info!(%error, "cannot read the relay thread's CPUs: it will not follow PgBouncer's");
            return;
        }
    };
    let mut told = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let pid = *pids.borrow_and_update();
        let followed = pid.map(|pid| (pid, follower.follow(pid)));
        let keep_sampling = match followed {
            Some((_, Ok(_))) => true,
            Some((pid, Err(error))) => {
                if !told {
                    told = true;
                    tracing::info!(pid, %error, "cannot read PgBouncer's CPU: the relay's thread keeps its own CPUs");
                }
                false
            }
            None => false,
        };
        let changed = if keep_sampling {
            tokio::select! {
                _ = tick.tick() => Ok(()),
                changed = pids.changed() => changed,
            }
        } else {
            pids.changed().await
        };
        if changed.is_err() {
            break;
        }
    }
    if let Err(error) = follower.release() {
        tracing::debug!(%error, "cannot give the relay's thread its CPUs back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_stat(root: &Path, pid: u32, text: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), text).unwrap();
    }

    /// A stat line as the kernel writes it, with `processor` (field 39) set to `cpu`.
    fn stat_line(comm: &str, cpu: usize) -> String {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "S".into();
        fields[39 - 3] = cpu.to_string();
        format!("4242 ({comm}) {}\n", fields.join(" "))
    }

    #[test]
    fn the_processor_field_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let root = tempfile::tempdir().unwrap();
        write_stat(root.path(), 4242, &stat_line("pg) bouncer (x", 7));
        assert_eq!(last_cpu(root.path(), 4242).unwrap(), 7);
        write_stat(root.path(), 4243, "4243 (cut) S 1 2\n");
        let error = last_cpu(root.path(), 4243).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn this_process_reads_its_own_cpu_from_the_real_proc() {
        let cpu = last_cpu(Path::new(PROC), std::process::id()).unwrap();
        assert!(
            CpuMask::of_this_thread().unwrap().contains(cpu),
            "cpu {cpu}"
        );
    }

    /// Without a `/proc` entry for PgBouncer (it exited, or it is in another pid namespace,
    /// where SO_PEERCRED gives pid 0), the thread is not pinned, or has its own CPUs back.
    #[test]
    fn without_a_proc_entry_the_thread_keeps_its_own_cpus() {
        let root = tempfile::tempdir().unwrap();
        // A thread of its own, so that pinning cannot leak into other tests.
        std::thread::spawn(move || {
            let own = cpus_of_this_thread();
            let mut follower = Follower::new(root.path()).unwrap();
            let error = follower.follow(4242).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::NotFound);
            assert_eq!(cpus_of_this_thread(), own);

            write_stat(root.path(), 4242, &stat_line("pgbouncer", own[0]));
            assert_eq!(follower.follow(4242).unwrap(), Some(own[0]));
            assert_eq!(cpus_of_this_thread(), [own[0]]);
            std::fs::remove_dir_all(root.path().join("4242")).unwrap();
            let error = follower.follow(4242).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::NotFound);
            assert_eq!(cpus_of_this_thread(), own);

            write_stat(root.path(), 4243, &stat_line("pgbouncer", own[0]));
            assert_eq!(follower.follow(4243).unwrap(), Some(own[0]));
            let error = follower.follow(0).unwrap_err();
            assert!(error.to_string().contains("pid namespace"), "{error}");
            assert_eq!(cpus_of_this_thread(), own);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_thread_is_pinned_to_the_cpu_read_and_gets_its_own_back_when_that_is_foreign() {
        let root = tempfile::tempdir().unwrap();
        std::thread::spawn(move || {
            let own = cpus_of_this_thread();
            let mut follower = Follower::new(root.path()).unwrap();
            let first = own[0];
            write_stat(root.path(), 4242, &stat_line("pgbouncer", first));
            assert_eq!(follower.follow(4242).unwrap(), Some(first));
            assert_eq!(cpus_of_this_thread(), [first]);
            // A CPU the thread may not use (beyond any machine's count here).
            write_stat(root.path(), 4242, &stat_line("pgbouncer", 1000));
            assert_eq!(follower.follow(4242).unwrap(), None);
            assert_eq!(cpus_of_this_thread(), own);
        })
        .join()
        .unwrap();
    }

    fn cpus_of_this_thread() -> Vec<usize> {
        let mask = CpuMask::of_this_thread().unwrap();
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| mask.contains(cpu))
            .collect()
    }
}
