//! The commands carried in Raft entries: what a client asked the volume to do.
//!
//! ```text
//! entry.data := header(24 bytes) payload
//! header     := magic "RBC1" ‖ kind u8 ‖ 3 reserved zero bytes ‖ offset u64 ‖ length u64
//! payload    := `length` bytes for a write (kind 1); empty for trim (2) and write-zeroes (3);
//!               for a placed write (kind 4) one (block u64, BLAKE3 hash) per 4 KiB of `length`
//! ```
//!
//! A placed write ("write once", `docs/format.md`) names data-region blocks that already hold
//! its bytes, durably, since before its log record was written: applying it links them into
//! the block map without copying them. Its offset and length are whole blocks.
//!
//! Offsets and lengths are in bytes, of any alignment: NBD clients that did not learn the
//! block sizes may write single bytes, and applying patches the blocks they touch (entries
//! of earlier versions were all multiples of 512, which still decode). An entry with empty data is the
//! leader's no-op and changes nothing. Every command is idempotent: applying it twice gives
//! the same volume content, so replay and client resends (at-least-once delivery) are safe.

use crate::device::BLOCK;
use crate::hash::Hash;
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic of a command header.
pub const COMMAND_MAGIC: [u8; 4] = *b"RBC1";
/// Bytes before a write's payload.
pub const COMMAND_HEADER: usize = 24;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawCommand {
    magic: [u8; 4],
    kind: u8,
    reserved: [u8; 3],
    offset: U64,
    length: U64,
}

const _: () = assert!(size_of::<RawCommand>() == COMMAND_HEADER);

/// One block of a placed write: where its bytes are and their hash (`hash::data_block`).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PlacedBlock {
    block: U64,
    pub hash: Hash,
}

/// Bytes of one [`PlacedBlock`] in a command.
pub const PLACED_BLOCK_BYTES: usize = 40;
const _: () = assert!(size_of::<PlacedBlock>() == PLACED_BLOCK_BYTES);

impl PlacedBlock {
    pub fn new(block: u64, hash: Hash) -> Self {
        Self { block: U64::new(block), hash }
    }

    pub fn block(&self) -> u64 {
        self.block.get()
    }
}

/// A decoded command, borrowing a write's payload from the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
    },
    /// Discard: the range reads as zeros and its blocks are freed.
    Trim {
        offset: u64,
        length: u64,
    },
    /// The range reads as zeros (full blocks are unmapped: thin provisioning).
    WriteZeroes {
        offset: u64,
        length: u64,
    },
    /// A write of whole blocks whose bytes were placed in data-region blocks before the entry
    /// was logged: `blocks[i]` holds the block at `offset + i * 4096`.
    Placed {
        offset: u64,
        blocks: &'a [PlacedBlock],
    },
}

/// Why entry data is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command too short ({0} bytes)")]
    Short(usize),
    #[error("no command magic")]
    Magic,
    #[error("unknown command kind {0}")]
    Kind(u8),
    #[error("write payload is {got} bytes, header says {want}")]
    Length { got: usize, want: u64 },
    #[error("placed write at {offset}+{length} is not whole blocks")]
    Unaligned { offset: u64, length: u64 },
}

fn header(kind: u8, offset: u64, length: u64) -> [u8; COMMAND_HEADER] {
    let raw =
        RawCommand { magic: COMMAND_MAGIC, kind, reserved: [0; 3], offset: U64::new(offset), length: U64::new(length) };
    let mut out = [0; COMMAND_HEADER];
    out.copy_from_slice(raw.as_bytes());
    out
}

