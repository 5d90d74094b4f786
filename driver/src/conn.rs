//! One NBD connection: the handshake, then a thread that decodes requests and answers what
//! it can at once (cached reads, flushes, errors: replies batched into one send before it
//! would wait for the client), four readers for the other reads, and a reply writer for the
//! write completions the applier could not send itself. Replies go out in whatever order
//! they complete.
//!
//! Reads see every acknowledged write: a write is acknowledged only after it was applied. Writes, trims and write-zeroes become proposals to
//! the Raft node and are answered when their entries are committed and applied, so every
//! acknowledged write is durable and FLUSH has nothing left to wait for. A request the node
//! could not take because the driver is stopping gets no reply at all: the connection drops
//! and the client resends (an error would be final for QEMU).

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, RwLock};

use raft_state::command::Command;
use raft_state::volume::{Applied, Volume};
use session::{Export, Request};
use slog::{debug, info, warn, Logger};

use crate::node::{read_volume, Outcome, Proposal};

/// Largest piece of a write carried by one Raft entry (entries hold a little under 2 MiB).
pub const MAX_ENTRY_DATA: usize = 1 << 20;

/// What every connection shares.
#[derive(Debug)]
pub struct Shared {
    pub volume: Arc<RwLock<Volume>>,
    pub export: Export,
    pub proposals: Sender<Proposal>,
    pub connections: AtomicUsize,
    /// Whether this incarnation answered a request yet (logged once: the supervisor and the
    /// chaos runs measure restart-to-first-served-request from it).
    pub served: std::sync::atomic::AtomicBool,
    pub log: Logger,
}

struct Reply {
    handle: u64,
    error: u32,
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
    /// Sends encoded replies; an error means the client is gone (the reader notices too).
    fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        std::io::Write::write_all(&mut *stream, bytes)?;
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

/// Appends a reply to `out` (writing to a Vec cannot fail).
fn encode(out: &mut Vec<u8>, handle: u64, error: u32, data: &[u8]) {
    let _ = session::write_reply(out, handle, error, data);
}

/// Serves one connection until the client disconnects, misbehaves, or the driver stops.
pub fn serve(stream: UnixStream, shared: Arc<Shared>, id: u64) {
    let log = shared.log.new(slog::o!("conn" => id));
    if let Err(e) = run(stream, &shared, &log) {
        // Logged once per connection; other connections and the volume are unaffected.
        warn!(log, "connection dropped"; "why" => %e);
    }
    shared.connections.fetch_sub(1, Ordering::SeqCst);
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> session::SessionError {
    move |source| session::SessionError::Io { what, source }
}

/// Replies the connection's thread holds back at most before sending them.
const BATCH_BYTES: usize = 256 << 10;

fn run(stream: UnixStream, shared: &Arc<Shared>, log: &Logger) -> Result<(), session::SessionError> {
    let mut hs_stream = stream.try_clone().map_err(io("clone the connection"))?;
    let Some(_negotiated) = session::handshake(&mut hs_stream, &shared.export)? else {
        debug!(log, "client ended the negotiation");
        return Ok(());
    };
    debug!(log, "transmission");
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
                encode(&mut out, first.handle, first.error, &[]);
                while let Ok(r) = rx.try_recv() {
                    encode(&mut out, r.handle, r.error, &[]);
                }
                if completions.send(&out).is_err() {
                    break;
                }
            }
        })
        .map_err(io("start the reply writer"))?;
    let (reads, read_rx) = mpsc::channel::<Request>();
    let read_rx = Arc::new(Mutex::new(read_rx));
    let mut readers = Vec::new();
    for _ in 0..READERS_PER_CONNECTION {
        let (rx, shared, replies) = (read_rx.clone(), shared.clone(), replies.clone());
        let spawned =
            std::thread::Builder::new().name("rblk-read".into()).spawn(move || serve_reads(&rx, &shared, &replies));
        readers.push(spawned.map_err(io("start a reader"))?);
    }
    let mut reader = BufReader::with_capacity(256 << 10, stream.try_clone().map_err(io("clone the connection"))?);
    // Replies this thread made, sent before it could wait for the client.
    let mut out: Vec<u8> = Vec::with_capacity(BATCH_BYTES + (64 << 10));
    let result = loop {
        if !out.is_empty() && (out.len() >= BATCH_BYTES || !session::request_buffered(reader.buffer())) {
            if replies.send(&out).is_err() {
                break Ok(());
            }
            out.clear();
        }
        let req = match session::read_request(&mut reader, shared.export.payload_limit()) {
            Ok(req) => req,
            Err(e) => break Err(e),
        };
        if let Some(errno) = session::check_request(&req, &shared.export) {
            encode(&mut out, req.handle, errno, &[]);
            continue;
        }
        match req.command {
            // A small read whose data is cached is answered here; the others run on the
            // connection's readers, several at once: each waits for the device, or (a large
            // one) spends a while checking hashes.
            session::Command::Read => {
                let hot = req.length <= HOT_READ_MAX && answer_read(shared, &req, &mut out, true);
                if !hot && reads.send(req).is_err() {
                    break Ok(());
                }
            }
            session::Command::Write | session::Command::Trim | session::Command::WriteZeroes => {
                submit(shared, req, tx.clone(), replies.clone());
            }
            // Every acknowledged write is already durable (committed to the log).
            session::Command::Flush => encode(&mut out, req.handle, 0, &[]),
            session::Command::Disc => break Ok(()),
            session::Command::Other(_) => encode(&mut out, req.handle, session::NBD_EINVAL, &[]),
        }
    };
    if !out.is_empty() {
        let _ = replies.send(&out);
    }
    // The readers end when the queue closes; the writer once every reply still owed was sent
    // (write completions hold clones of tx).
    drop(reads);
    for r in readers {
        let _ = r.join();
    }
    drop(tx);
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

