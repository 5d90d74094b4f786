//! The volume: the state machine that committed Raft entries are applied to, and the path that
//! brings it back after any crash.
//!
//! - `apply` runs a committed command: data goes to fresh blocks (never over a block a durable
//!   root reaches), the block map is updated in memory, replaced blocks are freed by the
//!   allocator's reuse rule. Sub-block writes read, patch and rewrite the block.
//! - `checkpoint` is the seed's transactional application of a log segment: flush the block
//!   map tree and the allocator to fresh blocks, flush the device, write the next root over
//!   slot a (flushed), then compact the log to what the backup root still needs.
//! - `open` finds the current root, opens both trees, recomputes what the next checkpoint
//!   releases, opens the log at the root's position and replays the committed entries after
//!   the root's applied index. Recovery writes nothing, so a crash during it changes nothing.
//! - Free space: data blocks are handed out only while enough stay free for the next
//!   checkpoint's metadata (the dirty block-map nodes, the allocator's worst case, and a slack
//!   for trims), so a full volume fails writes with `NoSpace` but can always checkpoint, read,
//!   trim and — once trimmed blocks are released two checkpoints later — write again.
//! - After any I/O error in apply or checkpoint the volume is poisoned (fail-stop): the driver
//!   stops and the supervisor restarts it.

mod apply;
mod checkpoint;
mod open;
mod read;
mod staged;

use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::ConfState;
use slog::Logger;

use crate::alloc::{AllocError, Allocator};
use crate::device::{Device, DeviceError, BLOCK};
use crate::layout::{Geometry, GeometryError};
use crate::log::{Anchor, LogError, LogMark, LogRegion};
use crate::roots::{self, Root, RootError, RootPayload, Roots};
use crate::tree::{self, BlockTree, TreeError, TreeRef};

// What the tests (`use super::*`) need besides the above.
#[cfg(test)]
use crate::{command::Command, device::BLOCK_SIZE, log::LogStore};
#[cfg(test)]
use raft::eraftpb::Entry;

pub use checkpoint::SealedCheckpoint;
pub use read::Checks;

