//! The vhost-user-blk session: a virtual machine's front-end (QEMU, cloud-hypervisor) shares
//! the guest's memory with the driver and passes requests through virtqueues; the driver reads
//! and writes the guest's buffers in place and completes requests into the used rings. Writes
//! go through the same Raft log and volume as NBD writes (one log, one volume: either session
//! reads what the other wrote once it was acknowledged), and complete only once durable and
//! applied.
//!
//! ```text
//!  front-end ──vhost-user messages──► handler thread (Frontend: features, memory table,
//!      │                                 rings, config space, inflight region)
//!      │ kick eventfd per ring
//!      ▼
//!  ring worker (one per queue): take requests → reads (cached: at once; else readers)
//!                                             → writes: proposals → node → applier
//!                                               → completion: used ring + call eventfd
//! ```
//!
//! Restart under a running guest: the front-end keeps the inflight region (INFLIGHT_SHMFD)
//! across backend deaths and reconnects (`-chardev socket,reconnect=1`); the new driver
//! incarnation resubmits exactly the requests the region marks as taken and not completed
//! (`inflight.rs`, `ring.rs`). Front-ends are served one at a time; another waits in the
//! listening backlog. docs/vhost-user.md has the protocol, the limits and the choices.
//!
//! The rust-vmm crates do the wire protocol (vhost's `BackendReqHandler`), the rings
//! (virtio-queue) and the memory checks (vm-memory). vhost-user-backend's daemon is not used:
//! its request handler answers GET/SET_INFLIGHT_FD with an error, and restart under a running
//! guest is the point of this session.

mod blk;
mod inflight;
mod memory;
mod ring;

use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use raft_state::command::{Command, COMMAND_HEADER};
use raft_state::volume::Applied;
use slog::{info, warn, Logger};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg, VhostUserSingleMemoryRegion,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    BackendReqHandler, Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{Bytes, GuestAddress};

use self::blk::{Segment, S_IOERR, S_OK};
use self::memory::Memory;
use self::ring::{Done, Ring};
use crate::budget::Grant;
use crate::conn::{self, Shared};
use crate::error_chain;
use crate::node::read_volume;

pub use self::blk::config_space;

/// Readers per front-end (reads that wait for the device, writes to place).
const READERS: usize = 4;

/// Queues the device offers. QEMU refuses a backend offering fewer than its `num-queues`,
/// which defaults to the guest's vCPUs; a worker runs only for each queue the front-end
/// starts, so offering more than the host's cores costs nothing (docs/vhost-user.md).
const QUEUES: u16 = 16;

/// How long stopping a ring waits for its requests to complete (GET_VRING_BASE, a front-end
/// that leaves).
const DRAIN: Duration = Duration::from_secs(60);

/// Serves vhost-user front-ends on `listener`, one at a time, until the node is done.
pub fn serve(listener: UnixListener, shared: Arc<Shared>, node_done: &AtomicBool) {
    let log = shared.log.new(slog::o!("session" => "vhost-user"));
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if node_done.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(log, "accept failed"; "error" => %e);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        next_id += 1;
        let log = log.new(slog::o!("frontend" => next_id));
        info!(log, "front-end connected");
        match session(stream, &shared, next_id, &log) {
            VhostError::Disconnected | VhostError::PartialMessage => info!(log, "front-end disconnected"),
            e => warn!(log, "front-end dropped"; "error" => %e),
        }
    }
}

/// Serves one front-end until it goes or sends what cannot be served; returns why it ended.
fn session(stream: UnixStream, shared: &Arc<Shared>, id: u64, log: &Logger) -> VhostError {
    let session = Session::new(shared.clone(), id, log.clone());
    let frontend = Arc::new(Mutex::new(Frontend::new(session)));
    let mut handler = BackendReqHandler::from_stream(stream, frontend.clone());
    let why = loop {
        if let Err(e) = handler.handle_request() {
            break e;
        }
    };
    drop(handler);
    frontend.lock().unwrap_or_else(|e| e.into_inner()).stop_all();
    why
}

/// What the rings of one front-end share.
#[derive(Debug)]
pub struct Session {
    pub shared: Arc<Shared>,
    memory: RwLock<Arc<Memory>>,
    /// GET_ID's answer.
    pub id: [u8; blk::ID_BYTES],
    work: mpsc::Sender<Work>,
    /// Rings' proposals are queued under ids apart from NBD connections'.
    id_base: u64,
    pub log: Logger,
}

/// What the readers do.
#[derive(Debug)]
pub enum Work {
    Read { done: Done, offset: u64, data: Vec<Segment>, grant: Grant },
    Place { done: Done, offset: u64, buf: raft_state::device::AlignedBuf, len: usize, grant: Grant, queue: u64 },
}

