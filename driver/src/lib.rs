//! The `rblk-driver` process: the restartable block driver.
//!
//! It opens the volume (three roots → current root → copy-on-write tree; Raft log → replay of
//! committed entries), runs a single-node Raft group on the log store, and serves NBD block
//! sessions on the listening sockets it is given (a unix socket, and a TCP one if configured):
//!
//! ```text
//!  accept thread ──► connection threads (handshake, decode, reads; one reply writer each)
//!    (waits for a slot)    │ each request first takes its bytes from the budgets
//!                          │ write (≤ 1 MiB per entry) / trim / write-zeroes (one entry each)
//!                          ▼ as proposals, one queue per connection
//!                    node thread (RawNode): take round-robin → ONE log append + flush
//!                          → applier thread: apply to the volume → complete → reply
//!  heartbeat thread: beats while the node or the applier make progress
//! ```
//!
//! Promises: a write is acknowledged only after its entry is durable in the log and applied;
//! reads see every acknowledged write; FLUSH returns at once because nothing acknowledged is
//! still volatile (which is also why CAN_MULTI_CONN is true). Any I/O error on the log, the
//! volume or a checkpoint stops the driver with an error (fail-stop); a stop request lets the
//! node finish what it took, checkpoint, and return `Ok`, so the next start replays nothing.

pub mod budget;
pub mod cli;
pub mod conn;
mod error;
mod heartbeat;
mod logging;
pub mod metrics;
pub mod node;
pub mod queue;
pub mod sandbox;
pub mod tls;
pub mod vhost;

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use nix::sys::time::TimeSpec;
use raft_state::device::Device;
use raft_state::volume::{Volume, VolumeOptions};
use slog::{info, warn, Logger};

pub use error::{error_chain, DriverError};
pub use heartbeat::Heartbeat;
pub use logging::{logger, raft_logger};
pub use node::NodeConfig;

/// The listening sockets the driver serves, both held by the supervisor.
#[derive(Debug)]
pub struct Listeners {
    pub unix: Option<UnixListener>,
    pub tcp: Option<TcpListener>,
    /// vhost-user-blk front-ends (virtual machines) connect here (`[server] vhost_user_socket`).
    pub vhost: Option<UnixListener>,
}

impl Listeners {
    /// Which sockets have a client waiting, within `timeout` (None: until one has). ppoll,
    /// not poll: aarch64 has no poll system call, and the sandbox allows only ppoll.
    fn poll(&self, timeout: Option<TimeSpec>) -> [bool; 2] {
        use nix::poll::{ppoll, PollFd, PollFlags};
        let unix = self.unix.as_ref().map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN));
        let tcp = self.tcp.as_ref().map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN));
        let mut fds: Vec<PollFd<'_>> = unix.into_iter().chain(tcp).collect();
        if !matches!(ppoll(&mut fds, timeout, None), Ok(n) if n > 0) {
            return [false, false];
        }
        let ready = |i: usize| fds.get(i).and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
        match (&self.unix, &self.tcp) {
            (Some(_), _) => [ready(0), ready(1)],
            (None, _) => [false, ready(0)],
        }
    }

    /// Whether a client waits in a backlog.
    fn client_waiting(&self) -> bool {
        self.poll(Some(TimeSpec::new(0, 0))).contains(&true)
    }

    /// The next client, from whichever socket has one. A TCP connection gets TCP_NODELAY
    /// (replies are whole messages: Nagle would only delay them) and is then served through
    /// the same type as a unix one: the connection code uses only calls that every stream
    /// socket answers alike (read, write, shutdown, SO_RCVTIMEO, dup).
    fn accept(&self) -> std::io::Result<UnixStream> {
        loop {
            let [unix, tcp] = self.poll(None);
            if let (true, Some(listener)) = (unix, &self.unix) {
                return Ok(listener.accept()?.0);
            }
            if let (true, Some(listener)) = (tcp, &self.tcp) {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                return Ok(UnixStream::from(std::os::fd::OwnedFd::from(stream)));
            }
        }
    }
}

