//! Written once: the bytes of large whole-block writes go straight to data-region blocks, and
//! their log records name those blocks instead of carrying the bytes (`docs/format.md`,
//! "Placed writes").
//!
//! Whoever holds a write's bytes (the driver's connection thread, which read them from the
//! socket into an aligned buffer) calls [`Placer::place`]: it takes blocks the volume lent
//! ([`crate::volume::Volume::lend`]), hashes each 4 KiB, writes them there
//! (`Device::write_placed`: into the page cache when the device uses one, with write-back
//! started at once, so reads of fresh data hit the cache; else O_DIRECT from the caller's
//! //! buffer) and returns the entry data of a [`Command::Placed`] that names them. Those writes
//! are not durable yet: the device must be flushed after they were written and before a batch
//! holding their entry is appended to the log ([`needs_flush`]; the driver's flusher thread
//! does it before the node may take the entry), so a durable record never names a block that
//! is not durable first.
//! Applying such an entry links the blocks into the tree (no copy, no hashing); recovery
//! holds the blocks that unapplied records name before it replays them.
//!
//! Placing costs a flush before the record's own durable write, so small writes stay inline:
//! `min_bytes` is the threshold.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use raft::eraftpb::{Entry, EntryType};

use crate::command::{Command, PlacedBlock, COMMAND_MAGIC};
use crate::device::{Device, BLOCK, BLOCK_SIZE};
use crate::hash;
use crate::volume::VolumeError;

/// Blocks the placer keeps lent beyond what one write needs, so that most writes take no lock
/// of the volume (4 MiB).
const SPARE_BLOCKS: u64 = 1024;

/// How the placer borrows blocks: `Volume::lend` under the volume's lock.
pub type Lend<'a> = dyn FnMut(u64) -> Result<Vec<u64>, VolumeError> + 'a;

/// Places the payload of large whole-block writes; see the module docs. Shared by the
/// threads that place writes.
#[derive(Debug)]
pub struct Placer {
    dev: Arc<dyn Device>,
    /// Whole-block writes of at least this many bytes are placed; 0 places none.
    min_bytes: u64,
    /// Lent blocks not used yet, in the order they were lent (mostly consecutive).
    spare: Mutex<VecDeque<u64>>,
}

/// Whether entry data is a placed write: the device must be flushed after its blocks were
/// written and before it is logged (they were written but not flushed).
pub fn needs_flush(data: &[u8]) -> bool {
    data.len() > 4 && data[..4] == COMMAND_MAGIC && data[4] == Command::PLACED_KIND
}

impl Placer {
    pub fn new(dev: Arc<dyn Device>, min_bytes: u64) -> Self {
        Self { dev, min_bytes, spare: Mutex::new(VecDeque::new()) }
    }

    /// Whether a write of `length` bytes at `offset` is one to place.
    pub fn wants(&self, offset: u64, length: u64) -> bool {
        self.min_bytes > 0
            && offset.is_multiple_of(BLOCK)
            && length.is_multiple_of(BLOCK)
            && length > 0
            && length >= self.min_bytes
    }

    /// Writes `data` (whole blocks, for `offset`) to blocks the volume lends and returns the
    /// entry data that names them, or `None` when no blocks could be had (space is short: the
    /// write goes inline, and fails there with `NoSpace` if it must). The bytes are written
    /// but not flushed (see the module docs). A device error is fatal to the caller's driver
    /// (the device is poisoned: the next flush fails and the driver stops).
    pub fn place(&self, offset: u64, data: &[u8], lend: &mut Lend<'_>) -> Result<Option<Vec<u8>>, VolumeError> {
        let count = (data.len() / BLOCK_SIZE) as u64;
        let Some(blocks) = self.take(count, lend)? else { return Ok(None) };
        let mut placed = Vec::with_capacity(blocks.len());
        let mut writes: Vec<(u64, &[u8])> = Vec::new();
        let mut i = 0;
        while i < blocks.len() {
            // A run: blocks lent consecutively take consecutive bytes of `data`.
            let mut j = i + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            writes.push((blocks[i] * BLOCK, &data[i * BLOCK_SIZE..j * BLOCK_SIZE]));
            i = j;
        }
        let mut hashes = vec![[0u8; 32]; blocks.len()];
        hash::data_blocks(data.as_chunks().0, &mut hashes);
        for (block, hash) in blocks.iter().zip(hashes) {
            placed.push(PlacedBlock::new(*block, hash));
        }
        if let Err(source) = self.dev.write_placed(&writes) {
            return Err(VolumeError::Device { block: blocks[0], source });
        }
        Ok(Some(Command::Placed { offset, blocks: &placed }.encode()))
    }

    /// `count` lent blocks from the spare, refilled from the volume when short: with some
    /// to spare for the next writes, else exactly what is missing, else `None`.
    fn take(&self, count: u64, lend: &mut Lend<'_>) -> Result<Option<Vec<u64>>, VolumeError> {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        let have = spare.len() as u64;
        if have < count {
            let mut got = false;
            for ask in [count - have + SPARE_BLOCKS, count - have] {
                match lend(ask) {
                    Ok(blocks) => {
                        spare.extend(blocks);
                        got = true;
                        break;
                    }
                    Err(VolumeError::Alloc(crate::alloc::AllocError::NoSpace)) => {}
                    Err(e) => return Err(e),
                }
            }
            if !got {
                return Ok(None);
            }
        }
        Ok(Some(spare.drain(..count as usize).collect()))
    }

    /// Places the writes among `entries` that qualify and flushes: what a log owner that has
    /// the entries but not the clients' buffers does (the volume tests).
    pub fn place_entries(&self, entries: &mut [Entry], lend: &mut Lend<'_>) -> Result<u64, VolumeError> {
        let mut placed = 0;
        for e in entries.iter_mut().filter(|e| e.get_entry_type() == EntryType::EntryNormal) {
            let Ok(Command::Write { offset, data }) = Command::decode(&e.data) else { continue };
            if !self.wants(offset, data.len() as u64) {
                continue;
            }
            if let Some(cmd) = self.place(offset, data, lend)? {
                e.data = cmd;
                placed += 1;
            }
        }
        if placed > 0 {
            self.dev.flush().map_err(|source| VolumeError::Device { block: 0, source })?;
        }
        Ok(placed)
    }
}
