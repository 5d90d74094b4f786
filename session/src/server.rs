//! The server's side of NBD, as pieces the driver composes: the fixed newstyle handshake, then
//! per request [`read_request`] → [`check_request`] → (the driver serves it) → [`write_reply`].
//!
//! There is one export, reached by its name ([`Export::name`]) and by the default name "";
//! other names are refused. The transmission flags are a function of the [`Export`] and of
//! whether structured replies were negotiated, and [`check_request_for`] follows the flags
//! sent, so what is advertised is exactly what is accepted.
//!
//! Structured replies (`NBD_OPT_STRUCTURED_REPLY`) and the `base:allocation` metadata context
//! (`NBD_OPT_SET_META_CONTEXT`) are negotiated here; the driver then answers reads with
//! [`encode_read_chunk`] (one chunk: `NBD_CMD_FLAG_DF` is always honoured) and
//! `NBD_CMD_BLOCK_STATUS` with [`encode_block_status`]. Replies without data stay simple
//! replies, which the spec allows for every command but a read.

use std::fmt;
use std::io::{Read, Write};

use zerocopy::big_endian::U32;
use zerocopy::IntoBytes;

use crate::wire::*;
use crate::{flush, read_full, read_raw, write_all, SessionError};

/// Option data longer than this ends the session: the longest legal option here (`NBD_OPT_GO`
/// with a 4096-byte name and a handful of information requests) is far shorter, and reading an
/// attacker's gigabytes to skip them is not worth it (proto.md "Termination of the session
/// during option haggling": a server MAY hard-disconnect a client it deems a denial of service).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// What the server offers: one export and its size constraints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes; a multiple of `min_block`.
    pub size: u64,
    pub read_only: bool,
    /// Smallest addressable length and alignment (a power of 2, at most 64 KiB).
    pub min_block: u32,
    /// Size and alignment for efficient I/O (a power of 2, at least `min_block` and 512).
    pub preferred_block: u32,
    /// Largest READ or WRITE payload accepted (at least `preferred_block`).
    pub max_block: u32,
    /// Flush and FUA are visible across all connections when answered (`NBD_FLAG_CAN_MULTI_CONN`).
    pub multi_conn: bool,
    /// Shown to humans by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// The name the export is served under; the default export "" reaches it too and any
    /// other name is unknown. `None`: every name reaches it.
    pub name: Option<String>,
}

impl Export {
    /// An export of `size` bytes with 512-byte sectors, 4 KiB preferred blocks and 32 MiB
    /// payloads, writable, single-connection, without description.
    pub fn new(size: u64) -> Self {
        Export {
            size,
            read_only: false,
            min_block: 512,
            preferred_block: 4096,
            max_block: PAYLOAD_DOS_LIMIT,
            multi_conn: false,
            description: None,
            name: None,
        }
    }

    /// Whether a client asking for `name` reaches this export.
    pub fn answers_to(&self, name: &[u8]) -> bool {
        name.is_empty() || self.name.as_ref().is_none_or(|n| n.as_bytes() == name)
    }

    /// The transmission flags advertised for this export to a client that did not negotiate
    /// structured replies. A read-only export does not offer TRIM, WRITE_ZEROES or FUA: it
    /// cannot do them, and the spec forbids advertising what the server does not support
    /// (proto.md "Transmission flags").
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags_for(false)
    }

    /// The transmission flags for a client that did (`structured`) or did not negotiate
    /// structured replies: `NBD_FLAG_SEND_DF` only with them (proto.md: the server MUST NOT
    /// set it otherwise).
    pub fn transmission_flags_for(&self, structured: bool) -> u16 {
        let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
        if structured {
            flags |= NBD_FLAG_SEND_DF;
        }
        if self.read_only {
            flags |= NBD_FLAG_READ_ONLY;
        } else {
            flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
        }
        if self.multi_conn {
            flags |= NBD_FLAG_CAN_MULTI_CONN;
        }
        flags
    }

    /// The write payload [`read_request`] should accept: payloads up to 32 MiB SHOULD NOT be
    /// taken for a denial of service even above `max_block` (proto.md "Size constraints"), so
    /// such a write is read and refused with `NBD_EINVAL` instead of dropping the connection.
    pub fn payload_limit(&self) -> u32 {
        self.max_block.max(PAYLOAD_DOS_LIMIT)
    }

    /// Checks the rules of proto.md "Size constraints" and "Conventions" (strings).
    pub fn validate(&self) -> Result<(), SessionError> {
        let bad = |why: String| Err(SessionError::BadExport(why));
        if !self.min_block.is_power_of_two() || self.min_block > MAX_MIN_BLOCK {
            return bad(format!("minimum block {} is not a power of 2 up to {MAX_MIN_BLOCK}", self.min_block));
        }
        if !self.preferred_block.is_power_of_two() || self.preferred_block < self.min_block.max(512) {
            return bad(format!(
                "preferred block {} is not a power of 2 at least the minimum block {} and 512",
                self.preferred_block, self.min_block
            ));
        }
        if self.max_block < self.preferred_block {
            return bad(format!(
                "maximum payload {} is below the preferred block {}",
                self.max_block, self.preferred_block
            ));
        }
        if !self.size.is_multiple_of(u64::from(self.min_block)) {
            return bad(format!("size {} is not a multiple of the minimum block {}", self.size, self.min_block));
        }
        if let Some(d) = &self.description {
            if d.len() > MAX_STRING || d.contains('\0') {
                return bad(format!("description is longer than {MAX_STRING} bytes or contains NUL"));
            }
        }
        if let Some(n) = &self.name {
            if n.is_empty() || n.len() > MAX_STRING || n.contains('\0') {
                return bad(format!("name is empty, longer than {MAX_STRING} bytes or contains NUL"));
            }
        }
        Ok(())
    }
}

/// What the handshake settled when transmission starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The name the client asked for (the export's name or ""); lossy UTF-8.
    pub export_name: String,
    /// The transmission flags sent to the client.
    pub flags: u16,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    pub client_no_zeroes: bool,
    /// The client entered with `NBD_OPT_GO` and requested `NBD_INFO_BLOCK_SIZE`, so it has
    /// promised to honour the size constraints (proto.md `NBD_INFO_BLOCK_SIZE`). Otherwise
    /// (e.g. `NBD_OPT_EXPORT_NAME`) it may not know them; [`check_request`] refuses what breaks
    /// them either way.
    pub block_size_requested: bool,
    /// Structured replies were negotiated (`NBD_OPT_STRUCTURED_REPLY`): reads are answered
    /// with structured chunks.
    pub structured_replies: bool,
    /// The id under which `base:allocation` was selected (`NBD_OPT_SET_META_CONTEXT`), if it
    /// was: only then is `NBD_CMD_BLOCK_STATUS` served.
    pub base_allocation: Option<u32>,
}

impl Negotiated {
    /// What a client that negotiated nothing but the export and learnt the block sizes has:
    /// simple replies, no metadata context.
    pub fn plain(export: &Export) -> Negotiated {
        Negotiated {
            export_name: String::new(),
            flags: export.transmission_flags(),
            client_no_zeroes: true,
            block_size_requested: true,
            structured_replies: false,
            base_allocation: None,
        }
    }
}

