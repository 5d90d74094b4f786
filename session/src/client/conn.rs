//! One connection in the transmission phase: requests written whole under a lock, a reader
//! that hands each reply to the caller waiting on its handle, and the soft disconnect
//! (`NBD_CMD_DISC`), also after the server answered `NBD_ESHUTDOWN`. A connection that fails
//! answers every request waiting on it as lost.

use std::collections::HashMap;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};

use zerocopy::IntoBytes;

use crate::server::RequestKind;
use crate::wire::*;
use crate::{read_full, read_raw, SessionError};

use super::{describe, lock};

/// One connection in the transmission phase.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) socket: UnixStream,
    /// Tells the client's connections apart: a caller whose request was lost on one waits for
    /// a later one.
    pub(super) generation: u64,
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
pub(super) enum Outcome {
    Done(Vec<u8>),
    Failed(u32),
    Lost(String),
}

/// How a connection ended.
#[derive(Debug)]
pub(super) struct Ended {
    pub(super) cause: String,
    /// The server answered a request (other than with `NBD_ESHUTDOWN`).
    pub(super) answered: bool,
    /// Requests were lost, or answered `NBD_ESHUTDOWN`: they are to be sent again.
    pub(super) lost_any: bool,
}

impl Conn {
    pub(super) fn new(socket: UnixStream, generation: u64) -> Conn {
        Conn {
            socket,
            generation,
            write_lock: Mutex::new(()),
            state: Mutex::new(ConnState::default()),
            next_handle: AtomicU64::new(1),
        }
    }

    /// Sends one request and waits for its outcome.
    pub(super) fn request(
        &self,
        command: RequestKind,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Outcome {
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
            let read_len = if command == RequestKind::Read { length } else { 0 };
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
    pub(super) fn read_replies(&self) -> Ended {
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
    pub(super) fn soft_disconnect(&self) -> Result<(), SessionError> {
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
    pub(super) fn close(&self) {
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
