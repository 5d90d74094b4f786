//! The heartbeat: the driver's one-way channel to the supervisor, and the thread that beats
//! while the node or the applier make progress, apart from request work.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The channel to the supervisor: one line `ready ms=<start to serving ms> replayed=<entries>`
/// once the driver recovered and accepts clients (the supervisor counts that as progress),
/// then `beat` lines from a thread of their own while the node or the applier make progress.
/// Writes never block (the pipe is non-blocking; a full pipe drops a beat, a gone supervisor
/// is ignored).
#[derive(Debug)]
pub struct Heartbeat {
    out: std::fs::File,
    every: Duration,
}

impl Heartbeat {
    pub fn new(out: std::fs::File, every: Duration) -> Heartbeat {
        Heartbeat { out, every }
    }

    /// Says `ready`, then beats every interval in which `alive` moved, until `done` is set.
    /// The beats never wait behind request work: only a node or applier that stopped moving
    /// (hung) silences them.
    pub(crate) fn start(
        mut self,
        ms: u64,
        replayed: u64,
        alive: Arc<AtomicU64>,
        done: Arc<AtomicBool>,
    ) -> std::io::Result<()> {
        use std::io::Write;
        let _ = self.out.write_all(format!("ready ms={ms} replayed={replayed}\n").as_bytes());
        std::thread::Builder::new().name("rblk-beat".into()).spawn(move || {
            let mut seen = alive.load(Ordering::Relaxed);
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(self.every);
                let now = alive.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    let _ = self.out.write_all(b"beat\n");
                }
            }
        })?;
        Ok(())
    }
}
