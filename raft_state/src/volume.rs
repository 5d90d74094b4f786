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

use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::{ConfState, Entry, EntryType};
use slog::{debug, info, warn, Logger};

use crate::alloc::{AllocError, Allocator};
use crate::command::{Command, PlacedBlock};
use crate::device::{AlignedBuf, Device, DeviceError, BLOCK, BLOCK_SIZE};
use crate::hash;
use crate::layout::{Geometry, GeometryError};
use crate::log::{Anchor, LogError, LogMark, LogRegion, LogStore};
use crate::roots::{self, Root, RootError, RootPayload, Roots};
use crate::tree::{self, BlockTree, Ptr, TreeError, TreeKind, TreeRef};

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
const PLACED_CHECKPOINT_FACTOR: u64 = 16;

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
    staged: std::collections::BTreeMap<u64, Vec<u8>>,
    /// Where staged blocks are gathered into runs for writing (kept: no fresh pages per batch).
    scratch: AlignedBuf,
    /// Blocks of placed writes applied since the last sealed checkpoint.
    placed_since_seal: u64,
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

    /// Opens the volume: current root, trees, log, replay of committed entries. Returns the
    /// volume and the log store (which the Raft node owns from then on).
    pub fn open(
        dev: Arc<dyn Device>,
        root_dev: Option<Arc<dyn Device>>,
        log: Logger,
    ) -> Result<(Volume, LogStore), VolumeError> {
        Self::open_with(dev, root_dev, VolumeOptions::default(), log)
    }

    /// `open` with options.
    pub fn open_with(
        dev: Arc<dyn Device>,
        root_dev: Option<Arc<dyn Device>>,
        options: VolumeOptions,
        log: Logger,
    ) -> Result<(Volume, LogStore), VolumeError> {
        let started = Instant::now();
        let separate_roots = root_dev.is_some();
        let root_dev = root_dev.unwrap_or_else(|| dev.clone());
        let roots = roots::open(&*root_dev)?;
        let current = roots.current().clone();
        let geometry = current.geometry;
        if geometry.roots_on_main == separate_roots {
            return Err(VolumeError::Devices(format!(
                "the roots say they are {} the main device",
                if geometry.roots_on_main { "on" } else { "apart from" }
            )));
        }
        if dev.size() < geometry.main_blocks * BLOCK {
            return Err(VolumeError::Devices(format!(
                "main device has {} bytes, the volume was formatted on {}",
                dev.size(),
                geometry.main_blocks * BLOCK
            )));
        }
        let volume_id = current.volume_id;
        // What the next checkpoint releases: the blocks the backup reaches and the current root
        // does not, found by a walk of both trees. It is needed only by that checkpoint, so on
        // a real device it runs beside recovery and serving (on a simulated one, inline: those
        // tests count and order every device operation).
        let mut release = Vec::new();
        let mut release_pending = None;
        match roots.backup() {
            Some(backup) => {
                let refs = ((tree_ref(backup), tree_ref(&current)), (alloc_ref(backup), alloc_ref(&current)));
                if dev.read_ahead() {
                    let dev = dev.clone();
                    release_pending = Some(
                        std::thread::Builder::new()
                            .name("rblk-release".into())
                            .spawn(move || Allocator::release_set(volume_id, &*dev, refs.0, refs.1))
                            .map_err(VolumeError::Thread)?,
                    );
                } else {
                    release = Allocator::release_set(volume_id, &*dev, refs.0, refs.1)?;
                }
            }
            None => warn!(log, "backup root slot is damaged: blocks only it reached stay allocated"),
        }
        let release_ms = started.elapsed().as_millis() as u64;
        let mut map = BlockTree::open(TreeKind::BlockMap, volume_id, tree_ref(&current))?;
        map.set_cache_capacity(options.node_cache);
        let mut alloc = Allocator::open(
            volume_id,
            geometry.data_start,
            geometry.data_blocks,
            alloc_ref(&current),
            current.payload.used_blocks,
            release,
        )?;
        alloc.set_cache_capacity(options.bitmap_cache, options.node_cache / 16 + 1);
        let p = &current.payload;
        let store = LogStore::open(dev.clone(), log_region(&current), &log_anchor(&roots), log.clone())?;
        let log_ms = started.elapsed().as_millis() as u64;
        let mut volume = Volume {
            dev,
            root_dev,
            geometry,
            roots,
            map,
            alloc,
            applied_index: p.applied_index,
            applied_term: p.applied_term,
            conf_state: p.conf_state.clone(),
            options,
            last_checkpoint: Instant::now(),
            space_pressure: 0,
            sealed: None,
            staged: std::collections::BTreeMap::new(),
            scratch: AlignedBuf::blocks(0),
            placed_since_seal: 0,
            release_pending,
            poisoned: false,
            log,
        };
        let (held, pinned) = volume.hold_logged_blocks(&store)?;
        let hold_ms = started.elapsed().as_millis() as u64;
        let commit = store.hard_state().commit;
        let mut replayed = 0u64;
        // In chunks: the log holds the entries already, so a second full copy is not needed.
        while volume.applied_index < commit {
            // Borrowed from the log: replay copies nothing it does not have to.
            let entries =
                store.entries_view(volume.applied_index + 1, commit + 1, REPLAY_CHUNK_BYTES).ok_or_else(|| {
                    VolumeError::Log(LogError::BadAnchor(format!(
                        "committed entries {}..={commit} unavailable",
                        volume.applied_index + 1
                    )))
                })?;
            let (first, rest) = entries.split_at(entries.len().min(1));
            volume.apply_batch(first)?;
            // Once per recovery (not per entry), so crashing recoveries still converge.
            if replayed == 0 && !rest.is_empty() {
                crate::failpoint("recovery::replay");
            }
            volume.apply_batch(rest)?;
            replayed += entries.len() as u64;
        }
        let slots: Vec<String> = volume.roots.slot_reports().iter().map(|r| r.to_string()).collect();
        info!(volume.log, "volume recovered";
            "root_slot" => current.slot, "generation" => current.generation, "slots" => slots.join("; "),
            "replayed" => replayed, "applied" => volume.applied_index, "placed_blocks" => held,
            "pinned_blocks" => pinned, "release_diff_ms" => release_ms, "log_scan_ms" => log_ms - release_ms,
            "hold_ms" => hold_ms - log_ms, "ms" => started.elapsed().as_millis() as u64);
        Ok((volume, store))
    }

    /// Recovery, before replay: the blocks that records after the root's applied index name
    /// are the log's until replay adopts them, and those the records between the backup's and
    /// the root's applied index name stay pinned while the backup may still be opened (see
    /// `alloc`).
    /// Returns how many blocks it held and pinned.
    fn hold_logged_blocks(&mut self, store: &LogStore) -> Result<(u64, u64), VolumeError> {
        let dev = &*self.dev;
        let alloc = &mut self.alloc;
        let mut held = 0u64;
        for e in store.entries_after(self.applied_index) {
            if let Ok(Command::Placed { blocks, .. }) = Command::decode(&e.data) {
                for b in blocks {
                    alloc.hold_for_replay(dev, b.block())?;
                    held += 1;
                }
            }
        }
        let mut pinned = 0u64;
        if let Some(backup) = self.roots.backup() {
            let (low, high) = (backup.payload.applied_index + 1, self.applied_index + 1);
            // Read back only when the root says its records placed any blocks.
            if low < high && self.roots.current().payload.placed_blocks > 0 {
                let scanned = store.read_retained(low, high, &mut |e: &Entry| {
                    if let Ok(Command::Placed { blocks, .. }) = Command::decode(&e.data) {
                        for b in blocks {
                            alloc.pin(dev, b.block(), e.index)?;
                            pinned += 1;
                        }
                    }
                    Ok(())
                });
                if let Err(e) = scanned {
                    // Only a fallback to the backup (a second fault) would need these.
                    warn!(self.log, "the log the backup root needs is unreadable: blocks it names are not pinned";
                        "error" => %crate::error_chain(&e));
                }
            }
        }
        Ok((held, pinned))
    }

    /// Lends `count` free blocks to the log for placed writes (`Command::Placed`), or fails
    /// with `NoSpace` (the write then goes inline). Keeps the metadata reserve, counting a
    /// path of the block map for every lent block.
    pub fn lend(&mut self, count: u64) -> Result<Vec<u64>, VolumeError> {
        self.check()?;
        let need = count * (1 + u64::from(self.map.height())) + self.data_reserve();
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
        let lent_paths = self.alloc.lent() * u64::from(self.map.height());
        self.map.dirty_nodes() + u64::from(self.map.height()) + self.alloc.metadata_bound() + lent_paths
    }

    /// Free blocks a data write leaves untouched: the metadata need and a slack so that trims
    /// on a full volume (each dirties at most two paths of nodes that stay non-empty) go on
    /// working until the next checkpoint.
    fn data_reserve(&self) -> u64 {
        self.metadata_need() + TRIM_SLACK_PATHS * u64::from(self.map.height())
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

    /// Applies a committed entry. Entries at or below the applied index are skipped, and every
    /// command is idempotent, so replays and resends are safe.
    pub fn apply(&mut self, entry: &Entry) -> Result<Applied, VolumeError> {
        let applied = self.apply_one(entry)?;
        self.write_staged()?;
        Ok(applied)
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
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            out.push(self.apply_one(e)?);
        }
        Ok(out)
    }

    /// Writes the staged data blocks; any error poisons the volume.
    pub fn write_staged(&mut self) -> Result<(), VolumeError> {
        let staged = std::mem::take(&mut self.staged);
        let blocks: Vec<(u64, &[u8])> = staged.iter().map(|(block, data)| (*block, &data[..])).collect();
        let written = crate::device::write_blocks(&*self.dev, &blocks, MAX_RUN_BLOCKS as usize, &mut self.scratch);
        if let Err((block, source)) = written {
            self.poisoned = true;
            return Err(VolumeError::Device { block, source });
        }
        Ok(())
    }

    fn apply_one(&mut self, entry: &Entry) -> Result<Applied, VolumeError> {
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
                            _ => self.run(&cmd),
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

    fn run(&mut self, cmd: &Command<'_>) -> Result<Applied, VolumeError> {
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
                    self.put_whole(vb, &data[(at - offset) as usize..][..n])
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
        self.staged.insert(block, content.to_vec());
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
    fn put_whole(&mut self, first_vb: u64, data: &[u8]) -> Result<(), VolumeError> {
        let count = data.len() / BLOCK_SIZE;
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
            self.staged.insert(block, data[i * BLOCK_SIZE..][..BLOCK_SIZE].to_vec());
        }
        for (i, &block) in placed.iter().enumerate() {
            let hash = hash::data_block(&data[i * BLOCK_SIZE..][..BLOCK_SIZE]);
            match self.map_block(first_vb + i as u64, Some(Ptr { block, hash })) {
                Ok(()) => {}
                // A damaged map node on this block's path: the block stays as it was, the
                // fresh copy goes back (run() reports the damage).
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
            Some(ptr) if self.staged.contains_key(&ptr.block) => {
                if let Some(data) = self.staged.get(&ptr.block) {
                    buf.copy_from_slice(data);
                }
            }
            Some(ptr) => tree::read_verified(&*self.dev, ptr, buf)?,
            None => buf.fill(0),
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512). A block that fails its
    /// hash check fails the read: never wrong data. Blocks that sit next to each other on the
    /// device are read with one read.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.checked_read(offset, buf, false).map(|_| ())
    }

    /// Like `read`, but only when the data can be had without waiting for the media (all of
    /// it in a cache, e.g. the kernel's page cache): `Ok(false)` means "use `read`" and leaves
    /// `buf` unspecified. Lets a connection answer hot reads on its own thread.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, VolumeError> {
        self.checked_read(offset, buf, true)
    }

    fn checked_read(&self, offset: u64, buf: &mut [u8], nowait: bool) -> Result<bool, VolumeError> {
        self.check()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(true);
        }
        let result = self.read_runs(offset, buf, nowait);
        if let Err(e) = &result {
            warn!(self.log, "read failed"; "offset" => offset, "length" => buf.len(), "error" => %e);
        }
        result
    }

    /// With `nowait`, returns `Ok(false)` as soon as something is not in a cache.
    fn read_runs(&self, offset: u64, buf: &mut [u8], nowait: bool) -> Result<bool, VolumeError> {
        let first_vb = offset / BLOCK;
        let end = offset + buf.len() as u64;
        let blocks = (end.div_ceil(BLOCK) - first_vb) as usize;
        let ptrs: Vec<Option<Ptr>> =
            (0..blocks as u64).map(|i| self.map.get(&*self.dev, first_vb + i)).collect::<Result<_, _>>()?;
        // Whole blocks are read straight into the caller's buffer; a partial first or last
        // block goes through one block of staging.
        let aligned = offset.is_multiple_of(BLOCK) && end.is_multiple_of(BLOCK);
        if nowait && !aligned {
            return Ok(false);
        }
        let mut staging = if aligned { None } else { Some(AlignedBuf::blocks(1)) };
        let mut i = 0;
        while i < blocks {
            // A run: consecutive mapped blocks that are consecutive on the device.
            let mut j = i + 1;
            let Some(p) = ptrs[i] else {
                self.read_part(offset, buf, first_vb + i as u64, None, &mut staging)?;
                i = j;
                continue;
            };
            if aligned {
                while j < blocks
                    && j - i < MAX_RUN_BLOCKS as usize
                    && ptrs[j].is_some_and(|q| q.block == p.block + (j - i) as u64)
                {
                    j += 1;
                }
                let run = &mut buf[i * BLOCK_SIZE..j * BLOCK_SIZE];
                let device = |source| TreeError::Device { block: p.block, source };
                if nowait {
                    if !self.dev.try_read_cached_at(p.block * BLOCK, run).map_err(device)? {
                        return Ok(false);
                    }
                } else {
                    self.dev.read_cached_at(p.block * BLOCK, run).map_err(device)?;
                }
                for (block, q) in run.chunks_exact_mut(BLOCK_SIZE).zip(ptrs[i..j].iter().flatten()) {
                    self.verify_data(*q, block)?;
                }
            } else {
                self.read_part(offset, buf, first_vb + i as u64, Some(p), &mut staging)?;
            }
            i = j;
        }
        Ok(true)
    }

    /// The part of virtual block `vb` that `buf` (at `offset`) covers, through `staging`.
    fn read_part(
        &self,
        offset: u64,
        buf: &mut [u8],
        vb: u64,
        ptr: Option<Ptr>,
        staging: &mut Option<AlignedBuf>,
    ) -> Result<(), VolumeError> {
        let vb_start = vb * BLOCK;
        let from = offset.max(vb_start);
        let to = (offset + buf.len() as u64).min(vb_start + BLOCK);
        let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
        let Some(p) = ptr else {
            dst.fill(0);
            return Ok(());
        };
        let block = staging.get_or_insert_with(|| AlignedBuf::blocks(1));
        self.dev
            .read_cached_at(p.block * BLOCK, block)
            .map_err(|source| TreeError::Device { block: p.block, source })?;
        self.verify_data(p, block)?;
        dst.copy_from_slice(&block[(from - vb_start) as usize..(to - vb_start) as usize]);
        Ok(())
    }

    /// Checks a data block read (maybe from a cache) against its hash; on a mismatch it reads
    /// the media itself once more before failing: never wrong data.
    fn verify_data(&self, p: Ptr, block: &mut [u8]) -> Result<(), VolumeError> {
        if hash::data_block(block) == p.hash {
            return Ok(());
        }
        let mut again = AlignedBuf::blocks(1);
        self.dev.read_at(p.block * BLOCK, &mut again).map_err(|source| TreeError::Device { block: p.block, source })?;
        if hash::data_block(&again) != p.hash {
            return Err(TreeError::HashMismatch { what: "data", block: p.block, level: 0 }.into());
        }
        warn!(self.log, "a cached copy of a data block failed its check; the media's is good"; "block" => p.block);
        block.copy_from_slice(&again);
        Ok(())
    }

    /// Whether a checkpoint is due: the log written since the current root reached the
    /// configured size (at most a quarter of the ring, which bounds recovery work and keeps
    /// the ring at most half full with what the backup needs), or the interval passed with
    /// something applied, or space is short and freed blocks wait for release.
    pub fn should_checkpoint(&self, log: &LogMark) -> bool {
        let root = &self.roots.current().payload;
        // Measured from the last sealed checkpoint, durable or not.
        let (root_applied, root_tail) = self.sealed.unwrap_or((root.applied_index, root.log_tail));
        let limit = (self.options.checkpoint_log_bytes / BLOCK).clamp(1, (log.ring_blocks / 4).max(1));
        let since_root = log.head.saturating_sub(root_tail);
        let pending = self.applied_index > root_applied || self.map.is_dirty();
        since_root >= limit
            || self.placed_since_seal >= limit * PLACED_CHECKPOINT_FACTOR
            || (pending && self.last_checkpoint.elapsed() >= self.options.checkpoint_interval)
            || self.space_pressure > 0
    }

    /// Clean shutdown: checkpoints what was applied since the current root, so the next open
    /// replays nothing.
    pub fn close(mut self, store: &mut LogStore) -> Result<(), VolumeError> {
        if self.applied_index > self.roots.current().payload.applied_index || self.map.is_dirty() {
            self.checkpoint(store)?;
        }
        info!(self.log, "volume closed"; "applied" => self.applied_index, "generation" => self.roots.current().generation);
        Ok(())
    }

    /// Makes everything applied so far the new current root and compacts the log to what the
    /// backup root still needs: `seal_checkpoint`, `make_durable`, `finish_checkpoint` and the
    /// compaction in one go, for a caller that owns the log. Any error poisons the volume.
    pub fn checkpoint(&mut self, store: &mut LogStore) -> Result<(), VolumeError> {
        let sealed = self.seal_checkpoint(&store.mark(self.applied_index))?;
        let durable = sealed.make_durable();
        if let Some(c) = self.finish_checkpoint(sealed, durable)? {
            self.compact(store, c)?;
        }
        Ok(())
    }

    /// Compacts `store` as `finish_checkpoint` said; an error poisons the volume.
    pub fn compact(&mut self, store: &mut LogStore, c: Compaction) -> Result<(), VolumeError> {
        store.compact(c.index, c.keep_from).map_err(|e| {
            self.poisoned = true;
            e.into()
        })
    }

    /// The first half of a checkpoint, under the volume's lock: writes the staged data
    /// blocks, the block map and the allocator for the next root (not flushed) and prepares
    /// that root, whose log positions `log` gives (the log's owner reports them for the
    /// applied index: `LogStore::mark`). The caller makes it durable with
    /// `SealedCheckpoint::make_durable` — without the volume, so applying and reading go on
    /// meanwhile — and then hands it back to `finish_checkpoint`. One checkpoint at a time;
    /// any error poisons the volume.
    pub fn seal_checkpoint(&mut self, log: &LogMark) -> Result<SealedCheckpoint, VolumeError> {
        self.check()?;
        if self.sealed.is_some() {
            return Err(VolumeError::CheckpointPending);
        }
        if log.applied != self.applied_index {
            self.poisoned = true;
            return Err(VolumeError::StaleLogMark { mark: log.applied, applied: self.applied_index });
        }
        let result = self.try_seal(log);
        match &result {
            Ok(sealed) => {
                self.sealed = Some((sealed.next.root().payload.applied_index, sealed.next.root().payload.log_tail));
                self.last_checkpoint = Instant::now();
                self.placed_since_seal = 0;
            }
            Err(_) => self.poisoned = true,
        }
        result
    }

    /// Installs the root `make_durable` wrote (or poisons the volume with its error) and lets
    /// the allocator hand out what the checkpoint released. Returns the compaction of the log
    /// that the new backup root allows, for the log's owner to carry out.
    pub fn finish_checkpoint(
        &mut self,
        sealed: SealedCheckpoint,
        durable: Result<(), VolumeError>,
    ) -> Result<Option<Compaction>, VolumeError> {
        self.sealed = None;
        if let Err(e) = durable {
            self.poisoned = true;
            return Err(e);
        }
        self.roots.install(sealed.next);
        self.alloc.root_durable();
        self.space_pressure = self.space_pressure.saturating_sub(1);
        // No root that may be opened now replays the entries the backup applied.
        let oldest = self.roots.backup().unwrap_or(self.roots.current());
        self.alloc.unpin_through(oldest.payload.applied_index);
        Ok(self
            .roots
            .backup()
            .map(|b| Compaction { index: b.payload.applied_index + 1, keep_from: b.payload.log_tail }))
    }

    fn try_seal(&mut self, log: &LogMark) -> Result<SealedCheckpoint, VolumeError> {
        if let Some(walk) = self.release_pending.take() {
            let release =
                walk.join().map_err(|_| VolumeError::Thread(std::io::Error::other("the release walk panicked")))?;
            self.alloc.add_release(release?);
        }
        // Data blocks first: the flush of `make_durable` makes them durable with the trees.
        let started = Instant::now();
        self.write_staged()?;
        let dirty = self.map.dirty_nodes();
        let dev = &*self.dev;
        let alloc = &mut self.alloc;
        let map_ref = self.map.flush(dev, &mut || {
            alloc.allocate(dev).map_err(|e| match e {
                AllocError::Tree(t) => t,
                _ => TreeError::NoSpace,
            })
        })?;
        for block in self.map.take_freed() {
            self.alloc.free(dev, block)?;
        }
        let map_us = started.elapsed().as_micros() as u64;
        let alloc_ref = self.alloc.checkpoint(dev)?;
        debug!(self.log, "sealed"; "dirty_nodes" => dirty, "map_us" => map_us, "us" => started.elapsed().as_micros() as u64);
        // Everything up to the head is durable; what lies past the applied index is replayed
        // after this root.
        let (log_tail, log_head) = (log.tail, log.head);
        let payload = RootPayload {
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            conf_state: self.conf_state.clone(),
            log_tail,
            log_head,
            tree_root: map_ref.block,
            tree_height: map_ref.height,
            tree_hash: map_ref.hash,
            alloc_root: alloc_ref.block,
            alloc_hash: alloc_ref.hash,
            used_blocks: self.alloc.used(),
            placed_blocks: self.placed_since_seal,
        };
        let next = self.roots.prepare(payload)?;
        Ok(SealedCheckpoint { dev: self.dev.clone(), root_dev: self.root_dev.clone(), next })
    }
}

/// A checkpoint whose trees are written but not yet flushed, and its root, prepared: see
/// `Volume::seal_checkpoint`.
#[derive(Debug)]
pub struct SealedCheckpoint {
    dev: Arc<dyn Device>,
    root_dev: Arc<dyn Device>,
    next: roots::NextRoot,
}

impl SealedCheckpoint {
    /// Flushes the device (the trees and every data block written before the seal become
    /// durable), then writes the root over its slot and flushes it. Needs no volume: blocks
    /// written meanwhile are fresh ones that no root names.
    pub fn make_durable(&self) -> Result<(), VolumeError> {
        self.dev.flush().map_err(|source| VolumeError::Device { block: 0, source })?;
        // The new trees are durable; no root names them yet.
        crate::failpoint("checkpoint::before_root");
        self.next.write(&*self.root_dev)?;
        Ok(())
    }

    /// The index the root records as applied.
    pub fn applied_index(&self) -> u64 {
        self.next.root().payload.applied_index
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
