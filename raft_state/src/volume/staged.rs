//! The data blocks a batch of entries applied but did not write yet (`Volume::apply_staged`):
//! their bytes one after another in one block-aligned buffer that is kept from batch to
//! batch, so staging a block is one copy, with no allocation and no fresh pages, and a run
//! of blocks consecutive on the device is written straight from the buffer.

use std::collections::HashMap;

use crate::device::{AlignedBuf, BLOCK, BLOCK_SIZE};

/// A buffer that grew past this for one large batch is given back after it was written.
const KEEP_BYTES: usize = 8 << 20;

pub(super) struct Staged {
    /// The staged blocks' bytes, the i-th block at `i * BLOCK_SIZE`.
    bytes: AlignedBuf,
    /// The device block of the i-th staged block, in the order they were staged.
    blocks: Vec<u64>,
    /// Device block → its position in `blocks`.
    at: HashMap<u64, usize>,
}

impl Staged {
    pub(super) fn new() -> Self {
        Staged { bytes: AlignedBuf::blocks(0), blocks: Vec::new(), at: HashMap::new() }
    }

    /// Stages `data` (one block) for device block `block`; a block staged twice keeps the
    /// later bytes.
    pub(super) fn insert(&mut self, block: u64, data: &[u8]) {
        let i = *self.at.entry(block).or_insert_with(|| {
            self.blocks.push(block);
            self.blocks.len() - 1
        });
        if self.bytes.len() < (i + 1) * BLOCK_SIZE {
            let mut bigger = AlignedBuf::blocks((2 * self.blocks.len()).max(64));
            bigger[..i * BLOCK_SIZE].copy_from_slice(&self.bytes[..i * BLOCK_SIZE]);
            self.bytes = bigger;
        }
        self.bytes[i * BLOCK_SIZE..][..BLOCK_SIZE].copy_from_slice(data);
    }

    /// The staged bytes of device block `block`, if it is staged.
    pub(super) fn get(&self, block: u64) -> Option<&[u8]> {
        self.at.get(&block).map(|&i| &self.bytes[i * BLOCK_SIZE..][..BLOCK_SIZE])
    }

    /// The writes that put every staged block in place: `(device offset, bytes)`, a run of
    /// blocks staged one after another onto consecutive device blocks (the allocator hands
    /// them out in order) as one write of at most `max_run` blocks.
    pub(super) fn writes(&self, max_run: usize) -> Vec<(u64, &[u8])> {
        let mut writes = Vec::new();
        let mut i = 0;
        while i < self.blocks.len() {
            let mut j = i + 1;
            while j < self.blocks.len() && j - i < max_run.max(1) && self.blocks[j] == self.blocks[j - 1] + 1 {
                j += 1;
            }
            writes.push((self.blocks[i] * BLOCK, &self.bytes[i * BLOCK_SIZE..j * BLOCK_SIZE]));
            i = j;
        }
        writes
    }

    /// Forgets every staged block (they were written).
    pub(super) fn clear(&mut self) {
        self.blocks.clear();
        self.at.clear();
        if self.bytes.len() > KEEP_BYTES {
            self.bytes = AlignedBuf::blocks(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_blocks_are_written_in_runs_and_read_back() {
        let mut s = Staged::new();
        // 100 blocks (the buffer grows twice), device-consecutive except at 50 and 70.
        let block = |i: u64| {
            if i < 50 {
                1000 + i
            } else if i < 70 {
                5000 + i
            } else {
                9000 + i
            }
        };
        for i in 0..100u64 {
            s.insert(block(i), &[i as u8; BLOCK_SIZE]);
        }
        // Restaged: the later bytes win, the position stays.
        s.insert(block(7), &[0xEE; BLOCK_SIZE]);
        assert!(s.get(block(7)).is_some_and(|b| b.iter().all(|&x| x == 0xEE)));
        assert!(s.get(block(99)).is_some_and(|b| b.iter().all(|&x| x == 99)));
        assert!(s.get(4).is_none());
        let writes = s.writes(32);
        let runs: Vec<(u64, usize)> = writes.iter().map(|(at, b)| (*at / BLOCK, b.len() / BLOCK_SIZE)).collect();
        assert_eq!(runs, vec![(1000, 32), (1032, 18), (5050, 20), (9070, 30)]);
        assert!(writes[1].1[..BLOCK_SIZE].iter().all(|&x| x == 32));
        s.clear();
        assert!(s.writes(32).is_empty() && s.get(block(0)).is_none());
        s.insert(3, &[1; BLOCK_SIZE]);
        assert_eq!(s.writes(32).len(), 1);
    }
}
