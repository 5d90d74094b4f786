//! virtio-blk: what the device offers (features, config space) and how a request is read
//! from a descriptor chain. Everything here treats the guest as hostile: a chain that loops,
//! points outside guest memory, nests indirect tables, mixes directions or is too long is
//! refused with the request's status (when it has a place for one) or dropped with a used
//! length of 0 (when it has none); nothing here can read or write outside guest memory.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, Permissions};

use super::memory::Mem;

pub const SECTOR: u64 = 512;

/// Largest segment the guest may use, and most segments per request: together they bound a
/// request's data to just under 32 MiB, the largest NBD request too.
pub const SIZE_MAX: u32 = 256 << 10;
pub const SEG_MAX: u32 = 126;

/// Most bytes of data one request may carry (the header and status come on top).
pub const MAX_DATA: u64 = SIZE_MAX as u64 * SEG_MAX as u64;

/// Descriptors in one chain at most (direct or through an indirect table): the segments,
/// the header and status, and room for a header or status split over descriptors.
pub const MAX_CHAIN: usize = SEG_MAX as usize + 8;

/// Ranges in one DISCARD or WRITE_ZEROES request, and sectors in each.
pub const MAX_RANGES: u32 = 16;
pub const MAX_RANGE_SECTORS: u32 = 1 << 23;

/// The bytes of GET_ID's answer.
pub const ID_BYTES: usize = 20;

pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The virtio features the device offers (the vhost-user PROTOCOL_FEATURES bit is added by
/// the caller).
pub fn features(read_only: bool) -> u64 {
    let bits = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
    ];
    let ro = if read_only { 1u64 << VIRTIO_BLK_F_RO } else { 0 };
    bits.iter().fold(ro, |acc, &b| acc | (1u64 << b))
}

pub fn event_idx(features: u64) -> bool {
    features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0
}

/// The device's config space (struct virtio_blk_config, little-endian, 60 bytes): capacity
/// in 512-byte sectors, 4 KiB logical blocks, the segment limits, one queue per worker, and
/// the discard and write-zeroes limits (both unmap).
pub fn config_space(size: u64, queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &(size / SECTOR).to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &4096u32.to_le_bytes()); // blk_size
                                     // physical_block_exp 0 and alignment_offset 0 (physical blocks are the 4 KiB logical
                                     // ones); min_io_size and opt_io_size count logical blocks.
    put(26, &1u16.to_le_bytes());
    put(28, &(SIZE_MAX / 4096).to_le_bytes());
    put(34, &queues.to_le_bytes());
    put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_RANGES.to_le_bytes()); // max_discard_seg
    put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
    put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_RANGES.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

/// A guest buffer: guest physical address and length.
pub type Segment = (GuestAddress, u32);

/// A chain, read: its device-readable buffers, then its device-writable ones.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

/// Reads the descriptor chain that starts at `head` of the table at `table` (a ring of
/// `size` descriptors), following one level of indirect table. None when it is broken:
/// a head or next index out of range, a loop (more descriptors than the table holds), a
/// nested or misaligned indirect table, a descriptor outside guest memory, a readable
/// buffer after a writable one, or more than `MAX_CHAIN` buffers.
///
/// virtio-queue's own chain iterator cannot start at a given head (its constructor is private
/// to the crate), and a restarted driver must resubmit chains by head: so every chain, taken
/// from the avail ring or resubmitted, is read here, the one way.
pub fn walk(mem: &Mem, table: GuestAddress, size: u16, head: u16) -> Option<Chain> {
    let mut chain = Chain::default();
    let (mut table, mut size, mut next, mut ttl, mut indirect) = (table, size, head, size, false);
    loop {
        if next >= size || ttl == 0 {
            return None;
        }
        ttl -= 1;
        let at = table.checked_add(u64::from(next) * 16)?;
        let desc: Descriptor = mem.read_obj(at).ok()?;
        if desc.refers_to_indirect_table() {
            // Only as the one descriptor of the ring's chain, never inside an indirect table.
            let entries = desc.len() / 16;
            if indirect || chain.readable.len() + chain.writable.len() > 0 || desc.has_next() {
                return None;
            }
            if !desc.len().is_multiple_of(16) || entries == 0 || entries > MAX_CHAIN as u32 {
                return None;
            }
            (table, size, next, ttl, indirect) = (desc.addr(), entries as u16, 0, entries as u16, true);
            continue;
        }
        if desc.len() > 0 {
            // The whole buffer must be guest memory (a range may cross regions).
            let access = if desc.is_write_only() { Permissions::Write } else { Permissions::Read };
            mem.get_slices(desc.addr(), desc.len() as usize, access).ok()?.try_for_each(|s| s.map(drop)).ok()?;
            if desc.is_write_only() {
                chain.writable.push((desc.addr(), desc.len()));
            } else if chain.writable.is_empty() {
                chain.readable.push((desc.addr(), desc.len()));
            } else {
                return None;
            }
        }
        if chain.readable.len() + chain.writable.len() > MAX_CHAIN {
            return None;
        }
        if !desc.has_next() {
            return Some(chain);
        }
        next = desc.next();
    }
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

/// A request, read from its chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub sector: u64,
    /// IN, GET_ID: the buffers to fill; OUT, DISCARD, WRITE_ZEROES: what the guest gives.
    pub data: Vec<Segment>,
    /// The byte to write the status into.
    pub status: GuestAddress,
}

