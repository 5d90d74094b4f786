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

/// Which write a block's bytes came from (0: zeros), or why they are garbage.
pub fn decode(block: u64, bytes: &[u8]) -> Result<u64, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let field = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let (Some(at), Some(id)) = (field(0), field(8)) else {
        return Err(format!("block {block}: short ({} bytes)", bytes.len()));
    };
    if bytes[16..24] != blake3::hash(&bytes[24..]).as_bytes()[..8] {
        return Err(format!("block {block}: garbage (checksum fails)"));
    }
    if at != block {
        return Err(format!("block {block}: holds block {at}'s write {id}"));
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
        assert!(decode(8, &stamp(7, 42)).is_err_and(|e| e.contains("block 7's write 42")));
        let mut torn = stamp(7, 42);
        torn[4000] ^= 1;
        assert!(decode(7, &torn).is_err_and(|e| e.contains("garbage")));
    }
}
