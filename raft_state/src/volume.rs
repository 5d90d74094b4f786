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
//! - After any I/O error in apply or checkpoint the volume is poisoned (fail-stop): the driver
//!   stops and the supervisor restarts it.

use std::sync::Arc;
use std::time::Instant;

use raft::eraftpb::{ConfState, Entry, EntryType};
use slog::{info, warn, Logger};

use crate::alloc::{AllocError, Allocator};
use crate::command::{Command, CommandError};
use crate::device::{AlignedBuf, Device, DeviceError, BLOCK, BLOCK_SIZE};
use crate::hash;
use crate::layout::{Geometry, GeometryError};
use crate::log::{Anchor, LogError, LogRegion, LogStore};
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
    #[error("entry {index} holds no valid command")]
    Command {
        index: u64,
        #[source]
        source: CommandError,
    },
    #[error("range {offset}+{length} is beyond the volume's {size} bytes")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("volume size {0} is not a positive multiple of 4096")]
    BadSize(u64),
    #[error("the devices do not match the volume: {0}")]
    Devices(String),
    #[error("the volume is poisoned by an earlier I/O error; restart to recover")]
    Poisoned,
}

/// What applying an entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Done (or nothing to do: a no-op, or an entry at or below the applied index).
    Done,
    /// The data region ran out of free blocks. As NBD permits for a failed write, part of the
    /// range may hold the new data; the rest is unchanged.
    NoSpace,
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

fn tree_ref(root: &Root) -> TreeRef {
    TreeRef { block: root.payload.tree_root, hash: root.payload.tree_hash, height: root.payload.tree_height }
}

