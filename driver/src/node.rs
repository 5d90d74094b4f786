//! The Raft node thread and its applier, the only place that changes the volume.
//!
//! It owns the `RawNode` (whose storage is the log on raw sectors). Sessions send proposals;
//! the node proposes everything that arrived meanwhile and persists it with ONE log append and
//! flush (group commit); the applier thread applies the committed entries (or the node thread
//! itself, when the applier is idle and nothing waits: `Links::apply_here`) and only then
//! completes each proposal. One thread applies at a time, so the volume has one writer. A
//! single-node group commits an entry as soon as it is durable, so a completed proposal is
//! durable. Any error of the log, the volume or a
//! checkpoint is fatal: the node stops and the driver exits non-zero (fail-stop; the
//! supervisor restarts it and recovery works from what is durable).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use raft::eraftpb::Entry;
use raft::{RawNode, StateRole};
use raft_state::log::{LogMark, LogStore};
use raft_state::volume::{Applied, Compaction, Volume};
use slog::{debug, error, info, Logger};

use crate::metrics;
use crate::queue::Proposals;
use crate::DriverError;

/// What became of a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed (durable) and applied with this result.
    Applied(Applied),
    /// The driver is stopping: not proposed. The client resends after reconnecting.
    Stopped,
}

/// Called once with the outcome, on the thread that applied the proposal (the applier, or the
/// node thread when it applies itself): it must not block.
pub type Completion = Box<dyn FnOnce(Outcome) + Send>;

/// An encoded command to commit, and whom to tell.
pub struct Proposal {
    pub data: Vec<u8>,
    pub done: Completion,
}

impl std::fmt::Debug for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposal").field("bytes", &self.data.len()).finish()
    }
}

/// What the node thread needs besides its channel.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub tick: Duration,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Bytes of proposals taken into one append at most.
    pub max_batch_bytes: u64,
    /// Whole-block writes of at least this many bytes are written once, to their blocks, by
    /// the connections (`raft_state::place`); 0: every write goes inline through the log.
    pub write_once_min: u64,
}

/// Batches of committed entries the node thread may hand the applier before it waits: the
/// log runs at most this far ahead of the volume (which bounds the ring space it takes).
const APPLY_QUEUE: usize = 1;

/// What the node thread hands the applier. The node thread owns the log; the applier learns
/// where it stands from the marks (`LogMark`: for each batch, the log's positions for a root
/// that applied it) and sends compactions back (`Compaction`).
enum ToApply {
    /// Committed entries in order, whom to tell about each (by position), and the log's mark
    /// for the last of them.
    Batch(Vec<Entry>, Vec<Option<Completion>>, LogMark),
    /// Answered once everything handed over before it is applied.
    Barrier(mpsc::Sender<()>),
    /// The node thread applied a batch itself and found a checkpoint due: take it.
    Checkpoint,
    /// A clean stop: checkpoint (with this mark of everything handed over) and return.
    Stop(LogMark),
}

/// The node: runs until `stop` is set (or every sender is gone) — then it completes what it
/// took, checkpoints so the next start replays nothing, and returns `Ok` — or a fatal error.
///
/// Two threads share the work, so the log's write and flush for one batch overlap applying
/// the one before: this (node) thread proposes, appends and learns what is committed; the
/// applier applies committed entries to the volume, completes their proposals and takes
/// checkpoints.
///
/// `start_serving` is called once everything committed at the start (a previous incarnation's
/// entries included) is applied, so that no client reads the volume before then.
///
/// `alive` counts the rounds of the node loop and the applier's batches: the heartbeat
/// beats while it moves, so a stuck node or applier stops the beats, while a busy one never
/// delays them. When `run` returns, `proposals` is closed: whatever is still queued, and
/// whatever is proposed later, is dropped unanswered (after an error, so is everything the
/// node took: a driver that fails never answers a request it did not complete).
#[allow(clippy::too_many_arguments)]
pub fn run(
    volume: Arc<RwLock<Volume>>,
    store: LogStore,
    proposals: &Proposals,
    cfg: &NodeConfig,
    stop: &AtomicBool,
    alive: &Arc<AtomicU64>,
    start_serving: impl FnOnce() -> std::io::Result<()>,
    log: &Logger,
) -> Result<(), DriverError> {
    let (to_apply, applies) = mpsc::sync_channel::<ToApply>(APPLY_QUEUE);
    let (compact, compactions) = mpsc::channel::<Compaction>();
    let applied_batches = Arc::new(AtomicU64::new(0));
    let applier = {
        let (volume, log, alive, applied) = (volume.clone(), log.clone(), alive.clone(), applied_batches.clone());
        std::thread::Builder::new()
            .name("rblk-apply".into())
            .spawn(move || apply_loop(&volume, &applies, &applied, &compact, &alive, &log))?
    };
    let dev = read_volume(&volume).device();
    let result = std::thread::scope(|scope| {
        // Flushes for placed writes, beside the node (see `queue.rs`); returns at `close`.
        let flusher = std::thread::Builder::new()
            .name("rblk-flush".into())
            .spawn_scoped(scope, || proposals.flush_placed(&*dev))?;
        let mut links = Links {
            to_apply: &to_apply,
            compactions: &compactions,
            handed: 0,
            sent_batches: 0,
            applied_batches: &applied_batches,
            volume: &volume,
            proposals,
            log,
        };
        let result = node_loop(store, cfg, stop, alive, &mut links, start_serving, log);
        proposals.close();
        let flushed = flusher.join().map_err(|_| DriverError::Panicked("flusher"));
        // A node error comes first: it may be the flusher's own, reported through the queue.
        result.and_then(|mark| flushed.map(|()| mark))
    });
    proposals.close();
    if let Ok(mark) = &result {
        let mark = *mark;
        // The applier may have failed meanwhile; then its error is the one to report.
        let _ = to_apply.send(ToApply::Stop(mark));
    }
    drop(to_apply);
    let applied = applier.join().unwrap_or_else(|_| Err(DriverError::Panicked("applier")));
    // A node error comes first: the applier only saw its channel close.
    result.map(|_| ()).and(applied)
}