/// Everything the driver is told.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub volume: VolumeOptions,
    pub node: NodeConfig,
    pub read_only: bool,
    /// The name the volume is exported under (`[server] export_name`); "" reaches it too.
    pub export_name: String,
    pub limits: Limits,
    /// STARTTLS for clients (`[tls]`; the credentials come from the supervisor).
    pub tls: Option<tls::TlsServer>,
}

/// What bounds the clients: connections, bytes in flight, and how long the driver waits for
/// a client (see `conn.rs` and `budget.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the listening backlog.
    pub max_connections: usize,
    /// Bytes of requests in flight (write payloads, read replies) per connection.
    pub inflight_per_connection: u64,
    /// Bytes of requests in flight across all connections.
    pub inflight_total: u64,
    /// The handshake must end within this.
    pub handshake_timeout: Duration,
    /// A request half sent, or replies unread, for this long drop the connection (0: never).
    pub stall_timeout: Duration,
    /// A connection silent between requests for this long is closed while other clients
    /// wait for a slot (0: never).
    pub idle_timeout: Duration,
}

/// NBD block sizes rblk advertises: 512-byte sectors work (read-modify-write below 4 KiB),
/// 4 KiB is the block the tree maps, 32 MiB the largest request.
pub const MIN_BLOCK: u32 = 512;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 32 << 20;

/// Opens the volume and serves `listener` until `stop` is set (then returns `Ok` after a
/// final checkpoint) or a fatal error. With a heartbeat, reports recovery and beats.
///
/// Threads it leaves when it returns (which a process exiting ends anyway): the accept thread
/// ends at the next connection, closing the listener; each connection's threads end when
/// its client goes (writes are no longer answered). Once they have, nothing holds `dev`.
pub fn run(
    dev: Arc<dyn Device>,
    root_dev: Option<Arc<dyn Device>>,
    listeners: Listeners,
    cfg: DriverConfig,
    stop: Arc<AtomicBool>,
    heartbeat: Option<Heartbeat>,
    log: Logger,
) -> Result<(), DriverError> {
    let started = std::time::Instant::now();
    let (volume, store) =
        Volume::open_with(dev, root_dev, cfg.volume.clone(), log.new(slog::o!("component" => "volume")))
            .map_err(DriverError::Volume)?;
    let stats = volume.stats();
    let replayed = stats.applied_index - stats.root_applied_index;
    metrics::volume_gauges(&stats);
    let export = session::Export {
        size: volume.size(),
        read_only: cfg.read_only,
        min_block: MIN_BLOCK,
        preferred_block: PREFERRED_BLOCK,
        max_block: MAX_BLOCK,
        multi_conn: true,
        description: Some("rblk volume".into()),
        name: Some(cfg.export_name.clone()),
    };
    let placer = raft_state::place::Placer::new(volume.device(), cfg.node.write_once_min);
    let volume = Arc::new(RwLock::new(volume));
    let proposals = Arc::new(queue::Proposals::new());
    let shared = Arc::new(conn::Shared {
        volume: volume.clone(),
        export,
        proposals: proposals.clone(),
        budget: budget::Budget::new(cfg.limits.inflight_total),
        limits: cfg.limits.clone(),
        connections: AtomicUsize::new(0),
        slot_freed: (Mutex::new(()), Condvar::new()),
        crowded: AtomicBool::new(false),
        served: AtomicBool::new(false),
        placer,
        buffers: conn::BufferPool::default(),
        tls: cfg.tls.clone(),
        log: log.new(slog::o!("component" => "session")),
    });
    let accept_shared = shared.clone();
    let alive = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (beat_alive, beat_done, accept_done) = (alive.clone(), done.clone(), done.clone());
    // Clients are let in only once everything committed is applied: a write acknowledged
    // by the previous incarnation may be committed only now (by the new leader's first
    // entry), and a read must see it. Until then they wait in the listening backlog. Only
    // then is the driver ready.
    let vhost_done = done.clone();
    let start_serving = move || -> std::io::Result<()> {
        let Listeners { unix, tcp, vhost } = listeners;
        if let Some(listener) = vhost {
            let shared = accept_shared.clone();
            std::thread::Builder::new()
                .name("rblk-vhost".into())
                .spawn(move || vhost::serve(listener, shared, &vhost_done))?;
        }
        let listeners = Listeners { unix, tcp, vhost: None };
        std::thread::Builder::new()
            .name("rblk-accept".into())
            .spawn(move || accept(listeners, accept_shared, &accept_done))?;
        if let Some(h) = heartbeat {
            h.start(started.elapsed().as_millis() as u64, replayed, beat_alive, beat_done)?;
        }
        Ok(())
    };
    let node_log = log.new(slog::o!("component" => "node"));
    let result = node::run(volume, store, &proposals, &cfg.node, stop.as_ref(), &alive, start_serving, &node_log);
    // The accept thread ends at its next connection, the heartbeat at its next beat (a
    // process exits anyway; a driver run in-process must let go of its volume).
    done.store(true, Ordering::SeqCst);
    // Proposals made from now on are dropped unanswered (the queue is closed).
    if let Err(e) = &result {
        warn!(log, "driver stops on an error"; "error" => error_chain(e));
    }
    result
}

