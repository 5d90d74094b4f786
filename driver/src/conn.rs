//! One NBD connection: the handshake, then a thread that decodes requests and answers what
//! it can at once (cached reads, flushes, caches, errors: replies batched into one send
//! before it would wait for the client), four readers for the other reads and for block
//! status, and a reply writer for the write completions the applier could not send itself.
//! Replies go out in whatever order they complete.
//!
//! With structured replies negotiated, a read is answered with one `OFFSET_DATA` chunk, or
//! (64 KiB or more, without `NBD_CMD_FLAG_DF`, with unmapped blocks) with data chunks and
//! `OFFSET_HOLE` chunks for its holes, or with one `ERROR` chunk; every other reply stays
//! simple.
//! Block status (`base:allocation`) comes from the block map that reads use, so it shows
//! every acknowledged write; unmapped blocks (never written, trimmed, write-zeroed) are
//! holes that read as zeros.
//!
//! Reads see every acknowledged write: a write is acknowledged only after it was applied.
//! Writes, trims and write-zeroes become proposals to the Raft node and are answered when
//! their entries are committed and applied, so every acknowledged write is durable and FLUSH
//! has nothing left to wait for.
//!
//! What a client cannot do to the driver:
//! - exhaust its memory: each request takes its bytes from the connection's and the global
//!   budget *before* its payload is read (`budget.rs`); at the limit the connection stops
//!   reading its socket. A trim or write-zeroes of any length is one small entry.
//! - hold a connection slot forever: the handshake must finish within `handshake_timeout`; a
//!   request half sent, or replies left unread, for `stall_timeout` drop the connection; a
//!   connection silent between requests for `idle_timeout` is closed while other clients
//!   wait for a slot.
//! - make a failing driver lie: a request the node could not take because the driver is
//!   stopping gets no reply at all, and an I/O error (EIO) is answered only after a later log
//!   write succeeded, so a driver whose device is failing dies without answering and the
//!   client resends after reconnecting (an error would be final for QEMU).

use std::cell::RefCell;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use raft_state::command::{Command, COMMAND_HEADER};
use raft_state::device::{AlignedBuf, BLOCK};
use raft_state::place::Placer;
use raft_state::volume::{Applied, Checks, Volume, VolumeError};
use session::{Export, Request};
use slog::{debug, error, info, warn, Logger};

use crate::budget::{Budget, Grant};
use crate::error_chain;
use crate::metrics::{self, Kind};
use crate::node::{read_volume, write_volume, Outcome, Proposal};
use crate::queue::Proposals;
use crate::Limits;

/// Largest piece of a write carried by one Raft entry (entries may hold a little under
/// 2 MiB). A batch takes whole entries, so this is also the least a light client's write can
/// wait behind: with 1 MiB pieces its p99 beside a flood of 1 MiB writes was twice as long as
/// with 256 KiB, and fio saw no throughput difference.
pub const MAX_ENTRY_DATA: usize = 256 << 10;

/// What every connection shares.
#[derive(Debug)]
pub struct Shared {
    pub volume: Arc<RwLock<Volume>>,
    pub export: Export,
    pub proposals: Arc<Proposals>,
    pub limits: Limits,
    /// Bytes in flight across all connections.
    pub budget: Arc<Budget>,
    pub connections: AtomicUsize,
    /// Signalled when a connection ends (a slot is free).
    pub slot_freed: (Mutex<()>, Condvar),
    /// Clients wait in the backlog for a slot: idle connections give theirs up.
    pub crowded: AtomicBool,
    /// Whether this incarnation answered a request yet (logged once: the supervisor and the
    /// chaos runs measure restart-to-first-served-request from it).
    pub served: AtomicBool,
    /// Writes large enough are written once, to their blocks, by the connection that
    /// read them (`raft_state::place`).
    pub placer: Placer,
    /// Payload buffers of writes to place, kept for reuse.
    pub buffers: BufferPool,
    /// STARTTLS offered or required (`[tls]`), or none.
    pub tls: Option<crate::tls::TlsServer>,
    pub log: Logger,
}

/// A reply without data: a write's completion, or an error (`chunk`: as a structured error
/// chunk, which a read's error must be once structured replies are on).
struct Reply {
    handle: u64,
    error: u32,
    chunk: bool,
}

/// Aligned payload buffers kept for reuse, at most `KEEP_BYTES` in all (buffers in use are
/// bounded by the in-flight budgets; these come on top, so they are capped for the driver as
/// a whole, not per connection).
#[derive(Debug, Default)]
pub struct BufferPool(Mutex<Vec<AlignedBuf>>);

impl BufferPool {
    const KEEP_BYTES: usize = 16 << 20;

    /// A kept buffer (the largest), or an empty one to grow.
    pub(crate) fn take(&self) -> AlignedBuf {
        self.0.lock().ok().and_then(|mut kept| kept.pop()).unwrap_or_else(|| AlignedBuf::blocks(0))
    }

    pub(crate) fn give_back(&self, buf: AlignedBuf) {
        let Ok(mut kept) = self.0.lock() else { return };
        let held: usize = kept.iter().map(|b| b.len()).sum();
        if held + buf.len() <= Self::KEEP_BYTES {
            kept.push(buf);
            kept.sort_unstable_by_key(|b| b.len());
        }
    }
}

/// The sending half of a connection. Whoever answers writes whole replies under the lock:
/// the connection's own thread (hot reads, flushes, errors: in batches), its readers (reads
/// that wait for the media) and its completion writer (writes, which the node finishes).
struct Replies {
    stream: Mutex<UnixStream>,
    shared: Arc<Shared>,
    log: Logger,
}

