//! The allocator of the data region: one bit per block in copy-on-write bitmap blocks, which
//! are the leaves of a tree of kind `Allocator`.
//!
//! Invariant (see `docs/format.md`): the bitmap of root k+1 marks every block reachable from
//! root k+1 or from root k, so a block is reused only when neither the current nor the backup
//! root can reach it.
//! - A block allocated since the last checkpoint and freed again is free at once: no durable
//!   root reaches it.
//! - A block that a durable root reaches is *deferred* when freed: it stays marked in the next
//!   root, and the checkpoint after that releases it.
//! - Bitmap blocks are loaded on demand (next-fit cursor); opening reads none of them. Clean
//!   ones are dropped again beyond a bound, so memory follows the working set.
//! - The count of blocks in use is kept exactly and recorded in every root, so free space is
//!   known without reading the bitmaps, and `metadata_bound` says how many blocks the next
//!   checkpoint of the allocator may need at most (the caller keeps them in reserve).
//! - Blocks the log holds (written once, `docs/format.md`): the log store borrows free blocks
//!   (`lend`) and writes a write's bytes there before its record names them; applying the
//!   record `adopt`s them into the tree. From the loan until no root that may still be opened
//!   could replay the record (`unpin_through` the backup's applied index), the block is
//!   *held*: never handed out again, even when the tree frees it meanwhile, because a replay
//!   from an older root links it again and may read it. A held block is marked in a bitmap
//!   only while the tree reaches it, so no root's bitmap ever marks a block only the log
//!   names (nothing leaks when the log's records are lost to a crash). Blocks are lent only
//!   when free in the current *and* the backup root's bitmap, so a record never names a block
//!   that the root it is replayed from marks in use.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::device::{AlignedBuf, Device, DeviceError, BLOCK};
use crate::hash;
use crate::tree::{self, BlockTree, Ptr, TreeError, TreeKind, TreeRef};

/// Data blocks covered by one bitmap block.
pub const BITS_PER_BITMAP: u64 = 8 * BLOCK;
/// Clean bitmap blocks kept in memory by default (4 KiB each).
pub const DEFAULT_BITMAP_CACHE: usize = 256;

/// Errors of the allocator.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("no free block in the data region")]
    NoSpace,
    #[error("block {block} is outside the data region")]
    OutOfRegion { block: u64 },
    #[error("block {block} is freed but was not in use: the allocator and the tree disagree")]
    DoubleFree { block: u64 },
    #[error("block {block} is adopted from the log but was not lent to it")]
    NotLent { block: u64 },
    #[error("a log record names block {block}, which {why}")]
    BadLogBlock { block: u64, why: &'static str },
    #[error("the root says {used} blocks are in use, but the data region has only {blocks}")]
    BadUsedCount { used: u64, blocks: u64 },
    #[error("allocator tree")]
    Tree(#[from] TreeError),
    #[error("bitmap block I/O failed at block {block}")]
    Device {
        block: u64,
        #[source]
        source: DeviceError,
    },
}

#[derive(Debug)]
struct Bitmap {
    bits: AlignedBuf,
    dirty: bool,
}

/// A block the log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Lent for a record not yet applied: its bit is clear.
    Lent,
    /// Named by the record of entry `index`, applied; `marked` while its bit is set.
    Named { index: u64, marked: bool },
}

/// The allocator; see the module docs.
#[derive(Debug)]
pub struct Allocator {
    data_start: u64,
    data_blocks: u64,
    tree: BlockTree,
    loaded: BTreeMap<u64, Bitmap>,
    /// Clean entries of `loaded`, and how many of them to keep.
    clean_loaded: usize,
    bitmap_cache: usize,
    /// Blocks marked in use.
    used: u64,
    /// Next block (relative to the region) the next-fit search tries.
    cursor: u64,
    /// Blocks allocated since the last checkpoint: no durable root reaches them.
    fresh: HashSet<u64>,
    /// Blocks a durable root reaches, freed since the last checkpoint.
    deferred: Vec<u64>,
    /// Blocks freed before the last checkpoint: released by the next one.
    release: Vec<u64>,
    /// Blocks the last checkpoint released (free in its bitmap) while its root is not durable
    /// yet: the backup root, which reaches them, is still needed, so they are not handed out
    /// until `root_durable`.
    quarantine: HashSet<u64>,
    /// What the checkpoint before the last released: free in the current root's bitmap but
    /// marked in the backup's, so not lent (a replay from the backup must not find a record
    /// naming a block it marks) until the next root is durable.
    lend_quarantine: HashSet<u64>,
    /// Blocks the log holds (see the module docs).
    held: HashMap<u64, Held>,
    /// The `Named` blocks in entry order, for `unpin_through`.
    held_order: VecDeque<(u64, u64)>,
    /// Held blocks whose bit is clear: not in use, yet not free.
    held_unmarked: u64,
    /// Held blocks still `Lent`.
    lent: u64,
}