impl Session {
    fn new(shared: Arc<Shared>, id: u64, log: Logger) -> Arc<Session> {
        let (tx, rx) = mpsc::channel::<Work>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..READERS {
            let (rx, shared) = (rx.clone(), shared.clone());
            let spawned = std::thread::Builder::new().name("rblk-vhost-io".into()).spawn(move || readers(&rx, &shared));
            if let Err(e) = spawned {
                warn!(log, "cannot start a reader"; "error" => %e);
            }
        }
        Arc::new(Session {
            id: blk::id(&shared.export.name.clone().unwrap_or_default()),
            shared,
            memory: RwLock::new(Arc::new(Memory::empty())),
            work: tx,
            id_base: (1 << 63) | (id << 16),
            log,
        })
    }

    /// The guest memory as the latest memory table maps it.
    pub fn memory(&self) -> Arc<Memory> {
        self.memory.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_memory(&self, m: Memory) {
        *self.memory.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(m);
    }

    pub fn work(&self, w: Work) {
        if let Err(mpsc::SendError(w)) = self.work.send(w) {
            // No reader is left (they could not start): done here, on the worker.
            run_work(w, &self.shared);
        }
    }

    /// A write's data, copied from the guest into its entries (or, large enough, into one
    /// aligned buffer a reader writes to the blocks it places).
    pub fn write(&self, done: Done, offset: u64, data: &[Segment], grant: Grant, queue: u64) {
        let shared = &self.shared;
        let len: u64 = data.iter().map(|s| u64::from(s.1)).sum();
        let mut source = Gather { data, at: 0, skip: 0 };
        if shared.placer.wants(offset, len) {
            let mut buf = shared.buffers.take();
            if buf.len() < len as usize {
                buf = raft_state::device::AlignedBuf::for_bytes(len as usize);
            }
            if source.fill(&done.mem, &mut buf[..len as usize]).is_err() {
                shared.buffers.give_back(buf);
                return done.finish(S_IOERR, 0);
            }
            shared.proposals.placing();
            return self.work(Work::Place { done, offset, buf, len: len as usize, grant, queue });
        }
        let end = offset + len;
        let step = conn::MAX_ENTRY_DATA as u64;
        let mut pieces = Vec::with_capacity(len.div_ceil(step) as usize + 1);
        let mut at = offset;
        while at < end {
            let next = ((at / step + 1) * step).min(end);
            let mut piece = Vec::with_capacity(COMMAND_HEADER + (next - at) as usize);
            piece.extend_from_slice(&Command::write_header(at, next - at));
            piece.resize(COMMAND_HEADER + (next - at) as usize, 0);
            if source.fill(&done.mem, &mut piece[COMMAND_HEADER..]).is_err() {
                return done.finish(S_IOERR, 0);
            }
            pieces.push(piece);
            at = next;
        }
        propose(shared, done, pieces, Some(grant), queue);
    }
}

/// Proposes a request's commands; it completes once all are applied.
fn propose(shared: &Shared, done: Done, pieces: Vec<Vec<u8>>, grant: Option<Grant>, queue: u64) {
    conn::propose(&shared.proposals, queue, pieces, move |applied| {
        drop(grant);
        done.finish(if applied == Applied::Done { S_OK } else { S_IOERR }, 0);
    });
}

/// Copies guest buffers out, in order, piece after piece.
struct Gather<'a> {
    data: &'a [Segment],
    at: usize,
    skip: u32,
}

impl Gather<'_> {
    fn fill(&mut self, mem: &Memory, mut out: &mut [u8]) -> Result<(), ()> {
        while !out.is_empty() {
            let &(addr, n) = self.data.get(self.at).ok_or(())?;
            let take = ((n - self.skip) as usize).min(out.len());
            let (now, rest) = out.split_at_mut(take);
            mem.guest.read_slice(now, GuestAddress(addr.0 + u64::from(self.skip))).map_err(drop)?;
            self.skip += take as u32;
            if self.skip == n {
                (self.at, self.skip) = (self.at + 1, 0);
            }
            out = rest;
        }
        Ok(())
    }
}

fn readers(queue: &Mutex<mpsc::Receiver<Work>>, shared: &Arc<Shared>) {
    loop {
        let next = match queue.lock() {
            Ok(q) => q.recv(),
            Err(_) => return,
        };
        match next {
            Ok(w) => run_work(w, shared),
            Err(_) => return,
        }
    }
}