/// Accepts clients while there is a free slot; at `max_connections` it stops accepting, so
/// further clients wait in the listening backlog (as with qemu-nbd) instead of being closed,
/// and marks the driver crowded while one waits (idle connections then give up their slot).
fn accept(listeners: Listeners, shared: Arc<conn::Shared>, node_done: &AtomicBool) {
    let max_connections = shared.limits.max_connections;
    let mut next_id = 0u64;
    loop {
        let (lock, freed) = &shared.slot_freed;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut logged = false;
        while shared.connections.load(Ordering::SeqCst) >= max_connections {
            let waiting = listeners.client_waiting();
            shared.crowded.store(waiting, Ordering::Relaxed);
            if waiting && !logged {
                logged = true;
                warn!(shared.log, "all connection slots taken: new clients wait"; "max" => max_connections);
            }
            guard = freed.wait_timeout(guard, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(guard);
        shared.crowded.store(false, Ordering::Relaxed);
        let accepted = listeners.accept();
        if node_done.load(Ordering::SeqCst) {
            // Nothing would answer its writes: the client reconnects to the next incarnation.
            info!(shared.log, "the node has stopped: no more connections");
            return;
        }
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                warn!(shared.log, "accept failed"; "error" => %e);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        next_id += 1;
        shared.connections.fetch_add(1, Ordering::SeqCst);
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
        write_once_min: cfg.raft.write_once_min,
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
        export_name: cfg.server.export_name.clone(),
        limits: Limits {
            max_connections: cfg.server.max_connections,
            inflight_per_connection: cfg.server.max_inflight_per_connection,
            inflight_total: cfg.server.max_inflight,
            handshake_timeout: cfg.server.handshake_timeout,
            stall_timeout: cfg.server.stall_timeout,
            idle_timeout: cfg.server.idle_timeout,
        },
        tls: None,
    }
}

#[cfg(test)]
mod tests {
    /// The driver serves the volume under the name the configuration it receives gives
    /// (the supervisor passes its whole configuration, `[server] export_name` included).
    #[test]
    fn the_export_name_comes_from_the_configuration() {
        let text = "[server]\nexport_name = \"disk-7\"\n";
        let cfg = config::Config::from_toml_str(text).expect("config");
        assert_eq!(super::driver_config(&cfg).export_name, "disk-7");
        let passed = config::Config::from_toml_str(&cfg.to_toml_string()).expect("round trip");
        assert_eq!(super::driver_config(&passed).export_name, "disk-7");
        assert_eq!(super::driver_config(&config::Config::default()).export_name, "rblk");
    }
}
