//! An NBD client over a unix socket that many threads share, each with requests in flight.
//!
//! Requests are written whole under `write_lock`, so they never interleave on the wire. One
//! reader thread reads simple replies and hands each to the caller waiting on its handle; the
//! server may answer in any order (proto.md "Transmission"). When the connection fails the
//! reader fails every waiting request with [`SessionError::Disconnected`] and marks the
//! connection broken under the same lock that admits new requests, so no request is left
//! waiting and every later one fails at once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};

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

/// A connection to an NBD export, usable from many threads at once.
#[derive(Debug)]
pub struct Client {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    size: u64,
    flags: u16,
    block_sizes: (u32, u32, u32),
}

#[derive(Debug)]
struct Shared {
    socket: UnixStream,
    /// Held while one request is written, so requests from different threads never interleave.
    write_lock: Mutex<()>,
    state: Mutex<State>,
    next_handle: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    waiters: HashMap<u64, Waiter>,
    /// Why the connection is unusable, once it is.
    broken: Option<String>,
    /// The server answered `NBD_ESHUTDOWN`: admit no new request, and disconnect once the last
    /// one in flight is answered (proto.md "Terminating the transmission phase").
    shutting_down: bool,
    /// `NBD_CMD_DISC` was sent; nothing more may be (proto.md `NBD_CMD_DISC`).
    disc_sent: bool,
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

/// What the handshake told the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settled {
    size: u64,
    flags: u16,
    block_sizes: (u32, u32, u32),
}

/// Locks a mutex even if a thread panicked while holding it: the data behind these locks is
/// only changed by code that does not panic half-way, so it is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Client {
    /// Connects to the unix socket at `path` and negotiates `export_name`: `NBD_OPT_GO`
    /// requesting `NBD_INFO_BLOCK_SIZE`, and `NBD_OPT_EXPORT_NAME` only if the server does not
    /// support `NBD_OPT_GO` (no fixed newstyle, or `NBD_REP_ERR_UNSUP`).
    pub fn connect(path: &Path, export_name: &str) -> Result<Client, SessionError> {
        let socket = UnixStream::connect(path).map_err(|source| SessionError::Io { what: "connect", source })?;
        Client::from_stream(socket, export_name)
    }

    /// Like [`Client::connect`], over a socket already connected. Timeouts set on `socket`
    /// bound the handshake, and a read timeout also bounds how long the connection may idle.
    pub fn from_stream(socket: UnixStream, export_name: &str) -> Result<Client, SessionError> {
        let settled = negotiate(&mut &socket, export_name)?;
        let shared = Arc::new(Shared {
            socket,
            write_lock: Mutex::new(()),
            state: Mutex::new(State::default()),
            next_handle: AtomicU64::new(1),
        });
        let reader_shared = Arc::clone(&shared);
        let reader = thread::Builder::new()
            .name("nbd-client-reader".into())
            .spawn(move || reader_shared.read_replies())
            .map_err(|source| SessionError::Io { what: "spawn the reply reader", source })?;
        Ok(Client {
            shared,
            reader: Some(reader),
            size: settled.size,
            flags: settled.flags,
            block_sizes: settled.block_sizes,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags (`NBD_FLAG_*`) the server sent.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// (minimum, preferred, maximum payload) this client keeps to.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        self.block_sizes
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
    /// client does the same, silently.
    pub fn disconnect(self) -> Result<(), SessionError> {
        self.shared.soft_disconnect()
        // Drop then shuts the socket down and joins the reader.
    }

    fn need(&self, flag: u16, what: &'static str) -> Result<(), SessionError> {
        if self.flags & flag == 0 {
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
        let (min, _, max) = self.block_sizes;
        let problem = if len == 0 {
            Some("zero length".to_string())
        } else if !offset.is_multiple_of(u64::from(min)) || !len.is_multiple_of(u64::from(min)) {
            Some(format!("not aligned to the minimum block size {min}"))
        } else if payload && len > u64::from(max) {
            Some(format!("longer than the maximum payload {max}"))
        } else if offset.checked_add(len).is_none_or(|end| end > self.size) {
            Some(format!("beyond the export size {}", self.size))
        } else {
            None
        };
        match problem {
            Some(why) => Err(SessionError::InvalidArgument(format!("{command:?} at {offset}, length {len}: {why}"))),
            None => Ok(()),
        }
    }

    /// Sends one request and waits for its reply.
    fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, SessionError> {
        let handle = self.shared.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut state = lock(&self.shared.state);
            if let Some(cause) = &state.broken {
                return Err(SessionError::Disconnected { cause: cause.clone() });
            }
            if state.shutting_down || state.disc_sent {
                return Err(SessionError::Disconnected { cause: "the server is shutting down".into() });
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
            let writing = lock(&self.shared.write_lock);
            let mut socket = &self.shared.socket;
            let sent = socket.write_all(header.as_bytes()).and_then(|()| socket.write_all(payload));
            if let Err(e) = sent {
                // A request cut short leaves the stream unparseable for the server: end the
                // connection. fail() answers our waiter too.
                drop(writing);
                self.shared.fail(format!("sending a request failed: {e}"));
            }
        }
        match rx.recv() {
            Ok(Outcome::Done(data)) => Ok(data),
            Ok(Outcome::Failed(errno)) => Err(SessionError::Nbd { errno, command, offset, length: length.into() }),
            Ok(Outcome::Lost(cause)) => Err(SessionError::Disconnected { cause }),
            // Unreachable while fail() answers every waiter; still, no answer means no reply.
            Err(mpsc::RecvError) => Err(SessionError::Disconnected { cause: "the reply reader is gone".into() }),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // A client may end the session only softly, unless the connection already failed
        // (proto.md "Termination of the session during option haggling", "Terminating the
        // transmission phase"); a failure here leaves nothing to do but hang up.
        self.shared.soft_disconnect().ok();
        // Wakes the reader (its read returns end of stream), which then fails nothing: no
        // request can be in flight while the client is being dropped.
        self.shared.socket.shutdown(Shutdown::Both).ok();
        if let Some(reader) = self.reader.take() {
            reader.join().ok();
        }
    }
}

impl Shared {
    /// The reader thread: dispatches replies until the connection ends, then fails the rest.
    fn read_replies(&self) {
        let cause = match self.dispatch_replies() {
            Ok(()) => "disconnected after NBD_CMD_DISC".to_string(),
            Err(e) => e.to_string(),
        };
        self.fail(cause);
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
                    waiter.reply.send(Outcome::Lost(e.to_string())).ok();
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
                let now = state.shutting_down && state.waiters.is_empty() && !state.disc_sent;
                state.disc_sent |= now;
                now
            };
            let disc = if disc_now {
                let _writing = lock(&self.write_lock);
                self.send_disc(self.next_handle.fetch_add(1, Ordering::Relaxed))
            } else {
                Ok(())
            };
            // The caller may have stopped waiting only by panicking; nothing to do then.
            waiter.reply.send(outcome).ok();
            disc?;
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
        self.send_disc(self.next_handle.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends `NBD_CMD_DISC` and closes the sending side: a client MUST NOT send anything after
    /// it. The caller holds `write_lock` and has set `disc_sent`.
    fn send_disc(&self, handle: u64) -> Result<(), SessionError> {
        let disc = RawRequest {
            magic: NBD_REQUEST_MAGIC.into(),
            flags: 0.into(),
            command: NBD_CMD_DISC.into(),
            handle: handle.into(),
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
