//! The block-session protocol: NBD, as specified by the NBD project's `doc/proto.md`.
//!
//! - [`wire`]: the constants of the protocol and the raw byte layouts of its messages;
//! - [`server`]: the server's side as separate pieces the driver composes: [`handshake`]
//!   (fixed newstyle option haggling), [`read_request`], [`check_request_for`], [`write_reply`]
//!   and the structured chunks ([`encode_read_chunk`], [`encode_error_chunk`],
//!   [`encode_block_status`]);
//! - [`client`]: a [`Client`] over a unix socket that keeps many requests in flight from many
//!   threads and, if asked ([`client::Reconnect`]), rides out restarts of the server.
//!
//! This crate knows offsets, lengths and bytes, never what backs them: the driver reads a
//! request, asks [`check_request`] whether the protocol allows it, serves it from its volume and
//! writes the reply.
//!
//! Invariants:
//! - The server advertises only what is true: the transmission flags come from [`Export`]
//!   and whether structured replies were negotiated ([`Export::transmission_flags_for`]), and
//!   [`check_request_for`] follows the flags sent (FUA passes only where it is advertised, DF
//!   only with structured replies, BLOCK_STATUS only with `base:allocation` selected; writes
//!   fail with `NBD_EPERM` where READ_ONLY is).
//! - One export, reached by its name and by ""; any other name is refused.
//! - Structured replies are used only where negotiated, and then only for what needs them
//!   (reads, block status); every other reply is a simple reply, as the spec allows.
//! - A framing error (bad magic, a message cut short, a write payload over the limit) is an
//!   error that ends the connection, because the byte stream cannot be resynchronised after it.
//!   A request the protocol can refuse is answered with an error value and the session goes on.
//! - The client writes each request whole under one lock, so requests never interleave on the
//!   wire; it matches replies to requests by handle, in whatever order they come. A request is
//!   never reported done unless its reply was read, and an error reply is returned as it came
//!   (never retried), except `NBD_ESHUTDOWN` on a reconnecting client.
//! - Without a reconnect policy, every request gets exactly one outcome on one connection: its
//!   reply, or [`SessionError::Disconnected`] once the connection fails (then every waiting
//!   request and every later one gets it). With one, a request lost with its connection is
//!   sent again on the next (at-least-once), and fails only when the client gives up
//!   ([`SessionError::GaveUp`]) or the export changed ([`SessionError::ExportChanged`]).

pub mod client;
pub mod server;
pub mod wire;

use std::io::{self, Read, Write};
use std::time::Duration;

use zerocopy::{FromBytes, IntoBytes};

pub use client::{Client, Options, Reconnect};
pub use server::{
    check_request, check_request_for, encode_block_status, encode_data_chunk, encode_error_chunk, encode_hole_chunk,
    encode_read_chunk, greet, handshake, negotiate, read_appended, read_payload, read_request, read_request_header,
    request_buffered, write_reply, ClientFlags, Export, Negotiated, Request, RequestKind, Step, Tls,
    BASE_ALLOCATION_ID, READ_CHUNK_HEADER,
};
// The protocol's constants (error values, command flags, ...) are used by name throughout the
// driver, as `session::NBD_EIO`.
pub use wire::*;

/// Errors of the session protocol, on either side.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The peer closed the connection cleanly between two messages (a client that went away).
    #[error("the peer closed the connection where {what} was expected")]
    Closed { what: &'static str },
    /// The peer closed the connection in the middle of a message.
    #[error("the connection ended in the middle of {what}")]
    Truncated { what: &'static str },
    #[error("I/O failed on {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("bad magic {found:#x} in {what} (expected {expected:#x})")]
    BadMagic { what: &'static str, found: u64, expected: u64 },
    /// The peer broke a rule of the protocol; the connection cannot go on.
    #[error("protocol violation in {what}: {why}")]
    Protocol { what: &'static str, why: String },
    /// An option longer than the server accepts; the server ends the session rather than read it.
    #[error("option {option} carries {length} bytes of data; at most {max} are accepted")]
    OptionTooLong { option: u32, length: u32, max: u32 },
    /// A write payload over the limit: it cannot be skipped safely, so the connection must drop.
    #[error("write request {handle:#x} carries {length} bytes; at most {max} are accepted")]
    PayloadTooLong { handle: u64, length: u32, max: u32 },
    /// The client asked `NBD_OPT_EXPORT_NAME` for a name the server does not serve; that
    /// option has no error reply, so the session ends (proto.md "Newstyle negotiation").
    #[error("the client asked for export {0:?}, which is not served")]
    UnknownExport(String),
    /// The [`Export`] handed to the server breaks a rule of the spec.
    #[error("export is misconfigured: {0}")]
    BadExport(String),
    /// The server refused an option the client needs.
    #[error("the server refused option {option} with reply {reply:#x}: {message:?}")]
    OptionRefused { option: u32, reply: u32, message: String },
    /// The server did not advertise the feature this call needs.
    #[error("the server does not offer {0}")]
    Unsupported(&'static str),
    /// A request the client must not send, refused before it reaches the wire.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The server answered the request with an NBD error value.
    #[error("{command:?} at offset {offset}, length {length} failed: {} ({errno})", wire::errno_name(*errno))]
    Nbd { errno: u32, command: RequestKind, offset: u64, length: u64 },
    /// The connection failed before this request was answered; the request may or may not have
    /// taken effect and can be sent again on a new connection.
    #[error("the connection to the server is gone ({cause}); the request was not answered")]
    Disconnected { cause: String },
    /// A reconnecting client found no working connection for the give-up time of its
    /// [`Reconnect`] policy; it stays disconnected. The request may or may not have taken effect.
    #[error(
        "no connection to the server for {waited:.1?} ({attempts} attempts, the last failed with: {last}); \
         gave up"
    )]
    GaveUp { waited: Duration, attempts: u32, last: String },
    /// After a reconnect the server offered a different export than at first; the client stays
    /// disconnected, as the caller and the client's checks rely on what was first negotiated.
    #[error("the export's {what} changed across a reconnect from {before} to {after}; the client stopped")]
    ExportChanged { what: &'static str, before: u64, after: u64 },
}

/// Reads a fixed-layout message. End of stream before its first byte is [`SessionError::Closed`]
/// (a clean end between messages); within it, [`SessionError::Truncated`].
pub(crate) fn read_raw<T: FromBytes + IntoBytes, R: Read>(r: &mut R, what: &'static str) -> Result<T, SessionError> {
    let mut raw = T::new_zeroed();
    read_full(r, raw.as_mut_bytes(), what, true)?;
    Ok(raw)
}

/// Fills `buf` from `r`. `at_boundary` says whether a message may cleanly end before `buf`.
pub(crate) fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
    at_boundary: bool,
) -> Result<(), SessionError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_boundary => return Err(SessionError::Closed { what }),
            Ok(0) => return Err(SessionError::Truncated { what }),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(SessionError::Io { what, source }),
        }
    }
    Ok(())
}

pub(crate) fn write_all<W: Write>(w: &mut W, bytes: &[u8], what: &'static str) -> Result<(), SessionError> {
    w.write_all(bytes).map_err(|source| SessionError::Io { what, source })
}

pub(crate) fn flush<W: Write>(w: &mut W, what: &'static str) -> Result<(), SessionError> {
    w.flush().map_err(|source| SessionError::Io { what, source })
}