fn alloc_ref(root: &Root) -> TreeRef {
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
        let release = match roots.backup() {
            Some(backup) => Allocator::release_set(
                volume_id,
                &*dev,
                (tree_ref(backup), tree_ref(&current)),
                (alloc_ref(backup), alloc_ref(&current)),
            )?,
            None => {
                warn!(log, "backup root slot is damaged: blocks only it reached stay allocated");
                Vec::new()
            }
        };
        let map = BlockTree::open(TreeKind::BlockMap, volume_id, tree_ref(&current))?;
        let alloc =
            Allocator::open(volume_id, geometry.data_start, geometry.data_blocks, alloc_ref(&current), release)?;
        let p = &current.payload;
        let anchor = Anchor {
            scan_from: p.log_tail,
            durable_head: p.log_head,
            retain_from: roots.backup().map_or(p.log_tail, |b| b.payload.log_tail.min(p.log_tail)),
            applied_index: p.applied_index,
            applied_term: p.applied_term,
            conf_state: p.conf_state.clone(),
        };
        let region = LogRegion { start: geometry.log_start, blocks: geometry.log_blocks, volume_id };
        let store = LogStore::open(dev.clone(), region, &anchor, log.clone())?;
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
            poisoned: false,
            log,
        };
        let commit = store.hard_state().commit;
        let mut replayed = 0u64;
        if commit > volume.applied_index {
            let entries = raft::Storage::entries(
                &store,
                volume.applied_index + 1,
                commit + 1,
                None,
                raft::GetEntriesContext::empty(false),
            )
            .map_err(|e| VolumeError::Log(LogError::BadAnchor(format!("committed entries unavailable: {e}"))))?;
            for e in &entries {
                volume.apply(e)?;
                replayed += 1;
            }
        }
        let slots: Vec<String> = volume.roots.slot_reports().iter().map(|r| r.to_string()).collect();
        info!(volume.log, "volume recovered";
            "root_slot" => current.slot, "generation" => current.generation, "slots" => slots.join("; "),
            "replayed" => replayed, "applied" => volume.applied_index, "ms" => started.elapsed().as_millis() as u64);
        Ok((volume, store))
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
        self.check()?;
        if entry.index <= self.applied_index {
            return Ok(Applied::Done);
        }
        let outcome = match entry.get_entry_type() {
            EntryType::EntryNormal if entry.data.is_empty() => Ok(Applied::Done),
            EntryType::EntryNormal => {
                let cmd = Command::decode(&entry.data)
                    .map_err(|source| VolumeError::Command { index: entry.index, source })?;
                self.run(&cmd)
            }
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
        self.check_range(offset, length)?;
        let end = offset + length;
        let mut block = AlignedBuf::blocks(1);
        let mut at = offset;
        while at < end {
            let vb = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = ((BLOCK - at % BLOCK).min(end - at)) as usize;
            let whole = within == 0 && n == BLOCK_SIZE;
            let result = match cmd {
                Command::Write { data, .. } => {
                    let src = &data[(at - offset) as usize..][..n];
                    if whole {
                        self.put(vb, Some(src))
                    } else {
                        self.read_block(vb, &mut block)?;
                        block[within..within + n].copy_from_slice(src);
                        self.put(vb, Some(&block))
                    }
                }
                Command::Trim { .. } | Command::WriteZeroes { .. } => {
                    if whole {
                        self.put(vb, None)
                    } else {
                        self.read_block(vb, &mut block)?;
                        block[within..within + n].fill(0);
                        self.put(vb, Some(&block))
                    }
                }
            };
            match result {
                Err(VolumeError::Alloc(AllocError::NoSpace)) => return Ok(Applied::NoSpace),
                other => other?,
            }
            at += n as u64;
        }
        Ok(Applied::Done)
    }

    /// Maps virtual block `vb` to a fresh copy of `content`, or unmaps it.
    fn put(&mut self, vb: u64, content: Option<&[u8]>) -> Result<(), VolumeError> {
        let target = match content {
            None => None,
            Some(bytes) => {
                let block = self.alloc.allocate(&*self.dev)?;
                self.dev.write_at(block * BLOCK, bytes).map_err(|source| VolumeError::Device { block, source })?;
                Some(Ptr { block, hash: hash::data_block(bytes) })
            }
        };
        if let Some(old) = self.map.set(&*self.dev, vb, target)? {
            self.alloc.free(&*self.dev, old.block)?;
        }
        Ok(())
    }

    /// Reads virtual block `vb` (zeros if unmapped), verified against its hash.
    fn read_block(&self, vb: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        match self.map.get(&*self.dev, vb)? {
            Some(ptr) => tree::read_verified(&*self.dev, ptr, buf)?,
            None => buf.fill(0),
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512). A block that fails its
    /// hash check fails the read: never wrong data.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check()?;
        self.check_range(offset, buf.len() as u64)?;
        let mut block = AlignedBuf::blocks(1);
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let within = (at % BLOCK) as usize;
            let n = (BLOCK_SIZE - within).min(buf.len() - done);
            self.read_block(at / BLOCK, &mut block)?;
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Whether the log asks for a checkpoint: a quarter of the ring in use. The ring retains
    /// what the backup root needs (two checkpoint intervals), so this keeps it at most half
    /// full and bounds recovery work by the interval.
    pub fn should_checkpoint(&self, store: &LogStore) -> bool {
        let (used, total) = store.usage();
        used * 4 >= total
    }

    /// Makes everything applied so far the new current root and compacts the log to what the
    /// backup root still needs. Any error poisons the volume.
    pub fn checkpoint(&mut self, store: &mut LogStore) -> Result<(), VolumeError> {
        self.check()?;
        let result = self.try_checkpoint(store);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn try_checkpoint(&mut self, store: &mut LogStore) -> Result<(), VolumeError> {
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
        let alloc_ref = self.alloc.checkpoint(dev)?;
        dev.flush().map_err(|source| VolumeError::Device { block: 0, source })?;
        let payload = RootPayload {
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            conf_state: self.conf_state.clone(),
            log_tail: store.tail_for(self.applied_index + 1),
            log_head: store.head(),
            tree_root: map_ref.block,
            tree_height: map_ref.height,
            tree_hash: map_ref.hash,
            alloc_root: alloc_ref.block,
            alloc_hash: alloc_ref.hash,
        };
        self.roots.commit(&*self.root_dev, payload)?;
        if let Some(backup) = self.roots.backup() {
            store.compact(backup.payload.applied_index + 1, backup.payload.log_tail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