fn run_work(w: Work, shared: &Arc<Shared>) {
    match w {
        Work::Read { done, offset, data, grant } => {
            let read = ring::read_into(&read_volume(&shared.volume), offset, &data, &done.mem, false);
            drop(grant);
            let len: u64 = data.iter().map(|s| u64::from(s.1)).sum();
            match read {
                Ok(_) => done.finish(S_OK, len as u32),
                Err(()) => done.finish(S_IOERR, 0),
            }
        }
        Work::Place { done, offset, buf, len, grant, queue } => {
            match conn::place(shared, offset, &buf[..len]) {
                Ok(pieces) => propose(shared, done, pieces, Some(grant), queue),
                Err(e) => {
                    // The device failed a write: the driver stops; the request stays in flight
                    // for the next driver to resubmit.
                    warn!(shared.log, "writing a placed write failed: the driver stops"; "error" => error_chain(&e));
                    shared.proposals.fail(e);
                }
            }
            shared.proposals.placed();
            shared.buffers.give_back(buf);
        }
    }
}

/// One ring as the front-end set it up.
#[derive(Debug, Default)]
struct RingConfig {
    size: u16,
    base: u16,
    /// Front-end virtual addresses of the descriptor table, used ring and avail ring.
    addrs: Option<(u64, u64, u64)>,
    kick: Option<File>,
    call: Arc<RwLock<Option<File>>>,
    enabled: bool,
    running: Option<Arc<Ring>>,
    worker: Option<JoinHandle<()>>,
}

/// The vhost-user device state of one front-end connection.
#[derive(Debug)]
struct Frontend {
    session: Arc<Session>,
    queues: u16,
    acked: u64,
    rings: Vec<RingConfig>,
    inflight: Option<Arc<inflight::Region>>,
}

fn invalid(what: &'static str) -> VhostError {
    VhostError::InvalidOperation(what)
}

impl Frontend {
    fn new(session: Arc<Session>) -> Frontend {
        Frontend {
            session,
            queues: QUEUES,
            acked: 0,
            rings: (0..QUEUES).map(|_| RingConfig::default()).collect(),
            inflight: None,
        }
    }

    fn ring(&mut self, index: u32) -> VhostResult<&mut RingConfig> {
        self.rings.get_mut(index as usize).ok_or(VhostError::InvalidParam)
    }

    fn offered(&self) -> u64 {
        blk::features(self.session.shared.export.read_only) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// Starts ring `index` once everything it needs is set.
    fn maybe_start(&mut self, index: u32) -> VhostResult<()> {
        let protocol = self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let event_idx = blk::event_idx(self.acked);
        let session = self.session.clone();
        let inflight = self.inflight.clone();
        let had_inflight = inflight.is_some();
        let r = self.ring(index)?;
        // With PROTOCOL_FEATURES a ring runs only once enabled; without, once it has a kick.
        if r.worker.is_some() || r.kick.is_none() || (protocol && !r.enabled) {
            return Ok(());
        }
        if let Some(ring) = &r.running {
            // Disabled and enabled again: the same ring goes on.
            let ring = ring.clone();
            ring.resume();
            r.worker = Some(spawn(ring, Vec::new())?);
            return Ok(());
        }
        let Some((desc, used, avail)) = r.addrs else { return Ok(()) };
        let mem = session.memory();
        let gpa = |va| mem.user_to_guest(va).ok_or(invalid("a ring address outside guest memory"));
        let kick = r.kick.as_ref().map(File::try_clone).transpose().map_err(VhostError::ReqHandlerError)?;
        let setup = ring::Setup {
            index: index as u16,
            size: r.size,
            desc: gpa(desc)?,
            avail: gpa(avail)?,
            used: gpa(used)?,
            base: r.base,
            event_idx,
            kick: kick.ok_or(invalid("no kick descriptor"))?,
            call: r.call.clone(),
            inflight,
        };
        let queue_id = session.id_base | u64::from(index);
        let (ring, resubmit) = Ring::new(setup, session.clone(), queue_id).map_err(|e| {
            warn!(session.log, "cannot start a ring"; "error" => %e);
            invalid("the ring cannot start")
        })?;
        slog::debug!(session.log, "ring started"; "ring" => index, "size" => r.size, "base" => r.base,
            "inflight" => had_inflight, "resubmit" => resubmit.len());
        if !resubmit.is_empty() {
            info!(session.log, "resubmitting what the previous driver left in flight";
                "ring" => index, "requests" => resubmit.len());
        }
        r.worker = Some(spawn(ring.clone(), resubmit)?);
        r.running = Some(ring);
        Ok(())
    }

    /// Stops ring `index`'s worker and waits for its requests; returns where the avail ring
    /// resumes.
    fn stop_ring(&mut self, index: u32) -> VhostResult<u16> {
        let r = self.ring(index)?;
        let Some(ring) = r.running.take() else { return Ok(r.base) };
        ring.stop();
        if let Some(w) = r.worker.take() {
            let _ = w.join();
        }
        r.kick = None;
        let base = ring.drain(DRAIN).ok_or(invalid("requests still run after a minute"))?;
        r.base = base;
        Ok(base)
    }

    fn stop_all(&mut self) {
        for index in 0..self.rings.len() as u32 {
            if let Err(e) = self.stop_ring(index) {
                warn!(self.session.log, "a ring did not drain"; "ring" => index, "error" => %e);
            }
        }
    }

    fn running(&self) -> bool {
        self.rings.iter().any(|r| r.running.is_some())
    }
}

fn spawn(ring: Arc<Ring>, resubmit: Vec<u16>) -> VhostResult<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rblk-vring".into())
        .spawn(move || ring.run(resubmit))
        .map_err(VhostError::ReqHandlerError)
}