impl Replies {
    /// Sends encoded replies. An error (the client is gone, or has not read for
    /// `stall_timeout`) breaks the connection: it is shut down, and its thread notices.
    fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.send_parts(bytes, &[])
    }

    /// Sends `head` and then `data` as one reply, with one system call where the socket
    /// takes both at once.
    fn send_parts(&self, head: &[u8], data: &[u8]) -> std::io::Result<()> {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = write_all_parts(&mut *stream, head, data) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Err(e);
        }
        drop(stream);
        self.served();
        Ok(())
    }

    /// Sends `bytes` only if that needs no wait: nobody else is sending and the socket
    /// takes all of it at once. For the applier, which must never block on a client.
    fn try_send_now(&self, bytes: &[u8]) -> bool {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        let Ok(stream) = self.stream.try_lock() else { return false };
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
            Ok(n) if n == bytes.len() => {
                drop(stream);
                self.served();
                true
            }
            // Part of a reply went out, and the rest cannot follow without waiting: the
            // stream is broken. Drop the connection; the client resends what it misses.
            Ok(_) => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                true
            }
            // Full (EAGAIN) or gone: the reply writer deals with it.
            Err(_) => false,
        }
    }

    fn served(&self) {
        // Read first: a swap on every reply would make all connections write one cache line.
        if !self.shared.served.load(Ordering::Relaxed) && !self.shared.served.swap(true, Ordering::SeqCst) {
            info!(self.log, "first request served");
        }
    }
}

