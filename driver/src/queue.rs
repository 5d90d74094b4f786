//! The proposals waiting for the Raft node, one queue per connection, taken round-robin.
//!
//! A single FIFO would let one client's backlog delay every other client's writes by the
//! whole backlog. Here the node takes one proposal from each connection that has any, in
//! turn, until its batch is full: a light client's write waits behind at most one batch,
//! whatever a flooding client has queued (deficit round-robin with a quantum of one request;
//! requests are bounded by the connection budgets, see `budget.rs`).
//!
//! A placed write (`raft_state::place`) names blocks its connection wrote but did not flush,
//! and a durable record must never name a block that is not durable first. Its proposal
//! therefore waits apart, in the flusher's group, until a device flush that began after it
//! was queued has returned (`Proposals::flush_placed`, on its own thread); only then does it
//! join its connection's queue. The node thread never flushes for placed writes, so a light
//! client's inline write is logged while the flusher waits for a flood's bytes to reach the
//! device (with the flush in the node thread, its p99 beside three 1 MiB floods was 300 ms).

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use raft_state::device::Device;
use raft_state::place::needs_flush;
use raft_state::volume::VolumeError;

use crate::node::{Outcome, Proposal};

/// How long the flusher waits for the placed writes still being written before it flushes,
/// so that one flush covers them too.
const PLACED_WAIT: Duration = Duration::from_millis(4);

/// See the module docs.
#[derive(Debug, Default)]
pub struct Proposals {
    state: Mutex<State>,
    arrived: Condvar,
    /// Signalled when a placed proposal waits for a flush (or a placement ends).
    unflushed_arrived: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Waiting proposals by connection; a connection is in `order` iff its queue is non-empty.
    queues: HashMap<u64, VecDeque<Proposal>>,
    order: VecDeque<u64>,
    /// The node has stopped: nothing more is taken.
    closed: bool,
    /// A connection met an error that must stop the driver (fail-stop), for the node to
    /// return.
    failure: Option<raft_state::volume::VolumeError>,
    /// Placed writes whose bytes are being written (proposed when written).
    placing: usize,
    /// Placed proposals, by connection, waiting for a device flush before the node may take
    /// them.
    unflushed: Vec<(u64, Proposal)>,
    /// The node sleeps in `take_batch` (set and read under the lock): only then does a new
    /// proposal wake it, a system call that is wasted while the node is busy.
    node_waits: bool,
}

