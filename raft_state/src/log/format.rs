//! The on-disk record format: the header, how a record's data is sealed into tagged
//! sectors and gathered back, and the entries of its payload.

use prost::Message;
use raft::eraftpb::Entry;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::device::{BLOCK_SIZE, SECTOR_SIZE};
use crate::hash::{self, Hash};

/// Magic at the start of every log record.
pub const LOG_MAGIC: [u8; 8] = *b"RBLKLOG\0";
/// The log record format this code writes and reads.
pub const LOG_FORMAT_VERSION: u32 = 2;
/// Bytes of the record header; the payload starts right after it.
pub const HEADER_SIZE: usize = 256;
/// Record data bytes in each 512-byte sector; the last 8 hold the record's tag twice.
const SECTOR_DATA: usize = SECTOR_SIZE - 8;
/// Record data bytes in each block.
pub(super) const BLOCK_DATA: usize = BLOCK_SIZE / SECTOR_SIZE * SECTOR_DATA;
/// The largest record, in blocks. A batch larger than this is split into several records;
/// it also bounds how far recovery looks past a bad record.
pub const MAX_RECORD_BLOCKS: u64 = 512;
/// The largest encoded entry a record can hold.
pub const MAX_ENTRY_BYTES: usize = MAX_RECORD_BLOCKS as usize * BLOCK_DATA - HEADER_SIZE - 16;

/// The on-disk record header. Byte offsets (all integers little-endian):
///
/// | offset | size | field            |
/// |-------:|-----:|------------------|
/// |      0 |    8 | magic `RBLKLOG\0` |
/// |      8 |    4 | format_version   |
/// |     12 |    4 | header_size (256)|
/// |     16 |   16 | volume_id        |
/// |     32 |    8 | vblock           |
/// |     40 |    8 | batch_start      |
/// |     48 |    4 | blocks           |
/// |     52 |    4 | entry_count      |
/// |     56 |    8 | payload_len      |
/// |     64 |    8 | first_index      |
/// |     72 |    8 | term             |
/// |     80 |    8 | vote             |
/// |     88 |    8 | commit           |
/// |     96 |   32 | prev_checksum    |
/// |    128 |   32 | payload_checksum |
/// |    160 |   64 | reserved (zero)  |
/// |    224 |   32 | header_checksum  |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone)]
#[repr(C)]
pub(super) struct RawHeader {
    pub(super) magic: [u8; 8],
    pub(super) format_version: U32,
    pub(super) header_size: U32,
    pub(super) volume_id: [u8; 16],
    pub(super) vblock: U64,
    pub(super) batch_start: U64,
    pub(super) blocks: U32,
    pub(super) entry_count: U32,
    pub(super) payload_len: U64,
    pub(super) first_index: U64,
    pub(super) term: U64,
    pub(super) vote: U64,
    pub(super) commit: U64,
    pub(super) prev_checksum: [u8; 32],
    pub(super) payload_checksum: [u8; 32],
    pub(super) reserved: [u8; 64],
    pub(super) header_checksum: [u8; 32],
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_SIZE);
pub(super) const CHECKED_HEADER: usize = HEADER_SIZE - 32;

/// A record header that passed every check, in native types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) vblock: u64,
    pub(super) batch_start: u64,
    pub(super) blocks: u64,
    pub(super) entry_count: u32,
    pub(super) payload_len: usize,
    pub(super) first_index: u64,
    pub(super) hard_state: (u64, u64, u64),
    pub(super) prev_checksum: Hash,
    pub(super) payload_checksum: Hash,
    pub(super) checksum: Hash,
}

/// Why the bytes at a position are not a valid record header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HeaderProblem {
    Magic,
    Checksum,
    Foreign,
    Misplaced { claims: u64 },
    Shape(String),
    Version(u32),
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Magic => write!(f, "no record magic"),
            Self::Checksum => write!(f, "header checksum mismatch"),
            Self::Foreign => write!(f, "record of another volume"),
            Self::Misplaced { claims } => write!(f, "record claims block {claims}"),
            Self::Shape(why) => write!(f, "malformed header: {why}"),
            Self::Version(v) => write!(f, "unsupported log format version {v}"),
        }
    }
}