impl Allocator {
    fn tree_height(data_blocks: u64) -> u32 {
        BlockTree::height_for(data_blocks.div_ceil(BITS_PER_BITMAP))
    }

    /// The allocator of a freshly formatted volume: everything free.
    pub fn new(volume_id: [u8; 16], data_start: u64, data_blocks: u64) -> Result<Self, AllocError> {
        let tree = BlockTree::new(TreeKind::Allocator, volume_id, Self::tree_height(data_blocks))?;
        Ok(Self::with_tree(tree, data_start, data_blocks, 0, Vec::new()))
    }

    /// The allocator a root names, with `used` blocks in use. `release` is what the next
    /// checkpoint releases: the blocks the backup root reaches and the current does not (see
    /// [`Allocator::release_set`]).
    pub fn open(
        volume_id: [u8; 16],
        data_start: u64,
        data_blocks: u64,
        at: TreeRef,
        used: u64,
        release: Vec<u64>,
    ) -> Result<Self, AllocError> {
        let height = Self::tree_height(data_blocks);
        if at.height != height {
            return Err(TreeError::BadHeight { height: at.height }.into());
        }
        if used > data_blocks {
            return Err(AllocError::BadUsedCount { used, blocks: data_blocks });
        }
        let tree = BlockTree::open(TreeKind::Allocator, volume_id, at)?;
        Ok(Self::with_tree(tree, data_start, data_blocks, used, release))
    }

    fn with_tree(tree: BlockTree, data_start: u64, data_blocks: u64, used: u64, release: Vec<u64>) -> Self {
        Self {
            data_start,
            data_blocks,
            tree,
            loaded: BTreeMap::new(),
            clean_loaded: 0,
            bitmap_cache: DEFAULT_BITMAP_CACHE,
            used,
            cursor: 0,
            fresh: HashSet::new(),
            deferred: Vec::new(),
            release,
            quarantine: HashSet::new(),
            lend_quarantine: HashSet::new(),
            held: HashMap::new(),
            held_order: VecDeque::new(),
            held_unmarked: 0,
            lent: 0,
        }
    }

    /// The blocks reachable from the backup root's trees but not the current root's: what the
    /// next checkpoint after a restart must release. Each pair is (backup, current).
    pub fn release_set(
        volume_id: [u8; 16],
        dev: &dyn Device,
        block_map: (TreeRef, TreeRef),
        allocator: (TreeRef, TreeRef),
    ) -> Result<Vec<u64>, AllocError> {
        let mut out = BlockTree::freed_between(TreeKind::BlockMap, volume_id, dev, block_map.0, block_map.1)?;
        out.extend(BlockTree::freed_between(TreeKind::Allocator, volume_id, dev, allocator.0, allocator.1)?);
        Ok(out)
    }

    /// Adds to what the next checkpoint releases (the release set of `open`, when it was
    /// computed later).
    pub fn add_release(&mut self, blocks: Vec<u64>) {
        self.release.extend(blocks);
    }

    /// Keeps at most `bitmaps` clean bitmap blocks and `nodes` allocator tree nodes in memory.
    pub fn set_cache_capacity(&mut self, bitmaps: usize, nodes: usize) {
        self.bitmap_cache = bitmaps.max(1);
        self.tree.set_cache_capacity(nodes);
    }

    /// Bitmap blocks held in memory now (clean and dirty).
    pub fn loaded_bitmaps(&self) -> usize {
        self.loaded.len()
    }

    /// Blocks of the data region marked in use (including blocks whose release waits for a
    /// checkpoint).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Blocks that can be handed out now.
    pub fn free_blocks(&self) -> u64 {
        self.data_blocks.saturating_sub(self.used + self.quarantine.len() as u64 + self.held_unmarked)
    }