/// Appends the reply to a read to `out`: the data, or EIO. With `nowait`, only if the data is
/// all cached (false: nothing appended, ask a reader).
fn answer_read(shared: &Shared, req: &Request, out: &mut Vec<u8>, nowait: bool) -> bool {
    let start = out.len();
    encode(out, req.handle, 0, &[]);
    let data_at = out.len();
    out.resize(data_at + req.length as usize, 0);
    let volume = read_volume(&shared.volume);
    let read = if nowait {
        volume.try_read(req.offset, &mut out[data_at..])
    } else {
        volume.read(req.offset, &mut out[data_at..]).map(|()| true)
    };
    match read {
        Ok(done) => {
            if !done {
                out.truncate(start);
            }
            done
        }
        Err(_) => {
            // Logged by the volume.
            out.truncate(start);
            encode(out, req.handle, session::NBD_EIO, &[]);
            true
        }
    }
}

/// The largest read the connection's thread answers itself when its data is cached.
const HOT_READ_MAX: u32 = 128 << 10;

/// Reads served at once per connection.
const READERS_PER_CONNECTION: usize = 4;

/// One reader: takes read requests off the connection's queue until it closes.
fn serve_reads(queue: &Mutex<mpsc::Receiver<Request>>, shared: &Shared, replies: &Replies) {
    let mut out = Vec::new();
    loop {
        let next = match queue.lock() {
            Ok(q) => q.recv(),
            Err(_) => return,
        };
        let Ok(req) = next else { return };
        out.clear();
        answer_read(shared, &req, &mut out, false);
        let _ = replies.send(&out);
    }
}

/// Turns a write-type request into proposals of at most `MAX_ENTRY_DATA` each; the reply goes
/// out when all of them are applied, with the worst error among them.
fn submit(shared: &Shared, req: Request, tx: Sender<Reply>, replies: Arc<Replies>) {
    let pieces: Vec<Vec<u8>> = split(&req);
    let state =
        Arc::new(Mutex::new(Pending { remaining: pieces.len(), error: 0, stopped: false, tx: Some(tx), replies }));
    let handle = req.handle;
    for data in pieces {
        let state = state.clone();
        let done = Box::new(move |outcome: Outcome| {
            let Ok(mut s) = state.lock() else { return };
            match outcome {
                Outcome::Applied(applied) => s.error = s.error.max(errno(applied)),
                Outcome::Stopped => s.stopped = true,
            }
            s.remaining -= 1;
            if s.remaining == 0 && !s.stopped {
                if let Some(tx) = s.tx.take() {
                    // Straight to the client when that cannot wait; else the reply writer.
                    let mut out = Vec::with_capacity(16);
                    encode(&mut out, handle, s.error, &[]);
                    if !s.replies.try_send_now(&out) {
                        let _ = tx.send(Reply { handle, error: s.error });
                    }
                }
            }
        });
        if let Err(mpsc::SendError(p)) = shared.proposals.send(Proposal { data, done }) {
            // The node has stopped: no reply (the client resends after reconnecting).
            (p.done)(Outcome::Stopped);
        }
    }
}