/// The node thread's ends of its channels with the applier, and what it needs to apply a
/// batch itself.
struct Links<'a> {
    to_apply: &'a SyncSender<ToApply>,
    compactions: &'a Receiver<Compaction>,
    /// The last index handed over (to the applier, or applied on the node thread).
    handed: u64,
    /// Batches sent to the applier, and (counted by the applier) applied by it: when they are
    /// equal, the applier has nothing left to apply.
    sent_batches: u64,
    applied_batches: &'a AtomicU64,
    volume: &'a RwLock<Volume>,
    proposals: &'a Proposals,
    log: &'a Logger,
}

impl Links<'_> {
    /// Whether the node thread should apply the next batch itself: the applier has applied
    /// everything sent to it (so the order holds) and no proposal waits for a log append (so
    /// the pipeline has nothing to overlap). Under load the applier applies, beside the node's
    /// next append; at low load a hand-over would only put a wake-up of another thread (tens
    /// of µs on a VM) into every write's latency.
    fn apply_here(&self) -> bool {
        self.applied_batches.load(Ordering::Acquire) == self.sent_batches && self.proposals.nothing_waiting()
    }

    /// Carries out the compactions the applier asked for since the last call.
    fn compact(&self, store: &mut LogStore) -> Result<(), DriverError> {
        while let Ok(c) = self.compactions.try_recv() {
            store.compact(c.index, c.keep_from).map_err(DriverError::Log)?;
        }
        Ok(())
    }
}