/// The metadata context id `base:allocation` is selected under (the only context).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Server side of the fixed newstyle handshake (proto.md "Fixed newstyle negotiation", "Option
/// types") without TLS: [`greet`], then [`negotiate`] with [`Tls::Off`].
///
/// Returns `Ok(Some(_))` when transmission starts, `Ok(None)` when the client aborted. An error
/// means the connection must be dropped.
pub fn handshake<S: Read + Write>(stream: &mut S, export: &Export) -> Result<Option<Negotiated>, SessionError> {
    let flags = greet(stream, export)?;
    match negotiate(stream, export, flags, Tls::Off)? {
        Step::Go(n) => Ok(Some(n)),
        Step::Aborted => Ok(None),
        Step::StartTls => Err(SessionError::Protocol { what: "STARTTLS", why: "offered without TLS".into() }),
    }
}

/// What the client said in its flags (after [`greet`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientFlags {
    no_zeroes: bool,
}

/// Where TLS stands in a negotiation (proto.md "TLS support").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// No TLS here ("NOTLS mode"): STARTTLS gets `NBD_REP_ERR_UNSUP`.
    Off,
    /// STARTTLS is offered; plaintext clients are served too.
    Offered,
    /// "FORCEDTLS mode": every option but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`
    /// (`NBD_OPT_EXPORT_NAME`, which cannot be refused, drops the connection).
    Required,
    /// The connection is encrypted: a second STARTTLS is `NBD_REP_ERR_INVALID`.
    Active,
}

/// How a negotiation ended.
#[derive(Debug)]
pub enum Step {
    /// Transmission starts.
    Go(Negotiated),
    /// The client aborted.
    Aborted,
    /// STARTTLS was acknowledged: the caller runs the TLS handshake on the stream and then
    /// negotiates again over it with [`Tls::Active`] (what was negotiated before is forgotten).
    StartTls,
}

/// Sends the greeting and reads the client's flags.
pub fn greet<S: Read + Write>(stream: &mut S, export: &Export) -> Result<ClientFlags, SessionError> {
    export.validate()?;
    let hello = RawHello {
        nbd_magic: NBD_MAGIC.into(),
        opts_magic: NBD_OPTS_MAGIC.into(),
        handshake_flags: (NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).into(),
    };
    write_all(stream, hello.as_bytes(), "handshake greeting")?;
    flush(stream, "handshake greeting")?;

    let client_flags = read_raw::<U32, _>(stream, "client flags")?.get();
    // The server MUST drop the connection on a client flag it does not know or did not offer
    // (proto.md "Client flags"). A client without NBD_FLAG_C_FIXED_NEWSTYLE is still served
    // fixed newstyle, which the spec allows.
    if client_flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(SessionError::Protocol { what: "client flags", why: format!("unknown bits in {client_flags:#x}") });
    }
    Ok(ClientFlags { no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0 })
}

