//! The `rblk-driver` process: the restartable block driver.
//!
//! It opens the volume (three roots → current root → copy-on-write tree; Raft log → replay of
//! committed entries), runs a single-node Raft group on the log store, and serves NBD block
//! sessions on a listening unix socket it is given:
//!
//! ```text
//!  accept thread ──► connection threads (handshake, decode, reads; one reply writer each)
//!                          │ write / trim / write-zeroes as proposals (≤ 1 MiB each)
//!                          ▼
//!                    node thread (RawNode): propose all waiting → ONE log append + flush
//!                          → apply to the volume → complete → reply
//! ```
//!
//! Promises: a write is acknowledged only after its entry is durable in the log and applied;
//! reads see every acknowledged write; FLUSH returns at once because nothing acknowledged is
//! still volatile (which is also why CAN_MULTI_CONN is true). Any I/O error on the log, the
//! volume or a checkpoint stops the driver with an error (fail-stop); a stop request lets the
//! node finish what it took, checkpoint, and return `Ok`, so the next start replays nothing.

pub mod cli;
pub mod conn;
pub mod node;
pub mod sandbox;

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, RwLock};

use raft_state::device::Device;
use raft_state::log::LogError;
use raft_state::volume::{Volume, VolumeError, VolumeOptions};
use slog::{info, warn, Logger};

pub use node::NodeConfig;

/// Errors that stop the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("volume")]
    Volume(#[source] VolumeError),
    #[error("raft log")]
    Log(#[source] LogError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("I/O")]
    Io(#[from] std::io::Error),
}

/// Everything the driver is told.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub volume: VolumeOptions,
    pub node: NodeConfig,
    pub read_only: bool,
    pub max_connections: usize,
}

/// NBD block sizes rblk advertises: 512-byte sectors work (read-modify-write below 4 KiB),
/// 4 KiB is the block the tree maps, 32 MiB the largest request.
pub const MIN_BLOCK: u32 = 512;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 32 << 20;

/// The channel to the supervisor: one line `ready ms=<recovery ms> replayed=<entries>` after
/// recovery, then `beat` lines while the node thread runs. Writes never block (the pipe is
/// non-blocking; a full pipe drops a beat, a gone supervisor is ignored).
#[derive(Debug)]
pub struct Heartbeat {
    out: std::fs::File,
    every: std::time::Duration,
    last: std::time::Instant,
}

impl Heartbeat {
    pub fn new(out: std::fs::File, every: std::time::Duration) -> Heartbeat {
        Heartbeat { out, every, last: std::time::Instant::now() }
    }

    fn line(&mut self, line: &str) {
        use std::io::Write;
        let _ = self.out.write_all(line.as_bytes());
        self.last = std::time::Instant::now();
    }

    pub fn ready(&mut self, ms: u64, replayed: u64) {
        self.line(&format!("ready ms={ms} replayed={replayed}\n"));
    }

    /// Beats if the interval has passed.
    pub fn beat(&mut self) {
        if self.last.elapsed() >= self.every {
            self.line("beat\n");
        }
    }
}

/// Opens the volume and serves `listener` until `stop` is set (then returns `Ok` after a
/// final checkpoint) or a fatal error. With a heartbeat, reports recovery and beats.
///
/// Threads it leaves when it returns (which a process exiting ends anyway): the accept thread
/// ends at the next connection, closing the listener; each connection's threads end when
/// its client goes (writes are no longer answered). Once they have, nothing holds `dev`.
pub fn run(
    dev: Arc<dyn Device>,
    root_dev: Option<Arc<dyn Device>>,
    listener: UnixListener,
    cfg: DriverConfig,
    stop: Arc<AtomicBool>,
    mut heartbeat: Option<Heartbeat>,
    log: Logger,
) -> Result<(), DriverError> {
    let started = std::time::Instant::now();
    let (volume, store) =
        Volume::open_with(dev, root_dev, cfg.volume.clone(), log.new(slog::o!("component" => "volume")))
            .map_err(DriverError::Volume)?;
    if let Some(h) = heartbeat.as_mut() {
        let stats = volume.stats();
        h.ready(started.elapsed().as_millis() as u64, stats.applied_index - stats.root_applied_index);
    }
    let export = session::Export {
        size: volume.size(),
        read_only: cfg.read_only,
        min_block: MIN_BLOCK,
        preferred_block: PREFERRED_BLOCK,
        max_block: MAX_BLOCK,
        multi_conn: true,
        description: Some("rblk volume".into()),
    };
    let volume = Arc::new(RwLock::new(volume));
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(conn::Shared {
        volume: volume.clone(),
        export,
        proposals: tx,
        connections: AtomicUsize::new(0),
        served: AtomicBool::new(false),
        log: log.new(slog::o!("component" => "session")),
    });
    let accept_shared = shared.clone();
    let max_connections = cfg.max_connections;
    // Set once the node has returned: the accept thread then ends at its next connection
    // (a process exits anyway; a driver run in-process must let go of its volume).
    let node_done = Arc::new(AtomicBool::new(false));
    let accept_done = node_done.clone();
    // Clients are let in only once everything committed is applied: a write acknowledged
    // by the previous incarnation may be committed only now (by the new leader's first
    // entry), and a read must see it. Until then they wait in the listening backlog.
    let start_serving = move || -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("rblk-accept".into())
            .spawn(move || accept(listener, accept_shared, max_connections, &accept_done))
            .map(drop)
    };
    let node_log = log.new(slog::o!("component" => "node"));
    let result = node::run(volume, store, rx, &cfg.node, stop.as_ref(), heartbeat, start_serving, &node_log);
    node_done.store(true, Ordering::SeqCst);
    // Proposals sent from now on find the channel closed and are dropped unanswered.
    if let Err(e) = &result {
        warn!(log, "driver stops on an error"; "error" => error_chain(e));
    }
    result
}