    /// Blocks lent to the log and not adopted yet: each may dirty a path of the block map
    /// when its record is applied.
    pub fn lent(&self) -> u64 {
        self.lent
    }

    /// Blocks the log holds (lent, or named by a record a root may still replay).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The most blocks a checkpoint of the allocator can need: every bitmap block and every
    /// node of its tree written anew.
    pub fn metadata_bound(&self) -> u64 {
        let mut total = 0;
        let mut level = self.data_blocks.div_ceil(BITS_PER_BITMAP);
        for _ in 0..=self.tree.height() {
            total += level;
            level = level.div_ceil(tree::FANOUT);
        }
        total
    }

    fn bitmap(&mut self, dev: &dyn Device, index: u64) -> Result<&mut Bitmap, AllocError> {
        if !self.loaded.contains_key(&index) {
            if self.clean_loaded >= self.bitmap_cache {
                // Dirty blocks stay until the checkpoint writes them; clean ones are on disk.
                self.loaded.retain(|_, m| m.dirty);
                self.clean_loaded = 0;
            }
            let mut bits = AlignedBuf::blocks(1);
            if let Some(ptr) = self.tree.get(dev, index)? {
                tree::read_verified(dev, ptr, &mut bits)?;
            }
            self.loaded.insert(index, Bitmap { bits, dirty: false });
            self.clean_loaded += 1;
        }
        // Inserted just above when missing.
        self.loaded.get_mut(&index).ok_or(AllocError::NoSpace)
    }

    fn locate(&self, block: u64) -> Result<(u64, usize), AllocError> {
        let rel = block.checked_sub(self.data_start).filter(|r| *r < self.data_blocks);
        let rel = rel.ok_or(AllocError::OutOfRegion { block })?;
        Ok((rel / BITS_PER_BITMAP, (rel % BITS_PER_BITMAP) as usize))
    }

    /// Whether `block` is marked in use.
    pub fn is_used(&mut self, dev: &dyn Device, block: u64) -> Result<bool, AllocError> {
        let (index, bit) = self.locate(block)?;
        let map = self.bitmap(dev, index)?;
        Ok(map.bits[bit / 8] & (1 << (bit % 8)) != 0)
    }

    fn set_bit(&mut self, dev: &dyn Device, block: u64, used: bool) -> Result<(), AllocError> {
        let (index, bit) = self.locate(block)?;
        let map = self.bitmap(dev, index)?;
        let mask = 1u8 << (bit % 8);
        let was = map.bits[bit / 8] & mask != 0;
        if was == used {
            // Allocating a used block cannot happen (the search skips them); freeing a free one
            // means the tree and the allocator disagree.
            return Err(AllocError::DoubleFree { block });
        }
        map.bits[bit / 8] ^= mask;
        let was_clean = !std::mem::replace(&mut map.dirty, true);
        if was_clean {
            self.clean_loaded -= 1;
        }
        if used {
            self.used += 1;
        } else {
            self.used -= 1;
        }
        Ok(())
    }

    /// Allocates a free block: next fit from the cursor to the end of the region, then from
    /// its start back to the cursor.
    pub fn allocate(&mut self, dev: &dyn Device) -> Result<u64, AllocError> {
        let block = self.find_free(dev, false)?;
        self.set_bit(dev, block, true)?;
        self.fresh.insert(block);
        Ok(block)
    }