/// Returns, after a clean stop, the log's mark of everything handed to the applier.
#[allow(clippy::too_many_arguments)]
fn node_loop(
    store: LogStore,
    cfg: &NodeConfig,
    stop: &AtomicBool,
    alive: &AtomicU64,
    links: &mut Links<'_>,
    start_serving: impl FnOnce() -> std::io::Result<()>,
    log: &Logger,
) -> Result<LogMark, DriverError> {
    let (volume, proposals) = (links.volume, links.proposals);
    let applied = read_volume(volume).applied_index();
    links.handed = applied;
    let raft_cfg = raft::Config {
        id: 1,
        election_tick: cfg.election_tick,
        heartbeat_tick: cfg.heartbeat_tick,
        applied,
        max_size_per_msg: 4 << 20,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    raft_cfg.validate().map_err(|source| DriverError::Raft { what: "configuration", source })?;
    let raft_log = crate::raft_logger(&log.new(slog::o!("raft" => 1)));
    let mut node =
        RawNode::new(&raft_cfg, store, &raft_log).map_err(|source| DriverError::Raft { what: "start", source })?;
    // A single node elects itself at once; its first entry (the leader's no-op) commits
    // every entry a previous incarnation persisted but did not see committed.
    node.campaign().map_err(|source| DriverError::Raft { what: "campaign", source })?;
    let mut waiting: HashMap<u64, Completion> = HashMap::new();
    drive(&mut node, &mut waiting, links)?;
    if node.raft.state != StateRole::Leader {
        return Err(DriverError::Unexpected("it did not become leader".into()));
    }
    // What the election committed must be applied before anyone reads.
    let (applied_tx, applied_rx) = mpsc::channel();
    let stopped = || DriverError::Stopped("applier");
    links.to_apply.send(ToApply::Barrier(applied_tx)).map_err(|_| stopped())?;
    applied_rx.recv().map_err(|_| stopped())?;
    start_serving()?;
    info!(log, "serving"; "term" => node.raft.term, "applied" => read_volume(volume).applied_index());
    let mut next_tick = Instant::now() + cfg.tick;
    while !stop.load(Ordering::SeqCst) {
        alive.fetch_add(1, Ordering::Relaxed);
        // Group commit: everything that is already waiting goes into the same append, taken
        // from the connections in turn.
        let batch = proposals.take_batch(next_tick, cfg.max_batch_bytes);
        if let Some(e) = proposals.take_failure() {
            return Err(DriverError::Volume(e));
        }
        for p in batch {
            propose(&mut node, p, &mut waiting)?;
        }
        if Instant::now() >= next_tick {
            node.tick();
            next_tick = Instant::now() + cfg.tick;
        }
        drive(&mut node, &mut waiting, links)?;
    }
    // Clean stop: what was not proposed is dropped unanswered when `run` closes the queue
    // (clients resend after reconnecting); everything proposed was committed and handed to
    // the applier.
    for (_, done) in waiting.drain() {
        done(Outcome::Stopped);
    }
    Ok(node.store().mark(links.handed))
}

fn propose(
    node: &mut RawNode<LogStore>,
    p: Proposal,
    waiting: &mut HashMap<u64, Completion>,
) -> Result<(), DriverError> {
    let before = node.raft.raft_log.last_index();
    match node.propose(vec![], p.data) {
        Ok(()) => {
            let index = node.raft.raft_log.last_index();
            if index != before + 1 {
                return Err(DriverError::Unexpected(format!("a proposal landed at {index}, expected {}", before + 1)));
            }
            waiting.insert(index, p.done);
            Ok(())
        }
        // Only a leader accepts proposals, and a single node is always the leader once
        // elected: anything else is a bug, and fail-stop is the safe answer.
        Err(source) => Err(DriverError::Raft { what: "proposal", source }),
    }
}

/// The ready loop: persist (one append per ready), advance, hand committed entries over.
fn drive(
    node: &mut RawNode<LogStore>,
    waiting: &mut HashMap<u64, Completion>,
    links: &mut Links<'_>,
) -> Result<(), DriverError> {
    links.compact(node.mut_store())?;
    while node.has_ready() {
        let mut rd = node.ready();
        if !rd.messages().is_empty() || !rd.persisted_messages().is_empty() || !rd.snapshot().is_empty() {
            return Err(DriverError::Unexpected("messages or a snapshot to handle".into()));
        }
        hand_over(rd.take_committed_entries(), waiting, links, node.store())?;
        // Placed writes among them were flushed before the node could take them (`queue.rs`).
        let entries = rd.take_entries();
        let hs = rd.hs().cloned();
        if !entries.is_empty() {
            let m = metrics::page();
            m.batch_entries.observe(entries.len() as u64);
            m.batch_bytes.fetch_add(entries.iter().map(|e| e.data.len() as u64).sum(), Ordering::Relaxed);
        }
        if !entries.is_empty() || hs.is_some() {
            node.mut_store().append_owned(entries, hs.as_ref()).map_err(DriverError::Log)?;
            let (used, ring) = node.store().usage();
            let m = metrics::page();
            m.log_used_bytes.store(used * config::BLOCK, Ordering::Relaxed);
            m.log_size_bytes.store(ring * config::BLOCK, Ordering::Relaxed);
        }
        let mut light = node.advance(rd);
        if let Some(commit) = light.commit_index() {
            node.mut_store().set_commit(commit);
        }
        hand_over(light.take_committed_entries(), waiting, links, node.store())?;
        // Raft's own applied index may run ahead of the volume's: the volume keeps its own,
        // and a restart starts raft from the volume's.
        node.advance_apply();
    }
    Ok(())
}

/// Hands committed entries over with the log's mark for the last of them: to the applier
/// (waiting while it is `APPLY_QUEUE` batches behind), or applies them on this thread when
/// that is faster (`Links::apply_here`; a checkpoint it finds due is still the applier's).
fn hand_over(
    entries: Vec<Entry>,
    waiting: &mut HashMap<u64, Completion>,
    links: &mut Links<'_>,
    store: &LogStore,
) -> Result<(), DriverError> {
    let Some(last) = entries.last().map(|e| e.index) else { return Ok(()) };
    let done = entries.iter().map(|e| waiting.remove(&e.index)).collect();
    links.handed = last;
    let mark = store.mark(last);
    let stopped = || DriverError::Stopped("applier");
    if links.apply_here() {
        if apply(links.volume, &entries, done, mark, links.log)? {
            links.to_apply.send(ToApply::Checkpoint).map_err(|_| stopped())?;
        }
        return Ok(());
    }
    links.sent_batches += 1;
    links.to_apply.send(ToApply::Batch(entries, done, mark)).map_err(|_| stopped())
}

/// How often an idle applier looks whether its checkpoint finished (or failed).
const CHECKPOINT_POLL: Duration = Duration::from_millis(50);

/// The applier: applies what the node thread hands over, completes proposals, checkpoints.
///
/// A checkpoint is taken in two halves: sealing it (its trees written, its root prepared)
/// holds the volume for a moment; making it durable (the device flush and the root write,
/// the slow part) runs on a checkpoint thread while this one goes on applying and readers go
/// on reading; the checkpoint thread then installs the root. One checkpoint at a time: when
/// the next is due before the last is durable, the applier waits for it (which also bounds
/// the log the ring must hold). An error of either half is fatal, like every volume error.
fn apply_loop(
    volume: &RwLock<Volume>,
    applies: &Receiver<ToApply>,
    applied: &AtomicU64,
    compact: &mpsc::Sender<Compaction>,
    alive: &AtomicU64,
    log: &Logger,
) -> Result<(), DriverError> {
    let stopped = std::thread::scope(|scope| {
        let mut checkpoint = None;
        let ended = apply_rounds(scope, &mut checkpoint, volume, applies, applied, compact, alive, log);
        // The pending checkpoint ends either way; its error counts unless one came first.
        let pending = join_checkpoint(&mut checkpoint);
        ended.and_then(|clean| pending.map(|()| clean))
    })?;
    let Some(mark) = stopped else { return Ok(()) };
    let mut guard = write_volume(volume);
    let started = Instant::now();
    if guard.stats().applied_index > guard.stats().root_applied_index {
        // The last checkpoint: no compaction after it (the log is closing; it is in memory).
        let mut sealed = guard.seal_checkpoint(&mark).map_err(DriverError::Volume)?;
        let durable = sealed.make_durable();
        guard.finish_checkpoint(&mut sealed, durable).map_err(DriverError::Volume)?;
        metrics::page().checkpoint_ms.observe(started.elapsed().as_millis() as u64);
        metrics::volume_gauges(&guard.stats());
    }
    info!(log, "stopped cleanly"; "applied" => guard.applied_index(), "checkpoint_ms" => started.elapsed().as_millis() as u64);
    Ok(())
}

type CheckpointThread<'scope> = Option<std::thread::ScopedJoinHandle<'scope, Result<(), DriverError>>>;

/// The applier's rounds until the node thread says stop (`Ok(Some(mark))`) or goes away after
/// a failure of its own (`Ok(None)`: it reports why; no checkpoint then). `applied` counts the
/// batches it applied (`Links::apply_here`).
#[allow(clippy::too_many_arguments)]
fn apply_rounds<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    checkpoint: &mut CheckpointThread<'scope>,
    volume: &'env RwLock<Volume>,
    applies: &Receiver<ToApply>,
    applied: &AtomicU64,
    compact: &'env mpsc::Sender<Compaction>,
    alive: &AtomicU64,
    log: &'env Logger,
) -> Result<Option<LogMark>, DriverError> {
    loop {
        if checkpoint.as_ref().is_some_and(|c| c.is_finished()) {
            join_checkpoint(checkpoint)?;
        }
        match applies.recv_timeout(CHECKPOINT_POLL) {
            Ok(ToApply::Batch(entries, done, mark)) => {
                let due = apply(volume, &entries, done, mark, log)?;
                applied.fetch_add(1, Ordering::Release);
                alive.fetch_add(1, Ordering::Relaxed);
                if due {
                    // One at a time: the previous one first.
                    join_checkpoint(checkpoint)?;
                    *checkpoint = Some(start_checkpoint(scope, volume, compact, log)?);
                }
            }
            // Only while still due: a checkpoint sealed since the word was sent took it (and
            // the applier then need not wait for that one to finish).
            Ok(ToApply::Checkpoint) => {
                if read_volume(volume).checkpoint_due() {
                    join_checkpoint(checkpoint)?;
                    *checkpoint = Some(start_checkpoint(scope, volume, compact, log)?);
                }
            }
            // Idle: a checkpoint may be due all the same (its interval passed, or writers wait
            // for space that only checkpoints release).
            Err(mpsc::RecvTimeoutError::Timeout) if checkpoint.is_none() && read_volume(volume).checkpoint_due() => {
                *checkpoint = Some(start_checkpoint(scope, volume, compact, log)?);
            }
            Ok(ToApply::Barrier(done)) => {
                let _ = done.send(());
            }
            Ok(ToApply::Stop(mark)) => return Ok(Some(mark)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(None),
        }
    }
}

/// Seals a checkpoint of what is applied (holding the volume for a moment) and starts the
/// thread that makes it durable and installs it.
fn start_checkpoint<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    volume: &'env RwLock<Volume>,
    compact: &'env mpsc::Sender<Compaction>,
    log: &'env Logger,
) -> Result<std::thread::ScopedJoinHandle<'scope, Result<(), DriverError>>, DriverError> {
    let started = Instant::now();
    let mut sealed = {
        let mut guard = write_volume(volume);
        // The mark of the last apply, noted under the same lock as the apply.
        let Some(mark) = guard.log_mark() else {
            return Err(DriverError::Unexpected("a checkpoint before anything was applied".into()));
        };
        guard.seal_checkpoint(&mark).map_err(DriverError::Volume)?
    };
    let sealed_ms = started.elapsed().as_millis() as u64;
    let thread = std::thread::Builder::new().name("rblk-ckpt".into()).spawn_scoped(scope, move || {
        let durable = sealed.make_durable();
        let applied = sealed.applied_index();
        let compaction = write_volume(volume).finish_checkpoint(&mut sealed, durable).map_err(DriverError::Volume)?;
        // The frozen map's nodes are freed here, without the volume.
        drop(sealed);
        if let Some(c) = compaction {
            // The node thread compacts its log at its next round (or is gone: then no matter).
            let _ = compact.send(c);
        }
        let ms = started.elapsed().as_millis() as u64;
        metrics::page().checkpoint_ms.observe(ms);
        debug!(log, "checkpoint"; "applied" => applied, "sealed_ms" => sealed_ms, "ms" => ms);
        Ok(())
    })?;
    Ok(thread)
}