/// `write_all` of `head` then `data`, gathered (`writev`) rather than copied together.
fn write_all_parts(w: &mut impl Write, head: &[u8], data: &[u8]) -> std::io::Result<()> {
    let mut parts = [std::io::IoSlice::new(head), std::io::IoSlice::new(data)];
    let mut left: &mut [std::io::IoSlice<'_>] = &mut parts;
    std::io::IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        match w.write_vectored(left) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut left, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Appends a simple reply without data to `out` (writing to a Vec cannot fail).
fn encode(out: &mut Vec<u8>, handle: u64, error: u32) {
    let _ = session::write_reply(out, handle, error, &[]);
}

/// Appends a reply without data: simple, or (`chunk`, for a failed read under structured
/// replies, which may not be answered simply) a final error chunk.
fn encode_reply(out: &mut Vec<u8>, reply: &Reply) {
    if reply.chunk && reply.error != 0 {
        session::encode_error_chunk(out, reply.handle, reply.error, session::errno_name(reply.error));
    } else {
        encode(out, reply.handle, reply.error);
    }
}

/// Serves one connection until the client disconnects, misbehaves, or the driver stops.
pub fn serve(stream: UnixStream, shared: Arc<Shared>, id: u64) {
    let log = shared.log.new(slog::o!("conn" => id));
    if let Err(e) = run(stream, &shared, id, &log) {
        // Logged once per connection; other connections and the volume are unaffected.
        warn!(log, "connection dropped"; "why" => %e);
    }
    shared.connections.fetch_sub(1, Ordering::SeqCst);
    let (lock, freed) = &shared.slot_freed;
    drop(lock.lock().unwrap_or_else(|e| e.into_inner()));
    freed.notify_all();
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> session::SessionError {
    move |source| session::SessionError::Io { what, source }
}

/// Replies the connection's thread holds back at most before sending them.
const BATCH_BYTES: usize = 256 << 10;

/// How often a connection waiting for its client looks at the clock.
const PATIENCE_TICK: Duration = Duration::from_millis(500);

/// The handshake's stream: every read and write must end before `until`, so a client that
/// connects and says nothing (or dribbles) frees its slot after `handshake_timeout`.
struct Deadline {
    stream: UnixStream,
    until: Instant,
}

impl Deadline {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timeout"));
        }
        Ok(left)
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        self.stream.read(buf).map_err(timed_out("handshake timeout"))
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        self.stream.write(buf).map_err(timed_out("handshake timeout"))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A socket timeout shows up as EAGAIN; say what it was.
fn timed_out(what: &'static str) -> impl Fn(std::io::Error) -> std::io::Error {
    move |e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            std::io::Error::new(std::io::ErrorKind::TimedOut, what)
        }
        _ => e,
    }
}

/// The transmission phase's receiving stream. Between requests a client may be silent as
/// long as it likes (an idle VM disk), unless other clients wait for a slot and it has been
/// silent for `idle_timeout`; within a request, a pause of `stall_timeout` ends the
/// connection.
struct Patient {
    stream: UnixStream,
    /// Set by the connection before it reads the next request from an empty buffer.
    between_requests: bool,
    stall: Duration,
    idle: Duration,
    shared: Arc<Shared>,
}

impl Read for Patient {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let started = Instant::now();
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    if n > 0 {
                        self.between_requests = false;
                    }
                    return Ok(n);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    let waited = started.elapsed();
                    if self.between_requests {
                        let crowded = self.shared.crowded.load(Ordering::Relaxed);
                        if !self.idle.is_zero() && waited >= self.idle && crowded {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "idle while other clients wait for a connection slot",
                            ));
                        }
                    } else if !self.stall.is_zero() && waited >= self.stall {
                        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "request stalled"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn run(stream: UnixStream, shared: &Arc<Shared>, id: u64, log: &Logger) -> Result<(), session::SessionError> {
    let limits = &shared.limits;
    let until = Instant::now() + limits.handshake_timeout;
    let mut hs = Deadline { stream: stream.try_clone().map_err(io("clone the connection"))?, until };
    let flags = session::greet(&mut hs, &shared.export)?;
    let offer = shared.tls.as_ref().map_or(session::Tls::Off, |t| t.negotiation());
    let (stream, negotiated) = match (session::negotiate(&mut hs, &shared.export, flags, offer)?, &shared.tls) {
        (session::Step::Go(n), _) => (stream, n),
        (session::Step::StartTls, Some(tls)) => {
            drop(hs);
            // The same handshake deadline covers the TLS handshake and what follows it.
            let plain = tls.upgrade(stream, until).map_err(io("TLS handshake"))?;
            debug!(log, "TLS started");
            let mut hs = Deadline { stream: plain.try_clone().map_err(io("clone the connection"))?, until };
            match session::negotiate(&mut hs, &shared.export, flags, session::Tls::Active)? {
                session::Step::Go(n) => (plain, n),
                _ => {
                    debug!(log, "client ended the negotiation");
                    return Ok(());
                }
            }
        }
        _ => {
            debug!(log, "client ended the negotiation");
            return Ok(());
        }
    };
    // From here, a send that waits `stall_timeout` for a client that does not read fails.
    let stall = (!limits.stall_timeout.is_zero()).then_some(limits.stall_timeout);
    stream.set_write_timeout(stall).map_err(io("set the send timeout"))?;
    stream.set_read_timeout(Some(PATIENCE_TICK)).map_err(io("set the receive timeout"))?;
    // Best effort: where the system caps it lower (net.core.wmem_max), the cap holds.
    if let Err(e) = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER) {
        debug!(log, "the connection's send buffer stays at the system's default"; "error" => %e);
    }
    debug!(log, "transmission"; "block_sizes" => negotiated.block_size_requested);
    let replies = Arc::new(Replies {
        stream: Mutex::new(stream.try_clone().map_err(io("clone the connection"))?),
        shared: shared.clone(),
        log: log.clone(),
    });
    let (tx, rx) = mpsc::channel::<Reply>();
    let completions = replies.clone();
    let writer = std::thread::Builder::new()
        .name("rblk-reply".into())
        .spawn(move || {
            // Everything completed meanwhile goes out with one send.
            let mut out = Vec::new();
            while let Ok(first) = rx.recv() {
                out.clear();
                encode_reply(&mut out, &first);
                while let Ok(r) = rx.try_recv() {
                    encode_reply(&mut out, &r);
                }
                if completions.send(&out).is_err() {
                    break;
                }
            }
        })
        .map_err(io("start the reply writer"))?;
    let answer = Answer {
        shared: shared.clone(),
        conn: id,
        replies: replies.clone(),
        tx: tx.clone(),
        structured: negotiated.structured_replies,
        base_allocation: negotiated.base_allocation,
    };
    let (reads, read_rx) = mpsc::channel::<Work>();
    let read_rx = Arc::new(Mutex::new(read_rx));
    let mut readers = Vec::new();
    for _ in 0..READERS_PER_CONNECTION {
        let (rx, answer) = (read_rx.clone(), answer.clone());
        let spawned = std::thread::Builder::new().name("rblk-read".into()).spawn(move || serve_work(&rx, &answer));
        readers.push(spawned.map_err(io("start a reader"))?);
    }
    let budget = Budget::new(limits.inflight_per_connection);
    let patient = Patient {
        stream: stream.try_clone().map_err(io("clone the connection"))?,
        between_requests: true,
        stall: limits.stall_timeout,
        idle: limits.idle_timeout,
        shared: shared.clone(),
    };
    let mut reader = BufReader::with_capacity(256 << 10, patient);
    // Replies this thread made, sent before it could wait for the client.
    let mut out: Vec<u8> = Vec::with_capacity(BATCH_BYTES + (64 << 10));
    // The hot reads in `out`, their blocks not yet checked (`answer.send_batch` checks them).
    let mut hot = HotReads::default();
    let result = loop {
        let due = !out.is_empty() && (out.len() >= BATCH_BYTES || !session::request_buffered(reader.buffer()));
        if due && answer.send_batch(&mut out, &mut hot).is_err() {
            break Ok(());
        }
        reader.get_mut().between_requests = reader.buffer().is_empty();
        let req = match session::read_request_header(&mut reader) {
            Ok(req) => req,
            Err(e) => break Err(e),
        };
        let arrived = Instant::now();
        let kind = Kind::of(req.kind);
        if req.kind != session::RequestKind::Disc {
            metrics::page().request(kind, u64::from(req.length));
        }
        // The bytes this request holds until it is answered: its payload or its reply.
        let cost = match req.kind {
            session::RequestKind::Read | session::RequestKind::Write => u64::from(req.length),
            _ => 0,
        };
        let limit = shared.export.payload_limit();
        if req.kind == session::RequestKind::Write && req.length > limit {
            break Err(session::SessionError::PayloadTooLong { handle: req.handle, length: req.length, max: limit });
        }
        // Waits, without reading the socket, while the budgets are spent; what this thread
        // holds back goes out first (its client may need those replies to go on).
        let grant = Grant::take(&budget, &shared.budget, cost, || {
            if !out.is_empty() {
                let _ = answer.send_batch(&mut out, &mut hot);
            }
        });
        // A write to place is read into an aligned buffer, the one its blocks are written from;
        // other writes straight into their entries, behind their headers.
        let placing = req.kind == session::RequestKind::Write && shared.placer.wants(req.offset, u64::from(req.length));
        let mut aligned = None;
        let pieces = match req.kind {
            session::RequestKind::Write if placing => {
                let mut buf = shared.buffers.take();
                if let Err(e) = read_aligned(&mut reader, &mut buf, req.length) {
                    break Err(e);
                }
                aligned = Some(buf);
                Vec::new()
            }
            session::RequestKind::Write => match read_write_pieces(&mut reader, &req) {
                Ok(pieces) => pieces,
                Err(e) => break Err(e),
            },
            _ => Vec::new(),
        };
        if let Some(errno) = session::check_request_for(&req, &shared.export, &negotiated) {
            let chunk = answer.structured && req.kind == session::RequestKind::Read;
            encode_reply(&mut out, &Reply { handle: req.handle, error: errno, chunk });
            metrics::page().error(errno);
            metrics::page().answered(kind, arrived.elapsed());
            continue;
        }
        if let Some(buf) = aligned {
            // Hashed, written and proposed by one of the connection's workers, several at once.
            shared.proposals.placing();
            if reads.send(Work::Place(req, buf, grant, arrived)).is_err() {
                shared.proposals.placed();
                break Ok(());
            }
            continue;
        }
        match req.kind {
            // A small read whose data is cached is answered here; the others run on the
            // connection's readers, several at once: each waits for the device, or (a large
            // one) spends a while checking hashes.
            session::RequestKind::Read => {
                let hot = req.length <= HOT_READ_MAX && answer.read_hot(&req, &mut out, &mut hot);
                if hot {
                    metrics::page().answered(kind, arrived.elapsed());
                }
                if !hot && reads.send(Work::Read(req, grant, arrived)).is_err() {
                    break Ok(());
                }
            }
            session::RequestKind::Write => submit(&answer, req.handle, pieces, grant, (kind, arrived)),
            session::RequestKind::Trim | session::RequestKind::WriteZeroes => {
                submit(&answer, req.handle, vec![range_command(&req)], grant, (kind, arrived));
            }
            // Every acknowledged write is already durable (committed to the log).
            session::RequestKind::Flush => {
                encode(&mut out, req.handle, 0);
                metrics::page().answered(kind, arrived.elapsed());
            }
            // Nothing to prefetch into: reads go through the kernel's page cache of the
            // image, and a read verifies every block anyway.
            session::RequestKind::Cache => {
                encode(&mut out, req.handle, 0);
                metrics::page().answered(kind, arrived.elapsed());
            }
            // A walk of the block map (it may read nodes): on a reader, like a read.
            session::RequestKind::BlockStatus => {
                if reads.send(Work::Status(req, grant, arrived)).is_err() {
                    break Ok(());
                }
            }
            session::RequestKind::Disc => break Ok(()),
            session::RequestKind::Other(_) => {
                encode(&mut out, req.handle, session::NBD_EINVAL);
                metrics::page().error(session::NBD_EINVAL);
                metrics::page().answered(kind, arrived.elapsed());
            }
        }
    };
    if !out.is_empty() {
        let _ = answer.send_batch(&mut out, &mut hot);
    }
    // The readers end when the queue closes; the writer once every reply still owed was sent
    // (write completions and error confirmations hold clones of tx).
    drop(reads);
    for r in readers {
        let _ = r.join();
    }
    drop((tx, answer));
    let _ = stream.shutdown(std::net::Shutdown::Read);
    if writer.join().is_err() {
        warn!(log, "reply writer panicked");
    }
    match result {
        Err(session::SessionError::Closed { .. }) => {
            info!(log, "client disconnected");
            Ok(())
        }
        other => other,
    }
}

