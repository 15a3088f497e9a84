//! A connection flood from another local uid (the test bed's intruder), in a process of its
//! own: `flood.py` holds connections open and replaces those the server closes.

use super::Testbed;
use std::io::{BufRead, BufReader, Lines};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};

/// What the flood's connections do once open.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Send nothing.
    Idle,
    /// Send the start of an HTTP request, then a header byte per second.
    Slowloris,
}

pub struct Flood {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    opened: usize,
}

impl Flood {
    /// Starts holding `held` connections to `target` (`unix:PATH` or `tcp:HOST:PORT`) for
    /// `seconds`, as the intruder uid.
    pub fn start(target: &str, held: usize, seconds: f64, kind: Kind) -> Flood {
        let testbed = Testbed::locate();
        let intruder = testbed.intruder();
        let kind = match kind {
            Kind::Idle => "idle",
            Kind::Slowloris => "slowloris",
        };
        let mut child = Command::new(&testbed.python)
            .args(["-c", include_str!("flood.py")])
            .arg(target)
            .arg(held.to_string())
            .arg(seconds.to_string())
            .arg(kind)
            .uid(intruder.uid)
            .gid(intruder.gid)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the flood");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Flood {
            child,
            lines,
            opened: 0,
        }
    }

    /// Blocks until the flood has opened at least `n` connections.
    pub fn wait_opened(&mut self, n: usize) {
        while self.opened < n {
            let line = self
                .lines
                .next()
                .expect("the flood ended before opening enough connections")
                .unwrap();
            self.opened = line["opened ".len()..].parse().unwrap();
        }
    }

    /// Waits for the flood's end; the number of connections it opened in all.
    pub fn finish(&mut self) -> usize {
        for line in self.lines.by_ref() {
            self.opened = line.unwrap()["opened ".len()..].parse().unwrap();
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the flood failed: {status}");
        self.opened
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
