//! An NBD client over a unix socket that many threads share, each with requests in flight, and
//! that can ride out a restart of the server.
//!
//! One connection (`Conn`) carries requests at a time. Requests are written whole under its
//! `write_lock`, so they never interleave on the wire. The client's connection thread reads
//! simple replies and hands each to the caller waiting on its handle; the server may answer in
//! any order (proto.md "Transmission"). When the connection fails, the thread tells every
//! request waiting on it that it was lost, and marks the connection broken under the same lock
//! that admits new requests, so no request is left waiting.
//!
//! What follows depends on [`Options::reconnect`]:
//! - `None` ([`Client::connect`], [`Client::from_stream`]): the broken connection stays; every
//!   lost request and every later one fails with [`SessionError::Disconnected`].
//! - a [`Reconnect`] policy ([`Client::connect_with`]): the connection thread connects to the
//!   same socket path again, with backoff, and negotiates the same export name. Each caller whose
//!   request was lost waits for the new connection and sends its request again there, under a
//!   new handle; requests issued meanwhile wait too. Callers see only latency.
//!
//! Resending is at-least-once: a request whose reply was lost may have taken effect, and then
//! takes effect again. That is harmless for NBD's requests (writing the same bytes twice,
//! reading twice, trimming twice) as long as (a) no other client writes the same blocks
//! meanwhile, and (b) the server applies nothing of a connection after it began serving a newer
//! one — true of a server process that was killed and restarted. Only the caller knows (a), so
//! reconnecting is asked for explicitly, never the default. Likewise, a FLUSH answered on a new
//! connection covers only what the new server holds: writes acknowledged before a crash are
//! safe only with a server that acknowledges a write once it is durable, as rblk's driver does.
//!
//! Rules of the reconnecting client:
//! - An error reply is an answer: it is returned, never retried. The exception is
//!   `NBD_ESHUTDOWN`: the server asks the client to go away (proto.md "Terminating the
//!   transmission phase"), so the client does as without reconnecting (admits no new request on
//!   that connection, lets those in flight finish, sends `NBD_CMD_DISC`) and then treats it as a
//!   dropped connection: the requests answered `NBD_ESHUTDOWN` and those that arrived meanwhile
//!   go out again on the next connection.
//! - The new connection must offer the same export (size, transmission flags, block sizes): the
//!   caller was told them and this client checks requests against them. If it does not, every
//!   waiting and later request fails with [`SessionError::ExportChanged`].
//! - Backoff: the thread waits before each attempt, `initial_backoff` at first, doubling after
//!   every attempt up to `max_backoff`; it starts again from `initial_backoff` only after a
//!   connection answered a request, so a server that accepts and at once drops connections is
//!   not hammered.
//! - Giving up: an outage starts when a connection fails, and ends when a new connection
//!   answers a request; a new connection that fails again without answering any, having lost
//!   requests, does not end it (an idle one that fails starts a new outage). Once an outage has
//!   lasted `give_up_after`, the next failed attempt or lost connection makes the client give up
//!   for good: every waiting and later request fails with [`SessionError::GaveUp`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use zerocopy::big_endian::U32;
use zerocopy::{FromBytes, IntoBytes};

use crate::server::Command;
use crate::wire::*;
use crate::{flush, read_full, read_raw, write_all, SessionError};

/// Size constraints assumed when the server gives none (with `NBD_OPT_EXPORT_NAME`, or a GO
/// without `NBD_INFO_BLOCK_SIZE`): what proto.md "Size constraints" tells a client desiring
/// maximum interoperability to keep to.
pub const DEFAULT_BLOCK_SIZES: (u32, u32, u32) = (512, 4096, PAYLOAD_DOS_LIMIT);

/// Option replies longer than this are not read: ours are a few bytes plus a description.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// The least wait between two attempts, whatever the policy says: never a busy loop.
const MIN_BACKOFF: Duration = Duration::from_millis(1);

/// The least time a reconnect attempt gets for its handshake, even when the give-up time is
/// (nearly) over, so that the last attempt is a real one.
const MIN_HANDSHAKE_TIME: Duration = Duration::from_millis(100);

/// How a client reconnects after its connection fails. See the module documentation for the
/// rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// The wait before the first attempt once a working connection failed.
    pub initial_backoff: Duration,
    /// The wait doubles after every attempt up to this (and is never below 1 ms).
    pub max_backoff: Duration,
    /// How long an outage may last before the client gives up for good. The handshake of an
    /// attempt is bounded by what is left of it (at least 100 ms).
    pub give_up_after: Duration,
}

impl Default for Reconnect {
    /// 10 ms doubling to 1 s, giving up after 60 s.
    fn default() -> Self {
        Reconnect {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            give_up_after: Duration::from_secs(60),
        }
    }
}

/// How [`Client::connect_with`] connects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// `None`: a failed connection stays failed (the behaviour of [`Client::connect`]).
    pub reconnect: Option<Reconnect>,
}