/// What answering a request needs, shared by the connection's threads.
#[derive(Clone)]
struct Answer {
    shared: Arc<Shared>,
    conn: u64,
    replies: Arc<Replies>,
    tx: Sender<Reply>,
    /// Structured replies were negotiated: reads are answered with chunks.
    structured: bool,
    /// The id of `base:allocation`, when the client selected it.
    base_allocation: Option<u32>,
}

impl Answer {
    /// Appends the reply to a read to `out`. With `nowait`, only if the data is all cached
    /// (false: nothing appended, ask a reader). An I/O error is answered only once a log
    /// write confirmed the driver is not failing (`confirm_error`).
    fn read(&self, req: &Request, out: &mut Vec<u8>, nowait: bool) -> bool {
        let start = out.len();
        let read = if self.may_have_holes(req) {
            // The block map and the data under one lock, so that the two agree.
            let volume = read_volume(&self.shared.volume);
            match hole_runs(&volume, req) {
                Some(runs) => read_chunks(&volume, req, &runs, out, nowait),
                None => {
                    let data_at = self.reply_head(req, out);
                    read_bytes(&volume, req.offset, &mut out[data_at..], nowait)
                }
            }
        } else {
            // The buffer is grown before the lock is taken, not while writers wait for it.
            let data_at = self.reply_head(req, out);
            let volume = read_volume(&self.shared.volume);
            read_bytes(&volume, req.offset, &mut out[data_at..], nowait)
        };
        match read {
            Ok(true) => true,
            Ok(false) => {
                out.truncate(start);
                false
            }
            Err(_) => {
                // Logged by the volume.
                out.truncate(start);
                self.confirm_error(req.handle, session::NBD_EIO, self.structured);
                true
            }
        }
    }

    /// Appends the reply to a read to `out` if its data is all cached (false: nothing
    /// appended, ask a reader), like `read` with `nowait`; but a read of whole blocks leaves
    /// its blocks' hash checks in `hot`, for `send_batch` to make with those of the other
    /// replies in `out`, side by side (`hash::data_blocks`: 16 blocks at once cost less than
    /// half as much per block as one alone).
    fn read_hot(&self, req: &Request, out: &mut Vec<u8>, hot: &mut HotReads) -> bool {
        let whole = req.offset.is_multiple_of(BLOCK) && u64::from(req.length).is_multiple_of(BLOCK);
        if !whole || self.may_have_holes(req) {
            return self.read(req, out, true);
        }
        let start = out.len();
        let data_at = self.reply_head(req, out);
        let volume = read_volume(&self.shared.volume);
        match volume.try_read_deferred(req.offset, &mut out[data_at..], data_at, hot.reads.len(), &mut hot.checks) {
            Ok(true) => {
                hot.reads.push((req.clone(), start..out.len()));
                true
            }
            Ok(false) => {
                out.truncate(start);
                false
            }
            Err(_) => {
                // Logged by the volume.
                drop(volume);
                out.truncate(start);
                self.confirm_error(req.handle, session::NBD_EIO, self.structured);
                true
            }
        }
    }

    /// Sends the replies in `out` and empties it, once the hot reads among them passed their
    /// hash checks: a read with a block that failed is taken out and read again, from the
    /// media if the cached copy is bad (never wrong data).
    fn send_batch(&self, out: &mut Vec<u8>, hot: &mut HotReads) -> std::io::Result<()> {
        if !hot.checks.is_empty() {
            // Each read's checks carry its place in `hot.reads`.
            let failed = hot.checks.failed(out);
            // Later replies first, so that the earlier ones' places in `out` hold.
            for &i in failed.iter().rev() {
                out.drain(hot.reads[i].1.clone());
            }
            for &i in &failed {
                warn!(self.replies.log, "a cached read failed its check: read again"; "offset" => hot.reads[i].0.offset);
                self.read(&hot.reads[i].0, out, false);
            }
        }
        hot.reads.clear();
        // Sent or not (the connection is then broken), the batch is done with.
        let sent = self.replies.send(out);
        out.clear();
        sent
    }

