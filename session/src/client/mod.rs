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
//!
//! Files: `negotiate.rs` holds the handshake; `conn.rs` one connection (requests out, replies
//! in); `reconnect.rs` the state callers share with the connection thread, and that thread,
//! which reconnects. This file holds the [`Client`] callers use: each request is checked
//! against the export, then sent, and sent again after a lost connection when reconnecting.

mod conn;
mod negotiate;
mod reconnect;

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::server::RequestKind;
use crate::wire::*;
use crate::SessionError;

use conn::{Conn, Outcome};
use negotiate::{negotiate, Settled};
use reconnect::{Inner, LinkState, Outage, Target};

pub use negotiate::DEFAULT_BLOCK_SIZES;
pub use reconnect::Reconnect;

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
        self.check_range(RequestKind::Read, offset, len.into(), true)?;
        self.call(RequestKind::Read, 0, offset, len, &[])
    }

    /// Writes `data` at `offset`; with `fua` the reply waits until it is persistent.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), SessionError> {
        let len = u32::try_from(data.len())
            .map_err(|_| SessionError::InvalidArgument(format!("write of {} bytes", data.len())))?;
        self.check_range(RequestKind::Write, offset, len.into(), true)?;
        let flags = self.fua_flag(fua)?;
        self.call(RequestKind::Write, flags, offset, len, data).map(drop)
    }

    pub fn flush(&self) -> Result<(), SessionError> {
        self.need(NBD_FLAG_SEND_FLUSH, "NBD_CMD_FLUSH")?;
        self.call(RequestKind::Flush, 0, 0, 0, &[]).map(drop)
    }

    pub fn trim(&self, offset: u64, len: u32) -> Result<(), SessionError> {
        self.need(NBD_FLAG_SEND_TRIM, "NBD_CMD_TRIM")?;
        self.check_range(RequestKind::Trim, offset, len.into(), false)?;
        self.call(RequestKind::Trim, 0, offset, len, &[]).map(drop)
    }

    /// Zeroes `len` bytes at `offset`; with `no_hole` the server must keep them allocated.
    pub fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool) -> Result<(), SessionError> {
        self.need(NBD_FLAG_SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES")?;
        self.check_range(RequestKind::WriteZeroes, offset, len.into(), false)?;
        let flags = if no_hole { NBD_CMD_FLAG_NO_HOLE } else { 0 };
        self.call(RequestKind::WriteZeroes, flags, offset, len, &[]).map(drop)
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
    fn check_range(&self, command: RequestKind, offset: u64, len: u64, payload: bool) -> Result<(), SessionError> {
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
        command: RequestKind,
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