fn accept(listener: UnixListener, shared: Arc<conn::Shared>, max_connections: usize, node_done: &AtomicBool) {
    let mut next_id = 0u64;
    for stream in listener.incoming() {
        if node_done.load(Ordering::SeqCst) {
            // Nothing would answer its writes: the client reconnects to the next incarnation.
            info!(shared.log, "the node has stopped: no more connections");
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!(shared.log, "accept failed"; "error" => %e);
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        next_id += 1;
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= max_connections {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            warn!(shared.log, "too many connections: refused"; "max" => max_connections);
            continue;
        }
        info!(shared.log, "connection"; "conn" => next_id);
        let conn_shared = shared.clone();
        let id = next_id;
        let spawned =
            std::thread::Builder::new().name("rblk-conn".into()).spawn(move || conn::serve(stream, conn_shared, id));
        if let Err(e) = spawned {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            warn!(shared.log, "cannot start a connection thread"; "error" => %e);
        }
    }
}

/// An error with its sources, for logs and the exit message.
pub use raft_state::error_chain;

/// A logger to stderr at `level` (trace, debug, info, warning, error, critical); the
/// environment variable `RBLK_LOG` overrides it.
pub fn logger(level: &str) -> Logger {
    use slog::Drain;
    let level = std::env::var("RBLK_LOG").unwrap_or_else(|_| level.to_string());
    let level = level.parse::<slog::Level>().unwrap_or(slog::Level::Info);
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let drain = slog_term::FullFormat::new(decorator).build().filter_level(level).fuse();
    Logger::root(drain, slog::o!())
}

/// Blocks SIGTERM and SIGINT in this thread and every thread started after, and starts a
/// thread that sets the returned flag when one arrives (the node then stops cleanly). Call it
/// first thing in `main`, before any other thread exists.
pub fn stop_on_signals(log: &Logger) -> Result<Arc<AtomicBool>, DriverError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(|e| DriverError::Io(e.into()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let log = log.clone();
    std::thread::Builder::new().name("rblk-signals".into()).spawn(move || {
        if let Ok(signal) = set.wait() {
            info!(log, "stopping"; "signal" => signal.as_str());
            flag.store(true, Ordering::SeqCst);
        }
    })?;
    Ok(stop)
}

/// The node settings the configuration gives.
pub fn node_config(cfg: &config::Config) -> NodeConfig {
    NodeConfig {
        tick: cfg.raft.tick,
        election_tick: cfg.raft.election_ticks,
        heartbeat_tick: cfg.raft.heartbeat_ticks,
        max_batch_bytes: cfg.raft.max_batch,
    }
}

/// The driver settings the configuration gives.
pub fn driver_config(cfg: &config::Config) -> DriverConfig {
    DriverConfig {
        volume: VolumeOptions {
            checkpoint_log_bytes: cfg.checkpoint.log_bytes,
            checkpoint_interval: cfg.checkpoint.interval,
            node_cache: cfg.cache.nodes,
            bitmap_cache: cfg.cache.bitmaps,
        },
        node: node_config(cfg),
        read_only: cfg.server.read_only,
        max_connections: cfg.server.max_connections,
    }
}