    /// Whether a read may be answered with hole chunks: structured replies on, no
    /// `NBD_CMD_FLAG_DF`, and long enough for the lookup to pay.
    fn may_have_holes(&self, req: &Request) -> bool {
        self.structured && req.flags & session::NBD_CMD_FLAG_DF == 0 && req.length >= HOLE_READ_MIN
    }

    /// Appends the head of a read's reply with all its data in one piece (a simple reply, or
    /// one data chunk under structured replies) and room for the data; returns where the data
    /// goes.
    fn reply_head(&self, req: &Request, out: &mut Vec<u8>) -> usize {
        self.reply_header(req, out);
        let data_at = out.len();
        out.resize(data_at + req.length as usize, 0);
        data_at
    }

    /// The header of a successful read's reply (one data chunk, or a simple reply).
    fn reply_header(&self, req: &Request, out: &mut Vec<u8>) {
        if self.structured {
            session::encode_read_chunk(out, req.handle, req.offset, req.length);
        } else {
            encode(out, req.handle, 0);
        }
    }

    /// A reader's read: like `read` (waiting for the media), but the data of a reply without
    /// holes goes into `data`, which the reader keeps from one read to the next, so a large
    /// reply's buffer is not zeroed again for every read. Returns how much of `data` is sent
    /// after `out` (0: the reply, if any, is all in `out`).
    fn read_apart(&self, req: &Request, out: &mut Vec<u8>, data: &mut Vec<u8>) -> usize {
        let length = req.length as usize;
        if data.len() < length {
            data.resize(length, 0);
        }
        let start = out.len();
        // The block map and the data under one lock, so that the two agree. Without `nowait`
        // a read never asks to be retried (`Ok(false)`): that would be a bug, answered as EIO.
        let volume = read_volume(&self.shared.volume);
        let read = match self.may_have_holes(req).then(|| hole_runs(&volume, req)).flatten() {
            // Chunks, all in `out`.
            Some(runs) => read_chunks(&volume, req, &runs, out, false).and_then(|done| done.then_some(None).ok_or(())),
            // One data chunk (or a simple reply), its data in `data`.
            None => read_bytes(&volume, req.offset, &mut data[..length], false)
                .and_then(|done| done.then_some(Some(length)).ok_or(())),
        };
        drop(volume);
        match read {
            Ok(None) => 0,
            Ok(Some(sent)) => {
                self.reply_header(req, out);
                sent
            }
            Err(()) => {
                // Logged by the volume; what was appended goes.
                out.truncate(start);
                self.confirm_error(req.handle, session::NBD_EIO, self.structured);
                0
            }
        }
    }

    /// Appends the reply to a block status request to `out`: `base:allocation` of the range
    /// from the block map, as reads see it (so every acknowledged write is in it). Unmapped
    /// ranges are holes that read as zeros; mapped ones are data. At most one extent with
    /// `NBD_CMD_FLAG_REQ_ONE`, else at most `MAX_STATUS_EXTENTS`: the reply may cover less
    /// than asked, never more.
    fn block_status(&self, req: &Request, out: &mut Vec<u8>) {
        let Some(context) = self.base_allocation else {
            // check_request refuses block status without a context; kept as a refusal.
            encode(out, req.handle, session::NBD_EINVAL);
            return;
        };
        let max = if req.flags & session::NBD_CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_STATUS_EXTENTS };
        let volume = read_volume(&self.shared.volume);
        let runs = volume.allocation(req.offset, u64::from(req.length), max);
        drop(volume);
        match runs {
            Ok(runs) if !runs.is_empty() => {
                let extents: Vec<(u32, u32)> = runs
                    .into_iter()
                    // Within the request's u32 length, so each run fits.
                    .map(|(len, mapped)| {
                        let flags = if mapped { 0 } else { session::NBD_STATE_HOLE | session::NBD_STATE_ZERO };
                        (len as u32, flags)
                    })
                    .collect();
                session::encode_block_status(out, req.handle, context, &extents);
            }
            // Not for a valid request (check_request bounds it); answered, not dropped.
            Ok(_) => encode(out, req.handle, session::NBD_EINVAL),
            Err(e) => {
                warn!(self.replies.log, "block status failed"; "offset" => req.offset, "error" => error_chain(&e));
                self.confirm_error(req.handle, session::NBD_EIO, false);
            }
        }
    }

    /// Answers `handle` with `error` once a later log write succeeded. A driver whose device
    /// fails dies on that write (fail-stop) and never sends the error, so the client resends
    /// to the next incarnation instead of passing EIO up; a driver that merely met a bad
    /// block answers within one append.
    /// `chunk`: send it as a structured error chunk (a read's error under structured replies).
    fn confirm_error(&self, handle: u64, error: u32, chunk: bool) {
        let (replies, tx) = (self.replies.clone(), self.tx.clone());
        let done = Box::new(move |outcome: Outcome| {
            if let Outcome::Applied(_) = outcome {
                reply_now_or_later(&replies, &tx, Reply { handle, error, chunk });
            }
        });
        self.shared.proposals.push(self.conn, Proposal { data: Vec::new(), done });
    }
}

/// Reads `buf.len()` bytes at `offset`, of any alignment (a client that did not negotiate
/// block sizes may read single bytes): an unaligned read goes through the 512-byte sectors
/// around it.
pub(crate) fn read_bytes(volume: &Volume, offset: u64, buf: &mut [u8], nowait: bool) -> Result<bool, ()> {
    const SECTOR: u64 = 512;
    let end = offset + buf.len() as u64;
    let read = |at: u64, into: &mut [u8]| {
        if nowait {
            volume.try_read(at, into)
        } else {
            volume.read(at, into).map(|()| true)
        }
    };
    if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
        return read(offset, buf).map_err(drop);
    }
    let first = offset / SECTOR * SECTOR;
    let last = end.div_ceil(SECTOR) * SECTOR;
    let mut around = vec![0u8; (last - first) as usize];
    let done = read(first, &mut around).map_err(drop)?;
    if done {
        let from = (offset - first) as usize;
        buf.copy_from_slice(&around[from..from + buf.len()]);
    }
    Ok(done)
}