pub(super) fn parse_header(bytes: &[u8], vblock: u64, volume_id: [u8; 16]) -> Result<Header, HeaderProblem> {
    let raw = RawHeader::read_from_bytes(&bytes[..HEADER_SIZE]).map_err(|_| HeaderProblem::Shape("short".into()))?;
    if raw.magic != LOG_MAGIC {
        return Err(HeaderProblem::Magic);
    }
    if raw.header_checksum != hash::log_header_checksum(&bytes[..CHECKED_HEADER]) {
        return Err(HeaderProblem::Checksum);
    }
    if raw.format_version.get() != LOG_FORMAT_VERSION {
        return Err(HeaderProblem::Version(raw.format_version.get()));
    }
    if raw.volume_id != volume_id {
        return Err(HeaderProblem::Foreign);
    }
    if raw.vblock.get() != vblock {
        return Err(HeaderProblem::Misplaced { claims: raw.vblock.get() });
    }
    let blocks = u64::from(raw.blocks.get());
    let payload_len = raw.payload_len.get();
    if raw.header_size.get() as usize != HEADER_SIZE
        || blocks == 0
        || blocks > MAX_RECORD_BLOCKS
        || HEADER_SIZE as u64 + payload_len > blocks * BLOCK_DATA as u64
        || raw.batch_start.get() > vblock
    {
        return Err(HeaderProblem::Shape(format!("{blocks} blocks, payload {payload_len}")));
    }
    Ok(Header {
        vblock,
        batch_start: raw.batch_start.get(),
        blocks,
        entry_count: raw.entry_count.get(),
        payload_len: payload_len as usize,
        first_index: raw.first_index.get(),
        hard_state: (raw.term.get(), raw.vote.get(), raw.commit.get()),
        prev_checksum: raw.prev_checksum,
        payload_checksum: raw.payload_checksum,
        checksum: raw.header_checksum,
    })
}

/// A tag no record has: what never-written (zeroed) sectors carry.
pub(super) const NO_TAG: [u8; 4] = [0; 4];

/// The tag a record writes into its first sector; the others carry `body_tag` of it, so the
/// first block of a record is told apart from a block in the middle of one.
pub(super) fn tag_of(header_checksum: &Hash) -> [u8; 4] {
    let tag = [header_checksum[0], header_checksum[1], header_checksum[2], header_checksum[3]];
    if tag == NO_TAG || body_tag(tag) == NO_TAG {
        [1, 0, 0, 0]
    } else {
        tag
    }
}

/// The tag of a record's sectors after the first: the complement of its first sector's.
pub(super) fn body_tag(tag: [u8; 4]) -> [u8; 4] {
    tag.map(|b| !b)
}

/// The two tag copies at the end of a sector.
pub(super) fn sector_tags(sector: &[u8]) -> [[u8; 4]; 2] {
    let mut out = [NO_TAG; 2];
    if sector.len() >= SECTOR_SIZE {
        out[0].copy_from_slice(&sector[SECTOR_DATA..SECTOR_DATA + 4]);
        out[1].copy_from_slice(&sector[SECTOR_DATA + 4..SECTOR_SIZE]);
    }
    out
}

/// Lays the record data `data` out in sectors of `out` (whole blocks), each ending with its
/// tag twice (`tag` in the first, `body_tag` in the rest); the data's tail is zero-padded.
pub(super) fn seal(data: &[u8], out: &mut [u8], first_tag: [u8; 4]) {
    for (i, sector) in out.chunks_mut(SECTOR_SIZE).enumerate() {
        let tag = if i == 0 { first_tag } else { body_tag(first_tag) };
        let from = (i * SECTOR_DATA).min(data.len());
        let to = ((i + 1) * SECTOR_DATA).min(data.len());
        sector[..to - from].copy_from_slice(&data[from..to]);
        sector[to - from..SECTOR_DATA].fill(0);
        sector[SECTOR_DATA..SECTOR_DATA + 4].copy_from_slice(&tag);
        sector[SECTOR_DATA + 4..].copy_from_slice(&tag);
    }
}

/// `len` bytes of record data from offset `from`, gathered from the sectors of `bytes`.
pub(super) fn gather(bytes: &[u8], from: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut at = from;
    while out.len() < len {
        let (sector, within) = (at / SECTOR_DATA, at % SECTOR_DATA);
        let n = (SECTOR_DATA - within).min(len - out.len());
        out.extend_from_slice(&bytes[sector * SECTOR_SIZE + within..][..n]);
        at += n;
    }
    out
}

pub(super) fn decode_entries(mut payload: &[u8], count: u32) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count {
        let e = Entry::decode_length_delimited(&mut payload).map_err(|err| format!("entry {i} of {count}: {err}"))?;
        entries.push(e);
    }
    if !payload.is_empty() {
        return Err(format!("{} bytes after the last entry", payload.len()));
    }
    Ok(entries)
}