impl VhostUserBackendReqHandlerMut for Frontend {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.stop_all();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        Err(invalid("RESET_DEVICE is not offered"))
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.offered())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        if features & !self.offered() != 0 {
            return Err(VhostError::InvalidParam);
        }
        self.acked = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        // Rings go on with the new table; requests already started keep the old one mapped
        // until they complete.
        let m = Memory::map(ctx, files).map_err(|e| {
            warn!(self.session.log, "memory table refused"; "error" => %e);
            invalid("memory table refused")
        })?;
        self.session.set_memory(m);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let r = self.ring(index)?;
        let size = u16::try_from(num).map_err(|_| VhostError::InvalidParam)?;
        if r.running.is_some() || size == 0 || !size.is_power_of_two() || size > ring::MAX_SIZE {
            return Err(VhostError::InvalidParam);
        }
        r.size = size;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let r = self.ring(index)?;
        if r.running.is_some() {
            return Err(invalid("ring addresses change while it runs"));
        }
        r.addrs = Some((descriptor, used, available));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let r = self.ring(index)?;
        if r.running.is_some() {
            return Err(invalid("ring base changes while it runs"));
        }
        r.base = u16::try_from(base).map_err(|_| VhostError::InvalidParam)?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let base = self.stop_ring(index)?;
        let r = self.ring(index)?;
        r.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let r = self.ring(u32::from(index))?;
        if r.running.is_some() {
            return Err(invalid("kick descriptor changes while the ring runs"));
        }
        r.kick = Some(fd.ok_or(invalid("polled rings are not supported"))?);
        self.maybe_start(u32::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let r = self.ring(u32::from(index))?;
        *r.call.write().unwrap_or_else(|e| e.into_inner()) = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        self.ring(u32::from(index)).map(drop)
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, _features: u64) -> VhostResult<()> {
        // vhost's handler keeps what was acked and checks each message against it.
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let r = self.ring(index)?;
        r.enabled = enable;
        if enable {
            return self.maybe_start(index);
        }
        // Disabled: the worker stops taking requests; those started still complete.
        if let (Some(ring), Some(worker)) = (&r.running, r.worker.take()) {
            ring.stop();
            let _ = worker.join();
        }
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VhostResult<Vec<u8>> {
        let space = blk::config_space(self.session.shared.export.size, self.queues);
        let (offset, size) = (offset as usize, size as usize);
        let mut out = vec![0u8; size];
        if let Some(have) = space.get(offset..) {
            let n = have.len().min(size);
            out[..n].copy_from_slice(&have[..n]);
        }
        Ok(out)
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VhostResult<()> {
        Err(invalid("the config space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        Err(invalid("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VhostResult<(VhostUserInflight, File)> {
        if msg.num_queues == 0 || msg.num_queues > self.queues || msg.queue_size == 0 || msg.queue_size > ring::MAX_SIZE
        {
            return Err(VhostError::InvalidParam);
        }
        let (file, size) = inflight::create(msg.num_queues, msg.queue_size).map_err(|e| {
            warn!(self.session.log, "cannot create the inflight region"; "error" => %e);
            invalid("no inflight region")
        })?;
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VhostResult<()> {
        if self.running() {
            return Err(invalid("the inflight region changes while rings run"));
        }
        let region = inflight::Region::map(file, msg.mmap_offset, msg.mmap_size, msg.num_queues, msg.queue_size)
            .map_err(|e| {
                warn!(self.session.log, "inflight region refused"; "error" => %e);
                invalid("inflight region refused")
            })?;
        slog::debug!(self.session.log, "inflight region"; "queues" => msg.num_queues, "queue_size" => msg.queue_size);
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Err(invalid("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        Err(invalid("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        Err(invalid("CONFIGURE_MEM_SLOTS is not offered"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(invalid("no device state transfer"))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(invalid("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(invalid("no dirty-page logging"))
    }
}