impl Proposals {
    pub fn new() -> Proposals {
        Proposals::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves whole proposals in whole queues.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a proposal of connection `conn` (a placed write after the next flush, see the
    /// module docs). After `close` it is completed at once with `Outcome::Stopped` (no reply:
    /// the client resends after reconnecting).
    pub fn push(&self, conn: u64, p: Proposal) {
        let mut s = self.lock();
        if s.closed {
            drop(s);
            (p.done)(Outcome::Stopped);
            return;
        }
        if needs_flush(&p.data) {
            s.unflushed.push((conn, p));
            drop(s);
            self.unflushed_arrived.notify_one();
            return;
        }
        s.enqueue(conn, p);
        let wake = s.node_waits;
        drop(s);
        if wake {
            self.arrived.notify_one();
        }
    }

    /// The flusher: until `close`, flushes `dev` whenever placed proposals wait for it and
    /// then queues them for the node. A failed flush stops the driver (`fail`; the device is
    /// poisoned, nothing is retried) and their writes are never answered.
    pub fn flush_placed(&self, dev: &dyn Device) {
        loop {
            let mut s = self.lock();
            while s.unflushed.is_empty() && !s.closed {
                s = self.unflushed_arrived.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            // Writes still being placed are waited for, briefly, so that this flush covers them.
            let deadline = Instant::now() + PLACED_WAIT;
            while s.placing > 0 && !s.closed {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                s = self.unflushed_arrived.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
            }
            if s.closed {
                return;
            }
            // Every proposal taken here was queued after its bytes were written: the flush
            // that starts below covers them.
            let group = std::mem::take(&mut s.unflushed);
            drop(s);
            let flushed = dev.flush();
            raft_state::failpoint("place::after_data");
            if let Err(source) = flushed {
                self.fail(VolumeError::Device { block: 0, source });
                for (_, p) in group {
                    (p.done)(Outcome::Stopped);
                }
                return;
            }
            let mut s = self.lock();
            if s.closed {
                drop(s);
                for (_, p) in group {
                    (p.done)(Outcome::Stopped);
                }
                return;
            }
            for (conn, p) in group {
                s.enqueue(conn, p);
            }
            drop(s);
            self.arrived.notify_one();
        }
    }

    /// Stops the driver with `error` (the first one reported wins): the node returns it at its
    /// next round. For errors met outside the node that fail-stop requires, such as a
    /// connection's write of placed data.
    pub fn fail(&self, error: raft_state::volume::VolumeError) {
        let mut s = self.lock();
        s.failure.get_or_insert(error);
        drop(s);
        self.arrived.notify_one();
    }

    /// The error a connection reported with `fail`, if any.
    pub fn take_failure(&self) -> Option<raft_state::volume::VolumeError> {
        self.lock().failure.take()
    }

    /// A connection starts writing the bytes of a placed write; `placed` follows when it
    /// proposed it (or gave up).
    pub fn placing(&self) {
        self.lock().placing += 1;
    }

    pub fn placed(&self) {
        let mut s = self.lock();
        s.placing = s.placing.saturating_sub(1);
        drop(s);
        self.unflushed_arrived.notify_one();
    }

    /// Waits until something is queued or `until` passes, then takes proposals round-robin
    /// across connections until they hold `max_bytes` (at least one is taken when any waits).
    pub fn take_batch(&self, until: Instant, max_bytes: u64) -> Vec<Proposal> {
        let mut s = self.lock();
        while s.order.is_empty() && !s.closed && s.failure.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Vec::new();
            }
            s.node_waits = true;
            s = self.arrived.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
            s.node_waits = false;
        }
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        while bytes < max_bytes {
            let Some(conn) = s.order.pop_front() else { break };
            let Some(queue) = s.queues.get_mut(&conn) else { continue };
            let Some(p) = queue.pop_front() else { continue };
            bytes += p.data.len() as u64;
            batch.push(p);
            if queue.is_empty() {
                s.queues.remove(&conn);
            } else {
                s.order.push_back(conn);
            }
        }
        batch
    }

    /// Whether no proposal waits for the node (placed ones still waiting for their flush
    /// aside).
    pub fn nothing_waiting(&self) -> bool {
        self.lock().order.is_empty()
    }

    /// No more proposals are taken; everything waiting is completed with `Outcome::Stopped`,
    /// and the flusher returns.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.order.clear();
        let queues = std::mem::take(&mut s.queues);
        let unflushed = std::mem::take(&mut s.unflushed);
        drop(s);
        for p in queues.into_values().flatten().chain(unflushed.into_iter().map(|(_, p)| p)) {
            (p.done)(Outcome::Stopped);
        }
        self.arrived.notify_all();
        self.unflushed_arrived.notify_all();
    }
}

