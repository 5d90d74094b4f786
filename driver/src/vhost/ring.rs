//! One virtqueue and its worker thread: takes requests from the avail ring, starts each
//! (reads on the worker or the session's readers, writes as proposals to the Raft node), and
//! completes them into the used ring in whatever order they finish.
//!
//! Every request taken is marked in the inflight region before anything of it is done, and
//! unmarked only as its completion reaches the used ring (`inflight.rs`); a driver killed at
//! any instant leaves exactly the requests it had not completed marked, and the next one
//! resubmits them (`Ring::start` with the heads `inflight::QueueArea::recover` returns).
//! A request whose driver stops before it completes is simply left marked.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use slog::{warn, Logger};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::blk::{self, Kind, S_IOERR, S_OK, S_UNSUPP};
use super::inflight::{self, Recovered};
use super::memory::Memory;
use super::Session;
use crate::budget::{Budget, Grant};
use crate::metrics::{self, Kind as MetricKind};
use crate::node::read_volume;

/// Largest ring rblk accepts (QEMU's vhost-user-blk allows up to 1024).
pub const MAX_SIZE: u16 = 1024;

/// The largest read the worker answers itself when its data is cached.
const HOT_READ_MAX: u64 = 128 << 10;

/// What a ring is given to start.
#[derive(Debug)]
pub struct Setup {
    pub index: u16,
    pub size: u16,
    /// Guest physical addresses of the descriptor table, avail ring and used ring.
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    /// SET_VRING_BASE: where the front-end says the avail ring resumes.
    pub base: u16,
    pub event_idx: bool,
    pub kick: File,
    pub call: Arc<RwLock<Option<File>>>,
    pub inflight: Option<Arc<inflight::Region>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring {index}: size {size} is not a power of two up to {MAX_SIZE}")]
    Size { index: u16, size: u16 },
    #[error("ring {index}: its tables are not in guest memory or misaligned")]
    Placement { index: u16 },
    #[error(transparent)]
    Inflight(#[from] inflight::InflightError),
}

/// A started ring.
#[derive(Debug)]
pub struct Ring {
    pub index: u16,
    size: u16,
    desc: GuestAddress,
    state: Mutex<State>,
    inflight: Option<Arc<inflight::Region>>,
    kick: File,
    call: Arc<RwLock<Option<File>>>,
    session: Arc<Session>,
    /// Set to stop the worker (with a write to `kick` to wake it).
    stopping: AtomicBool,
    /// Requests taken and not yet completed or abandoned.
    outstanding: Mutex<usize>,
    drained: Condvar,
    /// Bytes of this ring's requests in flight (one NBD connection's worth).
    budget: Arc<Budget>,
    /// The id its proposals are queued under (rings take turns with NBD connections).
    queue_id: u64,
    log: Logger,
}

/// The ring's queue, and the count that orders the requests taken in the inflight area.
#[derive(Debug)]
struct State {
    queue: Queue,
    counter: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ring {
    /// Sets the ring up, reads its inflight area and returns it with the heads to resubmit.
    pub fn new(setup: Setup, session: Arc<Session>, queue_id: u64) -> Result<(Arc<Ring>, Vec<u16>), RingError> {
        let index = setup.index;
        let mem = session.memory();
        let bad_size = || RingError::Size { index, size: setup.size };
        let mut queue = Queue::new(MAX_SIZE).map_err(|_| bad_size())?;
        queue.try_set_size(setup.size).map_err(|_| bad_size())?;
        let placed = queue.try_set_desc_table_address(setup.desc).is_ok()
            && queue.try_set_avail_ring_address(setup.avail).is_ok()
            && queue.try_set_used_ring_address(setup.used).is_ok();
        queue.set_event_idx(setup.event_idx);
        queue.set_ready(true);
        if !placed || !queue.is_valid(&mem.guest) {
            return Err(RingError::Placement { index });
        }
        let used = queue.used_idx(&mem.guest, Ordering::Acquire).map_err(|_| RingError::Placement { index })?;
        queue.set_next_used(used.0);
        let (mut resubmit, mut counter) = (Vec::new(), 0);
        match &setup.inflight {
            Some(region) => match region.queue(index, setup.size)?.recover(used.0, index)? {
                Recovered::Fresh => queue.set_next_avail(setup.base),
                Recovered::Inflight { heads, counter: next } => {
                    // Every request taken before is either in the used ring or marked.
                    queue.set_next_avail(used.0.wrapping_add(heads.len() as u16));
                    (resubmit, counter) = (heads, next);
                }
            },
            None => queue.set_next_avail(setup.base),
        }
        let limits = &session.shared.limits;
        let ring = Arc::new(Ring {
            index,
            size: setup.size,
            desc: setup.desc,
            state: Mutex::new(State { queue, counter }),
            inflight: setup.inflight,
            kick: setup.kick,
            call: setup.call,
            budget: Budget::new(limits.inflight_per_connection),
            stopping: AtomicBool::new(false),
            outstanding: Mutex::new(0),
            drained: Condvar::new(),
            queue_id,
            log: session.log.new(slog::o!("ring" => index)),
            session,
        });
        Ok((ring, resubmit))
    }

    /// The worker: resubmits what the previous driver left in flight, then serves the ring
    /// until `stop`.
    pub fn run(self: Arc<Ring>, resubmit: Vec<u16>) {
        for head in resubmit {
            self.start(head);
        }
        // Completions the previous driver put in the used ring may not have been signalled.
        self.signal();
        while !self.stopping.load(Ordering::SeqCst) {
            if !self.take_all() {
                return;
            }
            if let Err(e) = self.wait_kick() {
                warn!(self.log, "the ring's kick descriptor failed: the ring stops"; "error" => %e);
                return;
            }
        }
    }

    /// Waits until the guest (or `stop`) kicks, and takes the kick. The front-end's eventfds
    /// may be non-blocking: ppoll first (the sandbox's only poll).
    fn wait_kick(&self) -> std::io::Result<()> {
        use nix::poll::{ppoll, PollFd, PollFlags};
        use std::os::fd::AsFd;
        loop {
            let mut fds = [PollFd::new(self.kick.as_fd(), PollFlags::POLLIN)];
            match ppoll(&mut fds, None, None) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let mut kicked = [0u8; 8];
            match (&self.kick).read(&mut kicked) {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes and starts every request the avail ring offers, until it is empty with
    /// notifications on. False when the ring is broken (the guest wrote nonsense into it).
    fn take_all(self: &Arc<Ring>) -> bool {
        loop {
            let mem = self.session.memory();
            let mut s = lock(&self.state);
            // Notifications are off while taking what is there (with EVENT_IDX).
            let _ = s.queue.disable_notification(&mem.guest);
            let heads: Vec<u16> = match s.queue.iter(&mem.guest) {
                Ok(iter) => iter.map(|chain| chain.head_index()).collect(),
                Err(e) => {
                    drop(s);
                    warn!(self.log, "the guest's avail ring is broken: the ring stops"; "error" => %e);
                    return false;
                }
            };
            if let Some(&bad) = heads.iter().find(|&&h| h >= self.size) {
                drop(s);
                warn!(self.log, "the guest offered a descriptor head outside its ring: the ring stops"; "head" => bad);
                return false;
            }
            if let Some(area) = self.area() {
                for &head in &heads {
                    area.taken(head, s.counter);
                    s.counter += 1;
                }
            }
            let more = heads.is_empty() && matches!(s.queue.enable_notification(&mem.guest), Ok(true));
            drop(s);
            let done = heads.is_empty() && !more;
            for head in heads {
                self.start(head);
            }
            if done {
                return true;
            }
        }
    }

    /// Starts the request whose chain begins at `head` (already marked in flight).
    fn start(self: &Arc<Ring>, head: u16) {
        let arrived = Instant::now();
        *lock(&self.outstanding) += 1;
        let mem = self.session.memory();
        let Some(chain) = blk::walk(&mem.guest, self.desc, self.size, head) else {
            // No status byte to be trusted: completed with nothing written.
            metrics::page().error(session::NBD_EINVAL);
            self.complete(head, 0, &mem);
            return;
        };
        let req = match blk::parse(&mem.guest, &chain) {
            Ok(r) => r,
            Err(status) => {
                let done = Done { ring: self.clone(), mem, head, status, arrived, kind: MetricKind::Other, open: true };
                return done.finish(S_IOERR, 0);
            }
        };
        let kind = match req.kind {
            Kind::In => MetricKind::Read,
            Kind::Out => MetricKind::Write,
            Kind::Flush => MetricKind::Flush,
            Kind::Discard => MetricKind::Trim,
            Kind::WriteZeroes => MetricKind::WriteZeroes,
            Kind::GetId | Kind::Other(_) => MetricKind::Other,
        };
        metrics::page().request(kind, req.data_len());
        let done =
            Done { ring: self.clone(), mem: mem.clone(), head, status: Some(req.status), arrived, kind, open: true };
        let session = &self.session;
        let size = session.shared.export.size;
        let writes = matches!(req.kind, Kind::Out | Kind::Discard | Kind::WriteZeroes);
        if writes && session.shared.export.read_only {
            return done.finish(S_IOERR, 0);
        }
        match req.kind {
            Kind::In | Kind::Out => {
                let len = req.data_len();
                let Some((offset, _)) = blk::byte_range(req.sector, len, size).filter(|_| len % blk::SECTOR == 0)
                else {
                    return done.finish(S_IOERR, 0);
                };
                let grant = Grant::take(&self.budget, &session.shared.budget, len, || {});
                if req.kind == Kind::In {
                    if len <= HOT_READ_MAX {
                        let volume = read_volume(&session.shared.volume);
                        match read_into(&volume, offset, &req.data, &mem, true) {
                            Ok(true) => return done.finish(S_OK, len as u32),
                            Ok(false) => {}
                            Err(()) => return done.finish(S_IOERR, 0),
                        }
                    }
                    session.work(super::Work::Read { done, offset, data: req.data, grant });
                } else {
                    session.write(done, offset, &req.data, grant, self.queue_id);
                }
            }
            Kind::Flush => done.finish(S_OK, 0),
            Kind::GetId => {
                let id = &session.id;
                let mut at = 0;
                for &(addr, n) in &req.data {
                    let n = (n as usize).min(id.len() - at);
                    if mem.guest.write_slice(&id[at..at + n], addr).is_err() {
                        return done.finish(S_IOERR, 0);
                    }
                    at += n;
                }
                done.finish(S_OK, at as u32);
            }
            Kind::Discard | Kind::WriteZeroes => match blk::ranges(&mem.guest, &req, size) {
                Ok(ranges) => {
                    let zero = req.kind == Kind::WriteZeroes;
                    let pieces = ranges
                        .into_iter()
                        .map(|(offset, length)| match zero {
                            true => raft_state::command::Command::WriteZeroes { offset, length }.encode(),
                            false => raft_state::command::Command::Trim { offset, length }.encode(),
                        })
                        .collect();
                    super::propose(&session.shared, done, pieces, None, self.queue_id);
                }
                Err(status) => done.finish(status, 0),
            },
            Kind::Other(_) => done.finish(S_UNSUPP, 0),
        }
    }

    /// Puts `head` in the used ring (`len`: bytes written into the guest's buffers, status
    /// included), unmarks it, and signals the guest when it asked to be. `mem`: the table the
    /// request was read with (the rings' guest addresses do not change with the table, and it
    /// stays mapped while the request holds it).
    fn complete(&self, head: u16, len: u32, mem: &Memory) {
        let area = self.area();
        let mut s = lock(&self.state);
        if let Some(a) = &area {
            a.completing(head);
        }
        let added = s.queue.add_used(&mem.guest, head, len);
        if let Some(a) = &area {
            a.completed(head, s.queue.next_used());
        }
        let notify = added.is_ok() && s.queue.needs_notification(&mem.guest).unwrap_or(true);
        drop(s);
        if let Err(e) = added {
            warn!(self.log, "cannot complete a request into the used ring"; "error" => %e);
        }
        if notify {
            self.signal();
        }
        self.settled();
    }

    /// One request fewer outstanding (completed, or abandoned because the driver stops).
    fn settled(&self) {
        let mut n = lock(&self.outstanding);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.drained.notify_all();
        }
    }

    fn signal(&self) {
        let call = self.call.read().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = call.as_ref() {
            let _ = (&*fd).write(&1u64.to_ne_bytes());
        }
    }

    /// Stops the worker (it returns at its next wake-up, which this causes).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = (&self.kick).write(&1u64.to_ne_bytes());
    }

    /// Waits until every request taken is completed (or `within` passes); then the ring's
    /// avail index, which is where the front-end resumes. None when requests still run.
    pub fn drain(&self, within: Duration) -> Option<u16> {
        let deadline = Instant::now() + within;
        let mut n = lock(&self.outstanding);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            n = self.drained.wait_timeout(n, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(n);
        Some(lock(&self.state).queue.next_avail())
    }

    /// Lets a stopped worker run again (the ring was disabled and enabled).
    pub fn resume(&self) {
        self.stopping.store(false, Ordering::SeqCst);
    }

    /// This ring's area of the inflight region, if the front-end gave one.
    fn area(&self) -> Option<inflight::QueueArea<'_>> {
        self.inflight.as_ref().and_then(|r| r.queue(self.index, self.size).ok())
    }
}

/// A started request: completing it writes its status and puts it in the used ring. Dropped
/// without `finish` (the driver stops before it is applied), it stays in flight, marked, for
/// the next driver to resubmit.
pub struct Done {
    ring: Arc<Ring>,
    /// The memory its buffers were found in (kept mapped until it completes).
    pub mem: Arc<Memory>,
    head: u16,
    status: Option<GuestAddress>,
    arrived: Instant,
    kind: MetricKind,
    open: bool,
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done").field("ring", &self.ring.index).field("head", &self.head).finish()
    }
}

impl Done {
    /// Completes the request with `status`; `written`: data bytes written into its buffers.
    pub fn finish(mut self, status: u8, written: u32) {
        self.open = false;
        let len = match self.status {
            Some(at) if self.mem.guest.write_obj(status, at).is_ok() => written + 1,
            _ => 0,
        };
        if status != S_OK {
            metrics::page().error(session::NBD_EIO);
        }
        metrics::page().answered(self.kind, self.arrived.elapsed());
        self.ring.complete(self.head, len, &self.mem);
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if self.open {
            self.ring.settled();
        }
    }
}

/// Reads the volume from `offset` into the guest buffers `data`, in place. `nowait`: only
/// from cached data (Ok(false) when some is not). Err on a damaged block or an address that
/// is not guest memory.
pub fn read_into(
    volume: &raft_state::volume::Volume,
    mut offset: u64,
    data: &[blk::Segment],
    mem: &Memory,
    nowait: bool,
) -> Result<bool, ()> {
    for &(addr, n) in data {
        for slice in mem.guest.get_slices(addr, n as usize, Permissions::Write).map_err(drop)? {
            let slice = slice.map_err(drop)?;
            let guard = slice.ptr_guard_mut();
            // SAFETY: the slice is mapped guest memory of `slice.len()` bytes (vm-memory checked
            // the range against the regions), and `mem` keeps the mapping alive while the
            // buffer is used. The guest may write the same bytes meanwhile: it gets what it
            // raced for; the driver only writes into the buffer and never relies on its contents.
            let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
            if !crate::conn::read_bytes(volume, offset, buf, nowait)? {
                return Ok(false);
            }
            offset += slice.len() as u64;
        }
    }
    Ok(true)
}
