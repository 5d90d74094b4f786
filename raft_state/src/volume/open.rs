use std::sync::Arc;
use std::time::Instant;

use raft::eraftpb::Entry;
use slog::{info, warn, Logger};

use super::{alloc_ref, log_anchor, log_region, tree_ref, Volume, VolumeError, VolumeOptions, REPLAY_CHUNK_BYTES};
use crate::alloc::Allocator;
use crate::command::Command;
use crate::device::{Device, BLOCK};
use crate::log::{LogError, LogStore};
use crate::roots;
use crate::tree::{BlockTree, TreeKind};

impl Volume {
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
            staged: super::staged::Staged::new(),
            placed_since_seal: 0,
            log_mark: None,
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
}