/// How a read that may be answered with hole chunks is cut: `(length, mapped)` runs covering
/// it, unmapped ones sent as `OFFSET_HOLE` chunks (12 bytes instead of their zeros). `None`
/// (one data chunk) for a read without holes, or when the block map cannot say (the read then
/// reports the error). Asked under the same lock the read then takes, so the two agree.
fn hole_runs(volume: &Volume, req: &Request) -> Option<Vec<(u64, bool)>> {
    let length = u64::from(req.length);
    let mut runs = volume.allocation(req.offset, length, MAX_READ_CHUNKS).ok()?;
    if runs.iter().all(|r| r.1) {
        return None;
    }
    // What the bounded answer left out is read as data.
    let covered: u64 = runs.iter().map(|r| r.0).sum();
    if covered < length {
        match runs.last_mut() {
            Some(last) if last.1 => last.0 += length - covered,
            _ => runs.push((length - covered, true)),
        }
    }
    Some(runs)
}

/// Appends a structured reply to `req` made of `runs` (covering it in order): data chunks
/// read from the volume, hole chunks for unmapped runs, the last chunk marked done. The
/// result is `read_bytes`'s (on `Ok(false)` or an error the caller drops what was appended).
fn read_chunks(
    volume: &Volume,
    req: &Request,
    runs: &[(u64, bool)],
    out: &mut Vec<u8>,
    nowait: bool,
) -> Result<bool, ()> {
    let mut at = req.offset;
    for (i, &(length, mapped)) in runs.iter().enumerate() {
        let done = i + 1 == runs.len();
        // Each run lies within the request, so its length fits its u32 length.
        let len32 = length as u32;
        if mapped {
            session::encode_data_chunk(out, req.handle, at, len32, done);
            let data_at = out.len();
            out.resize(data_at + length as usize, 0);
            if !read_bytes(volume, at, &mut out[data_at..], nowait)? {
                return Ok(false);
            }
        } else {
            session::encode_hole_chunk(out, req.handle, at, len32, done);
        }
        at += length;
    }
    Ok(true)
}

/// Structured reads at least this long send their holes as hole chunks; shorter ones are
/// one data chunk (looking the holes up would cost more than the zeros it saves).
const HOLE_READ_MIN: u32 = 64 << 10;

/// Chunks one read is cut into at most (the rest goes as data).
const MAX_READ_CHUNKS: usize = 64;

/// The largest read the connection's thread answers itself when its data is cached.
const HOT_READ_MAX: u32 = 128 << 10;

/// How long a write to place waits for blocks while space is short (checkpoints release
/// what earlier writes freed) before it goes inline.
const PLACE_SPACE_WAIT: Duration = Duration::from_secs(2);

/// Extents one block status reply holds at most (8 bytes each): a client cannot make the
/// driver build a large reply, whatever range it asks about; it asks again from where the
/// reply ended.
const MAX_STATUS_EXTENTS: usize = 2048;

/// Reads (and writes to place) served at once per connection.
const READERS_PER_CONNECTION: usize = 4;

/// A reader keeps its reply buffers up to this size between reads; a larger one is freed.
/// It holds a 1 MiB read with its reply header: freeing that buffer after each read cost
/// 1 MiB reads QD4 about a tenth of the driver's CPU in page faults and zeroing fresh pages,
/// and zeroing a kept one before each read another 4 %.
const KEEP_READ_BUFFER: usize = (1 << 20) + 4096;

/// The send buffer asked for each connection (the kernel doubles it for its bookkeeping,
/// and caps it at `net.core.wmem_max`). With the default (about 208 KiB) a 1 MiB reply went
/// out in pieces, the reader waking once per piece the client had taken: 1 MiB reads QD4
/// took about 2.1 GB/s; with this, 2.6–2.9 in the same hour. It is kernel memory a client
/// that stops reading holds until `stall_timeout` drops it: 1 MiB per connection, 64 MiB at
/// the default `max_connections`.
const SEND_BUFFER: usize = 512 << 10;

/// The hot reads answered in the connection's batch of replies whose blocks are still to be
/// checked: each read, and where its reply lies in the batch.
#[derive(Default)]
struct HotReads {
    checks: Checks,
    reads: Vec<(Request, std::ops::Range<usize>)>,
}

/// What the connection's workers do.
enum Work {
    /// A read that waits for the media (or checks many hashes); when its header was read.
    Read(Request, Grant, Instant),
    /// A write to place, its payload read: hash it, write it to lent blocks, propose it.
    Place(Request, AlignedBuf, Grant, Instant),
    /// A block status request: walk the block map.
    Status(Request, Grant, Instant),
}

/// One worker: takes reads and writes to place off the connection's queue until it closes.
/// Each holds its bytes of the budgets until its reply is sent (a write: until applied).
fn serve_work(queue: &Mutex<mpsc::Receiver<Work>>, answer: &Answer) {
    let mut out = Vec::new();
    let mut data = Vec::new();
    loop {
        let next = match queue.lock() {
            Ok(q) => q.recv(),
            Err(_) => return,
        };
        match next {
            Err(_) => return,
            Ok(Work::Read(req, grant, arrived)) => {
                out.clear();
                let sent = answer.read_apart(&req, &mut out, &mut data);
                metrics::page().answered(Kind::Read, arrived.elapsed());
                if !out.is_empty() {
                    let _ = answer.replies.send_parts(&out, &data[..sent]);
                }
                drop(grant);
                if out.capacity() > KEEP_READ_BUFFER {
                    out = Vec::new();
                }
                if data.len() > KEEP_READ_BUFFER {
                    data = Vec::new();
                }
            }
            Ok(Work::Status(req, grant, arrived)) => {
                out.clear();
                answer.block_status(&req, &mut out);
                metrics::page().answered(Kind::BlockStatus, arrived.elapsed());
                if !out.is_empty() {
                    let _ = answer.replies.send(&out);
                }
                drop(grant);
            }
            Ok(Work::Place(req, buf, grant, arrived)) => {
                let shared = &answer.shared;
                match place(shared, req.offset, &buf[..req.length as usize]) {
                    Ok(pieces) => submit(answer, req.handle, pieces, grant, (Kind::Write, arrived)),
                    Err(e) => {
                        // The device failed a write: the driver stops (the supervisor restarts
                        // it); this request is not answered, the client resends it after
                        // reconnecting.
                        error!(answer.replies.log, "writing a placed write failed: the driver stops";
                            "error" => error_chain(&e));
                        shared.proposals.fail(e);
                    }
                }
                shared.proposals.placed();
                shared.buffers.give_back(buf);
            }
        }
    }
}