impl Options {
    /// Reconnecting with the [`Reconnect::default`] policy.
    pub fn reconnecting() -> Options {
        Options { reconnect: Some(Reconnect::default()) }
    }
}

/// A connection to an NBD export, usable from many threads at once; with a [`Reconnect`]
/// policy, a series of connections that looks like one.
#[derive(Debug)]
pub struct Client {
    inner: Arc<Inner>,
    /// Reads replies, and reconnects if the client does.
    thread: Option<JoinHandle<()>>,
    /// The export as first negotiated; every later connection must offer the same.
    settled: Settled,
}

/// What the client's callers and its connection thread share.
#[derive(Debug)]
struct Inner {
    /// Where to reconnect to; `None` when the client does not reconnect.
    target: Option<Target>,
    link: Mutex<Link>,
    /// Signalled whenever `link` changes.
    changed: Condvar,
    /// Connections made after the first.
    reconnects: AtomicU64,
}

#[derive(Debug)]
struct Target {
    path: PathBuf,
    export_name: String,
    policy: Reconnect,
}

#[derive(Debug)]
struct Link {
    state: LinkState,
    /// The client is being dropped: the connection thread makes no new connection.
    closing: bool,
    /// A connection in its handshake, so that closing can cut the handshake short.
    handshaking: Option<UnixStream>,
}

#[derive(Debug)]
enum LinkState {
    /// Requests go out on this connection (which may have failed a moment ago: then the
    /// connection thread changes the state soon).
    Up(Arc<Conn>),
    /// The connection failed for this cause and the connection thread is making a new one.
    Down { cause: String },
    /// For good: every request fails.
    Failed(Fatal),
}

/// Why a reconnecting client stopped for good.
#[derive(Debug, Clone)]
enum Fatal {
    Closing,
    GaveUp { waited: Duration, attempts: u32, last: String },
    ExportChanged { what: &'static str, before: u64, after: u64 },
}

impl Fatal {
    fn error(&self) -> SessionError {
        match self {
            Fatal::Closing => SessionError::Disconnected { cause: "the client is closing".into() },
            Fatal::GaveUp { waited, attempts, last } => {
                SessionError::GaveUp { waited: *waited, attempts: *attempts, last: last.clone() }
            }
            &Fatal::ExportChanged { what, before, after } => SessionError::ExportChanged { what, before, after },
        }
    }
}

/// One connection in the transmission phase.
#[derive(Debug)]
struct Conn {
    socket: UnixStream,
    /// Tells the client's connections apart: a caller whose request was lost on one waits for
    /// a later one.
    generation: u64,
    /// Held while one request is written, so requests from different threads never interleave.
    write_lock: Mutex<()>,
    state: Mutex<ConnState>,
    next_handle: AtomicU64,
}

#[derive(Debug, Default)]
struct ConnState {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is unusable, once it is.
    broken: Option<String>,
    /// The server answered `NBD_ESHUTDOWN`: admit no new request, and disconnect once the last
    /// one in flight is answered (proto.md "Terminating the transmission phase").
    shutting_down: bool,
    /// `NBD_CMD_DISC` was sent; nothing more may be (proto.md `NBD_CMD_DISC`).
    disc_sent: bool,
    /// A reply other than `NBD_ESHUTDOWN` arrived: the server did work on this connection.
    answered: bool,
    /// Requests that were waiting when the connection failed.
    lost: usize,
}

#[derive(Debug)]
struct Waiter {
    /// Bytes of data that follow a successful reply: the length of a READ, else 0.
    read_len: u32,
    reply: mpsc::SyncSender<Outcome>,
}

#[derive(Debug)]
enum Outcome {
    Done(Vec<u8>),
    Failed(u32),
    Lost(String),
}

/// How a connection ended.
#[derive(Debug)]
struct Ended {
    cause: String,
    /// The server answered a request (other than with `NBD_ESHUTDOWN`).
    answered: bool,
    /// Requests were lost, or answered `NBD_ESHUTDOWN`: they are to be sent again.
    lost_any: bool,
}

/// The state of the reconnect attempts of one outage.
#[derive(Debug)]
struct Outage {
    since: Instant,
    /// The wait before the next attempt.
    backoff: Duration,
    attempts: u32,
    /// Why the last attempt failed.
    last: String,
}

impl Outage {
    fn new(backoff: Duration) -> Outage {
        Outage { since: Instant::now(), backoff, attempts: 0, last: "no attempt was made".into() }
    }
}

/// What the handshake told the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settled {
    size: u64,
    flags: u16,
    block_sizes: (u32, u32, u32),
}

impl Settled {
    /// The first way in which `now` differs from `self`, if any.
    fn change(&self, now: &Settled) -> Option<Fatal> {
        let fields = [
            ("size", self.size, now.size),
            ("transmission flags", self.flags.into(), now.flags.into()),
            ("minimum block size", self.block_sizes.0.into(), now.block_sizes.0.into()),
            ("preferred block size", self.block_sizes.1.into(), now.block_sizes.1.into()),
            ("maximum payload", self.block_sizes.2.into(), now.block_sizes.2.into()),
        ];
        let (what, before, after) = fields.into_iter().find(|(_, before, after)| before != after)?;
        Some(Fatal::ExportChanged { what, before, after })
    }
}

