use raft::eraftpb::{Entry, EntryType};
use slog::warn;

use super::{Applied, Volume, VolumeError, LOW_SPACE_FACTOR, MAX_RUN_BLOCKS, TRIM_SLACK_PATHS, UNMAP_PIECE_BLOCKS};
use crate::alloc::AllocError;
use crate::command::{Command, PlacedBlock};
use crate::device::{AlignedBuf, DeviceError, BLOCK, BLOCK_SIZE};
use crate::hash::{self, Hash};
use crate::tree::{self, Ptr, TreeError};

impl Volume {
    /// Lends `count` free blocks to the log for placed writes (`Command::Placed`), or fails
    /// with `NoSpace` (the write waits for space, then goes inline). Keeps the metadata
    /// reserve, counting a path of the block map for every lent block, and room for inline
    /// writes besides (`inline_headroom`): a small write logged while placed writes wait for
    /// their flush is applied before them, with all their blocks still lent, and must not
    /// find the volume full because of them.
    pub fn lend(&mut self, count: u64) -> Result<Vec<u64>, VolumeError> {
        self.check()?;
        let slack = TRIM_SLACK_PATHS * u64::from(self.map.height());
        let need = count + self.metadata_need_with(count) + slack + self.inline_headroom();
        if self.alloc.free_blocks() < need {
            self.space_pressure = 2;
            return Err(AllocError::NoSpace.into());
        }
        let lent = self.alloc.lend(&*self.dev, count);
        lent.map_err(|e| {
            if !matches!(e, AllocError::NoSpace) {
                self.poisoned = true;
            }
            e.into()
        })
    }

    /// Applies a committed entry. Entries at or below the applied index are skipped, and every
    /// command is idempotent, so replays and resends are safe.
    pub fn apply(&mut self, entry: &Entry) -> Result<Applied, VolumeError> {
        let applied = self.apply_staged(std::slice::from_ref(entry))?;
        self.write_staged()?;
        Ok(applied.first().copied().unwrap_or(Applied::Done))
    }

    /// Applies committed entries in order, like `apply` one by one, but writes the new data
    /// blocks of all of them at the end, consecutive blocks with one write. Nothing can read
    /// the volume meanwhile (`&mut self`); partial writes within the batch see earlier ones.
    pub fn apply_batch(&mut self, entries: &[Entry]) -> Result<Vec<Applied>, VolumeError> {
        let out = self.apply_staged(entries)?;
        self.write_staged()?;
        Ok(out)
    }

    /// `apply_batch` without writing the new data blocks: they wait in memory for
    /// `write_staged`, which the caller must call before it lets anything read the volume
    /// (a read would find blocks that are mapped but not written). Lets the caller answer
    /// its clients first: the entries are durable in the log already.
    pub fn apply_staged(&mut self, entries: &[Entry]) -> Result<Vec<Applied>, VolumeError> {
        let (hashes, ranges) = whole_block_hashes(entries, self.applied_index);
        let mut out = Vec::with_capacity(entries.len());
        for (e, range) in entries.iter().zip(ranges) {
            out.push(self.apply_one(e, &hashes[range])?);
        }
        Ok(out)
    }

    /// Writes the staged data blocks; any error poisons the volume.
    pub fn write_staged(&mut self) -> Result<(), VolumeError> {
        let writes = self.staged.writes(MAX_RUN_BLOCKS as usize);
        if let Err(source) = self.dev.write_many(&writes) {
            self.poisoned = true;
            let block = writes.first().map_or(0, |w| w.0 / BLOCK);
            return Err(VolumeError::Device { block, source });
        }
        self.staged.clear();
        Ok(())
    }