thread_local! {
    /// While the applier completes a batch (`batch_replies`): the write replies it makes, by
    /// connection.
    static COLLECTING: RefCell<Option<Vec<Collected>>> = const { RefCell::new(None) };
}

/// One connection's replies collected during a batch: encoded, and as the reply writer takes
/// them.
struct Collected {
    replies: Arc<Replies>,
    tx: Sender<Reply>,
    out: Vec<u8>,
    owed: Vec<Reply>,
}

/// Runs `complete` (the applier completing a batch's proposals) and sends the write replies it
/// makes with one system call per connection, or hands them to the connection's reply writer
/// when its socket cannot take them at once. One send per reply was 5–7 % of the driver's CPU
/// under 4 KiB random writes at QD32. (A send of a few KiB to a unix stream socket goes out
/// whole or not at all: it is one buffer of the socket, never a part of one.)
pub fn batch_replies(complete: impl FnOnce()) {
    COLLECTING.with(|c| *c.borrow_mut() = Some(Vec::new()));
    complete();
    let collected = COLLECTING.with(|c| c.borrow_mut().take()).unwrap_or_default();
    for c in collected {
        if !c.replies.try_send_now(&c.out) {
            for r in c.owed {
                let _ = c.tx.send(r);
            }
        }
    }
}

/// Sends a write's reply straight to the client when that cannot wait; else the reply writer.
/// During `batch_replies`, collects it instead.
fn reply_now_or_later(replies: &Arc<Replies>, tx: &Sender<Reply>, reply: Reply) {
    metrics::page().error(reply.error);
    let collected = COLLECTING.with(|c| {
        let mut c = c.borrow_mut();
        let Some(list) = c.as_mut() else { return Some(reply) };
        let at = match list.iter().position(|e| Arc::ptr_eq(&e.replies, replies)) {
            Some(at) => at,
            None => {
                list.push(Collected { replies: replies.clone(), tx: tx.clone(), out: Vec::new(), owed: Vec::new() });
                list.len() - 1
            }
        };
        encode_reply(&mut list[at].out, &reply);
        list[at].owed.push(reply);
        None
    });
    let Some(reply) = collected else { return };
    let mut out = Vec::with_capacity(16);
    encode_reply(&mut out, &reply);
    if !replies.try_send_now(&out) {
        let _ = tx.send(reply);
    }
}

/// Turns a write-type request into proposals (a write in pieces of at most
/// `MAX_ENTRY_DATA`; a trim or write-zeroes of any length is one); the reply goes out when
/// all of them are applied, with the worst error among them. The request's bytes stay taken
/// from the budgets until then.
/// `arrived`: the request's kind and when its header was read, for its latency.
fn submit(answer: &Answer, handle: u64, pieces: Vec<Vec<u8>>, grant: Grant, arrived: (Kind, Instant)) {
    let proposals = answer.shared.proposals.clone();
    let (conn, answer) = (answer.conn, answer.clone());
    propose(&proposals, conn, pieces, move |applied| {
        drop(grant);
        metrics::page().answered(arrived.0, arrived.1.elapsed());
        let error = errno(applied);
        if error == session::NBD_EIO {
            // Damage met while applying: said only once the log proves the driver is
            // not failing as a whole.
            answer.confirm_error(handle, error, false);
        } else {
            reply_now_or_later(&answer.replies, &answer.tx, Reply { handle, error, chunk: false });
        }
    });
}

/// Proposes the commands of one request under queue `conn` (a connection, or a vhost-user
/// ring); `done` runs on the applier once all are applied, with the worst result among them
/// (as NBD ranks their errors), and never if the driver stops first (then it is dropped).
pub fn propose(proposals: &Proposals, conn: u64, pieces: Vec<Vec<u8>>, done: impl FnOnce(Applied) + Send + 'static) {
    if pieces.len() <= 1 {
        let Some(data) = pieces.into_iter().next() else { return done(Applied::Done) };
        let done = Box::new(move |outcome: Outcome| {
            if let Outcome::Applied(applied) = outcome {
                done(applied);
            }
        });
        return proposals.push(conn, Proposal { data, done });
    }
    let state = Arc::new(Mutex::new(Pending { remaining: pieces.len(), worst: Applied::Done, done: Some(done) }));
    for data in pieces {
        let state = state.clone();
        let done = Box::new(move |outcome: Outcome| {
            let Ok(mut s) = state.lock() else { return };
            let Outcome::Applied(applied) = outcome else {
                // The driver stops: the request is never completed.
                s.done = None;
                return;
            };
            if errno(applied) > errno(s.worst) {
                s.worst = applied;
            }
            s.remaining -= 1;
            if s.remaining == 0 {
                let worst = s.worst;
                if let Some(done) = s.done.take() {
                    drop(s);
                    done(worst);
                }
            }
        });
        proposals.push(conn, Proposal { data, done });
    }
}

struct Pending<F> {
    remaining: usize,
    worst: Applied,
    done: Option<F>,
}

fn errno(applied: Applied) -> u32 {
    match applied {
        Applied::Done => 0,
        Applied::NoSpace => session::NBD_ENOSPC,
        Applied::Damaged => session::NBD_EIO,
        Applied::Invalid => session::NBD_EINVAL,
    }
}