    /// Lends `count` free blocks to the log (all or none: `NoSpace`), preferably consecutive
    /// (next fit). They stay clear in the bitmap and are handed out to no one else until
    /// adopted or, after the backup root passed their record, unpinned. Only blocks free in
    /// both durable roots' bitmaps are lent.
    pub fn lend(&mut self, dev: &dyn Device, count: u64) -> Result<Vec<u64>, AllocError> {
        let mut out = Vec::with_capacity(count as usize);
        while (out.len() as u64) < count {
            match self.find_free(dev, true) {
                Ok(block) => {
                    self.held.insert(block, Held::Lent);
                    self.held_unmarked += 1;
                    self.lent += 1;
                    out.push(block);
                }
                Err(e) => {
                    for block in out {
                        self.held.remove(&block);
                        self.held_unmarked -= 1;
                        self.lent -= 1;
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Recovery: the record of an entry the root has not applied names `block`; hold it as
    /// lent until the replay adopts it. Refuses a block outside the region, one the root marks
    /// in use, or one another record names: the log and the root disagree.
    pub fn hold_for_replay(&mut self, dev: &dyn Device, block: u64) -> Result<(), AllocError> {
        if self.is_used(dev, block)? {
            return Err(AllocError::BadLogBlock { block, why: "the root marks in use" });
        }
        if self.held.insert(block, Held::Lent).is_some() {
            return Err(AllocError::BadLogBlock { block, why: "another log record names too" });
        }
        self.held_unmarked += 1;
        self.lent += 1;
        Ok(())
    }

    /// Recovery: the record of entry `index`, which the current root applied and the backup
    /// did not, names `block`: keep it from being handed out while a replay from the backup
    /// may still link it.
    pub fn pin(&mut self, dev: &dyn Device, block: u64, index: u64) -> Result<(), AllocError> {
        if self.held.contains_key(&block) {
            return Ok(());
        }
        let marked = self.is_used(dev, block)?;
        self.held.insert(block, Held::Named { index, marked });
        self.held_order.push_back((index, block));
        self.held_unmarked += u64::from(!marked);
        Ok(())
    }

    /// The record of entry `index` naming the lent `block` is applied: the tree takes it.
    pub fn adopt(&mut self, dev: &dyn Device, block: u64, index: u64) -> Result<(), AllocError> {
        if self.held.get(&block) != Some(&Held::Lent) {
            return Err(AllocError::NotLent { block });
        }
        self.set_bit(dev, block, true)?;
        self.fresh.insert(block);
        self.held.insert(block, Held::Named { index, marked: true });
        self.held_order.push_back((index, block));
        self.held_unmarked -= 1;
        self.lent -= 1;
        Ok(())
    }

    /// No root that may still be opened replays entries up to `index` any more: the blocks
    /// their records name are the tree's alone (or free).
    pub fn unpin_through(&mut self, index: u64) {
        while let Some(&(at, block)) = self.held_order.front() {
            if at > index {
                break;
            }
            self.held_order.pop_front();
            if let Some(Held::Named { marked: false, .. }) = self.held.remove(&block) {
                self.held_unmarked -= 1;
            }
        }
    }

    /// The next free block by next fit (not marked, not quarantined, not held; when `lending`,
    /// not marked in the backup root either), without taking it.
    fn find_free(&mut self, dev: &dyn Device, lending: bool) -> Result<u64, AllocError> {
        let maps = self.data_blocks.div_ceil(BITS_PER_BITMAP);
        let (start_index, start_bit) = (self.cursor / BITS_PER_BITMAP, (self.cursor % BITS_PER_BITMAP) as usize);
        // maps + 1 steps: the last one revisits the start block's bits before the cursor.
        for step in 0..=maps {
            let index = (start_index + step) % maps;
            let in_map = (self.data_blocks - index * BITS_PER_BITMAP).min(BITS_PER_BITMAP) as usize;
            let lo = if step == 0 { start_bit } else { 0 };
            let hi = if step == maps { start_bit } else { in_map };
            let first = self.data_start + index * BITS_PER_BITMAP;
            self.bitmap(dev, index)?;
            let map = self.loaded.get(&index).ok_or(AllocError::NoSpace)?;
            let taken = |b: usize| {
                let block = first + b as u64;
                map.bits[b / 8] & (1 << (b % 8)) != 0
                    || self.quarantine.contains(&block)
                    || self.held.contains_key(&block)
                    || (lending && self.lend_quarantine.contains(&block))
            };
            if let Some(bit) = (lo..hi).find(|&b| !taken(b)) {
                let block = first + bit as u64;
                self.cursor = (block - self.data_start + 1) % self.data_blocks;
                return Ok(block);
            }
        }
        Err(AllocError::NoSpace)
    }

    /// Frees `block`: at once if no durable root reaches it, else at the checkpoint after next.
    pub fn free(&mut self, dev: &dyn Device, block: u64) -> Result<(), AllocError> {
        if self.fresh.remove(&block) {
            self.set_bit(dev, block, false)?;
            // Still held if the log names it: cleared, but not free.
            if let Some(Held::Named { marked, .. }) = self.held.get_mut(&block) {
                *marked = false;
                self.held_unmarked += 1;
            }
            Ok(())
        } else {
            self.locate(block)?;
            self.deferred.push(block);
            Ok(())
        }
    }

    /// Writes the allocator for the next root: releases the blocks the previous checkpoint
    /// deferred, reserves and writes every dirty bitmap block and allocator node, and returns
    /// the tree to record in the root. The writes are not flushed; the caller flushes once
    /// before writing the root block. Call after the block map tree was flushed.
    ///
    /// The released blocks are free in the bitmap this writes, but nothing is allocated from
    /// them — neither this checkpoint's own blocks nor anything after — until the caller says
    /// the new root is durable (`root_durable`): until then the backup root, which reaches
    /// them, is still needed.
    pub fn checkpoint(&mut self, dev: &dyn Device) -> Result<TreeRef, AllocError> {
        debug_assert!(self.quarantine.is_empty(), "a checkpoint's root is not durable yet");
        let release = std::mem::take(&mut self.release);
        // Clearing their bits will dirty these bitmap blocks: stage them before reserving.
        for &block in &release {
            let (index, _) = self.locate(block)?;
            if !std::mem::replace(&mut self.bitmap(dev, index)?.dirty, true) {
                self.clean_loaded -= 1;
            }
        }
        // Reserve a block for every dirty bitmap block and allocator node. Reserving marks
        // bits, which may dirty more bitmap blocks: repeat until the count is stable.
        let placeholder = Ptr { block: u64::MAX, hash: [0; 32] };
        let mut staged: HashSet<u64> = HashSet::new();
        let mut reserved: Vec<u64> = Vec::new();
        loop {
            let dirty: Vec<u64> = self.loaded.iter().filter(|(_, m)| m.dirty).map(|(i, _)| *i).collect();
            for index in dirty {
                if staged.insert(index) {
                    if let Some(old) = self.tree.set(dev, index, Some(placeholder))? {
                        // The previous version is reachable from the current root.
                        self.deferred.push(old.block);
                    }
                }
            }
            let need = staged.len() as u64 + self.tree.dirty_nodes();
            if reserved.len() as u64 >= need {
                break;
            }
            while (reserved.len() as u64) < need {
                reserved.push(self.allocate(dev)?);
            }
        }
        for &block in &release {
            self.set_bit(dev, block, false)?;
            if let Some(Held::Named { marked: marked @ true, .. }) = self.held.get_mut(&block) {
                *marked = false;
                self.held_unmarked += 1;
            }
        }
        self.quarantine.extend(release);
        let mut indexes: Vec<u64> = staged.into_iter().collect();
        indexes.sort_unstable();
        for index in indexes {
            let block = reserved.pop().ok_or(AllocError::NoSpace)?;
            let map = self.loaded.get_mut(&index).ok_or(AllocError::NoSpace)?;
            dev.write_at(block * BLOCK, &map.bits).map_err(|source| AllocError::Device { block, source })?;
            map.dirty = false;
            self.clean_loaded += 1;
            let ptr = Ptr { block, hash: hash::data_block(&map.bits) };
            self.tree.set(dev, index, Some(ptr))?;
        }
        let at = self.tree.flush(dev, &mut || reserved.pop().ok_or(TreeError::NoSpace))?;
        // Every reserved block is used: the allocator tree never loses entries, so no dirty
        // node becomes empty. A leftover would be marked in use and reachable from nothing.
        debug_assert!(reserved.is_empty(), "reserved {} blocks too many", reserved.len());
        self.deferred.extend(self.tree.take_freed());
        self.deferred.extend(reserved);
        self.release = std::mem::take(&mut self.deferred);
        self.fresh.clear();
        Ok(at)
    }

    /// Next fit starts over at the region's first block (tests: to make a freed block the next
    /// candidate).
    #[cfg(test)]
    pub(crate) fn rewind(&mut self) {
        self.cursor = 0;
    }

    /// The root of the last checkpoint is durable: the blocks it released may be handed out
    /// (and lent once the next root is durable too: the backup still marks them).
    pub fn root_durable(&mut self) {
        self.lend_quarantine = std::mem::take(&mut self.quarantine);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::SimDisk;
    use crate::rng::Rng;
    use std::collections::BTreeSet;

    const VOL: [u8; 16] = *b"alloc-test-vol-1";

    #[test]
    fn allocates_every_block_once_then_reports_no_space() {
        let disk = SimDisk::new(200 * BLOCK, 0);
        let mut a = Allocator::new(VOL, 10, 100).expect("new");
        let mut got = BTreeSet::new();
        for _ in 0..100 {
            let b = a.allocate(&disk).expect("allocate");
            assert!((10..110).contains(&b));
            assert!(got.insert(b), "block {b} handed out twice");
        }
        assert!(matches!(a.allocate(&disk), Err(AllocError::NoSpace)));
        // A fresh block freed is reusable at once.
        a.free(&disk, 57).expect("free");
        assert_eq!(a.allocate(&disk).expect("reuse"), 57);
        assert!(matches!(a.free(&disk, 5), Err(AllocError::OutOfRegion { .. })));
    }

    #[test]
    fn spans_several_bitmap_blocks_and_wraps() {
        let blocks = 2 * BITS_PER_BITMAP + 100;
        let disk = SimDisk::new(8 * BLOCK, 0); // no bitmap block is written in this test
        let mut a = Allocator::new(VOL, 1 << 20, blocks).expect("new");
        a.cursor = blocks - 3;
        let first: Vec<u64> = (0..5).map(|_| a.allocate(&disk).expect("allocate")).collect();
        let base = 1 << 20;
        assert_eq!(first, vec![base + blocks - 3, base + blocks - 2, base + blocks - 1, base, base + 1]);
        a.cursor = BITS_PER_BITMAP - 1;
        assert_eq!(a.allocate(&disk).expect("allocate"), base + BITS_PER_BITMAP - 1);
        assert_eq!(a.allocate(&disk).expect("allocate"), base + BITS_PER_BITMAP);
    }

    /// The reuse rule across checkpoints: a block freed while a durable root reaches it is not
    /// handed out again until two checkpoints later.
    #[test]
    fn durable_blocks_are_reused_only_after_the_next_checkpoint_but_one() {
        let disk = SimDisk::new(4096 * BLOCK, 0);
        let (start, blocks) = (100, 3000);
        let mut a = Allocator::new(VOL, start, blocks).expect("new");
        let kept: Vec<u64> = (0..10).map(|_| a.allocate(&disk).expect("allocate")).collect();
        let at1 = a.checkpoint(&disk).expect("checkpoint 1"); // root 1 reaches `kept`
        a.root_durable();
        for &b in &kept[..5] {
            a.free(&disk, b).expect("free");
        }
        let at2 = a.checkpoint(&disk).expect("checkpoint 2"); // root 2 does not; root 1 is backup
        a.root_durable();
        let used2 = a.used();
        for _ in 0..blocks {
            match a.allocate(&disk) {
                Ok(b) => assert!(!kept[..5].contains(&b), "block {b} reused while the backup reaches it"),
                Err(AllocError::NoSpace) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // Reopen from root 2 and go on: after checkpoint 3 the blocks are free again.
        let release = Allocator::release_set(
            VOL,
            &disk,
            (TreeRef { block: 0, hash: [0; 32], height: 1 }, TreeRef { block: 0, hash: [0; 32], height: 1 }),
            (at1, at2),
        )
        .expect("release");
        let mut b = Allocator::open(VOL, start, blocks, at2, used2, kept[..5].iter().copied().chain(release).collect())
            .expect("open");
        for &k in &kept[..5] {
            assert!(b.is_used(&disk, k).expect("bit"), "still marked in root 2");
        }
        let at3 = b.checkpoint(&disk).expect("checkpoint 3");
        let reused = reachable_alloc(&disk, at3);
        for &k in &kept[..5] {
            // Released, and not taken by checkpoint 3 itself: root 1 reaches them until root 3
            // is durable.
            assert!(!b.is_used(&disk, k).expect("bit"), "block {k} not released by checkpoint 3");
            assert!(!reused.contains(&k), "block {k} written by checkpoint 3 while the backup reaches it");
        }
        for &k in &kept[5..] {
            assert!(b.is_used(&disk, k).expect("bit"));
        }
        // Until root 3 is durable, nothing is handed out from them; then they are free.
        let mut taken = Vec::new();
        while let Ok(block) = b.allocate(&disk) {
            assert!(!kept[..5].contains(&block), "block {block} handed out before root 3 is durable");
            taken.push(block);
        }
        b.root_durable();
        let mut again = Vec::new();
        while let Ok(block) = b.allocate(&disk) {
            again.push(block);
        }
        again.sort_unstable();
        assert_eq!(again, kept[..5].to_vec(), "free once root 3 is durable");
    }

    /// Blocks lent to the log are nobody else's until adopted; adopted and freed again they
    /// stay held (not free, not marked) until unpinned; a block the backup root still marks is
    /// allocated but not lent.
    #[test]
    fn lent_blocks_are_held_until_adopted_and_unpinned() {
        let disk = SimDisk::new(400 * BLOCK, 0);
        let mut a = Allocator::new(VOL, 100, 200).expect("new");
        let free0 = a.free_blocks();
        let lent = a.lend(&disk, 3).expect("lend");
        assert_eq!((a.free_blocks(), a.used(), a.lent()), (free0 - 3, 0, 3));
        for _ in 0..20 {
            let b = a.allocate(&disk).expect("allocate");
            assert!(!lent.contains(&b), "lent block {b} allocated");
        }
        let free1 = a.free_blocks();
        a.adopt(&disk, lent[0], 5).expect("adopt");
        assert!(matches!(a.adopt(&disk, lent[0], 5), Err(AllocError::NotLent { .. })));
        assert!(a.is_used(&disk, lent[0]).expect("bit"));
        assert_eq!((a.free_blocks(), a.lent()), (free1, 2));
        a.free(&disk, lent[0]).expect("free");
        assert!(!a.is_used(&disk, lent[0]).expect("bit"), "a freed fresh block is clear in the bitmap");
        assert_eq!(a.free_blocks(), free1, "but held: not free");
        a.unpin_through(4);
        assert_eq!(a.free_blocks(), free1);
        a.unpin_through(5);
        assert_eq!(a.free_blocks(), free1 + 1);
        assert_eq!(a.held(), 2, "the two blocks still lent");
        // Recovery: a record names a block the root marks: refused; twice the same: refused.
        let marked = a.allocate(&disk).expect("allocate");
        assert!(matches!(a.hold_for_replay(&disk, marked), Err(AllocError::BadLogBlock { .. })));
        assert!(matches!(a.hold_for_replay(&disk, lent[1]), Err(AllocError::BadLogBlock { .. })));

        // Released by a checkpoint: allocatable once its root is durable, lendable only once
        // the next one is too (the backup still marks it).
        let mut b = Allocator::new(VOL, 100, 200).expect("new");
        let kept = b.allocate(&disk).expect("allocate");
        b.checkpoint(&disk).expect("checkpoint 1");
        b.root_durable();
        b.free(&disk, kept).expect("free"); // deferred: root 1 reaches it
        b.checkpoint(&disk).expect("checkpoint 2");
        b.root_durable();
        b.checkpoint(&disk).expect("checkpoint 3"); // releases it
        b.root_durable();
        b.rewind();
        let lent = b.lend(&disk, b.free_blocks() - 1).expect("lend all but one");
        assert!(!lent.contains(&kept), "lent while the backup marks it");
        b.unpin_through(u64::MAX);
        b.rewind();
        assert_eq!(b.allocate(&disk).expect("allocate"), kept, "allocatable meanwhile");
    }

    /// Random allocations, frees and checkpoints; after each checkpoint the allocator reopened
    /// from its root (with the release set recomputed by the tree diff) agrees bit for bit with
    /// the running one, and nothing reachable from the current or backup root is ever free.
    #[test]
    fn random_runs_agree_with_a_reopened_allocator() {
        for seed in 0..30u64 {
            let mut rng = Rng::new(seed);
            let (start, blocks) = (50, 500 + rng.below(BITS_PER_BITMAP));
            let disk = SimDisk::new((start + blocks) * BLOCK, seed);
            let mut a = Allocator::new(VOL, start, blocks).expect("new");
            if seed % 2 == 1 {
                // Caches of one entry: bitmap blocks and nodes are dropped and read again.
                a.set_cache_capacity(1, 1);
            }
            let mut live: Vec<u64> = Vec::new(); // blocks the "volume" uses
            let empty = TreeRef { block: 0, hash: [0; 32], height: 1 };
            let mut roots = vec![(a.tree_ref_for_test(), live.clone())];
            // While the last checkpoint's root is not durable (`root_durable` not called yet),
            // the blocks of the root before the backup are still reachable by the backup's
            // recovery: nothing is handed out from them.
            let mut pending: Option<BTreeSet<u64>> = None;
            for step in 0..300 {
                match rng.below(10) {
                    0..=5 => {
                        // Sometimes a burst that wraps around the region.
                        let burst = if rng.chance(1, 8) { 1 + rng.below(blocks / 2) } else { 1 };
                        for _ in 0..burst {
                            // Leaves the next checkpoint its blocks, as the volume does.
                            if a.free_blocks() <= a.metadata_bound() + 4 {
                                break;
                            }
                            match a.allocate(&disk) {
                                Ok(b) => {
                                    if let Some(old_backup) = &pending {
                                        assert!(
                                            !old_backup.contains(&b),
                                            "seed {seed} step {step}: block {b} reused early"
                                        );
                                    }
                                    live.push(b);
                                }
                                Err(AllocError::NoSpace) => break,
                                Err(e) => panic!("seed {seed} step {step}: {e}"),
                            }
                        }
                    }
                    6..=8 if !live.is_empty() => {
                        for _ in 0..1 + rng.below(live.len() as u64 / 2 + 1) {
                            if live.is_empty() {
                                break;
                            }
                            let b = live.swap_remove(rng.below(live.len() as u64) as usize);
                            a.free(&disk, b).expect("free");
                        }
                    }
                    _ => {
                        if pending.take().is_some() {
                            a.root_durable();
                        }
                        let at = a.checkpoint(&disk).expect("checkpoint");
                        roots.push((at, live.clone()));
                        if rng.chance(1, 2) {
                            a.root_durable();
                        } else if roots.len() >= 3 {
                            let (old_at, old_live) = &roots[roots.len() - 3];
                            let mut reach: BTreeSet<u64> = old_live.iter().copied().collect();
                            reach.extend(reachable_alloc(&disk, *old_at));
                            pending = Some(reach);
                        }
                        // Current and backup reach: their live blocks and their allocator trees.
                        let (backup_at, backup_live) = roots[roots.len() - 2].clone();
                        let mut reach: BTreeSet<u64> = live.iter().chain(backup_live.iter()).copied().collect();
                        for t in [at, backup_at] {
                            reach.extend(reachable_alloc(&disk, t));
                        }
                        let release =
                            Allocator::release_set(VOL, &disk, (empty, empty), (backup_at, at)).expect("diff");
                        let backup_only: Vec<u64> = backup_live.iter().copied().filter(|b| !live.contains(b)).collect();
                        let mut b = Allocator::open(
                            VOL,
                            start,
                            blocks,
                            at,
                            a.used,
                            backup_only.into_iter().chain(release).collect(),
                        )
                        .expect("open");
                        let mut marked = 0;
                        for block in start..start + blocks {
                            let used = a.is_used(&disk, block).expect("bit");
                            marked += u64::from(used);
                            assert_eq!(used, b.is_used(&disk, block).expect("bit"), "seed {seed}: block {block}");
                            if reach.contains(&block) {
                                assert!(used, "seed {seed}: block {block} reachable but free");
                            }
                        }
                        assert_eq!(marked, a.used(), "seed {seed}: the used count is exact");
                        let mut ra = a.release.clone();
                        let mut rb = b.release.clone();
                        ra.sort_unstable();
                        rb.sort_unstable();
                        assert_eq!(ra, rb, "seed {seed}: release set after restart");
                    }
                }
            }
        }
    }

    fn reachable_alloc(dev: &dyn Device, at: TreeRef) -> BTreeSet<u64> {
        let empty = TreeRef { block: 0, hash: [0; 32], height: at.height };
        BlockTree::freed_between(TreeKind::Allocator, VOL, dev, at, empty).expect("walk").into_iter().collect()
    }

    impl Allocator {
        fn tree_ref_for_test(&self) -> TreeRef {
            TreeRef { block: 0, hash: [0; 32], height: self.tree.height() }
        }
    }
}