/// Errors of the volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("roots")]
    Roots(#[from] RootError),
    #[error("log")]
    Log(#[from] LogError),
    #[error("block tree")]
    Tree(#[from] TreeError),
    #[error("allocator")]
    Alloc(#[from] AllocError),
    #[error("geometry")]
    Geometry(#[from] GeometryError),
    #[error("data I/O failed at block {block}")]
    Device {
        block: u64,
        #[source]
        source: DeviceError,
    },
    #[error("range {offset}+{length} is beyond the volume's {size} bytes")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("volume size {0} is not a positive multiple of 4096")]
    BadSize(u64),
    #[error("the devices do not match the volume: {0}")]
    Devices(String),
    #[error("the volume is poisoned by an earlier I/O error; restart to recover")]
    Poisoned,
    #[error("a checkpoint was started while the previous one's root is not durable yet")]
    CheckpointPending,
    #[error("entry {index} follows applied index {applied}: an entry is missing")]
    Gap { applied: u64, index: u64 },
    #[error("a thread of the volume")]
    Thread(#[source] std::io::Error),
    #[error("a checkpoint was given the log's positions for index {mark}, but {applied} is applied")]
    StaleLogMark { mark: u64, applied: u64 },
}

/// Whole blocks of one write placed at a time (bounds the placement list).
const MAX_RUN_BLOCKS: u64 = 256;
/// Bytes of entries replay copies out of the log at a time.
const REPLAY_CHUNK_BYTES: u64 = 4 << 20;
/// Paths of block-map nodes kept free for trims on a full volume between two checkpoints.
const TRIM_SLACK_PATHS: u64 = 64;
/// Whole blocks a trim or write-zeroes unmaps in one step (1 GiB): bounds the list of freed
/// blocks it holds at once.
const UNMAP_PIECE_BLOCKS: u64 = 1 << 18;
/// Below this many times the data reserve, space is short: a freed durable block asks for the
/// two checkpoints that release it.
const LOW_SPACE_FACTOR: u64 = 2;
/// A checkpoint is due once this many times `checkpoint_log_bytes` of data were placed (written
/// once) since the last one: placed writes take little log, but the blocks their records name
/// stay held until two checkpoints pass them, which this bounds.
const PLACED_CHECKPOINT_FACTOR: u64 = 4;

/// What applying an entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Done (or nothing to do: a no-op, or an entry at or below the applied index).
    Done,
    /// The data region ran out of free blocks. As NBD permits for a failed write, part of the
    /// range may hold the new data; the rest is unchanged.
    NoSpace,
    /// Some blocks of the range could not be read (damaged or unreadable old content that a
    /// partial write must merge with, or a damaged block-map node on the way) and were left as
    /// they were; the rest was applied. The client gets an I/O error; reads of those blocks
    /// keep failing until they are overwritten whole.
    Damaged,
    /// The entry holds no valid command (undecodable, or a range beyond the volume): nothing
    /// was changed. The driver validates requests before proposing them, so this is a bug
    /// upstream; it is applied as a no-op rather than poisoning the volume, because a committed
    /// entry is replayed at every open and would otherwise make the volume unopenable.
    Invalid,
}

/// When to checkpoint (`should_checkpoint`), and how much to cache.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Checkpoint once this many bytes of log were written since the current root. Capped at
    /// a quarter of the ring: the ring must hold what the backup root needs (two intervals)
    /// and leave room for appends while a checkpoint runs.
    pub checkpoint_log_bytes: u64,
    /// Checkpoint when this long has passed since the last one and something was applied.
    pub checkpoint_interval: Duration,
    /// Clean block-map nodes kept in memory (about 3 KiB each).
    pub node_cache: usize,
    /// Clean allocator bitmap blocks kept in memory (4 KiB each).
    pub bitmap_cache: usize,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        Self {
            checkpoint_log_bytes: 8 << 20,
            checkpoint_interval: Duration::from_secs(30),
            node_cache: tree::DEFAULT_NODE_CACHE,
            bitmap_cache: crate::alloc::DEFAULT_BITMAP_CACHE,
        }
    }
}

/// Counters for `rblk inspect` and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeStats {
    pub volume_blocks: u64,
    pub data_blocks: u64,
    /// Data-region blocks in use (data, tree nodes, bitmaps, and blocks waiting for release).
    pub used_blocks: u64,
    /// Free blocks a data write may take now (what the metadata reserve leaves).
    pub writable_blocks: u64,
    pub dirty_nodes: u64,
    pub cached_nodes: usize,
    pub loaded_bitmaps: usize,
    pub applied_index: u64,
    pub root_applied_index: u64,
}

/// The volume; see the module docs.
pub struct Volume {
    dev: Arc<dyn Device>,
    root_dev: Arc<dyn Device>,
    geometry: Geometry,
    roots: Roots,
    map: BlockTree,
    alloc: Allocator,
    applied_index: u64,
    applied_term: u64,
    conf_state: ConfState,
    options: VolumeOptions,
    last_checkpoint: Instant,
    /// Checkpoints still wanted to release freed blocks while space is short (see `put`).
    space_pressure: u8,
    /// A sealed checkpoint whose root is not durable yet: its applied index and log tail.
    sealed: Option<(u64, u64)>,
    /// New data blocks not written yet: a batch of entries writes them at its end, in runs of
    /// device-consecutive blocks (next fit hands out consecutive blocks), one write per run.
    staged: staged::Staged,
    /// Blocks of placed writes applied since the last sealed checkpoint.
    placed_since_seal: u64,
    /// The log's mark for the last entry applied, as whoever applied it noted it
    /// (`note_log_mark`, under the same lock as the apply): what a checkpoint of the volume as
    /// it is records.
    log_mark: Option<LogMark>,
    /// The release set the walk at open is still computing (the first seal waits for it).
    release_pending: Option<std::thread::JoinHandle<Result<Vec<u64>, AllocError>>>,
    poisoned: bool,
    log: Logger,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("geometry", &self.geometry)
            .field("applied_index", &self.applied_index)
            .field("root_generation", &self.roots.current().generation)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// The block map tree a root names.
pub fn tree_ref(root: &Root) -> TreeRef {
    TreeRef { block: root.payload.tree_root, hash: root.payload.tree_hash, height: root.payload.tree_height }
}

/// Where the log opens for the current root: replay from its tail, retained back to the
/// backup's (the backup can still become current), never shorter than the head it saw.
pub fn log_anchor(roots: &Roots) -> Anchor {
    let p = &roots.current().payload;
    Anchor {
        scan_from: p.log_tail,
        durable_head: p.log_head,
        retain_from: roots.backup().map_or(p.log_tail, |b| b.payload.log_tail.min(p.log_tail)),
        applied_index: p.applied_index,
        applied_term: p.applied_term,
        conf_state: p.conf_state.clone(),
    }
}

/// The log ring a root's geometry places.
pub fn log_region(root: &Root) -> LogRegion {
    LogRegion { start: root.geometry.log_start, blocks: root.geometry.log_blocks, volume_id: root.volume_id }
}

/// The allocator tree a root names.
pub fn alloc_ref(root: &Root) -> TreeRef {
    let height = BlockTree::height_for(root.geometry.data_blocks.div_ceil(crate::alloc::BITS_PER_BITMAP));
    TreeRef { block: root.payload.alloc_root, hash: root.payload.alloc_hash, height }
}

/// Options for `format`.
#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    /// Size the clients see, in bytes (a multiple of 4096; may exceed the data region).
    pub volume_bytes: u64,
    /// Length of the Raft log ring in blocks.
    pub log_blocks: u64,
    pub volume_id: [u8; 16],
}

impl Volume {
    /// Writes a new, empty volume: the genesis roots (on `root_dev`, or on `main`'s first
    /// three blocks). Nothing else needs writing: the trees are empty and stale log bytes
    /// belong to no volume.
    pub fn format(main: &dyn Device, root_dev: Option<&dyn Device>, opts: FormatOptions) -> Result<(), VolumeError> {
        if opts.volume_bytes == 0 || !opts.volume_bytes.is_multiple_of(BLOCK) {
            return Err(VolumeError::BadSize(opts.volume_bytes));
        }
        let volume_blocks = opts.volume_bytes / BLOCK;
        let geometry = Geometry::plan(main.size(), root_dev.is_none(), opts.log_blocks, volume_blocks)?;
        let payload = RootPayload {
            conf_state: ConfState { voters: vec![1], ..Default::default() },
            tree_height: BlockTree::height_for(volume_blocks),
            ..Default::default()
        };
        roots::format(root_dev.unwrap_or(main), opts.volume_id, geometry, payload)?;
        Ok(())
    }

    /// The main device (data, trees and log).
    pub fn device(&self) -> Arc<dyn Device> {
        self.dev.clone()
    }

    /// Size the clients see, in bytes.
    pub fn size(&self) -> u64 {
        self.geometry.volume_blocks * BLOCK
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn roots(&self) -> &Roots {
        &self.roots
    }

    pub fn stats(&self) -> VolumeStats {
        VolumeStats {
            volume_blocks: self.geometry.volume_blocks,
            data_blocks: self.geometry.data_blocks,
            used_blocks: self.alloc.used(),
            writable_blocks: self.alloc.free_blocks().saturating_sub(self.data_reserve()),
            dirty_nodes: self.map.dirty_nodes(),
            cached_nodes: self.map.cached_nodes(),
            loaded_bitmaps: self.alloc.loaded_bitmaps(),
            applied_index: self.applied_index,
            root_applied_index: self.roots.current().payload.applied_index,
        }
    }

    /// Blocks the next checkpoint may need for metadata if one more block is remapped: the
    /// block map's dirty nodes plus one path, and the allocator's worst case.
    fn metadata_need(&self) -> u64 {
        self.metadata_need_with(0)
    }

    /// `metadata_need` with `more_lent` blocks lent besides those lent already: each lent block
    /// may dirty a path of the map when its record is applied. The map's part is capped by the
    /// nodes the map can have at all (a checkpoint cannot write more), which matters when many
    /// blocks are lent at once (placed writes in flight on a nearly full volume).
    fn metadata_need_with(&self, more_lent: u64) -> u64 {
        let height = u64::from(self.map.height());
        let map = self.map.dirty_nodes() + height + (self.alloc.lent() + more_lent) * height;
        let mut nodes = 0;
        let mut level = self.geometry.volume_blocks;
        for _ in 0..height {
            level = level.div_ceil(tree::FANOUT);
            nodes += level;
        }
        map.min(nodes + height) + self.alloc.metadata_bound()
    }

    /// Free blocks a data write leaves untouched: the metadata need and a slack so that trims
    /// on a full volume (each dirties at most two paths of nodes that stay non-empty) go on
    /// working until the next checkpoint.
    fn data_reserve(&self) -> u64 {
        self.metadata_need() + TRIM_SLACK_PATHS * u64::from(self.map.height())
    }

    /// Free blocks that lending leaves to inline writes: 1/256 of the volume, at least 16 and
    /// at most 4096 blocks (4 MiB for 1 GiB, 16 MiB from 4 GiB on).
    fn inline_headroom(&self) -> u64 {
        (self.geometry.volume_blocks / 256).clamp(16, 4096)
    }

    fn check(&self) -> Result<(), VolumeError> {
        if self.poisoned {
            return Err(VolumeError::Poisoned);
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), VolumeError> {
        if offset.checked_add(length).is_none_or(|end| end > self.size()) {
            return Err(VolumeError::OutOfRange { offset, length, size: self.size() });
        }
        Ok(())
    }
}

/// What the log's owner does once a checkpoint is installed: drop entries before `index` and
/// free ring space before `keep_from` (`LogStore::compact`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    pub index: u64,
    pub keep_from: u64,
}

#[cfg(test)]
mod tests;
