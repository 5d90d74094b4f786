use std::sync::Arc;
use std::time::Instant;

use slog::{debug, info};

use super::{Compaction, Volume, VolumeError, PLACED_CHECKPOINT_FACTOR};
use crate::alloc::AllocError;
use crate::device::{Device, BLOCK};
use crate::log::{LogMark, LogStore};
use crate::roots::{self, RootPayload};
use crate::tree::{FrozenTree, TreeError};

impl Volume {
    /// Notes the log's mark for the entries just applied (their applier holds the volume
    /// from the apply to this call), for `log_mark` and `checkpoint_due`.
    pub fn note_log_mark(&mut self, mark: LogMark) {
        self.log_mark = Some(mark);
    }

    /// The log's mark noted for what is applied now (none before the first apply).
    pub fn log_mark(&self) -> Option<LogMark> {
        self.log_mark
    }

    /// `should_checkpoint` at the noted mark (never before anything was applied).
    pub fn checkpoint_due(&self) -> bool {
        self.log_mark.is_some_and(|m| self.should_checkpoint(&m))
    }

    /// Whether a checkpoint is due: the log written since the current root reached the
    /// configured size (at most a quarter of the ring, which bounds recovery work and keeps
    /// the ring at most half full with what the backup needs), or placed writes applied since
    /// the last seal reached 4 times that in data (or an eighth of the free blocks, if less),
    /// or the interval passed with something applied, or space is short and freed blocks wait
    /// for release.
    pub fn should_checkpoint(&self, log: &LogMark) -> bool {
        let root = &self.roots.current().payload;
        // Measured from the last sealed checkpoint, durable or not.
        let (root_applied, root_tail) = self.sealed.unwrap_or((root.applied_index, root.log_tail));
        let limit = (self.options.checkpoint_log_bytes / BLOCK).clamp(1, (log.ring_blocks / 4).max(1));
        let since_root = log.head.saturating_sub(root_tail);
        let pending = self.applied_index > root_applied || self.map.is_dirty();
        // Placed writes take little log, but every block they free stays held or deferred for
        // two checkpoints: their window is bounded by data, and by a share of the free space.
        let placed_limit = (limit * PLACED_CHECKPOINT_FACTOR).min((self.alloc.free_blocks() / 8).max(limit));
        since_root >= limit
            || self.placed_since_seal >= placed_limit
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
        let mut sealed = self.seal_checkpoint(&store.mark(self.applied_index))?;
        let durable = sealed.make_durable();
        if let Some(c) = self.finish_checkpoint(&mut sealed, durable)? {
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
                self.sealed = Some((sealed.applied_index, log.tail));
                self.last_checkpoint = Instant::now();
                self.placed_since_seal = 0;
            }
            Err(_) => self.poisoned = true,
        }
        result
    }

    /// Installs the root `make_durable` wrote (or poisons the volume with its error) and lets
    /// the allocator hand out what the checkpoint released. Returns the compaction of the log
    /// that the new backup root allows, for the log's owner to carry out. Drop `sealed`
    /// after releasing the volume: it frees the frozen map's nodes then.
    pub fn finish_checkpoint(
        &mut self,
        sealed: &mut SealedCheckpoint,
        durable: Result<(), VolumeError>,
    ) -> Result<Option<Compaction>, VolumeError> {
        self.sealed = None;
        if let Err(e) = durable {
            self.poisoned = true;
            return Err(e);
        }
        let Some(next) = sealed.next.take() else {
            // Finished before: a bug in the caller, and the volume cannot tell what is durable.
            self.poisoned = true;
            return Err(VolumeError::CheckpointPending);
        };
        if let Some(map) = sealed.map.as_mut() {
            self.map.thaw(map);
        }
        self.roots.install(next);
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
        // The block map is frozen here and written by `make_durable`, without the volume; the
        // blocks its nodes go to are taken now, so the allocator's tree below records them.
        let map = self.map.freeze(&mut || {
            alloc.allocate(dev).map_err(|e| match e {
                AllocError::Tree(t) => t,
                _ => TreeError::NoSpace,
            })
        })?;
        for block in self.map.take_freed() {
            self.alloc.free(dev, block)?;
        }
        let alloc_ref = self.alloc.checkpoint(dev)?;
        debug!(self.log, "sealed"; "dirty_nodes" => dirty, "us" => started.elapsed().as_micros() as u64);
        // Everything up to the head is durable; what lies past the applied index is replayed
        // after this root.
        let (log_tail, log_head) = (log.tail, log.head);
        let payload = RootPayload {
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            conf_state: self.conf_state.clone(),
            log_tail,
            log_head,
            // Set by `make_durable` once the frozen map is written.
            tree_root: 0,
            tree_height: self.map.height(),
            tree_hash: [0; 32],
            alloc_root: alloc_ref.block,
            alloc_hash: alloc_ref.hash,
            used_blocks: self.alloc.used(),
            placed_blocks: self.placed_since_seal,
        };
        let next = self.roots.prepare(payload)?;
        Ok(SealedCheckpoint {
            dev: self.dev.clone(),
            root_dev: self.root_dev.clone(),
            applied_index: self.applied_index,
            next: Some(next),
            map: Some(map),
        })
    }
}

/// A checkpoint whose allocator tree and data blocks are written but not yet flushed, its
/// block map frozen, and its root prepared: see `Volume::seal_checkpoint`.
#[derive(Debug)]
pub struct SealedCheckpoint {
    dev: Arc<dyn Device>,
    root_dev: Arc<dyn Device>,
    applied_index: u64,
    /// Taken by `finish_checkpoint`.
    next: Option<roots::NextRoot>,
    /// The block map as sealed: written by `make_durable`, handed back to the live map by
    /// `finish_checkpoint`.
    map: Option<FrozenTree>,
}

impl SealedCheckpoint {
    /// Writes the frozen block map (encoding and hashing its nodes), flushes the device (the
    /// trees and every data block written before the seal become durable), then writes the
    /// root over its slot and flushes it. Needs no volume: blocks written meanwhile are fresh
    /// ones that no root names, and the map's nodes go to blocks taken at the seal.
    pub fn make_durable(&mut self) -> Result<(), VolumeError> {
        let Some(next) = self.next.as_mut() else { return Err(VolumeError::CheckpointPending) };
        if let Some(map) = self.map.as_mut() {
            let at = map.write(&*self.dev)?;
            next.update_payload(|p| {
                p.tree_root = at.block;
                p.tree_hash = at.hash;
            })?;
        }
        self.dev.flush().map_err(|source| VolumeError::Device { block: 0, source })?;
        // The new trees are durable; no root names them yet.
        crate::failpoint("checkpoint::before_root");
        next.write(&*self.root_dev)?;
        Ok(())
    }

    /// The index the root records as applied.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }
}