/// Reads a write's payload into its commands: pieces of at most `MAX_ENTRY_DATA` bytes that
/// start at `MAX_ENTRY_DATA` boundaries after the first, each read in place behind its
/// command header (no zeroing, no copy).
fn read_write_pieces<R: Read>(r: &mut R, req: &Request) -> Result<Vec<Vec<u8>>, session::SessionError> {
    let end = req.offset + u64::from(req.length);
    let mut out = Vec::with_capacity((req.length as usize).div_ceil(MAX_ENTRY_DATA) + 1);
    let mut at = req.offset;
    while at < end {
        let next = ((at / MAX_ENTRY_DATA as u64 + 1) * MAX_ENTRY_DATA as u64).min(end);
        let len = (next - at) as usize;
        let mut piece = Vec::with_capacity(COMMAND_HEADER + len);
        piece.extend_from_slice(&Command::write_header(at, next - at));
        session::read_appended(r, &mut piece, len)?;
        out.push(piece);
        at = next;
    }
    Ok(out)
}

/// Reads a write's payload of `length` bytes into `buf` (grown when too small).
fn read_aligned<R: Read>(r: &mut R, buf: &mut AlignedBuf, length: u32) -> Result<(), session::SessionError> {
    let length = length as usize;
    if buf.len() < length {
        *buf = AlignedBuf::for_bytes(length);
    }
    let what = "write payload";
    r.read_exact(&mut buf[..length]).map_err(|source| match source.kind() {
        std::io::ErrorKind::UnexpectedEof => session::SessionError::Truncated { what },
        _ => session::SessionError::Io { what, source },
    })
}

/// Writes a write's bytes once, to blocks the volume lends (`Placer::place`), and returns its
/// one entry; when no blocks can be had (space is short) its inline pieces instead.
pub(crate) fn place(shared: &Shared, offset: u64, data: &[u8]) -> Result<Vec<Vec<u8>>, VolumeError> {
    let mut lend = |count| write_volume(&shared.volume).lend(count);
    // Space short for now is mostly freed blocks waiting for the two checkpoints that release
    // them (which the failed loan asked for): wait a while for them before going inline, where
    // a volume that is really full fails the write with ENOSPC.
    let deadline = Instant::now() + PLACE_SPACE_WAIT;
    let placed = loop {
        match shared.placer.place(offset, data, &mut lend)? {
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => break other,
        }
    };
    match placed {
        Some(entry) => Ok(vec![entry]),
        None => Ok(data
            .chunks(MAX_ENTRY_DATA)
            .enumerate()
            .map(|(i, piece)| Command::Write { offset: offset + (i * MAX_ENTRY_DATA) as u64, data: piece }.encode())
            .collect()),
    }
}

/// A trim or write-zeroes as one command for its whole range, whatever its length (applying
/// it costs what the range has mapped).
///
/// WRITE_ZEROES with NO_HOLE is applied like one without: the range reads as zeros and its
/// blocks are unmapped. In a copy-on-write volume every later write goes to a fresh block
/// anyway, so keeping zero blocks allocated would reserve nothing for it; writing them would
/// only cost the client's bandwidth and the device's space.
fn range_command(req: &Request) -> Vec<u8> {
    let (offset, length) = (req.offset, u64::from(req.length));
    match req.kind {
        session::RequestKind::WriteZeroes => Command::WriteZeroes { offset, length }.encode(),
        _ => Command::Trim { offset, length }.encode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: session::RequestKind, flags: u16, offset: u64, length: u32) -> Request {
        Request { handle: 1, kind, flags, offset, length, data: Vec::new() }
    }

    /// Pieces cover the request exactly, in order, none above `MAX_ENTRY_DATA`, and cut at
    /// `MAX_ENTRY_DATA` boundaries so later pieces are block-aligned; a payload cut short is
    /// an error.
    #[test]
    fn write_pieces_cover_the_request_in_entry_sized_pieces() {
        for (offset, length) in [(0u64, 512u32), (512, 4096), (1_048_064, 2_999_808), (7 << 20, 32 << 20)] {
            let r = req(session::RequestKind::Write, 0, offset, length);
            let payload: Vec<u8> = (0..length).map(|i| (i % 251) as u8).collect();
            let mut at = offset;
            let mut data = Vec::new();
            for piece in read_write_pieces(&mut &payload[..], &r).expect("pieces") {
                let Command::Write { offset: o, data: d } = Command::decode(&piece).expect("decode") else {
                    panic!("not a write")
                };
                assert_eq!(o, at);
                assert!(d.len() <= MAX_ENTRY_DATA);
                assert!(o == offset || o % MAX_ENTRY_DATA as u64 == 0);
                at += d.len() as u64;
                data.extend_from_slice(d);
            }
            assert_eq!(at, offset + u64::from(length));
            assert_eq!(data, payload);
            let short = &payload[..payload.len() - 1];
            assert!(matches!(read_write_pieces(&mut &short[..], &r), Err(session::SessionError::Truncated { .. })));
        }
    }

    /// A range command is one small entry whatever its length, NO_HOLE included (finding:
    /// 160 MiB of zeros built in memory per 28-byte request).
    #[test]
    fn range_commands_are_one_entry_of_constant_size() {
        let plain = range_command(&req(session::RequestKind::WriteZeroes, 0, 4096, 8192));
        assert!(matches!(Command::decode(&plain), Ok(Command::WriteZeroes { offset: 4096, length: 8192 })));
        let huge = u32::MAX / 4096 * 4096;
        let no_hole = range_command(&req(session::RequestKind::WriteZeroes, session::NBD_CMD_FLAG_NO_HOLE, 0, huge));
        assert!(no_hole.len() <= 64);
        assert!(
            matches!(Command::decode(&no_hole), Ok(Command::WriteZeroes { offset: 0, length }) if length == u64::from(huge))
        );
        let trim = range_command(&req(session::RequestKind::Trim, 0, 0, huge));
        assert!(matches!(Command::decode(&trim), Ok(Command::Trim { .. })));
    }

    #[test]
    fn outcomes_map_to_nbd_errors() {
        assert_eq!(errno(Applied::Done), 0);
        assert_eq!(errno(Applied::NoSpace), session::NBD_ENOSPC);
        assert_eq!(errno(Applied::Damaged), session::NBD_EIO);
        assert_eq!(errno(Applied::Invalid), session::NBD_EINVAL);
    }
}