impl Command<'_> {
    /// The kind byte of a placed write.
    pub const PLACED_KIND: u8 = 4;

    /// The byte range the command touches.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Command::Write { offset, data } => (offset, data.len() as u64),
            Command::Trim { offset, length } | Command::WriteZeroes { offset, length } => (offset, length),
            Command::Placed { offset, blocks } => (offset, blocks.len() as u64 * BLOCK),
        }
    }

    /// Encodes the command as entry data.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload) = match self {
            Command::Write { data, .. } => (1, *data),
            Command::Trim { .. } => (2, &[][..]),
            Command::WriteZeroes { .. } => (3, &[][..]),
            Command::Placed { blocks, .. } => (Self::PLACED_KIND, blocks.as_bytes()),
        };
        let (offset, length) = self.range();
        let mut out = Vec::with_capacity(COMMAND_HEADER + payload.len());
        out.extend_from_slice(&header(kind, offset, length));
        out.extend_from_slice(payload);
        out
    }

    /// The header of a write of `length` bytes at `offset`: the entry data is this followed
    /// by exactly the `length` bytes (so a caller can read them in behind it, no copy).
    pub fn write_header(offset: u64, length: u64) -> [u8; COMMAND_HEADER] {
        header(1, offset, length)
    }

    /// Decodes entry data.
    pub fn decode(data: &[u8]) -> Result<Command<'_>, CommandError> {
        let (raw, payload) = RawCommand::ref_from_prefix(data).map_err(|_| CommandError::Short(data.len()))?;
        if raw.magic != COMMAND_MAGIC || raw.reserved != [0; 3] {
            return Err(CommandError::Magic);
        }
        let (offset, length) = (raw.offset.get(), raw.length.get());
        match raw.kind {
            1 if payload.len() as u64 == length => Ok(Command::Write { offset, data: payload }),
            1 => Err(CommandError::Length { got: payload.len(), want: length }),
            2 | 3 if !payload.is_empty() => Err(CommandError::Length { got: payload.len(), want: 0 }),
            2 => Ok(Command::Trim { offset, length }),
            3 => Ok(Command::WriteZeroes { offset, length }),
            4 => {
                if !offset.is_multiple_of(BLOCK) || !length.is_multiple_of(BLOCK) {
                    return Err(CommandError::Unaligned { offset, length });
                }
                let want = length / BLOCK * PLACED_BLOCK_BYTES as u64;
                let blocks = <[PlacedBlock]>::ref_from_bytes(payload)
                    .ok()
                    .filter(|_| payload.len() as u64 == want)
                    .ok_or(CommandError::Length { got: payload.len(), want })?;
                Ok(Command::Placed { offset, blocks })
            }
            other => Err(CommandError::Kind(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(kind in 0u8..3, offset in 0u64..1 << 40, blocks in 0u64..64, byte: u8) {
            let offset = offset / 512 * 512;
            let data = vec![byte; (blocks * 512) as usize];
            let cmd = match kind {
                0 => Command::Write { offset, data: &data },
                1 => Command::Trim { offset, length: blocks * 512 },
                _ => Command::WriteZeroes { offset, length: blocks * 512 },
            };
            let bytes = cmd.encode();
            prop_assert_eq!(Command::decode(&bytes), Ok(cmd.clone()));
            // Any truncation of a write, or a flipped magic byte, is refused.
            if blocks > 0 && kind == 0 {
                prop_assert!(Command::decode(&bytes[..bytes.len() - 1]).is_err());
            }
            let mut bad = bytes.clone();
            bad[0] ^= 1;
            prop_assert!(Command::decode(&bad).is_err());
        }
    }

    #[test]
    fn malformed_commands_are_refused() {
        assert_eq!(Command::decode(b"RBC"), Err(CommandError::Short(3)));
        // Byte-granular ranges are commands too (1-byte I/O from clients without block sizes).
        assert_eq!(
            Command::decode(&Command::Write { offset: 3, data: b"x" }.encode()),
            Ok(Command::Write { offset: 3, data: b"x" })
        );
        let mut kind = Command::Trim { offset: 0, length: 512 }.encode();
        kind[4] = 9;
        assert_eq!(Command::decode(&kind), Err(CommandError::Kind(9)));
        let mut trailing = Command::Trim { offset: 0, length: 512 }.encode();
        trailing.push(0);
        assert!(matches!(Command::decode(&trailing), Err(CommandError::Length { .. })));
    }

    #[test]
    fn placed_writes_round_trip_and_must_be_whole_blocks() {
        let blocks = [PlacedBlock::new(77, [1; 32]), PlacedBlock::new(78, [2; 32])];
        let cmd = Command::Placed { offset: 8192, blocks: &blocks };
        let bytes = cmd.encode();
        assert_eq!(bytes.len(), COMMAND_HEADER + 2 * PLACED_BLOCK_BYTES);
        let back = Command::decode(&bytes).expect("decode");
        assert_eq!(back, cmd);
        assert_eq!(back.range(), (8192, 8192));
        let Command::Placed { blocks: got, .. } = back else { panic!("kind") };
        assert_eq!(got[1].block(), 78);
        // One placed block short, or a byte too many: refused.
        assert!(matches!(Command::decode(&bytes[..bytes.len() - 1]), Err(CommandError::Length { .. })));
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; PLACED_BLOCK_BYTES]);
        assert!(matches!(Command::decode(&long), Err(CommandError::Length { .. })));
        // A range that is not whole blocks cannot be placed.
        let mut odd = bytes.clone();
        odd[8] = 1; // offset 8193
        assert!(matches!(Command::decode(&odd), Err(CommandError::Unaligned { .. })));
    }
}