struct Pending {
    remaining: usize,
    error: u32,
    stopped: bool,
    tx: Option<Sender<Reply>>,
    replies: Arc<Replies>,
}

fn errno(applied: Applied) -> u32 {
    match applied {
        Applied::Done => 0,
        Applied::NoSpace => session::NBD_ENOSPC,
        Applied::Damaged => session::NBD_EIO,
        Applied::Invalid => session::NBD_EINVAL,
    }
}

/// The encoded commands of a request, in pieces of at most `MAX_ENTRY_DATA` bytes that start
/// at block boundaries after the first.
fn split(req: &Request) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let end = req.offset + u64::from(req.length);
    let mut at = req.offset;
    while at < end {
        let next = ((at / MAX_ENTRY_DATA as u64 + 1) * MAX_ENTRY_DATA as u64).min(end);
        let length = next - at;
        let cmd = match req.command {
            session::Command::Write => {
                let from = (at - req.offset) as usize;
                Command::Write { offset: at, data: &req.data[from..from + length as usize] }
            }
            session::Command::Trim => Command::Trim { offset: at, length },
            // NO_HOLE: the zeros must stay allocated, so they are written, not unmapped.
            _ if req.flags & session::NBD_CMD_FLAG_NO_HOLE != 0 => {
                out.push(Command::Write { offset: at, data: &vec![0u8; length as usize] }.encode());
                at = next;
                continue;
            }
            _ => Command::WriteZeroes { offset: at, length },
        };
        out.push(cmd.encode());
        at = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: session::Command, flags: u16, offset: u64, length: u32) -> Request {
        let data = if command == session::Command::Write { (0..length).map(|i| i as u8).collect() } else { Vec::new() };
        Request { handle: 1, command, flags, offset, length, data }
    }

    /// Pieces cover the request exactly, in order, none above `MAX_ENTRY_DATA`, and cut at
    /// 1 MiB boundaries so later pieces are block-aligned.
    #[test]
    fn split_covers_the_request_in_entry_sized_pieces() {
        for (offset, length) in [(0u64, 512u32), (512, 4096), (1_048_064, 2_999_808), (7 << 20, 32 << 20)] {
            let r = req(session::Command::Write, 0, offset, length);
            let mut at = offset;
            let mut data = Vec::new();
            for piece in split(&r) {
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
            assert_eq!(data, r.data);
        }
    }

    #[test]
    fn write_zeroes_unmaps_unless_no_hole() {
        let plain = split(&req(session::Command::WriteZeroes, 0, 4096, 8192));
        assert!(matches!(Command::decode(&plain[0]), Ok(Command::WriteZeroes { offset: 4096, length: 8192 })));
        let no_hole = split(&req(session::Command::WriteZeroes, session::NBD_CMD_FLAG_NO_HOLE, 4096, 8192));
        match Command::decode(&no_hole[0]) {
            Ok(Command::Write { offset: 4096, data }) => assert!(data.len() == 8192 && data.iter().all(|&b| b == 0)),
            other => panic!("{other:?}"),
        }
        let trim = split(&req(session::Command::Trim, 0, 0, 3 << 20));
        assert_eq!(trim.len(), 3);
    }

    #[test]
    fn outcomes_map_to_nbd_errors() {
        assert_eq!(errno(Applied::Done), 0);
        assert_eq!(errno(Applied::NoSpace), session::NBD_ENOSPC);
        assert_eq!(errno(Applied::Damaged), session::NBD_EIO);
        assert_eq!(errno(Applied::Invalid), session::NBD_EINVAL);
    }
}