impl Request {
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.1)).sum()
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Header {
    kind: u32,
    ioprio: u32,
    sector: u64,
}

// SAFETY: Header is plain old data of integer fields, with no padding; any bytes are a value.
unsafe impl ByteValued for Header {}

/// The first `len` bytes of `segments` dropped (where a header ends and data begins).
fn skip(segments: &[Segment], mut len: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segments.len());
    for &(addr, n) in segments {
        let n64 = u64::from(n);
        if len >= n64 {
            len -= n64;
            continue;
        }
        out.push((GuestAddress(addr.0 + len), (n64 - len) as u32));
        len = 0;
    }
    out
}

/// Reads the request a chain holds. Err(Some(status)) when it is malformed but has a status
/// byte to say so in (S_IOERR); Err(None) when it has none.
pub fn parse(mem: &Mem, chain: &Chain) -> Result<Request, Option<GuestAddress>> {
    let &(last, last_len) = chain.writable.last().ok_or(None)?;
    let status = GuestAddress(last.0 + u64::from(last_len) - 1);
    let readable: u64 = chain.readable.iter().map(|s| u64::from(s.1)).sum();
    if readable < 16 {
        return Err(Some(status));
    }
    // The header, wherever its 16 bytes lie.
    let mut raw = [0u8; 16];
    let mut filled = 0;
    for &(addr, n) in &chain.readable {
        let take = (n as usize).min(16 - filled);
        mem.read_slice(&mut raw[filled..filled + take], addr).map_err(|_| Some(status))?;
        filled += take;
        if filled == 16 {
            break;
        }
    }
    let header = Header::from_slice(&raw).copied().unwrap_or_default();
    let kind = match u32::from_le(header.kind) {
        VIRTIO_BLK_T_IN => Kind::In,
        VIRTIO_BLK_T_OUT => Kind::Out,
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        VIRTIO_BLK_T_DISCARD => Kind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
        other => Kind::Other(other),
    };
    let data = match kind {
        // Everything writable but the status byte.
        Kind::In | Kind::GetId => {
            if readable != 16 {
                return Err(Some(status));
            }
            let mut w = chain.writable.clone();
            if let Some(l) = w.last_mut() {
                l.1 -= 1;
            }
            w.retain(|s| s.1 > 0);
            w
        }
        // Everything readable after the header; nothing writable but the status byte.
        Kind::Out | Kind::Discard | Kind::WriteZeroes => {
            if chain.writable.len() != 1 || last_len != 1 {
                return Err(Some(status));
            }
            skip(&chain.readable, 16)
        }
        Kind::Flush | Kind::Other(_) => Vec::new(),
    };
    let request = Request { kind, sector: u64::from_le(header.sector), data, status };
    if request.data_len() > MAX_DATA {
        return Err(Some(status));
    }
    Ok(request)
}

/// One range of a DISCARD or WRITE_ZEROES request.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RangeRaw {
    sector: u64,
    sectors: u32,
    flags: u32,
}

// SAFETY: plain old data of integer fields, with no padding; any bytes are a value.
unsafe impl ByteValued for RangeRaw {}

/// The byte ranges of a DISCARD or WRITE_ZEROES request on a volume of `size` bytes, or the
/// status to fail it with: S_UNSUPP for flags this device does not know, S_IOERR for a
/// malformed or out-of-range one.
pub fn ranges(mem: &Mem, req: &Request, size: u64) -> Result<Vec<(u64, u64)>, u8> {
    let len = req.data_len();
    if len == 0 || !len.is_multiple_of(16) || len / 16 > u64::from(MAX_RANGES) {
        return Err(S_IOERR);
    }
    let mut bytes = vec![0u8; len as usize];
    let mut at = 0;
    for &(addr, n) in &req.data {
        mem.read_slice(&mut bytes[at..at + n as usize], addr).map_err(|_| S_IOERR)?;
        at += n as usize;
    }
    let allowed = if req.kind == Kind::WriteZeroes { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
    bytes
        .chunks_exact(16)
        .map(|raw| {
            let r = RangeRaw::from_slice(raw).copied().unwrap_or_default();
            let (sector, sectors, flags) = (u64::from_le(r.sector), u32::from_le(r.sectors), u32::from_le(r.flags));
            if flags & !allowed != 0 {
                return Err(S_UNSUPP);
            }
            if sectors > MAX_RANGE_SECTORS {
                return Err(S_IOERR);
            }
            byte_range(sector, u64::from(sectors) * SECTOR, size).ok_or(S_IOERR)
        })
        .collect()
}

/// `(offset, length)` of `length` bytes from `sector` when they lie within `size`.
pub fn byte_range(sector: u64, length: u64, size: u64) -> Option<(u64, u64)> {
    let offset = sector.checked_mul(SECTOR)?;
    (offset.checked_add(length)? <= size).then_some((offset, length))
}

/// GET_ID's answer: the export name, cut or zero-padded to 20 bytes.
pub fn id(name: &str) -> [u8; ID_BYTES] {
    let mut out = [0u8; ID_BYTES];
    let name = if name.is_empty() { "rblk" } else { name };
    let n = name.len().min(ID_BYTES);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}