impl State {
    fn enqueue(&mut self, conn: u64, p: Proposal) {
        let queue = self.queues.entry(conn).or_default();
        queue.push_back(p);
        if queue.len() == 1 {
            self.order.push_back(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn proposal(tag: u8, bytes: usize, stopped: Option<Arc<AtomicUsize>>) -> Proposal {
        Proposal {
            data: vec![tag; bytes],
            done: Box::new(move |o| {
                if let (Outcome::Stopped, Some(n)) = (o, stopped) {
                    n.fetch_add(1, Ordering::SeqCst);
                }
            }),
        }
    }

    /// A connection with a long backlog gets one turn per round: the other's proposal is in
    /// the first batch, second in line.
    #[test]
    fn connections_take_turns() {
        let q = Proposals::new();
        for _ in 0..100 {
            q.push(1, proposal(1, 1000, None));
        }
        q.push(2, proposal(2, 1000, None));
        let batch = q.take_batch(Instant::now(), 3000);
        let tags: Vec<u8> = batch.iter().map(|p| p.data[0]).collect();
        assert_eq!(tags, [1, 2, 1]);
        let rest = q.take_batch(Instant::now(), u64::MAX);
        assert_eq!(rest.len(), 98);
        assert!(rest.iter().all(|p| p.data[0] == 1));
        assert!(q.take_batch(Instant::now(), u64::MAX).is_empty());
    }

    /// Entry data the queue takes for a placed write (only its kind matters here).
    fn placed(stopped: Option<Arc<AtomicUsize>>) -> Proposal {
        let mut p = proposal(0, 64, stopped);
        p.data[..4].copy_from_slice(&raft_state::command::COMMAND_MAGIC);
        p.data[4] = raft_state::command::Command::PLACED_KIND;
        p
    }

    /// A placed write reaches the node only after a device flush that began after it was
    /// queued; an inline write queued later does not wait for that flush.
    #[test]
    fn placed_writes_reach_the_node_after_a_flush() {
        use raft_state::device::{SimDisk, TraceOp, BLOCK};
        let q = Proposals::new();
        let disk = SimDisk::new(4 * BLOCK, 1);
        q.push(1, placed(None));
        q.push(2, proposal(2, 10, None));
        let batch = q.take_batch(Instant::now(), u64::MAX);
        assert_eq!(batch.len(), 1, "only the inline write, before any flush");
        assert_eq!(batch[0].data[0], 2);
        assert!(!disk.trace().contains(&TraceOp::Flush));
        let (batch, flushed) = std::thread::scope(|scope| {
            let flusher = scope.spawn(|| q.flush_placed(&disk));
            let batch = q.take_batch(Instant::now() + std::time::Duration::from_secs(10), u64::MAX);
            let flushed = disk.trace().contains(&TraceOp::Flush);
            q.close();
            flusher.join().expect("flusher");
            (batch, flushed)
        });
        assert_eq!(batch.len(), 1);
        assert!(raft_state::place::needs_flush(&batch[0].data));
        assert!(flushed, "taken before the device was flushed");
    }

    /// A flush that fails stops the driver: the queue reports the error to the node, the
    /// placed writes that waited are never answered (completed as stopped), and the flusher
    /// returns.
    #[test]
    fn a_failed_flush_fails_the_queue() {
        use raft_state::device::{SimDisk, SimFault, BLOCK};
        let q = Proposals::new();
        let disk = SimDisk::new(4 * BLOCK, 1);
        disk.inject(SimFault::FlushError);
        let stopped = Arc::new(AtomicUsize::new(0));
        q.push(1, placed(Some(stopped.clone())));
        let returned = std::thread::scope(|scope| {
            let flusher = scope.spawn(|| q.flush_placed(&disk));
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while !flusher.is_finished() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let returned = flusher.is_finished();
            // Ends a flusher that did not return by itself, so that the test fails, not hangs.
            q.close();
            flusher.join().expect("flusher");
            returned
        });
        assert!(returned, "the flusher went on after a failed flush");
        assert!(q.take_failure().is_some());
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn closing_completes_what_waits_and_what_comes_later_as_stopped() {
        let q = Proposals::new();
        let stopped = Arc::new(AtomicUsize::new(0));
        q.push(1, proposal(1, 10, Some(stopped.clone())));
        q.push(2, proposal(2, 10, Some(stopped.clone())));
        q.close();
        assert_eq!(stopped.load(Ordering::SeqCst), 2);
        q.push(1, proposal(1, 10, Some(stopped.clone())));
        assert_eq!(stopped.load(Ordering::SeqCst), 3);
        assert!(q.take_batch(Instant::now() + std::time::Duration::from_secs(5), 100).is_empty(), "no wait");
    }
}
