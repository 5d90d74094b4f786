//! Stamped blocks, for the verifying workloads of `rblk chaos` and the power-cut test: a
//! 4 KiB block written by write `id` carries ⟨block, id, checksum of the rest⟩, so a block read
//! back tells which write it came from, or that it is garbage or another block's.

use raft_state::rng::Rng;

/// Bytes of a stamped block.
pub const BLOCK: u64 = 4096;

/// The payload of `block` written by write `id` (0: zeros).
pub fn stamp(block: u64, id: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    if id == 0 {
        return out;
    }
    Rng::new(block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ id).fill(&mut out[24..]);
    out[..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&id.to_le_bytes());
    let sum = blake3::hash(&out[24..]);
    out[16..24].copy_from_slice(&sum.as_bytes()[..8]);
    out
}

/// Why a block read back is not a stamp of its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadStamp {
    #[error("block {block}: short ({len} bytes)")]
    Short { block: u64, len: usize },
    #[error("block {block}: garbage (checksum fails)")]
    Garbage { block: u64 },
    #[error("block {block}: holds block {holds}'s write {id}")]
    Misplaced { block: u64, holds: u64, id: u64 },
}

/// Which write a block's bytes came from (0: zeros), or why they are garbage.
pub fn decode(block: u64, bytes: &[u8]) -> Result<u64, BadStamp> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let field = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let (Some(holds), Some(id), Some(sum), Some(rest)) = (field(0), field(8), bytes.get(16..24), bytes.get(24..))
    else {
        return Err(BadStamp::Short { block, len: bytes.len() });
    };
    if sum != &blake3::hash(rest).as_bytes()[..8] {
        return Err(BadStamp::Garbage { block });
    }
    if holds != block {
        return Err(BadStamp::Misplaced { block, holds, id });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_decodes_to_its_write_and_damage_is_told() {
        assert_eq!(decode(7, &stamp(7, 42)), Ok(42));
        assert_eq!(decode(7, &stamp(7, 0)), Ok(0));
        assert_eq!(decode(8, &stamp(7, 42)), Err(BadStamp::Misplaced { block: 8, holds: 7, id: 42 }));
        assert!(decode(8, &stamp(7, 42)).is_err_and(|e| e.to_string().contains("block 7's write 42")));
        let mut torn = stamp(7, 42);
        torn[4000] ^= 1;
        assert_eq!(decode(7, &torn), Err(BadStamp::Garbage { block: 7 }));
        assert_eq!(decode(7, &[1, 2, 3]), Err(BadStamp::Short { block: 7, len: 3 }));
    }
}