    /// `hashes`: the entry's `whole_blocks`' hashes (for an inline write).
    fn apply_one(&mut self, entry: &Entry, hashes: &[Hash]) -> Result<Applied, VolumeError> {
        self.check()?;
        if entry.index <= self.applied_index {
            return Ok(Applied::Done);
        }
        // Committed entries come in order without gaps; one that skips an index means the
        // caller lost one, and applying past it would lose that write for good.
        if entry.index != self.applied_index + 1 {
            return Err(VolumeError::Gap { applied: self.applied_index, index: entry.index });
        }
        let outcome = match entry.get_entry_type() {
            EntryType::EntryNormal if entry.data.is_empty() => Ok(Applied::Done),
            EntryType::EntryNormal => match Command::decode(&entry.data) {
                Ok(cmd) => {
                    let (offset, length) = cmd.range();
                    match self.check_range(offset, length) {
                        Ok(()) => match cmd {
                            Command::Placed { offset, blocks } => self.link_placed(offset / BLOCK, blocks, entry.index),
                            _ => self.apply_command(&cmd, hashes),
                        },
                        Err(e) => {
                            warn!(self.log, "entry not applied"; "index" => entry.index, "error" => %e);
                            Ok(Applied::Invalid)
                        }
                    }
                }
                Err(e) => {
                    warn!(self.log, "entry not applied"; "index" => entry.index, "error" => %e);
                    Ok(Applied::Invalid)
                }
            },
            // A single-node group never changes its membership; the conf state stays.
            EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                warn!(self.log, "ignoring a configuration change entry"; "index" => entry.index);
                Ok(Applied::Done)
            }
        };
        match outcome {
            Ok(applied) => {
                self.applied_index = entry.index;
                self.applied_term = entry.term;
                Ok(applied)
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// `hashes`: those of `whole_blocks(cmd)`, in order.
    fn apply_command(&mut self, cmd: &Command<'_>, hashes: &[Hash]) -> Result<Applied, VolumeError> {
        let (offset, length) = cmd.range();
        let end = offset + length;
        let mut block = AlignedBuf::blocks(1);
        let mut at = offset;
        let mut damaged = false;
        while at < end {
            let vb = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let mut n = ((BLOCK - at % BLOCK).min(end - at)) as usize;
            let whole = within == 0 && n == BLOCK_SIZE;
            let result = match cmd {
                Command::Write { data, .. } if whole => {
                    // A run of whole blocks at once: consecutive blocks go out in one write.
                    n = ((end - at) / BLOCK).min(MAX_RUN_BLOCKS) as usize * BLOCK_SIZE;
                    // The whole blocks start at the first block boundary of the write.
                    let k = ((at - offset.next_multiple_of(BLOCK)) / BLOCK) as usize;
                    let run = &data[(at - offset) as usize..][..n];
                    match hashes.get(k..k + n / BLOCK_SIZE) {
                        Some(hashes) => self.put_whole(vb, run, hashes),
                        // Should `whole_block_hashes` ever disagree with this loop about
                        // which blocks are whole, they are hashed here, never mapped with
                        // hashes that are not theirs.
                        None => {
                            let mut hashes = vec![[0u8; 32]; n / BLOCK_SIZE];
                            hash::data_blocks(run.as_chunks().0, &mut hashes);
                            self.put_whole(vb, run, &hashes)
                        }
                    }
                }
                Command::Write { data, .. } => {
                    self.patch(vb, &mut block, within..within + n, Some(&data[(at - offset) as usize..][..n]))
                }
                Command::Trim { .. } | Command::WriteZeroes { .. } if whole => {
                    // A run of whole blocks at once, by the tree's structure (bounded pieces,
                    // so the list of freed blocks stays small whatever the range).
                    n = ((end - at) / BLOCK).min(UNMAP_PIECE_BLOCKS) as usize * BLOCK_SIZE;
                    self.unmap_whole(vb, (n / BLOCK_SIZE) as u64)
                }
                Command::Trim { .. } | Command::WriteZeroes { .. } => {
                    self.patch(vb, &mut block, within..within + n, None)
                }
                // Applied by `link_placed`.
                Command::Placed { .. } => return Ok(Applied::Invalid),
            };
            match result {
                Err(VolumeError::Alloc(AllocError::NoSpace)) => return Ok(Applied::NoSpace),
                // Damage is an error for this request, not for the volume: poisoning would
                // replay the same entry into the same damage at every open.
                Err(VolumeError::Tree(
                    e @ (TreeError::HashMismatch { .. }
                    | TreeError::BadNode { .. }
                    | TreeError::Device { source: DeviceError::Io { .. }, .. }),
                )) => {
                    warn!(self.log, "block not written: its old content or map node is unreadable";
                        "block" => vb, "error" => %e);
                    damaged = true;
                }
                other => other?,
            }
            at += n as u64;
        }
        Ok(if damaged { Applied::Damaged } else { Applied::Done })
    }

    /// Applies a placed write of entry `index`: the tree adopts the blocks its record names,
    /// which hold its bytes already (no copy, no hash). A block whose map path is damaged is
    /// left as it was and its placed copy freed (it stays held while a replay may need it).
    fn link_placed(&mut self, first_vb: u64, blocks: &[PlacedBlock], index: u64) -> Result<Applied, VolumeError> {
        let mut damaged = false;
        for (i, b) in blocks.iter().enumerate() {
            let (vb, block) = (first_vb + i as u64, b.block());
            self.alloc.adopt(&*self.dev, block, index)?;
            match self.map_block(vb, Some(Ptr { block, hash: b.hash })) {
                Ok(()) => {}
                Err(VolumeError::Tree(e)) => {
                    warn!(self.log, "block not written: its map node is unreadable"; "block" => vb, "error" => %e);
                    self.alloc.free(&*self.dev, block)?;
                    damaged = true;
                }
                Err(e) => return Err(e),
            }
        }
        self.placed_since_seal += blocks.len() as u64;
        Ok(if damaged { Applied::Damaged } else { Applied::Done })
    }

    /// Read-modify-write of the bytes `range` of block `vb`: `src` there, or zeros.
    fn patch(
        &mut self,
        vb: u64,
        block: &mut AlignedBuf,
        range: std::ops::Range<usize>,
        src: Option<&[u8]>,
    ) -> Result<(), VolumeError> {
        self.read_block(vb, block)?;
        match src {
            Some(src) => block[range].copy_from_slice(src),
            None => block[range].fill(0),
        }
        self.put(vb, block)
    }

    /// Unmaps `count` whole blocks from `first_vb` on and frees what they pointed at: the
    /// work follows the mapped part of the range, so a huge trim of a thin volume is cheap.
    fn unmap_whole(&mut self, first_vb: u64, count: u64) -> Result<(), VolumeError> {
        // The two edges of the range may dirty a path each (metadata_need counts one).
        if self.alloc.free_blocks() < self.metadata_need() + u64::from(self.map.height()) {
            self.space_pressure = 2;
            return Err(AllocError::NoSpace.into());
        }
        let mut unmapped = Vec::new();
        let result = self.map.unmap_range(&*self.dev, first_vb..first_vb + count, &mut unmapped);
        for block in unmapped {
            self.alloc.free(&*self.dev, block)?;
        }
        if self.alloc.free_blocks() < LOW_SPACE_FACTOR * (1 + self.data_reserve()) {
            self.space_pressure = 2;
        }
        result.map_err(VolumeError::from)
    }

    /// Maps virtual block `vb` to a fresh copy of `content` (unmapping is `unmap_whole`).
    fn put(&mut self, vb: u64, content: &[u8]) -> Result<(), VolumeError> {
        if self.alloc.free_blocks() < 1 + self.data_reserve() {
            // Checkpoints release what earlier trims freed; ask for them.
            self.space_pressure = 2;
            return Err(AllocError::NoSpace.into());
        }
        let block = self.alloc.allocate(&*self.dev)?;
        self.staged.insert(block, content);
        let mapped = self.map_block(vb, Some(Ptr { block, hash: hash::data_block(content) }));
        if let Err(VolumeError::Tree(_)) = &mapped {
            // Not mapped (a damaged node on the path): the fresh copy goes back.
            self.alloc.free(&*self.dev, block)?;
        }
        mapped
    }

    /// Maps the whole blocks from `first_vb` on to fresh copies of `data`. The blocks are
    /// allocated first, so physically consecutive ones are written with one write. On
    /// `NoSpace` the blocks placed so far are still mapped (a failed write may change part of
    /// its range).
    /// `hashes` are those of `data`'s blocks.
    fn put_whole(&mut self, first_vb: u64, data: &[u8], hashes: &[Hash]) -> Result<(), VolumeError> {
        let count = data.len() / BLOCK_SIZE;
        debug_assert_eq!(hashes.len(), count, "one hash per block");
        let height = u64::from(self.map.height());
        let mut placed: Vec<u64> = Vec::with_capacity(count);
        let mut outcome = Ok(());
        while placed.len() < count {
            // Every block placed but not yet mapped may still dirty a path of the map.
            let reserve = 1 + self.data_reserve() + placed.len() as u64 * height;
            if self.alloc.free_blocks() < reserve {
                self.space_pressure = 2;
                outcome = Err(AllocError::NoSpace.into());
                break;
            }
            placed.push(self.alloc.allocate(&*self.dev)?);
        }
        for (i, &block) in placed.iter().enumerate() {
            self.staged.insert(block, &data[i * BLOCK_SIZE..][..BLOCK_SIZE]);
        }
        for (i, (&block, &hash)) in placed.iter().zip(hashes).enumerate() {
            match self.map_block(first_vb + i as u64, Some(Ptr { block, hash })) {
                Ok(()) => {}
                // A damaged map node on this block's path: the block stays as it was, the
                // fresh copy goes back (apply_command() reports the damage).
                Err(e @ VolumeError::Tree(_)) => {
                    self.alloc.free(&*self.dev, block)?;
                    if outcome.is_ok() {
                        outcome = Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        outcome
    }

    /// Points `vb` at `target` (or unmaps it) and frees the block it pointed at.
    fn map_block(&mut self, vb: u64, target: Option<Ptr>) -> Result<(), VolumeError> {
        if let Some(old) = self.map.set(&*self.dev, vb, target)? {
            self.alloc.free(&*self.dev, old.block)?;
            if self.alloc.free_blocks() < LOW_SPACE_FACTOR * (1 + self.data_reserve()) {
                // A durable block freed now is reusable only after two checkpoints.
                self.space_pressure = 2;
            }
        }
        Ok(())
    }

    /// Reads virtual block `vb` (zeros if unmapped), verified against its hash.
    fn read_block(&self, vb: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        match self.map.get(&*self.dev, vb)? {
            // Written earlier in this batch: not on the device yet.
            Some(ptr) if let Some(data) = self.staged.get(ptr.block) => buf.copy_from_slice(data),
            Some(ptr) => tree::read_verified(&*self.dev, ptr, buf)?,
            None => buf.fill(0),
        }
        Ok(())
    }
}

/// The bytes of an inline write's blocks that it writes whole: from its first block boundary
/// to its last (empty for a write within one block, and for every other command).
fn whole_blocks<'a>(cmd: &Command<'a>) -> &'a [u8] {
    let Command::Write { offset, data } = *cmd else { return &[] };
    let skip = (offset.next_multiple_of(BLOCK) - offset) as usize;
    let rest = data.get(skip..).unwrap_or(&[]);
    &rest[..rest.len() / BLOCK_SIZE * BLOCK_SIZE]
}

/// The hashes of the whole blocks of every inline write among `entries` not yet applied (index
/// above `applied`), computed together (`hash::data_blocks` hashes 16 blocks side by side: a
/// batch of 4 KiB writes is hashed twice as fast as one by one), and each entry's range of
/// them.
fn whole_block_hashes(entries: &[Entry], applied: u64) -> (Vec<Hash>, Vec<std::ops::Range<usize>>) {
    let mut ranges = Vec::with_capacity(entries.len());
    let mut blocks: Vec<&[u8; BLOCK_SIZE]> = Vec::new();
    for e in entries {
        let from = blocks.len();
        if e.index > applied && e.get_entry_type() == EntryType::EntryNormal {
            if let Ok(cmd) = Command::decode(&e.data) {
                blocks.extend(whole_blocks(&cmd).as_chunks::<BLOCK_SIZE>().0);
            }
        }
        ranges.push(from..blocks.len());
    }
    let mut hashes = vec![[0u8; 32]; blocks.len()];
    hash::data_blocks(blocks, &mut hashes);
    (hashes, ranges)
}