/// Waits for the checkpoint thread, if one runs, and returns its result.
fn join_checkpoint(checkpoint: &mut CheckpointThread<'_>) -> Result<(), DriverError> {
    match checkpoint.take() {
        None => Ok(()),
        Some(handle) => handle.join().unwrap_or_else(|_| Err(DriverError::Panicked("checkpoint"))),
    }
}

/// Applies a batch of committed entries (`mark`: the log's mark for the last), completes their
/// proposals and writes their new blocks. Returns whether a checkpoint is due.
fn apply(
    volume: &RwLock<Volume>,
    entries: &[Entry],
    done: Vec<Option<Completion>>,
    mark: LogMark,
    log: &Logger,
) -> Result<bool, DriverError> {
    let failed = |err| {
        error!(log, "apply failed"; "first" => entries[0].index, "entries" => entries.len(), "error" => %err);
        DriverError::Volume(err)
    };
    let mut guard = write_volume(volume);
    let results = guard.apply_staged(entries).map_err(failed)?;
    guard.note_log_mark(mark);
    // Committed means durable: the clients hear now, while the new data blocks of all the
    // entries go out together. Nothing reads the volume before they are written (the lock
    // is held), and if writing them fails, the driver stops and replay writes them again.
    crate::conn::batch_replies(|| {
        for (done, applied) in done.into_iter().zip(results) {
            if let Some(done) = done {
                done(Outcome::Applied(applied));
            }
        }
    });
    guard.write_staged().map_err(failed)?;
    metrics::volume_gauges(&guard.stats());
    Ok(guard.checkpoint_due())
}

/// The volume for reading. A poisoned lock means a thread panicked while applying: the
/// volume's in-memory state is suspect, so the whole driver must stop.
pub fn read_volume(volume: &RwLock<Volume>) -> std::sync::RwLockReadGuard<'_, Volume> {
    volume.read().unwrap_or_else(|_| fatal_poisoned_lock())
}

pub fn write_volume(volume: &RwLock<Volume>) -> std::sync::RwLockWriteGuard<'_, Volume> {
    volume.write().unwrap_or_else(|_| fatal_poisoned_lock())
}

fn fatal_poisoned_lock() -> ! {
    eprintln!("rblk-driver: a thread panicked while holding the volume; stopping (restart recovers)");
    std::process::exit(70)
}