/// Locks a mutex even if a thread panicked while holding it: the data behind these locks is
/// only changed by code that does not panic half-way, so it is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error with its chain of sources, for messages that outlive the error.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl Client {
    /// Connects to the unix socket at `path` and negotiates `export_name`: `NBD_OPT_GO`
    /// requesting `NBD_INFO_BLOCK_SIZE`, and `NBD_OPT_EXPORT_NAME` only if the server does not
    /// support `NBD_OPT_GO` (no fixed newstyle, or `NBD_REP_ERR_UNSUP`).
    ///
    /// The client does not reconnect: once the connection fails, every request fails with
    /// [`SessionError::Disconnected`]. [`Client::connect_with`] can reconnect.
    pub fn connect(path: &Path, export_name: &str) -> Result<Client, SessionError> {
        Client::connect_with(path, export_name, &Options::default())
    }

    /// Like [`Client::connect`], with `options`. With a [`Reconnect`] policy the first
    /// connection is made the way later ones are: failed attempts are retried with backoff
    /// until `give_up_after`, and then the error is [`SessionError::GaveUp`] naming the last
    /// failure.
    pub fn connect_with(path: &Path, export_name: &str, options: &Options) -> Result<Client, SessionError> {
        let Some(policy) = options.reconnect else {
            let socket = UnixStream::connect(path).map_err(|source| SessionError::Io { what: "connect", source })?;
            return Client::from_stream(socket, export_name);
        };
        // Retrying cannot mend this one.
        if export_name.len() > MAX_STRING {
            return Err(SessionError::InvalidArgument(format!("export name longer than {MAX_STRING} bytes")));
        }
        let target = Target { path: path.to_path_buf(), export_name: export_name.to_string(), policy };
        let inner = Arc::new(Inner::new(Some(target), "not connected yet"));
        // The first attempt goes out at once.
        let mut outage = Outage::new(Duration::ZERO);
        let (conn, settled) = inner.connect_again(&mut outage, 1).map_err(|fatal| fatal.error())?;
        Client::start(inner, conn, settled)
    }

    /// Like [`Client::connect`], over a socket already connected; the client does not
    /// reconnect. Timeouts set on `socket` bound the handshake, and a read timeout also bounds
    /// how long the connection may idle.
    pub fn from_stream(socket: UnixStream, export_name: &str) -> Result<Client, SessionError> {
        let settled = negotiate(&mut &socket, export_name)?;
        let inner = Arc::new(Inner::new(None, "not connected yet"));
        Client::start(inner, Arc::new(Conn::new(socket, 1)), settled)
    }

    /// Puts `conn` to work and starts the connection thread.
    fn start(inner: Arc<Inner>, conn: Arc<Conn>, settled: Settled) -> Result<Client, SessionError> {
        inner.install(&conn, false);
        let thread_inner = Arc::clone(&inner);
        let thread_conn = Arc::clone(&conn);
        let thread = thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || thread_inner.run(thread_conn, settled))
            .map_err(|source| {
                conn.close();
                SessionError::Io { what: "spawn the connection thread", source }
            })?;
        Ok(Client { inner, thread: Some(thread), settled })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.settled.size
    }

    /// Transmission flags (`NBD_FLAG_*`) the server sent.
    pub fn flags(&self) -> u16 {
        self.settled.flags
    }

    /// (minimum, preferred, maximum payload) this client keeps to.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        self.settled.block_sizes
    }

    /// How many times the client connected again after losing a connection.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, SessionError> {
        self.check_range(Command::Read, offset, len.into(), true)?;
        self.call(Command::Read, 0, offset, len, &[])
    }

    /// Writes `data` at `offset`; with `fua` the reply waits until it is persistent.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), SessionError> {
        let len = u32::try_from(data.len())
            .map_err(|_| SessionError::InvalidArgument(format!("write of {} bytes", data.len())))?;
        self.check_range(Command::Write, offset, len.into(), true)?;
        let flags = self.fua_flag(fua)?;
        self.call(Command::Write, flags, offset, len, data).map(drop)
    }

    pub fn flush(&self) -> Result<(), SessionError> {
        self.need(NBD_FLAG_SEND_FLUSH, "NBD_CMD_FLUSH")?;
        self.call(Command::Flush, 0, 0, 0, &[]).map(drop)
    }

    pub fn trim(&self, offset: u64, len: u32) -> Result<(), SessionError> {
        self.need(NBD_FLAG_SEND_TRIM, "NBD_CMD_TRIM")?;
        self.check_range(Command::Trim, offset, len.into(), false)?;
        self.call(Command::Trim, 0, offset, len, &[]).map(drop)
    }

    /// Zeroes `len` bytes at `offset`; with `no_hole` the server must keep them allocated.
    pub fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<(), SessionError> {
        self.need(NBD_FLAG_SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES")?;
        self.check_range(Command::WriteZeroes, offset, len.into(), false)?;
        let flags = if no_hole { NBD_CMD_FLAG_NO_HOLE } else { 0 };
        self.call(Command::WriteZeroes, flags, offset, len, &[]).map(drop)
    }

    /// Ends the session with `NBD_CMD_DISC` (a soft disconnect). Taking the client by value
    /// means no request of this client is in flight, as the spec asks first. Dropping the
    /// client does the same, silently. Fails if there is no working connection to end (also
    /// while a reconnecting client is between connections).
    pub fn disconnect(self) -> Result<(), SessionError> {
        self.close()
        // Drop then joins the connection thread.
    }

    fn need(&self, flag: u16, what: &'static str) -> Result<(), SessionError> {
        if self.settled.flags & flag == 0 {
            return Err(SessionError::Unsupported(what));
        }
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> Result<u16, SessionError> {
        if !fua {
            return Ok(0);
        }
        self.need(NBD_FLAG_SEND_FUA, "NBD_CMD_FLAG_FUA")?;
        Ok(NBD_CMD_FLAG_FUA)
    }

    /// The client's MUSTs of proto.md "Size constraints": offset and length multiples of the
    /// minimum block, within the export, and payloads within the maximum. Zero lengths SHOULD
    /// NOT be sent ("Request types"), so they are refused here too.
    fn check_range(&self, command: Command, offset: u64, len: u64, payload: bool) -> Result<(), SessionError> {
        let (min, _, max) = self.settled.block_sizes;
        let size = self.settled.size;
        let problem = if len == 0 {
            Some("zero length".to_string())
        } else if !offset.is_multiple_of(u64::from(min)) || !len.is_multiple_of(u64::from(min)) {
            Some(format!("not aligned to the minimum block size {min}"))
        } else if payload && len > u64::from(max) {
            Some(format!("longer than the maximum payload {max}"))
        } else if offset.checked_add(len).is_none_or(|end| end > size) {
            Some(format!("beyond the export size {size}"))
        } else {
            None
        };
        match problem {
            Some(why) => Err(SessionError::InvalidArgument(format!("{command:?} at {offset}, length {len}: {why}"))),
            None => Ok(()),
        }
    }

    /// Sends one request and waits for its reply; when reconnecting, sends it again on every
    /// new connection until one answers it.
    fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, SessionError> {
        let reconnecting = self.inner.target.is_some();
        let mut lost_on = None;
        loop {
            let conn = self.inner.usable(lost_on)?;
            match conn.request(command, flags, offset, length, payload) {
                Outcome::Done(data) => return Ok(data),
                // The server is going away: like a dropped connection (see the module docs).
                Outcome::Failed(NBD_ESHUTDOWN) if reconnecting => {}
                Outcome::Failed(errno) => {
                    return Err(SessionError::Nbd { errno, command, offset, length: length.into() });
                }
                Outcome::Lost(cause) if !reconnecting => return Err(SessionError::Disconnected { cause }),
                Outcome::Lost(_) => {}
            }
            lost_on = Some(conn.generation);
        }
    }

    /// Keeps the connection thread from reconnecting, and ends the current connection softly.
    /// Idempotent.
    fn close(&self) -> Result<(), SessionError> {
        let (current, handshaking) = {
            let mut link = lock(&self.inner.link);
            link.closing = true;
            let current = match &link.state {
                LinkState::Up(conn) => Ok(Arc::clone(conn)),
                LinkState::Down { cause } => Err(SessionError::Disconnected { cause: cause.clone() }),
                LinkState::Failed(fatal) => Err(fatal.error()),
            };
            (current, link.handshaking.take())
        };
        self.inner.changed.notify_all();
        if let Some(socket) = handshaking {
            socket.shutdown(Shutdown::Both).ok();
        }
        let conn = current?;
        // A client may end the session only softly, unless the connection already failed
        // (proto.md "Terminating the transmission phase").
        let result = conn.soft_disconnect();
        // Wakes the connection thread (its read returns end of stream), which then fails
        // nothing: no request can be in flight while the client is being closed.
        conn.socket.shutdown(Shutdown::Both).ok();
        result
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // A failure here leaves nothing to do but hang up, which close() did.
        self.close().ok();
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

impl Inner {
    fn new(target: Option<Target>, cause: &str) -> Inner {
        Inner {
            target,
            link: Mutex::new(Link {
                state: LinkState::Down { cause: cause.to_string() },
                closing: false,
                handshaking: None,
            }),
            changed: Condvar::new(),
            reconnects: AtomicU64::new(0),
        }
    }

    /// The connection a request should go out on: the current one, unless it is the one the
    /// request was just lost on; then waits for the next (or for the client to give up).
    fn usable(&self, lost_on: Option<u64>) -> Result<Arc<Conn>, SessionError> {
        let mut link = lock(&self.link);
        loop {
            match &link.state {
                LinkState::Up(conn) if Some(conn.generation) != lost_on => return Ok(Arc::clone(conn)),
                LinkState::Failed(fatal) => return Err(fatal.error()),
                // Down, or Up on the connection that just failed, which the connection thread
                // is about to replace.
                LinkState::Up(_) | LinkState::Down { .. } => {}
            }
            if link.closing {
                return Err(Fatal::Closing.error());
            }
            link = self.changed.wait(link).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The connection thread: reads replies until the connection fails; when reconnecting,
    /// makes a new connection and goes on, until the client closes or gives up.
    fn run(&self, mut conn: Arc<Conn>, settled: Settled) {
        let Some(target) = &self.target else {
            // The broken connection stays in place and answers every later request.
            conn.read_replies();
            return;
        };
        let policy = target.policy;
        let mut outage: Option<Outage> = None;
        loop {
            let ended = conn.read_replies();
            let mut current = outage.take().unwrap_or_else(|| Outage::new(policy.initial_backoff));
            if ended.answered {
                current = Outage::new(policy.initial_backoff);
            } else if !ended.lost_any {
                // An idle connection ended: nobody waited, so no outage went on meanwhile; the
                // backoff still grows, against a server that drops every connection at once.
                current.since = Instant::now();
                current.attempts = 0;
            } else {
                // The connection lost requests and answered none: the outage goes on, with its
                // give-up time and backoff.
                current.last = format!("a connection was lost before it answered anything: {}", ended.cause);
            }
            if !self.set_state(LinkState::Down { cause: ended.cause }) {
                return;
            }
            let fatal = match self.connect_again(&mut current, conn.generation + 1) {
                Ok((new, now)) => {
                    let change = settled.change(&now);
                    if change.is_none() && self.install(&new, true) {
                        conn = new;
                        outage = Some(current);
                        continue;
                    }
                    new.close();
                    change.unwrap_or(Fatal::Closing)
                }
                Err(fatal) => fatal,
            };
            lock(&self.link).state = LinkState::Failed(fatal);
            self.changed.notify_all();
            return;
        }
    }

    /// Makes connections until one completes its handshake, or the outage has lasted the
    /// policy's `give_up_after`, or the client closes.
    fn connect_again(&self, outage: &mut Outage, generation: u64) -> Result<(Arc<Conn>, Settled), Fatal> {
        let Some(target) = &self.target else {
            return Err(Fatal::Closing);
        };
        let policy = target.policy;
        // None: never (a give-up time too far in the future to represent).
        let deadline = outage.since.checked_add(policy.give_up_after);
        let left = |deadline: Option<Instant>| deadline.map(|d| d.saturating_duration_since(Instant::now()));
        loop {
            // Checked before an attempt too: in an outage carried over from connections that
            // were made but answered nothing, attempts may keep succeeding.
            if outage.attempts > 0 && left(deadline) == Some(Duration::ZERO) {
                return Err(Fatal::GaveUp {
                    waited: outage.since.elapsed(),
                    attempts: outage.attempts,
                    last: outage.last.clone(),
                });
            }
            let wait = left(deadline).map_or(outage.backoff, |left| left.min(outage.backoff));
            if !self.pause(wait) {
                return Err(Fatal::Closing);
            }
            outage.attempts += 1;
            let budget = left(deadline).map(|left| left.max(MIN_HANDSHAKE_TIME));
            let result = self.attempt(target, budget, generation);
            outage.backoff =
                outage.backoff.saturating_mul(2).max(policy.initial_backoff).min(policy.max_backoff).max(MIN_BACKOFF);
            match result {
                Ok(Some(made)) => return Ok(made),
                Ok(None) => return Err(Fatal::Closing),
                Err(e) => outage.last = describe(&e),
            }
        }
    }

    /// One connection and handshake, with the handshake bounded by `budget`. `Ok(None)` if the
    /// client is closing.
    fn attempt(
        &self,
        target: &Target,
        budget: Option<Duration>,
        generation: u64,
    ) -> Result<Option<(Arc<Conn>, Settled)>, SessionError> {
        let io = |what| move |source| SessionError::Io { what, source };
        let socket = UnixStream::connect(&target.path).map_err(io("connect"))?;
        // A server that is restarting may accept only much later (the connection waits in the
        // listen backlog meanwhile).
        socket.set_read_timeout(budget).map_err(io("set the handshake timeout"))?;
        socket.set_write_timeout(budget).map_err(io("set the handshake timeout"))?;
        let cut_short = socket.try_clone().map_err(io("clone the connection"))?;
        {
            let mut link = lock(&self.link);
            if link.closing {
                return Ok(None);
            }
            link.handshaking = Some(cut_short);
        }
        let settled = negotiate(&mut &socket, &target.export_name);
        lock(&self.link).handshaking = None;
        let settled = settled?;
        socket.set_read_timeout(None).map_err(io("clear the handshake timeout"))?;
        socket.set_write_timeout(None).map_err(io("clear the handshake timeout"))?;
        Ok(Some((Arc::new(Conn::new(socket, generation)), settled)))
    }

    /// Sleeps for `wait` unless the client closes first; false if it does.
    fn pause(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        let mut link = lock(&self.link);
        loop {
            if link.closing {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            link = match self.changed.wait_timeout(link, until - now) {
                Ok((link, _)) => link,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Makes `conn` the connection requests go out on, unless the client is closing (false).
    fn install(&self, conn: &Arc<Conn>, reconnected: bool) -> bool {
        if !self.set_state(LinkState::Up(Arc::clone(conn))) {
            return false;
        }
        if reconnected {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Sets the link state and wakes whoever waits for it, unless the client is closing.
    fn set_state(&self, state: LinkState) -> bool {
        {
            let mut link = lock(&self.link);
            if link.closing {
                return false;
            }
            link.state = state;
        }
        self.changed.notify_all();
        true
    }
}

impl Conn {
    fn new(socket: UnixStream, generation: u64) -> Conn {
        Conn {
            socket,
            generation,
            write_lock: Mutex::new(()),
            state: Mutex::new(ConnState::default()),
            next_handle: AtomicU64::new(1),
        }
    }

    /// Sends one request and waits for its outcome.
    fn request(&self, command: Command, flags: u16, offset: u64, length: u32, payload: &[u8]) -> Outcome {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut state = lock(&self.state);
            if let Some(cause) = &state.broken {
                return Outcome::Lost(cause.clone());
            }
            if state.shutting_down || state.disc_sent {
                return Outcome::Lost("the server is shutting down".into());
            }
            let read_len = if command == Command::Read { length } else { 0 };
            state.waiters.insert(handle, Waiter { read_len, reply: tx });
        }
        let header = RawRequest {
            magic: NBD_REQUEST_MAGIC.into(),
            flags: flags.into(),
            command: command.to_wire().into(),
            handle: handle.into(),
            offset: offset.into(),
            length: length.into(),
        };
        {
            let writing = lock(&self.write_lock);
            let mut socket = &self.socket;
            let sent = socket.write_all(header.as_bytes()).and_then(|()| socket.write_all(payload));
            if let Err(e) = sent {
                // A request cut short leaves the stream unparseable for the server: end the
                // connection. fail() answers our waiter too.
                drop(writing);
                self.fail(format!("sending a request failed: {e}"));
            }
        }
        // Unreachable while fail() answers every waiter; still, no answer means no reply.
        rx.recv().unwrap_or_else(|mpsc::RecvError| Outcome::Lost("the reply reader is gone".into()))
    }

    /// Dispatches replies until the connection ends, then fails the requests left waiting.
    fn read_replies(&self) -> Ended {
        let cause = match self.dispatch_replies() {
            Ok(()) => "disconnected after NBD_CMD_DISC".to_string(),
            Err(e) => describe(&e),
        };
        self.fail(cause.clone());
        let state = lock(&self.state);
        Ended { cause, answered: state.answered, lost_any: state.lost > 0 || state.shutting_down }
    }

    fn dispatch_replies(&self) -> Result<(), SessionError> {
        let mut socket = &self.socket;
        loop {
            let reply: RawSimpleReply = match read_raw(&mut socket, "reply header") {
                Err(SessionError::Closed { .. }) if lock(&self.state).disc_sent => return Ok(()),
                other => other?,
            };
            if reply.magic.get() != NBD_SIMPLE_REPLY_MAGIC {
                // A structured reply was never negotiated, and anything else is noise: either
                // way the stream cannot be trusted (proto.md "Structured reply chunk message").
                return Err(SessionError::BadMagic {
                    what: "reply header",
                    found: reply.magic.get().into(),
                    expected: NBD_SIMPLE_REPLY_MAGIC.into(),
                });
            }
            let handle = reply.handle.get();
            let error = reply.error.get();
            let Some(waiter) = lock(&self.state).waiters.remove(&handle) else {
                return Err(SessionError::Protocol {
                    what: "reply header",
                    why: format!("reply to handle {handle:#x}, which is not in flight"),
                });
            };
            let outcome = if error != 0 {
                Outcome::Failed(error)
            } else {
                let mut data = vec![0; waiter.read_len as usize];
                if let Err(e) = read_full(&mut socket, &mut data, "read reply data", false) {
                    lock(&self.state).lost += 1;
                    waiter.reply.send(Outcome::Lost(describe(&e))).ok();
                    return Err(e);
                }
                Outcome::Done(data)
            };

            // After NBD_ESHUTDOWN the client MUST disconnect softly, and SHOULD first let the
            // requests in flight finish (proto.md "Terminating the transmission phase"). This
            // is settled before the caller hears of the error, so its next request is refused
            // rather than sent, and the DISC is out before the caller can drop the client.
            let disc_now = {
                let mut state = lock(&self.state);
                state.shutting_down |= error == NBD_ESHUTDOWN;
                state.answered |= error != NBD_ESHUTDOWN;
                let now = state.shutting_down && state.waiters.is_empty() && !state.disc_sent;
                state.disc_sent |= now;
                now
            };
            let disc = if disc_now {
                let _writing = lock(&self.write_lock);
                self.send_disc()
            } else {
                Ok(())
            };
            // The caller may have stopped waiting only by panicking; nothing to do then.
            waiter.reply.send(outcome).ok();
            disc?;
            if disc_now {
                // Nothing is in flight and nothing more may be sent: the connection is done.
                return Ok(());
            }
        }
    }

    /// Sends `NBD_CMD_DISC` unless it was sent already or the connection is gone.
    fn soft_disconnect(&self) -> Result<(), SessionError> {
        let _writing = lock(&self.write_lock);
        {
            let mut state = lock(&self.state);
            if state.disc_sent {
                // Sent before, perhaps by the reader after NBD_ESHUTDOWN.
                return Ok(());
            }
            if let Some(cause) = &state.broken {
                return Err(SessionError::Disconnected { cause: cause.clone() });
            }
            state.disc_sent = true;
        }
        self.send_disc()
    }

    /// Ends the connection, softly if it still works.
    fn close(&self) {
        self.soft_disconnect().ok();
        self.socket.shutdown(Shutdown::Both).ok();
    }

    /// Sends `NBD_CMD_DISC` and closes the sending side: a client MUST NOT send anything after
    /// it. The caller holds `write_lock` and has set `disc_sent`.
    fn send_disc(&self) -> Result<(), SessionError> {
        let disc = RawRequest {
            magic: NBD_REQUEST_MAGIC.into(),
            flags: 0.into(),
            command: NBD_CMD_DISC.into(),
            handle: self.next_handle.fetch_add(1, Ordering::Relaxed).into(),
            offset: 0.into(),
            length: 0.into(),
        };
        let mut socket = &self.socket;
        socket
            .write_all(disc.as_bytes())
            .map_err(|e| SessionError::Disconnected { cause: format!("sending NBD_CMD_DISC failed: {e}") })?;
        self.socket.shutdown(Shutdown::Write).ok();
        Ok(())
    }

    /// Marks the connection broken, shuts the socket down and fails every waiting request.
    fn fail(&self, cause: String) {
        let waiters = {
            let mut state = lock(&self.state);
            state.broken.get_or_insert_with(|| cause.clone());
            state.lost += state.waiters.len();
            std::mem::take(&mut state.waiters)
        };
        // Stops the reader too, if a sender failed first.
        self.socket.shutdown(Shutdown::Both).ok();
        for waiter in waiters.into_values() {
            waiter.reply.send(Outcome::Lost(cause.clone())).ok();
        }
    }
}

/// The client's side of the newstyle handshake: `NBD_OPT_GO` when the server offers fixed
/// newstyle, else (or if GO is unsupported) `NBD_OPT_EXPORT_NAME`.
fn negotiate<S: Read + Write>(stream: &mut S, export_name: &str) -> Result<Settled, SessionError> {
    if export_name.len() > MAX_STRING {
        return Err(SessionError::InvalidArgument(format!("export name longer than {MAX_STRING} bytes")));
    }
    let hello: RawHello = read_raw(stream, "server greeting")?;
    if hello.nbd_magic.get() != NBD_MAGIC {
        return Err(SessionError::BadMagic {
            what: "server greeting",
            found: hello.nbd_magic.get(),
            expected: NBD_MAGIC,
        });
    }
    if hello.opts_magic.get() == NBD_CLISERV_MAGIC {
        return Err(SessionError::Protocol {
            what: "server greeting",
            why: "oldstyle negotiation is not supported".into(),
        });
    }
    if hello.opts_magic.get() != NBD_OPTS_MAGIC {
        return Err(SessionError::BadMagic {
            what: "server greeting",
            found: hello.opts_magic.get(),
            expected: NBD_OPTS_MAGIC,
        });
    }
    let handshake_flags = hello.handshake_flags.get();
    // A client MUST NOT set a flag the server did not offer (proto.md "Client flags").
    let fixed = handshake_flags & NBD_FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = handshake_flags & NBD_FLAG_NO_ZEROES != 0;
    let client_flags =
        if fixed { NBD_FLAG_C_FIXED_NEWSTYLE } else { 0 } | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
    write_all(stream, U32::new(client_flags).as_bytes(), "client flags")?;

    // Without fixed newstyle the only option is NBD_OPT_EXPORT_NAME ("Newstyle negotiation").
    if fixed {
        if let Some(settled) = go(stream, export_name)? {
            return Ok(settled);
        }
    }
    send_option(stream, NBD_OPT_EXPORT_NAME, export_name.as_bytes())?;
    let reply: RawExportNameReply = read_raw(stream, "NBD_OPT_EXPORT_NAME reply")?;
    if !no_zeroes {
        let mut zeroes = [0; EXPORT_NAME_ZEROES];
        read_full(stream, &mut zeroes, "NBD_OPT_EXPORT_NAME reply", false)?;
    }
    settle(reply.size.get(), reply.flags.get(), DEFAULT_BLOCK_SIZES)
}

/// `NBD_OPT_GO` with an `NBD_INFO_BLOCK_SIZE` request. `Ok(None)` if the server does not support
/// it: then the client SHOULD fall back to `NBD_OPT_EXPORT_NAME` (proto.md `NBD_OPT_INFO`).
fn go<S: Read + Write>(stream: &mut S, export_name: &str) -> Result<Option<Settled>, SessionError> {
    // Name length, name, one information request.
    let mut data = (export_name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export_name.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    send_option(stream, NBD_OPT_GO, &data)?;

    let mut export: Option<(u64, u16)> = None;
    let mut block_sizes = None;
    loop {
        let (reply_type, data) = read_option_reply(stream, NBD_OPT_GO)?;
        match reply_type {
            NBD_REP_INFO => {
                let Some((info_type, _)) = data.split_first_chunk::<2>() else {
                    return Err(bad_reply("an NBD_REP_INFO without a type"));
                };
                match u16::from_be_bytes(*info_type) {
                    NBD_INFO_EXPORT => {
                        let info = RawInfoExport::read_from_bytes(&data)
                            .map_err(|_| bad_reply("NBD_INFO_EXPORT of the wrong length"))?;
                        export = Some((info.size.get(), info.flags.get()));
                    }
                    NBD_INFO_BLOCK_SIZE => {
                        let info = RawInfoBlockSize::read_from_bytes(&data)
                            .map_err(|_| bad_reply("NBD_INFO_BLOCK_SIZE of the wrong length"))?;
                        block_sizes = Some((info.min_block.get(), info.preferred_block.get(), info.max_block.get()));
                    }
                    // A client MUST ignore information it does not understand.
                    _ => {}
                }
            }
            NBD_REP_ACK => {
                let (size, flags) = export.ok_or_else(|| bad_reply("NBD_REP_ACK before NBD_INFO_EXPORT"))?;
                return settle(size, flags, block_sizes.unwrap_or(DEFAULT_BLOCK_SIZES)).map(Some);
            }
            NBD_REP_ERR_UNSUP => return Ok(None),
            error if error & NBD_REP_FLAG_ERROR != 0 => {
                return Err(SessionError::OptionRefused {
                    option: NBD_OPT_GO,
                    reply: error,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            other => return Err(bad_reply_owned(format!("unexpected reply type {other:#x} to NBD_OPT_GO"))),
        }
    }
}

/// Checks what the server sent against the spec's rules before trusting it.
fn settle(size: u64, flags: u16, (min, preferred, max): (u32, u32, u32)) -> Result<Settled, SessionError> {
    if flags & NBD_FLAG_HAS_FLAGS == 0 {
        return Err(bad_reply("transmission flags without NBD_FLAG_HAS_FLAGS"));
    }
    let sizes_ok = min.is_power_of_two()
        && min <= MAX_MIN_BLOCK
        && preferred.is_power_of_two()
        && preferred >= min.max(512)
        && max >= preferred;
    if !sizes_ok {
        return Err(bad_reply_owned(format!("invalid block sizes {min}/{preferred}/{max}")));
    }
    Ok(Settled { size, flags, block_sizes: (min, preferred, max) })
}

fn bad_reply(why: &str) -> SessionError {
    bad_reply_owned(why.to_string())
}

fn bad_reply_owned(why: String) -> SessionError {
    SessionError::Protocol { what: "option reply", why }
}

fn send_option<S: Write>(stream: &mut S, option: u32, data: &[u8]) -> Result<(), SessionError> {
    let header = RawOption { magic: NBD_OPTS_MAGIC.into(), option: option.into(), length: (data.len() as u32).into() };
    let mut message = header.as_bytes().to_vec();
    message.extend_from_slice(data);
    write_all(stream, &message, "option")?;
    flush(stream, "option")
}

/// Reads one option reply to `option`: its type and data.
fn read_option_reply<S: Read>(stream: &mut S, option: u32) -> Result<(u32, Vec<u8>), SessionError> {
    let header: RawOptionReply = read_raw(stream, "option reply")?;
    if header.magic.get() != NBD_REP_MAGIC {
        return Err(SessionError::BadMagic {
            what: "option reply",
            found: header.magic.get(),
            expected: NBD_REP_MAGIC,
        });
    }
    if header.option.get() != option {
        return Err(bad_reply_owned(format!("reply to option {} while {option} was sent", header.option.get())));
    }
    let length = header.length.get();
    if length > MAX_OPTION_REPLY {
        return Err(bad_reply_owned(format!("reply of {length} bytes")));
    }
    let mut data = vec![0; length as usize];
    read_full(stream, &mut data, "option reply data", false)?;
    Ok((header.reply_type.get(), data))
}
