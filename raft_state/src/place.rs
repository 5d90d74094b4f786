//! Written once: the bytes of large whole-block writes go straight to data-region blocks, and
//! their log records name those blocks instead of carrying the bytes (`docs/format.md`,
//! "placed writes").
//!
//! The log's owner calls [`Placer::place`] on the entries of a batch before it appends them:
//! it borrows free blocks from the volume ([`crate::volume::Volume::lend`]), writes each
//! placed write's bytes there, flushes, and only then rewrites the entries as
//! [`Command::Placed`] — so a durable record never names a block that is not durable first.
//! Applying such an entry links the blocks into the tree (no copy, no hashing); recovery holds
//! the blocks that unapplied records name before it replays them.
//!
//! Placing costs a second durable write before the record's (data, then record), so small
//! writes stay inline: `min_bytes` is the threshold.

use std::collections::VecDeque;
use std::sync::Arc;

use raft::eraftpb::{Entry, EntryType};

use crate::command::{Command, PlacedBlock};
use crate::device::{AlignedBuf, Device, BLOCK, BLOCK_SIZE};
use crate::hash;
use crate::volume::VolumeError;

/// Blocks the placer keeps lent beyond what a batch needs, so that most batches of small
/// placed writes take no lock of the volume.
const SPARE_BLOCKS: u64 = 256;
/// Consecutive blocks written with one write at most.
const MAX_RUN_BLOCKS: usize = 256;

/// What one `place` call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub entries: u64,
    pub blocks: u64,
}

/// Places the payload of large whole-block writes; see the module docs.
#[derive(Debug)]
pub struct Placer {
    dev: Arc<dyn Device>,
    /// Whole-block writes of at least this many bytes are placed; 0 places none.
    min_bytes: u64,
    /// Lent blocks not used yet, in the order they were lent (mostly consecutive).
    spare: VecDeque<u64>,
    /// Where the payloads are gathered for O_DIRECT writes (kept between batches).
    staging: AlignedBuf,
}

impl Placer {
    pub fn new(dev: Arc<dyn Device>, min_bytes: u64) -> Self {
        Self { dev, min_bytes, spare: VecDeque::new(), staging: AlignedBuf::blocks(0) }
    }

    /// The blocks of `data` if it is a write to place.
    fn wants(&self, entry: &Entry) -> Option<u64> {
        if self.min_bytes == 0 || entry.get_entry_type() != EntryType::EntryNormal {
            return None;
        }
        match Command::decode(&entry.data) {
            Ok(Command::Write { offset, data })
                if offset.is_multiple_of(BLOCK)
                    && data.len().is_multiple_of(BLOCK_SIZE)
                    && !data.is_empty()
                    && data.len() as u64 >= self.min_bytes =>
            {
                Some(data.len() as u64 / BLOCK)
            }
            _ => None,
        }
    }

    /// Places the writes among `entries` that qualify, as far as `lend` gives blocks (a write
    /// it cannot give blocks for stays inline). On return the placed bytes are durable and the
    /// entries name their blocks. An error is fatal to the log's owner (fail-stop): entries may
    /// be half rewritten.
    pub fn place(
        &mut self,
        entries: &mut [Entry],
        lend: &mut dyn FnMut(u64) -> Result<Vec<u64>, VolumeError>,
    ) -> Result<Placed, VolumeError> {
        let wanted: Vec<(usize, u64)> =
            entries.iter().enumerate().filter_map(|(i, e)| self.wants(e).map(|n| (i, n))).collect();
        let need: u64 = wanted.iter().map(|&(_, n)| n).sum();
        if need == 0 {
            return Ok(Placed::default());
        }
        self.refill(need, lend)?;
        let mut out = Placed::default();
        let mut writes: Vec<(u64, &[u8])> = Vec::new();
        let mut placed: Vec<(usize, u64, Vec<PlacedBlock>)> = Vec::new();
        for &(i, n) in &wanted {
            if (self.spare.len() as u64) < n {
                break;
            }
            let Ok(Command::Write { offset, data }) = Command::decode(&entries[i].data) else { continue };
            let mut blocks = Vec::with_capacity(n as usize);
            for chunk in data.chunks_exact(BLOCK_SIZE) {
                let Some(block) = self.spare.pop_front() else { break };
                blocks.push(PlacedBlock::new(block, hash::data_block(chunk)));
                writes.push((block, chunk));
            }
            out.entries += 1;
            out.blocks += n;
            placed.push((i, offset, blocks));
        }
        writes.sort_unstable_by_key(|&(block, _)| block);
        crate::device::write_blocks(&*self.dev, &writes, MAX_RUN_BLOCKS, &mut self.staging)
            .map_err(|(block, source)| VolumeError::Device { block, source })?;
        self.dev.flush().map_err(|source| VolumeError::Device { block: 0, source })?;
        // The bytes are durable; no record names them yet.
        crate::failpoint("place::after_data");
        drop(writes);
        for (i, offset, blocks) in placed {
            entries[i].data = Command::Placed { offset, blocks: &blocks }.encode();
        }
        Ok(out)
    }

    /// Makes `need` blocks spare if the volume lends them: with some to spare for the next
    /// batches, else exactly what is missing, else none (the writes stay inline).
    fn refill(
        &mut self,
        need: u64,
        lend: &mut dyn FnMut(u64) -> Result<Vec<u64>, VolumeError>,
    ) -> Result<(), VolumeError> {
        let have = self.spare.len() as u64;
        if have >= need {
            return Ok(());
        }
        for ask in [need - have + SPARE_BLOCKS, need - have] {
            match lend(ask) {
                Ok(blocks) => {
                    self.spare.extend(blocks);
                    return Ok(());
                }
                Err(VolumeError::Alloc(crate::alloc::AllocError::NoSpace)) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
