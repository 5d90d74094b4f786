//! NBD wire format: constants and raw message layouts, as given by the NBD project's
//! `doc/proto.md`.
//!
//! Everything on the wire is big-endian ("network byte order", proto.md "Conventions"). The raw
//! structs here are only byte layouts; `server` and `client` check magics and lengths and turn
//! them into native values. Variable-length parts (names, info lists, payloads) follow the fixed
//! headers and are framed by a length field of the header.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

// ---- Magics (proto.md "Handshake", "Transmission") ----

/// `NBDMAGIC`, the first 8 bytes the server sends (`INIT_PASSWD`).
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows `NBDMAGIC` in newstyle negotiation and starts every client option.
pub const NBD_OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// `cliserv_magic`: follows `NBDMAGIC` in the oldstyle negotiation, which no one here speaks.
pub const NBD_CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Starts every option reply in fixed newstyle negotiation.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts a structured reply chunk (only after `NBD_OPT_STRUCTURED_REPLY`).
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- Handshake flags, server → client (16 bits) ----

pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

// ---- Client flags, client → server (32 bits) ----

pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Transmission flags (16 bits) ----

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Option types ----

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

// ---- Option reply types; errors have bit 31 set ----

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// ---- Information types in NBD_REP_INFO (NBD_OPT_INFO / NBD_OPT_GO) ----

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---- Metadata contexts (proto.md "Metadata querying") ----

/// The one context served: which ranges are allocated, and which read as zeros.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The namespace of the contexts the spec defines.
pub const BASE_NAMESPACE: &str = "base:";
/// `base:allocation`: the range is not allocated (a hole).
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the range reads as zeros.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

// ---- Structured replies (proto.md "Structured reply chunk message") ----

/// The chunk is the last of its reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// ---- Request types ----

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

// ---- Command flags (16 bits) ----

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- Error values of the simple reply (proto.md "Error values") ----

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The name of an NBD error value, for messages.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        0 => "success",
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error value",
    }
}

// ---- Size limits ----

/// Strings (export names, descriptions, messages) MUST be no longer than this (proto.md
/// "Conventions").
pub const MAX_STRING: usize = 4096;
/// The largest minimum block size the spec allows (proto.md "Size constraints").
pub const MAX_MIN_BLOCK: u32 = 1 << 16;
/// Payloads up to this length SHOULD NOT be taken for a denial of service even when they exceed
/// the advertised maximum (proto.md "Size constraints"); it is also the default maximum payload.
pub const PAYLOAD_DOS_LIMIT: u32 = 1 << 25;
/// Bytes of zeroes after the `NBD_OPT_EXPORT_NAME` reply unless `NBD_FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_ZEROES: usize = 124;

// ---- Raw layouts ----

/// The server's first message in newstyle negotiation.
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | `NBDMAGIC` |
/// | 8 | 8 | `IHAVEOPT` |
/// | 16 | 2 | handshake flags |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawHello {
    pub(crate) nbd_magic: U64,
    pub(crate) opts_magic: U64,
    pub(crate) handshake_flags: U16,
}
const _: () = assert!(size_of::<RawHello>() == 18);

/// The header of every client option; `length` bytes of option data follow.
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | `IHAVEOPT` |
/// | 8 | 4 | option |
/// | 12 | 4 | length of option data |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawOption {
    pub(crate) magic: U64,
    pub(crate) option: U32,
    pub(crate) length: U32,
}
const _: () = assert!(size_of::<RawOption>() == 16);

/// The header of every option reply in fixed newstyle; `length` bytes of reply data follow.
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | `NBD_REP_MAGIC` |
/// | 8 | 4 | option being answered |
/// | 12 | 4 | reply type |
/// | 16 | 4 | length of reply data |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawOptionReply {
    pub(crate) magic: U64,
    pub(crate) option: U32,
    pub(crate) reply_type: U32,
    pub(crate) length: U32,
}
const _: () = assert!(size_of::<RawOptionReply>() == 20);

/// The server's answer to `NBD_OPT_EXPORT_NAME`, followed by 124 zero bytes unless the client
/// set `NBD_FLAG_C_NO_ZEROES`.
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 8 | export size in bytes |
/// | 8 | 2 | transmission flags |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawExportNameReply {
    pub(crate) size: U64,
    pub(crate) flags: U16,
}
const _: () = assert!(size_of::<RawExportNameReply>() == 10);

/// `NBD_INFO_EXPORT` in an `NBD_REP_INFO` reply (reply length 12).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawInfoExport {
    pub(crate) info_type: U16,
    pub(crate) size: U64,
    pub(crate) flags: U16,
}
const _: () = assert!(size_of::<RawInfoExport>() == 12);

/// `NBD_INFO_BLOCK_SIZE` in an `NBD_REP_INFO` reply (reply length 14).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawInfoBlockSize {
    pub(crate) info_type: U16,
    pub(crate) min_block: U32,
    pub(crate) preferred_block: U32,
    pub(crate) max_block: U32,
}
const _: () = assert!(size_of::<RawInfoBlockSize>() == 14);

/// A transmission request; `length` bytes of data follow only for `NBD_CMD_WRITE`.
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 4 | `NBD_REQUEST_MAGIC` |
/// | 4 | 2 | command flags |
/// | 6 | 2 | type |
/// | 8 | 8 | cookie (called handle here, as in older versions of the spec) |
/// | 16 | 8 | offset |
/// | 24 | 4 | length |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawRequest {
    pub(crate) magic: U32,
    pub(crate) flags: U16,
    pub(crate) command: U16,
    pub(crate) handle: U64,
    pub(crate) offset: U64,
    pub(crate) length: U32,
}
const _: () = assert!(size_of::<RawRequest>() == 28);

/// A simple reply; the read data follows only for a successful `NBD_CMD_READ`.
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 4 | `NBD_SIMPLE_REPLY_MAGIC` |
/// | 4 | 4 | error (0 = success) |
/// | 8 | 8 | cookie of the request answered |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawSimpleReply {
    pub(crate) magic: U32,
    pub(crate) error: U32,
    pub(crate) handle: U64,
}
const _: () = assert!(size_of::<RawSimpleReply>() == 16);

/// The header of a structured reply chunk; `length` bytes of payload follow.
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 4 | `NBD_STRUCTURED_REPLY_MAGIC` |
/// | 4 | 2 | flags (`NBD_REPLY_FLAG_DONE`) |
/// | 6 | 2 | type (`NBD_REPLY_TYPE_*`) |
/// | 8 | 8 | cookie of the request answered |
/// | 16 | 4 | length of the payload |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug)]
#[repr(C)]
pub(crate) struct RawChunk {
    pub(crate) magic: U32,
    pub(crate) flags: U16,
    pub(crate) chunk_type: U16,
    pub(crate) handle: U64,
    pub(crate) length: U32,
}
const _: () = assert!(size_of::<RawChunk>() == 20);