/// The option haggling after [`greet`]. Answers:
/// - `NBD_OPT_GO` and `NBD_OPT_INFO` for the export's name or "" (`NBD_INFO_EXPORT`,
///   `NBD_INFO_BLOCK_SIZE`, `NBD_INFO_DESCRIPTION` when the export has one, `NBD_INFO_NAME`
///   when asked); another name gets `NBD_REP_ERR_UNKNOWN`;
/// - `NBD_OPT_EXPORT_NAME` (honouring `NBD_FLAG_C_NO_ZEROES`); an unknown name ends the
///   session ([`SessionError::UnknownExport`]), the only refusal that option has;
/// - `NBD_OPT_LIST` (the export, by its name) and `NBD_OPT_ABORT`;
/// - `NBD_OPT_STRUCTURED_REPLY`, then `NBD_OPT_LIST_META_CONTEXT` and
///   `NBD_OPT_SET_META_CONTEXT` with `base:allocation` (queries in other namespaces select
///   nothing; `base:` lists it);
/// - `NBD_OPT_STARTTLS` as `tls` says (everything negotiated before it is forgotten: the
///   caller negotiates afresh over TLS);
///
/// any other option gets `NBD_REP_ERR_UNSUP` and haggling goes on.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    export: &Export,
    flags: ClientFlags,
    tls: Tls,
) -> Result<Step, SessionError> {
    let client_no_zeroes = flags.no_zeroes;
    let mut structured = false;
    let mut base_allocation = None;
    loop {
        let header: RawOption = read_raw(stream, "option header")?;
        if header.magic.get() != NBD_OPTS_MAGIC {
            return Err(SessionError::BadMagic {
                what: "option header",
                found: header.magic.get(),
                expected: NBD_OPTS_MAGIC,
            });
        }
        let option = header.option.get();
        let length = header.length.get();
        if length > MAX_OPTION_DATA {
            // Tell the client why before hanging up; it may already be gone.
            send_reply(stream, option, NBD_REP_ERR_TOO_BIG, b"option data too long").ok();
            return Err(SessionError::OptionTooLong { option, length, max: MAX_OPTION_DATA });
        }
        let mut data = vec![0; length as usize];
        read_full(stream, &mut data, "option data", false)?;
        let negotiated = |name: &[u8], block_size_requested| Negotiated {
            export_name: String::from_utf8_lossy(name).into_owned(),
            flags: export.transmission_flags_for(structured),
            client_no_zeroes,
            block_size_requested,
            structured_replies: structured,
            base_allocation,
        };

        match (option, tls) {
            (NBD_OPT_STARTTLS, Tls::Off) => {
                send_reply(stream, option, NBD_REP_ERR_UNSUP, b"TLS is not configured")?;
                continue;
            }
            (NBD_OPT_STARTTLS, Tls::Active) => {
                send_reply(stream, option, NBD_REP_ERR_INVALID, b"TLS is already active")?;
                continue;
            }
            (NBD_OPT_STARTTLS, _) if !data.is_empty() => {
                send_reply(stream, option, NBD_REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
                continue;
            }
            (NBD_OPT_STARTTLS, _) => {
                send_reply(stream, option, NBD_REP_ACK, &[])?;
                return Ok(Step::StartTls);
            }
            (NBD_OPT_EXPORT_NAME, Tls::Required) => {
                return Err(SessionError::Protocol { what: "NBD_OPT_EXPORT_NAME", why: "TLS is required".into() });
            }
            (NBD_OPT_ABORT, _) | (_, Tls::Off | Tls::Offered | Tls::Active) => {}
            (_, Tls::Required) => {
                send_reply(stream, option, NBD_REP_ERR_TLS_REQD, b"TLS is required: start it first")?;
                continue;
            }
        }

        match option {
            NBD_OPT_EXPORT_NAME => {
                // This option has no error reply: a server unwilling to serve the name MUST
                // end the session (proto.md "Newstyle negotiation").
                if !export.answers_to(&data) {
                    return Err(SessionError::UnknownExport(String::from_utf8_lossy(&data).into_owned()));
                }
                let flags = export.transmission_flags_for(structured);
                let reply = RawExportNameReply { size: export.size.into(), flags: flags.into() };
                write_all(stream, reply.as_bytes(), "NBD_OPT_EXPORT_NAME reply")?;
                if !client_no_zeroes {
                    write_all(stream, &[0; EXPORT_NAME_ZEROES], "NBD_OPT_EXPORT_NAME reply")?;
                }
                flush(stream, "NBD_OPT_EXPORT_NAME reply")?;
                return Ok(Step::Go(negotiated(&data, false)));
            }
            NBD_OPT_ABORT => {
                // The client may close without waiting for the ACK (proto.md NBD_OPT_ABORT), so a
                // failed send is no error.
                send_reply(stream, option, NBD_REP_ACK, &[]).ok();
                return Ok(Step::Aborted);
            }
            NBD_OPT_LIST if !data.is_empty() => {
                send_reply(stream, option, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
            }
            NBD_OPT_LIST => {
                // NBD_REP_SERVER: name length, name, then the description for humans.
                let name = export.name.as_deref().unwrap_or("");
                let mut server = (name.len() as u32).to_be_bytes().to_vec();
                server.extend_from_slice(name.as_bytes());
                server.extend_from_slice(export.description.as_deref().unwrap_or("").as_bytes());
                send_reply(stream, option, NBD_REP_SERVER, &server)?;
                send_reply(stream, option, NBD_REP_ACK, &[])?;
            }
            NBD_OPT_INFO | NBD_OPT_GO => match parse_info_request(&data) {
                Err(why) => send_reply(stream, option, NBD_REP_ERR_INVALID, why.as_bytes())?,
                Ok((name, _)) if !export.answers_to(name) => {
                    send_reply(stream, option, NBD_REP_ERR_UNKNOWN, b"no export of that name")?;
                }
                Ok((name, requests)) => {
                    send_export_info(stream, option, export, structured, &requests)?;
                    send_reply(stream, option, NBD_REP_ACK, &[])?;
                    if option == NBD_OPT_GO {
                        return Ok(Step::Go(negotiated(name, requests.contains(&NBD_INFO_BLOCK_SIZE))));
                    }
                }
            },
            NBD_OPT_STRUCTURED_REPLY if !data.is_empty() => {
                send_reply(stream, option, NBD_REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
            }
            NBD_OPT_STRUCTURED_REPLY => {
                structured = true;
                send_reply(stream, option, NBD_REP_ACK, &[])?;
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                let set = option == NBD_OPT_SET_META_CONTEXT;
                if set {
                    // Each SET replaces what an earlier one selected, also when it fails.
                    base_allocation = None;
                }
                // The client SHOULD negotiate structured replies first; the server SHOULD
                // answer NBD_REP_ERR_INVALID otherwise (proto.md NBD_OPT_LIST_META_CONTEXT).
                if !structured {
                    send_reply(stream, option, NBD_REP_ERR_INVALID, b"negotiate structured replies first")?;
                    continue;
                }
                match parse_meta_request(&data) {
                    Err(why) => send_reply(stream, option, NBD_REP_ERR_INVALID, why.as_bytes())?,
                    Ok((name, _)) if !export.answers_to(name) => {
                        send_reply(stream, option, NBD_REP_ERR_UNKNOWN, b"no export of that name")?;
                    }
                    Ok((_, queries)) => {
                        if meta_contexts_selected(&queries, set) {
                            let id = if set { BASE_ALLOCATION_ID } else { 0 };
                            let mut context = id.to_be_bytes().to_vec();
                            context.extend_from_slice(BASE_ALLOCATION.as_bytes());
                            send_reply(stream, option, NBD_REP_META_CONTEXT, &context)?;
                            if set {
                                base_allocation = Some(BASE_ALLOCATION_ID);
                            }
                        }
                        send_reply(stream, option, NBD_REP_ACK, &[])?;
                    }
                }
            }
            // Includes NBD_OPT_EXTENDED_HEADERS.
            _ => send_reply(stream, option, NBD_REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// Whether `queries` select `base:allocation`, the only context: by its name, or (listing
/// only) by its namespace `base:` or by asking for no query at all (proto.md "Metadata
/// querying"). Queries in other namespaces, and unknown names in `base:`, select nothing.
fn meta_contexts_selected(queries: &[&[u8]], set: bool) -> bool {
    if queries.is_empty() {
        return !set;
    }
    queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes() || (!set && *q == BASE_NAMESPACE.as_bytes()))
}

/// Splits `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT` data: 32-bit export name
/// length, name, 32-bit number of queries, then each query as a 32-bit length and the string,
/// and nothing after.
fn parse_meta_request(data: &[u8]) -> Result<(&[u8], Vec<&[u8]>), &'static str> {
    let too_short = "option data shorter than its fields";
    fn string(data: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
        let (len, rest) = data.split_first_chunk::<4>().ok_or("option data shorter than its fields")?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > rest.len() || len > MAX_STRING {
            return Err("a string is longer than the option data or the limit");
        }
        Ok(rest.split_at(len))
    }
    let (name, rest) = string(data)?;
    let (count, mut rest) = rest.split_first_chunk::<4>().ok_or(too_short)?;
    let count = u32::from_be_bytes(*count) as usize;
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if count > rest.len() / 4 {
        return Err("query count does not match the option length");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let (query, after) = string(rest)?;
        queries.push(query);
        rest = after;
    }
    if !rest.is_empty() {
        return Err("option data goes on after the last query");
    }
    Ok((name, queries))
}

/// Splits `NBD_OPT_INFO`/`NBD_OPT_GO` data: 32-bit name length, name, 16-bit count, that many
/// 16-bit information requests, and nothing after.
fn parse_info_request(data: &[u8]) -> Result<(&[u8], Vec<u16>), &'static str> {
    let too_short = "option data shorter than its fields";
    let (name_len, rest) = data.split_first_chunk::<4>().ok_or(too_short)?;
    let name_len = u32::from_be_bytes(*name_len) as usize;
    if name_len > rest.len() {
        return Err("name length beyond the option data");
    }
    let (name, rest) = rest.split_at(name_len);
    let (count, rest) = rest.split_first_chunk::<2>().ok_or(too_short)?;
    let count = usize::from(u16::from_be_bytes(*count));
    if rest.len() != 2 * count {
        return Err("information request count does not match the option length");
    }
    let requests = rest.chunks_exact(2).map(|r| u16::from_be_bytes([r[0], r[1]])).collect();
    Ok((name, requests))
}

/// The `NBD_REP_INFO` replies for the one export. `NBD_INFO_BLOCK_SIZE` goes out whether or not
/// it was requested: the spec lets a server send unrequested information (proto.md `NBD_OPT_INFO`)
/// and our constraints are not the defaults, so a client that reads it can follow them. The
/// description goes out whenever there is one, the export's name when `requests` ask for it.
fn send_export_info<S: Write>(
    stream: &mut S,
    option: u32,
    export: &Export,
    structured: bool,
    requests: &[u16],
) -> Result<(), SessionError> {
    let info = RawInfoExport {
        info_type: NBD_INFO_EXPORT.into(),
        size: export.size.into(),
        flags: export.transmission_flags_for(structured).into(),
    };
    send_reply(stream, option, NBD_REP_INFO, info.as_bytes())?;
    let sizes = RawInfoBlockSize {
        info_type: NBD_INFO_BLOCK_SIZE.into(),
        min_block: export.min_block.into(),
        preferred_block: export.preferred_block.into(),
        max_block: export.max_block.into(),
    };
    send_reply(stream, option, NBD_REP_INFO, sizes.as_bytes())?;
    if let Some(description) = &export.description {
        let mut info = NBD_INFO_DESCRIPTION.to_be_bytes().to_vec();
        info.extend_from_slice(description.as_bytes());
        send_reply(stream, option, NBD_REP_INFO, &info)?;
    }
    if let (Some(name), true) = (&export.name, requests.contains(&NBD_INFO_NAME)) {
        let mut info = NBD_INFO_NAME.to_be_bytes().to_vec();
        info.extend_from_slice(name.as_bytes());
        send_reply(stream, option, NBD_REP_INFO, &info)?;
    }
    Ok(())
}

/// One option reply, written whole and flushed.
fn send_reply<S: Write>(stream: &mut S, option: u32, reply_type: u32, data: &[u8]) -> Result<(), SessionError> {
    let header = RawOptionReply {
        magic: NBD_REP_MAGIC.into(),
        option: option.into(),
        reply_type: reply_type.into(),
        length: (data.len() as u32).into(),
    };
    let mut message = header.as_bytes().to_vec();
    message.extend_from_slice(data);
    write_all(stream, &message, "option reply")?;
    flush(stream, "option reply")
}

/// A transmission request type (proto.md "Request types"): what an NBD request asks for. Named
/// apart from the Raft entry payload (`raft_state::command::Command`) that the driver turns
/// writes, trims and zeroings into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
    /// Any other type; it carries no payload and is answered `NBD_EINVAL`.
    Other(u16),
}

impl RequestKind {
    pub fn from_wire(command: u16) -> RequestKind {
        match command {
            NBD_CMD_READ => RequestKind::Read,
            NBD_CMD_WRITE => RequestKind::Write,
            NBD_CMD_DISC => RequestKind::Disc,
            NBD_CMD_FLUSH => RequestKind::Flush,
            NBD_CMD_TRIM => RequestKind::Trim,
            NBD_CMD_WRITE_ZEROES => RequestKind::WriteZeroes,
            NBD_CMD_CACHE => RequestKind::Cache,
            NBD_CMD_BLOCK_STATUS => RequestKind::BlockStatus,
            other => RequestKind::Other(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            RequestKind::Read => NBD_CMD_READ,
            RequestKind::Write => NBD_CMD_WRITE,
            RequestKind::Disc => NBD_CMD_DISC,
            RequestKind::Flush => NBD_CMD_FLUSH,
            RequestKind::Trim => NBD_CMD_TRIM,
            RequestKind::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            RequestKind::Cache => NBD_CMD_CACHE,
            RequestKind::BlockStatus => NBD_CMD_BLOCK_STATUS,
            RequestKind::Other(other) => other,
        }
    }
}

/// One transmission request, framed and decoded but not yet checked against the export.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    pub kind: RequestKind,
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    /// The payload of a WRITE (`length` bytes); empty for every other command.
    pub data: Vec<u8>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("handle", &self.handle)
            .field("kind", &self.kind)
            .field("flags", &self.flags)
            .field("offset", &self.offset)
            .field("length", &self.length)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// Reads one request (proto.md "Request message"), and the payload of a WRITE.
///
/// `max_payload` bounds a WRITE payload; pass [`Export::payload_limit`]. A longer one is
/// [`SessionError::PayloadTooLong`] and the connection must drop, since skipping it would mean
/// reading it. End of stream before a request is [`SessionError::Closed`]: the client went away.
pub fn read_request<R: Read>(r: &mut R, max_payload: u32) -> Result<Request, SessionError> {
    let mut request = read_request_header(r)?;
    read_payload(r, &mut request, max_payload)?;
    Ok(request)
}

/// The first half of [`read_request`]: the header alone, with `data` still empty. A server
/// that budgets memory reads the header, waits until the payload fits its budget, and only
/// then calls [`read_payload`] — until then the payload stays in the socket (backpressure).
pub fn read_request_header<R: Read>(r: &mut R) -> Result<Request, SessionError> {
    let raw: RawRequest = read_raw(r, "request header")?;
    if raw.magic.get() != NBD_REQUEST_MAGIC {
        return Err(SessionError::BadMagic {
            what: "request header",
            found: raw.magic.get().into(),
            expected: NBD_REQUEST_MAGIC.into(),
        });
    }
    let request = Request {
        handle: raw.handle.get(),
        kind: RequestKind::from_wire(raw.command.get()),
        flags: raw.flags.get(),
        offset: raw.offset.get(),
        length: raw.length.get(),
        data: Vec::new(),
    };
    Ok(request)
}

/// The second half of [`read_request`]: the payload of a WRITE into `request.data` (other
/// commands carry none, proto.md "Request message"). A payload above `max_payload` is
/// [`SessionError::PayloadTooLong`]; the connection must drop.
pub fn read_payload<R: Read>(r: &mut R, request: &mut Request, max_payload: u32) -> Result<(), SessionError> {
    if request.kind != RequestKind::Write {
        return Ok(());
    }
    if request.length > max_payload {
        return Err(SessionError::PayloadTooLong { handle: request.handle, length: request.length, max: max_payload });
    }
    request.data = Vec::with_capacity(request.length as usize);
    read_appended(r, &mut request.data, request.length as usize)
}

/// Reads exactly `len` bytes of a write's payload and appends them to `out`, without zeroing
/// them first (a server that frames the payload behind its own header reads it in place).
pub fn read_appended<R: Read>(r: &mut R, out: &mut Vec<u8>, len: usize) -> Result<(), SessionError> {
    let what = "write payload";
    let want = out.len() + len;
    out.reserve_exact(len);
    r.take(len as u64).read_to_end(out).map_err(|source| SessionError::Io { what, source })?;
    if out.len() < want {
        return Err(SessionError::Truncated { what });
    }
    Ok(())
}

/// Whether `buffered` (bytes already received, not yet parsed) holds a whole request, so
/// that `read_request` on them will not wait for the client. A server that answers requests
/// in batches sends its answers before it would wait.
pub fn request_buffered(buffered: &[u8]) -> bool {
    let header = std::mem::size_of::<RawRequest>();
    let Some(raw) = buffered.get(..header).and_then(|b| zerocopy::FromBytes::ref_from_bytes(b).ok()) else {
        return false;
    };
    let raw: &RawRequest = raw;
    raw.command.get() != NBD_CMD_WRITE || buffered.len() - header >= raw.length.get() as usize
}

/// Writes a simple reply (proto.md "Simple reply message") and flushes it. `data` is the result
/// of a successful READ; it is sent only when `error` is 0, since a failed read carries no
/// payload. The caller serialises replies on a shared stream.
pub fn write_reply<W: Write>(w: &mut W, handle: u64, error: u32, data: &[u8]) -> std::io::Result<()> {
    let reply = RawSimpleReply { magic: NBD_SIMPLE_REPLY_MAGIC.into(), error: error.into(), handle: handle.into() };
    w.write_all(reply.as_bytes())?;
    if error == 0 {
        w.write_all(data)?;
    }
    w.flush()
}

/// The checks every request needs before it reaches the volume, in the spec's terms (proto.md
/// "Error values", "Size constraints", "Command flags", "Request types"), for a client that
/// learnt the block sizes and negotiated nothing else ([`Negotiated::plain`]). Returns the
/// error value to answer with, or `None` when the request may be served. See
/// [`check_request_for`].
pub fn check_request(req: &Request, export: &Export) -> Option<u32> {
    check_request_for(req, export, &Negotiated::plain(export))
}

/// [`check_request`] for what the handshake settled: the transmission flags sent, whether the
/// client learnt the size constraints, and the metadata context it selected.
///
/// In order:
/// - an unknown command → `NBD_EINVAL`;
/// - `NBD_CMD_DISC` → `None` (it is never answered);
/// - `NBD_CMD_BLOCK_STATUS` without a selected metadata context → `NBD_EINVAL`;
/// - a flag not valid for the command under the transmission flags sent → `NBD_EINVAL` (FUA
///   on any command when FUA is advertised, NO_HOLE on WRITE_ZEROES, DF on READ when DF is
///   advertised, REQ_ONE on BLOCK_STATUS, nothing else);
/// - WRITE, TRIM or WRITE_ZEROES on a read-only export → `NBD_EPERM`;
/// - FLUSH with a nonzero offset or length → `NBD_EINVAL`; otherwise FLUSH is fine;
/// - length 0 → `NBD_EINVAL` (the spec leaves it unspecified; refusing keeps degenerate
///   requests from the volume without disconnecting);
/// - offset or length not a multiple of the minimum block → `NBD_EINVAL`, unless the client
///   never asked for the block sizes: it may not know them, and the server SHOULD then accept
///   requests of any alignment, down to one byte (proto.md "Size constraints");
/// - READ or WRITE longer than the maximum payload → `NBD_EINVAL` (TRIM, WRITE_ZEROES, CACHE
///   and BLOCK_STATUS may exceed it: they carry no payload);
/// - past the end of the export → `NBD_ENOSPC` for WRITE and WRITE_ZEROES, `NBD_EINVAL` for
///   the others.
pub fn check_request_for(req: &Request, export: &Export, negotiated: &Negotiated) -> Option<u32> {
    let advertised = negotiated.flags;
    let fua = if advertised & NBD_FLAG_SEND_FUA != 0 { NBD_CMD_FLAG_FUA } else { 0 };
    let df = if advertised & NBD_FLAG_SEND_DF != 0 { NBD_CMD_FLAG_DF } else { 0 };
    let allowed_flags = match req.kind {
        RequestKind::Other(_) => return Some(NBD_EINVAL),
        RequestKind::Disc => return None,
        RequestKind::BlockStatus if negotiated.base_allocation.is_none() => return Some(NBD_EINVAL),
        RequestKind::BlockStatus => fua | NBD_CMD_FLAG_REQ_ONE,
        RequestKind::WriteZeroes => fua | NBD_CMD_FLAG_NO_HOLE,
        RequestKind::Read => fua | df,
        RequestKind::Write | RequestKind::Flush | RequestKind::Trim | RequestKind::Cache => fua,
    };
    if req.flags & !allowed_flags != 0 {
        return Some(NBD_EINVAL);
    }
    let writes = matches!(req.kind, RequestKind::Write | RequestKind::Trim | RequestKind::WriteZeroes);
    if writes && export.read_only {
        return Some(NBD_EPERM);
    }
    if req.kind == RequestKind::Flush {
        // Offset and length of a FLUSH are reserved and MUST be zero (proto.md NBD_CMD_FLUSH).
        return (req.offset != 0 || req.length != 0).then_some(NBD_EINVAL);
    }
    if req.length == 0 {
        return Some(NBD_EINVAL);
    }
    let min = if negotiated.block_size_requested { u64::from(export.min_block) } else { 1 };
    if !req.offset.is_multiple_of(min) || !u64::from(req.length).is_multiple_of(min) {
        return Some(NBD_EINVAL);
    }
    if matches!(req.kind, RequestKind::Read | RequestKind::Write) && req.length > export.max_block {
        return Some(NBD_EINVAL);
    }
    let fits = req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= export.size);
    if !fits {
        let past_end =
            if matches!(req.kind, RequestKind::Write | RequestKind::WriteZeroes) { NBD_ENOSPC } else { NBD_EINVAL };
        return Some(past_end);
    }
    None
}

/// Appends the header of a structured reply chunk to `out`; `length` bytes of payload follow.
fn chunk_header(out: &mut Vec<u8>, handle: u64, flags: u16, chunk_type: u16, length: u32) {
    let raw = RawChunk {
        magic: NBD_STRUCTURED_REPLY_MAGIC.into(),
        flags: flags.into(),
        chunk_type: chunk_type.into(),
        handle: handle.into(),
        length: length.into(),
    };
    out.extend_from_slice(raw.as_bytes());
}

/// The bytes [`encode_read_chunk`] puts before the data.
pub const READ_CHUNK_HEADER: usize = size_of::<RawChunk>() + 8;

/// Appends the reply to a successful READ of `length` bytes at `offset` under structured
/// replies, up to its data: one `NBD_REPLY_TYPE_OFFSET_DATA` chunk with `NBD_REPLY_FLAG_DONE`
/// (all of the read in one chunk, as `NBD_CMD_FLAG_DF` asks). The caller appends exactly
/// `length` bytes of data (`READ_CHUNK_HEADER` bytes come before them).
pub fn encode_read_chunk(out: &mut Vec<u8>, handle: u64, offset: u64, length: u32) {
    encode_data_chunk(out, handle, offset, length, true);
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_DATA` chunk header for `length` bytes at `offset`, the
/// last of its reply if `done`; the caller appends exactly `length` bytes of data (at least
/// one). Several such chunks and [`encode_hole_chunk`]s may answer one READ without
/// `NBD_CMD_FLAG_DF`, covering it without overlap.
pub fn encode_data_chunk(out: &mut Vec<u8>, handle: u64, offset: u64, length: u32, done: bool) {
    let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, handle, flags, NBD_REPLY_TYPE_OFFSET_DATA, length.saturating_add(8));
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `length` bytes (nonzero) at `offset` read as
/// zeros; the last chunk of its reply if `done`.
pub fn encode_hole_chunk(out: &mut Vec<u8>, handle: u64, offset: u64, length: u32, done: bool) {
    let flags = if done { NBD_REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, handle, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk: the whole request failed with `error`
/// (nonzero), with `message` for humans (cut to the spec's string limit).
pub fn encode_error_chunk(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let mut cut = message.len().min(MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message.as_bytes()[..cut];
    chunk_header(out, handle, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6 + message.len() as u32);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
}

/// Appends the reply to `NBD_CMD_BLOCK_STATUS`: one final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk
/// for metadata context `context`, with `extents` as `(length, flags)` descriptors (at least
/// one, none of length 0; the caller keeps their sum within the request).
pub fn encode_block_status(out: &mut Vec<u8>, handle: u64, context: u32, extents: &[(u32, u32)]) {
    let length = 4 + 8 * extents.len();
    chunk_header(out, handle, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS, length as u32);
    out.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn export() -> Export {
        Export { max_block: 64 * 1024, ..Export::new(1 << 20) }
    }

    fn req(kind: RequestKind, flags: u16, offset: u64, length: u32) -> Request {
        Request { handle: 7, kind, flags, offset, length, data: Vec::new() }
    }

    fn raw_request(magic: u32, flags: u16, command: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
        let raw = RawRequest {
            magic: magic.into(),
            flags: flags.into(),
            command: command.into(),
            handle: handle.into(),
            offset: offset.into(),
            length: length.into(),
        };
        raw.as_bytes().to_vec()
    }

    // proto.md "Size constraints": a client that did not learn the block sizes may use any
    // alignment (the server SHOULD accept it); every other rule still holds.
    #[test]
    fn clients_without_block_sizes_may_use_any_alignment() {
        use RequestKind::*;
        let rw = export();
        let unknown = Negotiated { block_size_requested: false, ..Negotiated::plain(&rw) };
        let known = Negotiated::plain(&rw);
        for r in [req(Read, 0, 1, 1), req(Write, 0, 4097, 3), req(Trim, 0, 100, 1), req(WriteZeroes, 0, 7, 9)] {
            assert_eq!(check_request_for(&r, &rw, &unknown), None, "{r:?}");
            assert_eq!(check_request_for(&r, &rw, &known), Some(NBD_EINVAL), "{r:?}");
        }
        let past_end = req(Read, 0, rw.size - 1, 2);
        assert_eq!(check_request_for(&past_end, &rw, &unknown), Some(NBD_EINVAL), "past the end");
        assert_eq!(check_request_for(&req(Read, 0, 3, 0), &rw, &unknown), Some(NBD_EINVAL), "zero length");
    }

    // proto.md NBD_CMD_BLOCK_STATUS: only with a selected metadata context (else EINVAL),
    // REQ_ONE is its flag, its length is not bound by the maximum payload, and its range must
    // lie in the export. NBD_CMD_FLAG_DF only on READ and only where NBD_FLAG_SEND_DF was sent
    // (with structured replies). NBD_CMD_CACHE is checked like a read but may exceed the
    // maximum payload.
    #[test]
    fn block_status_df_and_cache_follow_the_negotiation() {
        use RequestKind::*;
        let rw = export();
        let plain = Negotiated::plain(&rw);
        let structured =
            Negotiated { structured_replies: true, flags: rw.transmission_flags_for(true), ..Negotiated::plain(&rw) };
        let status = Negotiated { base_allocation: Some(BASE_ALLOCATION_ID), ..structured.clone() };
        let size = rw.size;
        let cases: &[(&str, &Negotiated, Request, Option<u32>)] = &[
            ("block status, no context", &plain, req(BlockStatus, 0, 0, 4096), Some(NBD_EINVAL)),
            ("block status, structured but no context", &structured, req(BlockStatus, 0, 0, 4096), Some(NBD_EINVAL)),
            ("block status", &status, req(BlockStatus, 0, 0, 4096), None),
            ("block status, REQ_ONE", &status, req(BlockStatus, NBD_CMD_FLAG_REQ_ONE, 0, 4096), None),
            ("block status of the whole export", &status, req(BlockStatus, 0, 0, size as u32), None),
            ("block status, DF", &status, req(BlockStatus, NBD_CMD_FLAG_DF, 0, 4096), Some(NBD_EINVAL)),
            ("block status past the end", &status, req(BlockStatus, 0, size - 512, 1024), Some(NBD_EINVAL)),
            ("block status, zero length", &status, req(BlockStatus, 0, 0, 0), Some(NBD_EINVAL)),
            ("block status, unaligned", &status, req(BlockStatus, 0, 100, 512), Some(NBD_EINVAL)),
            ("read, DF, simple replies", &plain, req(Read, NBD_CMD_FLAG_DF, 0, 4096), Some(NBD_EINVAL)),
            ("read, DF, structured", &structured, req(Read, NBD_CMD_FLAG_DF, 0, 4096), None),
            ("write, DF", &structured, req(Write, NBD_CMD_FLAG_DF, 0, 4096), Some(NBD_EINVAL)),
            ("read, REQ_ONE", &status, req(Read, NBD_CMD_FLAG_REQ_ONE, 0, 4096), Some(NBD_EINVAL)),
            ("cache", &plain, req(Cache, 0, 0, 4096), None),
            ("cache above max payload", &plain, req(Cache, 0, 0, 1 << 20), None),
            ("cache past the end", &plain, req(Cache, 0, size, 512), Some(NBD_EINVAL)),
            ("cache, unaligned", &plain, req(Cache, 0, 7, 512), Some(NBD_EINVAL)),
            ("cache, NO_HOLE", &plain, req(Cache, NBD_CMD_FLAG_NO_HOLE, 0, 512), Some(NBD_EINVAL)),
        ];
        for (what, negotiated, r, want) in cases {
            assert_eq!(check_request_for(r, &rw, negotiated), *want, "{what}");
        }
        // CACHE on a read-only export is a read: allowed.
        let ro = Export { read_only: true, ..export() };
        assert_eq!(check_request(&req(Cache, 0, 0, 4096), &ro), None);
    }

    // proto.md "Structured reply chunk message": magic, flags, type, cookie, length, payload;
    // OFFSET_DATA carries the offset then the data, ERROR the error, the message length and
    // the message, BLOCK_STATUS the context id then (length, flags) descriptors. Each is the
    // final chunk here (NBD_REPLY_FLAG_DONE).
    #[test]
    fn structured_chunks_are_laid_out_as_the_spec_says() {
        let head = |flags: u16, ty: u16, len: u32| {
            let mut h = vec![0x66, 0x8e, 0x33, 0xef];
            h.extend_from_slice(&flags.to_be_bytes());
            h.extend_from_slice(&ty.to_be_bytes());
            h.extend_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h
        };
        let mut out = Vec::new();
        encode_read_chunk(&mut out, 0x0102_0304_0506_0708, 4096, 4);
        assert_eq!(out.len(), READ_CHUNK_HEADER);
        assert_eq!(out, [head(1, 1, 12), 4096u64.to_be_bytes().to_vec()].concat());

        let mut out = Vec::new();
        encode_data_chunk(&mut out, 0x0102_0304_0506_0708, 512, 4, false);
        encode_hole_chunk(&mut out, 0x0102_0304_0506_0708, 516, 8192, true);
        let hole = [&516u64.to_be_bytes()[..], &8192u32.to_be_bytes()].concat();
        assert_eq!(out, [head(0, 1, 12), 512u64.to_be_bytes().to_vec(), head(1, 2, 12), hole].concat());

        let mut out = Vec::new();
        encode_error_chunk(&mut out, 0x0102_0304_0506_0708, NBD_EIO, "bad");
        assert_eq!(out, [head(1, 0x8001, 9), vec![0, 0, 0, 5, 0, 3], b"bad".to_vec()].concat());
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 0x0102_0304_0506_0708, NBD_EIO, &"é".repeat(3000));
        assert_eq!(out.len(), 20 + 6 + 4096, "the message is cut to the string limit");

        let mut out = Vec::new();
        encode_block_status(&mut out, 0x0102_0304_0506_0708, 1, &[(4096, 0), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO)]);
        let descriptors = [0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 3];
        assert_eq!(out, [head(1, 5, 20), descriptors.to_vec()].concat());
    }

    // proto.md "Error values": reads and trims past the end are EINVAL, writes (and write
    // zeroes, "NBD_CMD_WRITE_ZEROES") past the end ENOSPC; unaligned requests EINVAL; writes and
    // trims on a read-only export EPERM; unknown commands and flags EINVAL.
    #[test]
    fn check_request_follows_the_error_values_section() {
        use RequestKind::*;
        let rw = export();
        let ro = Export { read_only: true, ..export() };
        let size = rw.size;
        let cases: &[(&str, &Export, Request, Option<u32>)] = &[
            ("aligned read", &rw, req(Read, 0, 4096, 4096), None),
            ("read to the very end", &rw, req(Read, 0, size - 512, 512), None),
            ("read past the end", &rw, req(Read, 0, size - 512, 1024), Some(NBD_EINVAL)),
            ("read offset+length overflows", &rw, req(Read, 0, u64::MAX - 511, 1024), Some(NBD_EINVAL)),
            ("read at the end", &rw, req(Read, 0, size, 512), Some(NBD_EINVAL)),
            ("trim past the end", &rw, req(Trim, 0, size, 512), Some(NBD_EINVAL)),
            ("write past the end", &rw, req(Write, 0, size, 512), Some(NBD_ENOSPC)),
            ("write zeroes past the end", &rw, req(WriteZeroes, 0, size - 512, 1024), Some(NBD_ENOSPC)),
            ("unaligned offset", &rw, req(Read, 0, 100, 512), Some(NBD_EINVAL)),
            ("unaligned length", &rw, req(Write, 0, 0, 100), Some(NBD_EINVAL)),
            ("unaligned trim", &rw, req(Trim, 0, 256, 512), Some(NBD_EINVAL)),
            ("zero-length read", &rw, req(Read, 0, 0, 0), Some(NBD_EINVAL)),
            ("zero-length write zeroes", &rw, req(WriteZeroes, 0, 0, 0), Some(NBD_EINVAL)),
            // "Size constraints": READ/WRITE MUST NOT exceed the maximum payload; TRIM and
            // WRITE_ZEROES MAY, and the server SHOULD NOT refuse them only for that.
            ("read above max payload", &rw, req(Read, 0, 0, 128 * 1024), Some(NBD_EINVAL)),
            ("write above max payload", &rw, req(Write, 0, 0, 128 * 1024), Some(NBD_EINVAL)),
            ("trim above max payload", &rw, req(Trim, 0, 0, 128 * 1024), None),
            ("write zeroes above max payload", &rw, req(WriteZeroes, 0, 0, 128 * 1024), None),
            ("write on read-only", &ro, req(Write, 0, 0, 512), Some(NBD_EPERM)),
            ("trim on read-only", &ro, req(Trim, 0, 0, 512), Some(NBD_EPERM)),
            ("write zeroes on read-only", &ro, req(WriteZeroes, 0, 0, 512), Some(NBD_EPERM)),
            ("read on read-only", &ro, req(Read, 0, 0, 512), None),
            ("flush on read-only", &ro, req(Flush, 0, 0, 0), None),
            // NBD_CMD_FLUSH: offset and length MUST be zero.
            ("flush", &rw, req(Flush, 0, 0, 0), None),
            ("flush with offset", &rw, req(Flush, 0, 512, 0), Some(NBD_EINVAL)),
            ("flush with length", &rw, req(Flush, 0, 0, 512), Some(NBD_EINVAL)),
            // "Command flags": FUA is valid on every command once NBD_FLAG_SEND_FUA is
            // advertised; NO_HOLE only on WRITE_ZEROES; DF, REQ_ONE, FAST_ZERO need flags this
            // server never advertises.
            ("write with FUA", &rw, req(Write, NBD_CMD_FLAG_FUA, 0, 512), None),
            ("flush with FUA", &rw, req(Flush, NBD_CMD_FLAG_FUA, 0, 0), None),
            ("read with FUA", &rw, req(Read, NBD_CMD_FLAG_FUA, 0, 512), None),
            ("FUA not advertised (read-only)", &ro, req(Read, NBD_CMD_FLAG_FUA, 0, 512), Some(NBD_EINVAL)),
            ("write zeroes with NO_HOLE", &rw, req(WriteZeroes, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA, 0, 512), None),
            ("write with NO_HOLE", &rw, req(Write, NBD_CMD_FLAG_NO_HOLE, 0, 512), Some(NBD_EINVAL)),
            ("read with DF", &rw, req(Read, NBD_CMD_FLAG_DF, 0, 512), Some(NBD_EINVAL)),
            ("write zeroes with FAST_ZERO", &rw, req(WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 0, 512), Some(NBD_EINVAL)),
            ("unknown flag", &rw, req(Read, 1 << 15, 0, 512), Some(NBD_EINVAL)),
            // "Error values": an unknown command is EINVAL; CACHE and BLOCK_STATUS are not offered.
            ("cache", &rw, req(Other(NBD_CMD_CACHE), 0, 0, 512), Some(NBD_EINVAL)),
            ("block status", &rw, req(Other(NBD_CMD_BLOCK_STATUS), 0, 0, 512), Some(NBD_EINVAL)),
            ("unknown command", &rw, req(Other(0x1234), 0, 0, 512), Some(NBD_EINVAL)),
            // NBD_CMD_DISC has no reply at all.
            ("disconnect", &rw, req(Disc, 0xffff, 1, 1), None),
        ];
        for (name, export, request, expected) in cases {
            assert_eq!(check_request(request, export), *expected, "{name}: {request:?}");
        }
    }

    #[test]
    fn transmission_flags_advertise_only_what_is_true() {
        let rw = Export::new(1 << 20);
        let flags = rw.transmission_flags();
        assert_eq!(
            flags,
            NBD_FLAG_HAS_FLAGS
                | NBD_FLAG_SEND_FLUSH
                | NBD_FLAG_SEND_CACHE
                | NBD_FLAG_SEND_FUA
                | NBD_FLAG_SEND_TRIM
                | NBD_FLAG_SEND_WRITE_ZEROES
        );
        // DF only with structured replies, which alone can honour it.
        assert_eq!(rw.transmission_flags_for(true), flags | NBD_FLAG_SEND_DF);
        let ro = Export { read_only: true, multi_conn: true, ..Export::new(1 << 20) };
        assert_eq!(
            ro.transmission_flags(),
            NBD_FLAG_HAS_FLAGS
                | NBD_FLAG_SEND_FLUSH
                | NBD_FLAG_SEND_CACHE
                | NBD_FLAG_READ_ONLY
                | NBD_FLAG_CAN_MULTI_CONN
        );
    }

    // proto.md "Size constraints": minimum block a power of 2 up to 64 KiB; preferred a power of
    // 2 at least max(minimum, 512); maximum payload at least the preferred block.
    #[test]
    fn validate_refuses_exports_the_spec_forbids() {
        assert!(Export::new(1 << 20).validate().is_ok());
        let bad = [
            Export { min_block: 3, ..Export::new(1 << 20) },
            Export { min_block: 1 << 17, preferred_block: 1 << 17, ..Export::new(1 << 20) },
            Export { preferred_block: 256, min_block: 256, ..Export::new(1 << 20) },
            Export { preferred_block: 6000, ..Export::new(1 << 20) },
            Export { max_block: 2048, ..Export::new(1 << 20) },
            Export { size: 1000, ..Export::new(0) },
            Export { description: Some("a\0b".into()), ..Export::new(1 << 20) },
        ];
        for export in bad {
            assert!(matches!(export.validate(), Err(SessionError::BadExport(_))), "{export:?}");
        }
    }

    #[test]
    fn request_buffered_needs_the_header_and_a_write_payload() {
        let read = raw_request(NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, 1, 0, 4096);
        assert!(request_buffered(&read));
        assert!(!request_buffered(&read[..read.len() - 1]));
        assert!(!request_buffered(&[]));
        let mut write = raw_request(NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 2, 0, 4);
        assert!(!request_buffered(&write), "header only");
        write.extend_from_slice(b"dat");
        assert!(!request_buffered(&write), "payload short by one");
        write.push(b'a');
        assert!(request_buffered(&write));
        assert_eq!(read_request(&mut &write[..], 1024).expect("whole").data, b"data");
    }

    #[test]
    fn read_request_decodes_a_write_with_its_payload() {
        let mut bytes = raw_request(NBD_REQUEST_MAGIC, NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 0xabc, 4096, 4);
        bytes.extend_from_slice(b"data");
        bytes.extend_from_slice(&raw_request(NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, 0xdef, 0, 512));
        let mut stream = &bytes[..];
        let write = read_request(&mut stream, 1024).expect("write");
        assert_eq!(
            write,
            Request {
                handle: 0xabc,
                kind: RequestKind::Write,
                flags: NBD_CMD_FLAG_FUA,
                offset: 4096,
                length: 4,
                data: b"data".to_vec()
            }
        );
        // A READ carries no payload: the next request follows the header directly.
        let read = read_request(&mut stream, 1024).expect("read");
        assert_eq!((read.handle, read.kind, read.length, read.data.len()), (0xdef, RequestKind::Read, 512, 0));
        // Then the stream ends between requests: the client went away.
        assert!(matches!(read_request(&mut stream, 1024), Err(SessionError::Closed { .. })));
    }

    #[test]
    fn read_request_keeps_unknown_commands_for_an_einval_reply() {
        let bytes = raw_request(NBD_REQUEST_MAGIC, 0, 0x77, 1, 0, 512);
        let request = read_request(&mut &bytes[..], 1024).expect("request");
        assert_eq!(request.kind, RequestKind::Other(0x77));
        assert_eq!(check_request(&request, &export()), Some(NBD_EINVAL));
    }

    #[test]
    fn read_request_framing_errors_are_errors_not_panics() {
        // The historic request magic 0x12560953 is reserved, not valid (proto.md "Reserved
        // Magic values").
        let bytes = raw_request(0x1256_0953, 0, NBD_CMD_READ, 1, 0, 512);
        assert!(matches!(read_request(&mut &bytes[..], 1024), Err(SessionError::BadMagic { found: 0x1256_0953, .. })));

        let bytes = raw_request(NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, 1, 0, 512);
        assert!(matches!(read_request(&mut &bytes[..20], 1024), Err(SessionError::Truncated { .. })));

        let mut bytes = raw_request(NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 1, 0, 512);
        bytes.extend_from_slice(&[0; 100]);
        assert!(matches!(read_request(&mut &bytes[..], 1024), Err(SessionError::Truncated { what: "write payload" })));

        let bytes = raw_request(NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 9, 0, 4096);
        assert!(matches!(
            read_request(&mut &bytes[..], 1024),
            Err(SessionError::PayloadTooLong { handle: 9, length: 4096, max: 1024 })
        ));

        assert!(matches!(read_request(&mut &[][..], 1024), Err(SessionError::Closed { .. })));
    }

    // proto.md "Simple reply message": magic, error, cookie, then data only for a successful read.
    #[test]
    fn write_reply_sends_data_only_on_success() {
        let mut out = Vec::new();
        write_reply(&mut out, 0x0102_0304_0506_0708, 0, b"abcd").expect("write");
        assert_eq!(out, [&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8][..], b"abcd"].concat());
        let mut out = Vec::new();
        write_reply(&mut out, 1, NBD_EIO, b"ignored").expect("write");
        assert_eq!(out, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 1]);
    }

    /// Runs `negotiate` with `tls` on one end of a pair; returns the other end and the
    /// thread's outcome.
    fn negotiating(tls: Tls) -> (UnixStream, std::thread::JoinHandle<Result<Step, SessionError>>) {
        let (mut server, client) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || negotiate(&mut server, &export(), ClientFlags { no_zeroes: true }, tls));
        (client, t)
    }

    fn send_option(c: &mut UnixStream, option: u32, data: &[u8]) {
        let mut m = NBD_OPTS_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        c.write_all(&m).unwrap();
    }

    /// The reply type of the next option reply (its data skipped).
    fn reply_type(c: &mut UnixStream) -> u32 {
        let mut r = [0u8; 20];
        c.read_exact(&mut r).unwrap();
        let mut data = vec![0u8; u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize];
        c.read_exact(&mut data).unwrap();
        u32::from_be_bytes(r[12..16].try_into().unwrap())
    }

    #[test]
    fn starttls_follows_the_tls_mode() {
        let go = [0u8; 6]; // name "" and no information requests
                           // NOTLS: STARTTLS unsupported, the rest served.
        let (mut c, t) = negotiating(Tls::Off);
        send_option(&mut c, NBD_OPT_STARTTLS, &[]);
        assert_eq!(reply_type(&mut c), NBD_REP_ERR_UNSUP);
        send_option(&mut c, NBD_OPT_ABORT, &[]);
        assert_eq!(reply_type(&mut c), NBD_REP_ACK);
        assert!(matches!(t.join().unwrap(), Ok(Step::Aborted)));
        // FORCEDTLS: everything but STARTTLS and ABORT is TLS_REQD; STARTTLS with data is
        // invalid; a plain STARTTLS is acknowledged and ends this negotiation.
        let (mut c, t) = negotiating(Tls::Required);
        for option in [NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_STRUCTURED_REPLY, 999] {
            send_option(&mut c, option, if option == NBD_OPT_LIST { &[] } else { &go });
            assert_eq!(reply_type(&mut c), NBD_REP_ERR_TLS_REQD, "option {option}");
        }
        send_option(&mut c, NBD_OPT_STARTTLS, b"x");
        assert_eq!(reply_type(&mut c), NBD_REP_ERR_INVALID);
        send_option(&mut c, NBD_OPT_STARTTLS, &[]);
        assert_eq!(reply_type(&mut c), NBD_REP_ACK);
        assert!(matches!(t.join().unwrap(), Ok(Step::StartTls)));
        // FORCEDTLS: NBD_OPT_EXPORT_NAME cannot be refused, so the connection drops.
        let (mut c, t) = negotiating(Tls::Required);
        send_option(&mut c, NBD_OPT_EXPORT_NAME, b"");
        assert!(t.join().unwrap().is_err());
        // Offered: plaintext options are served. Active: a second STARTTLS is invalid.
        for tls in [Tls::Offered, Tls::Active] {
            let (mut c, t) = negotiating(tls);
            if tls == Tls::Active {
                send_option(&mut c, NBD_OPT_STARTTLS, &[]);
                assert_eq!(reply_type(&mut c), NBD_REP_ERR_INVALID);
            }
            send_option(&mut c, NBD_OPT_GO, &go);
            let mut last = NBD_REP_ACK ^ 1;
            while last != NBD_REP_ACK {
                last = reply_type(&mut c);
                assert!(last & NBD_REP_FLAG_ERROR == 0, "{tls:?}: error reply {last:#x}");
            }
            assert!(matches!(t.join().unwrap(), Ok(Step::Go(_))));
        }
    }

    #[test]
    fn parse_info_request_checks_lengths() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
        assert_eq!(parse_info_request(&data), Ok((&b"abc"[..], vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME])));
        assert!(parse_info_request(&data[..data.len() - 1]).is_err());
        assert!(parse_info_request(&[data.as_slice(), &[0]].concat()).is_err());
        assert!(parse_info_request(&[0, 0, 0, 9, b'a', 0, 0]).is_err());
        assert!(parse_info_request(&[0, 0, 0]).is_err());
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0, 0]), Ok((&b""[..], vec![])));
    }
}
