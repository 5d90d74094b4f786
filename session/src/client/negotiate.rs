//! The handshake: the client's side of newstyle negotiation (`NBD_OPT_GO` with
//! `NBD_INFO_BLOCK_SIZE`, falling back to `NBD_OPT_EXPORT_NAME`), and the checks of what the
//! server offered before the client trusts it.

use std::io::{Read, Write};

use zerocopy::big_endian::U32;
use zerocopy::{FromBytes, IntoBytes};

use crate::wire::*;
use crate::{flush, read_full, read_raw, write_all, SessionError};

/// Size constraints assumed when the server gives none (with `NBD_OPT_EXPORT_NAME`, or a GO
/// without `NBD_INFO_BLOCK_SIZE`): what proto.md "Size constraints" tells a client desiring
/// maximum interoperability to keep to.
pub const DEFAULT_BLOCK_SIZES: (u32, u32, u32) = (512, 4096, PAYLOAD_DOS_LIMIT);

/// Option replies longer than this are not read: ours are a few bytes plus a description.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// What the handshake told the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Settled {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) block_sizes: (u32, u32, u32),
}

/// The client's side of the newstyle handshake: `NBD_OPT_GO` when the server offers fixed
/// newstyle, else (or if GO is unsupported) `NBD_OPT_EXPORT_NAME`.
pub(super) fn negotiate<S: Read + Write>(stream: &mut S, export_name: &str) -> Result<Settled, SessionError> {
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
