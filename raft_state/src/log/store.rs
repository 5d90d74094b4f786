//! The log store: appends of batches, compaction, the positions roots record, and the
//! reads `raft::Storage` serves from memory.

use std::collections::VecDeque;
use std::sync::Arc;

use prost::Message;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use slog::{debug, info, Logger};
use zerocopy::little_endian::{U32, U64};
use zerocopy::IntoBytes;

use crate::command::Command;
use crate::device::{AlignedBuf, Device, DeviceError, BLOCK, BLOCK_SIZE};
use crate::hash::{self, Hash};

use super::format::{
    seal, tag_of, RawHeader, BLOCK_DATA, CHECKED_HEADER, HEADER_SIZE, LOG_FORMAT_VERSION, LOG_MAGIC, MAX_ENTRY_BYTES,
    MAX_RECORD_BLOCKS,
};
use super::{Anchor, LogError};

/// Where the log region is and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRegion {
    /// First block of the ring on the main device.
    pub start: u64,
    /// Length of the ring in blocks.
    pub blocks: u64,
    pub volume_id: [u8; 16],
}

/// One record of the live ring, as the store remembers it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub(super) vblock: u64,
    pub(super) first_index: u64,
    pub(super) entry_count: u64,
}

/// Where the log stands for a root whose applied index is `applied`: what a checkpoint
/// records (`Volume::seal_checkpoint`) and what decides when one is due. The log's owner
/// reports it with each batch it hands the applier (`LogStore::mark`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogMark {
    pub applied: u64,
    /// `tail_for(applied + 1)`: where a replay after that root starts.
    pub tail: u64,
    /// The head: every record before it is durable.
    pub head: u64,
    /// The ring's size in blocks.
    pub ring_blocks: u64,
}

/// The Raft log store. Reads (`raft::Storage`) are served from memory; appends write a batch
/// of records and flush once.
pub struct LogStore {
    pub(super) dev: Arc<dyn Device>,
    pub(super) region: LogRegion,
    pub(super) hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the entry before the first one kept (the compaction point).
    pub(super) snapshot_index: u64,
    pub(super) snapshot_term: u64,
    /// Entries `snapshot_index + 1 ..= last_index`.
    pub(super) entries: VecDeque<Entry>,
    /// Records from `retain` up to `head`, oldest first; the first ones may only be retained.
    pub(super) spans: VecDeque<Span>,
    /// Where the next record goes.
    pub(super) head: u64,
    /// Ring space before this vblock is free.
    pub(super) retain: u64,
    /// Header checksum of the last record written or recovered.
    pub(super) last_checksum: Hash,
    poisoned: bool,
    /// Reused by every append: a record's data before it is sealed into sectors, and the
    /// sealed batch (grown to the largest batch; every byte of it is written anew each time).
    record: Vec<u8>,
    pub(super) sealed: AlignedBuf,
    pub(super) log: Logger,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("region", &self.region)
            .field("first_index", &(self.snapshot_index + 1))
            .field("last_index", &self.last_index())
            .field("head", &self.head)
            .field("retain", &self.retain)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl LogStore {
    /// Opens the log at the position the roots give and replays every record after it.
    pub fn open(dev: Arc<dyn Device>, region: LogRegion, anchor: &Anchor, log: Logger) -> Result<Self, LogError> {
        if region.blocks < 2 || (region.start + region.blocks) * BLOCK > dev.size() {
            return Err(LogError::BadAnchor(format!(
                "region {}+{} blocks does not fit the device ({} bytes)",
                region.start,
                region.blocks,
                dev.size()
            )));
        }
        let a = anchor;
        if a.retain_from > a.scan_from || a.scan_from > a.durable_head || a.durable_head - a.scan_from > region.blocks {
            return Err(LogError::BadAnchor(format!(
                "retain {} ≤ scan {} ≤ durable head {} ≤ scan + {} blocks does not hold",
                a.retain_from, a.scan_from, a.durable_head, region.blocks
            )));
        }
        let mut store = Self {
            dev,
            region,
            hard_state: HardState::default(),
            conf_state: a.conf_state.clone(),
            snapshot_index: a.applied_index,
            snapshot_term: a.applied_term,
            entries: VecDeque::new(),
            spans: VecDeque::new(),
            head: a.scan_from,
            retain: a.retain_from,
            last_checksum: [0; 32],
            poisoned: false,
            record: Vec::new(),
            sealed: AlignedBuf::blocks(0),
            log,
        };
        let recovered = store.recover(a)?;
        info!(store.log, "log recovered";
            "records" => recovered.records, "entries" => recovered.entries, "head" => recovered.head,
            "torn_tail" => recovered.torn_tail, "first_index" => store.snapshot_index + 1,
            "last_index" => store.last_index(), "term" => store.hard_state.term, "commit" => store.hard_state.commit);
        Ok(store)
    }

    pub(super) fn truncate_from(&mut self, index: u64) {
        let keep = index.saturating_sub(self.snapshot_index + 1) as usize;
        self.entries.truncate(keep);
    }

    /// Persists `entries` (which may replace an uncommitted suffix) and the hard state in one
    /// batch: the records are written, then flushed once. On return they are durable and
    /// visible through `Storage`. Any I/O error poisons the store.
    pub fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), LogError> {
        self.append_owned(entries.to_vec(), hard_state)
    }

    /// `append` of entries the store may keep as they are (no copy of their data).
    pub fn append_owned(&mut self, entries: Vec<Entry>, hard_state: Option<&HardState>) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let hs = hard_state.cloned().unwrap_or_else(|| self.hard_state.clone());
        if let Some(first) = entries.first().map(|e| e.index) {
            self.check_append(&entries, first)?;
        }
        if hs.term < self.hard_state.term {
            return Err(LogError::BadAppend {
                first: 0,
                why: format!("hard state term goes back from {} to {}", self.hard_state.term, hs.term),
            });
        }
        // A commit index learnt through `set_commit` is never persisted lower.
        let hs = HardState { commit: hs.commit.max(self.hard_state.commit), ..hs };
        let (bytes, spans, last_checksum) = self.encode_batch(&entries, &hs)?;
        let blocks = bytes as u64 / BLOCK;
        let free = self.region.blocks - (self.head - self.retain);
        if blocks > free {
            return Err(LogError::Full { needed: blocks, free });
        }
        if let Err(source) = self.write_ring(self.head, &self.sealed[..bytes]) {
            self.poisoned = true;
            return Err(LogError::Device { what: "append batch", source });
        }
        debug!(self.log, "appended"; "vblock" => self.head, "blocks" => blocks, "entries" => entries.len());
        if let Some(first) = entries.first().map(|e| e.index) {
            self.truncate_from(first);
            self.entries.extend(entries);
        }
        self.hard_state = hs;
        self.head += blocks;
        self.spans.extend(spans);
        self.last_checksum = last_checksum;
        // Durable, not yet acknowledged to anyone.
        crate::failpoint("log::after_append");
        Ok(())
    }

    fn check_append(&self, entries: &[Entry], first: u64) -> Result<(), LogError> {
        let bad = |why: String| Err(LogError::BadAppend { first, why });
        if first <= self.snapshot_index {
            return bad(format!("entries up to {} are compacted", self.snapshot_index));
        }
        if first > self.last_index() + 1 {
            return bad(format!("gap after the last index {}", self.last_index()));
        }
        if first <= self.last_index() && first <= self.hard_state.commit {
            return bad(format!("would replace committed entries (commit {})", self.hard_state.commit));
        }
        for (i, e) in entries.iter().enumerate() {
            if e.index != first + i as u64 {
                return bad(format!("entry {} is not consecutive", e.index));
            }
        }
        Ok(())
    }

    /// Encodes a batch into records of at most [`MAX_RECORD_BLOCKS`] each, chained, starting at
    /// the current head.
    /// The batch goes into `self.sealed`; returns its length in bytes.
    pub(super) fn encode_batch(
        &mut self,
        entries: &[Entry],
        hs: &HardState,
    ) -> Result<(usize, Vec<Span>, Hash), LogError> {
        // Group entries into records by encoded size.
        let record_room = MAX_RECORD_BLOCKS as usize * BLOCK_DATA - HEADER_SIZE;
        let mut groups: Vec<(usize, usize, usize)> = Vec::new(); // (start, end, payload bytes)
        let (mut start, mut bytes) = (0, 0);
        for (i, e) in entries.iter().enumerate() {
            let size = e.encoded_len();
            let framed = size + prost::length_delimiter_len(size);
            if framed > MAX_ENTRY_BYTES {
                return Err(LogError::EntryTooLarge { index: e.index, size: framed, max: MAX_ENTRY_BYTES });
            }
            if bytes + framed > record_room {
                groups.push((start, i, bytes));
                (start, bytes) = (i, 0);
            }
            bytes += framed;
        }
        groups.push((start, entries.len(), bytes));
        let total_blocks: usize = groups.iter().map(|&(_, _, b)| (HEADER_SIZE + b).div_ceil(BLOCK_DATA)).sum();
        if self.sealed.len() < total_blocks * BLOCK_SIZE {
            self.sealed = AlignedBuf::blocks(total_blocks);
        }
        let mut spans = Vec::with_capacity(groups.len());
        let mut prev = self.last_checksum;
        let mut at = 0usize;
        let mut vblock = self.head;
        for (start, end, payload_len) in groups {
            let blocks = (HEADER_SIZE + payload_len).div_ceil(BLOCK_DATA);
            // Every byte of the record is written below (header, then the entries filling the
            // payload exactly): only growth needs zeros.
            if self.record.len() < HEADER_SIZE + payload_len {
                self.record.resize(HEADER_SIZE + payload_len, 0);
            }
            let record = &mut self.record[..HEADER_SIZE + payload_len];
            let mut payload = &mut record[HEADER_SIZE..];
            for e in &entries[start..end] {
                // Cannot fail: the slice was sized from encoded_len.
                e.encode_length_delimited(&mut payload)
                    .map_err(|err| LogError::BadAppend { first: e.index, why: format!("encoding: {err}") })?;
            }
            let group = &entries[start..end];
            let raw = RawHeader {
                magic: LOG_MAGIC,
                format_version: U32::new(LOG_FORMAT_VERSION),
                header_size: U32::new(HEADER_SIZE as u32),
                volume_id: self.region.volume_id,
                vblock: U64::new(vblock),
                batch_start: U64::new(self.head),
                blocks: U32::new(blocks as u32),
                entry_count: U32::new(group.len() as u32),
                payload_len: U64::new(payload_len as u64),
                first_index: U64::new(group.first().map_or(0, |e| e.index)),
                term: U64::new(hs.term),
                vote: U64::new(hs.vote),
                commit: U64::new(hs.commit),
                prev_checksum: prev,
                payload_checksum: hash::log_payload_checksum(
                    &self.region.volume_id,
                    vblock,
                    &record[HEADER_SIZE..HEADER_SIZE + payload_len],
                ),
                reserved: [0; 64],
                header_checksum: [0; 32],
            };
            record[..HEADER_SIZE].copy_from_slice(raw.as_bytes());
            let checksum = hash::log_header_checksum(&record[..CHECKED_HEADER]);
            record[CHECKED_HEADER..HEADER_SIZE].copy_from_slice(&checksum);
            seal(record, &mut self.sealed[at..at + blocks * BLOCK_SIZE], tag_of(&checksum));
            prev = checksum;
            spans.push(Span {
                vblock,
                first_index: group.first().map_or(0, |e| e.index),
                entry_count: group.len() as u64,
            });
            at += blocks * BLOCK_SIZE;
            vblock += blocks as u64;
        }
        Ok((at, spans, prev))
    }

    /// Writes `buf` durably at ring position `vblock`, in two writes when it wraps (each
    /// durable: `write_durable` promises nothing about other writes).
    fn write_ring(&self, vblock: u64, buf: &[u8]) -> Result<(), DeviceError> {
        let n = self.region.blocks;
        let pos = vblock % n;
        let first_blocks = ((n - pos) as usize).min(buf.len() / BLOCK_SIZE);
        let (a, b) = buf.split_at(first_blocks * BLOCK_SIZE);
        self.dev.write_durable((self.region.start + pos) * BLOCK, a)?;
        if !b.is_empty() {
            self.dev.write_durable(self.region.start * BLOCK, b)?;
        }
        Ok(())
    }

    /// Drops entries before `index` from memory (the caller has applied them and a root that
    /// no longer needs them is durable) and frees ring space before `keep_from`, the
    /// `log_tail` of the oldest root that may still become current (never past the record
    /// holding `index`). Keeps the term of `index - 1` for `Storage::term`.
    pub fn compact(&mut self, index: u64, keep_from: u64) -> Result<(), LogError> {
        crate::failpoint("log::compact");
        if index <= self.snapshot_index + 1 {
            return Ok(());
        }
        if index > self.last_index() + 1 {
            return Err(LogError::BadAppend {
                first: index,
                why: format!("compaction past last {}", self.last_index()),
            });
        }
        let term = self
            .term_of(index - 1)
            .ok_or_else(|| LogError::BadAppend { first: index, why: "term of the compaction point unknown".into() })?;
        let drop = (index - 1 - self.snapshot_index) as usize;
        self.entries.drain(..drop);
        self.snapshot_index = index - 1;
        self.snapshot_term = term;
        let tail = self.tail_for(index).min(keep_from);
        while self.spans.front().is_some_and(|s| s.vblock < tail) {
            self.spans.pop_front();
        }
        self.retain = self.retain.max(tail);
        Ok(())
    }

    /// The ring position a replay that must yield every entry from `index` on starts at: the
    /// record holding the live copy of `index`, else the last record (it carries the newest
    /// hard state), else the head. A root stores it as its `log_tail`.
    pub fn tail_for(&self, index: u64) -> u64 {
        if index > self.last_index() {
            return self.spans.back().map_or(self.head, |s| s.vblock);
        }
        let holds = |s: &&Span| s.entry_count > 0 && s.first_index <= index && index < s.first_index + s.entry_count;
        // The live copy is in the newest record holding the index (later records replace).
        if let Some(span) = self.spans.iter().rev().find(holds) {
            return span.vblock;
        }
        self.spans.back().map_or(self.head, |s| s.vblock)
    }

    /// The positions a root whose applied index is `applied` records.
    pub fn mark(&self, applied: u64) -> LogMark {
        LogMark { applied, tail: self.tail_for(applied + 1), head: self.head, ring_blocks: self.region.blocks }
    }

    /// Where the next record goes; a root stores it as its `log_head`.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Ring blocks in use (retained or live) and the ring size.
    pub fn usage(&self) -> (u64, u64) {
        (self.head - self.retain, self.region.blocks)
    }

    /// Updates the hard state's commit index in memory (raft-rs `LightReady::commit_index`);
    /// it is persisted with the next record. The root's applied index stands in for it on disk.
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = self.hard_state.commit.max(commit);
    }

    /// Records the configuration after a conf change was applied; roots persist it.
    pub fn set_conf_state(&mut self, conf_state: ConfState) {
        self.conf_state = conf_state;
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn last_index(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    pub fn first_index(&self) -> u64 {
        self.snapshot_index + 1
    }

    fn term_of(&self, index: u64) -> Option<u64> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        let offset = index.checked_sub(self.snapshot_index + 1)?;
        self.entries.get(offset as usize).map(|e| e.term)
    }
}

impl LogStore {
    /// The entries in memory after `index`, in order.
    pub fn entries_after(&self, index: u64) -> impl Iterator<Item = &Entry> {
        let skip = index.saturating_sub(self.snapshot_index) as usize;
        self.entries.iter().skip(skip)
    }

    /// Entries from `low` (before `high`), as many as fit in `max_bytes` of data (at least
    /// one) and lie next to each other in memory, borrowed: what replay applies without
    /// copying. `None` if `low` is not in the log.
    pub fn entries_view(&self, low: u64, high: u64, max_bytes: u64) -> Option<&[Entry]> {
        if low <= self.snapshot_index || low >= high || high > self.last_index() + 1 {
            return None;
        }
        let from = (low - self.snapshot_index - 1) as usize;
        let to = (high - self.snapshot_index - 1) as usize;
        let (front, back) = self.entries.as_slices();
        let run = if from < front.len() {
            &front[from..to.min(front.len())]
        } else {
            &back[from - front.len()..to - front.len()]
        };
        let mut bytes = 0u64;
        let n = run
            .iter()
            .take_while(|e| {
                bytes += e.data.len() as u64;
                bytes <= max_bytes
            })
            .count();
        Some(&run[..n.max(1)])
    }
}

impl LogStore {
    /// A placed write's entry as an inline write: its blocks read back and each verified
    /// against the hash its record holds (a mismatch is an error, never wrong data). The
    /// blocks are intact while the log holds the entry: recovery and the allocator keep the
    /// blocks of every retained record out of reuse (`docs/format.md`, "Placed writes").
    fn with_data(&self, e: &Entry) -> raft::Result<Entry> {
        let other = |err: Box<dyn std::error::Error + Send + Sync>| raft::Error::Store(StorageError::Other(err));
        let Command::Placed { offset, blocks } = Command::decode(&e.data).map_err(|err| other(Box::new(err)))? else {
            return Ok(e.clone());
        };
        let mut data = vec![0u8; blocks.len() * BLOCK_SIZE];
        let mut buf = AlignedBuf::blocks(1);
        for (b, into) in blocks.iter().zip(data.chunks_exact_mut(BLOCK_SIZE)) {
            let ptr = crate::tree::Ptr { block: b.block(), hash: b.hash };
            crate::tree::read_verified(&*self.dev, ptr, &mut buf).map_err(|err| other(Box::new(err)))?;
            into.copy_from_slice(&buf);
        }
        Ok(Entry { data: Command::Write { offset, data: &data }.encode(), ..e.clone() })
    }
}

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState { hard_state: self.hard_state.clone(), conf_state: self.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let from = (low - self.snapshot_index - 1) as usize;
        let to = (high - self.snapshot_index - 1) as usize;
        // raft's rule: at least one entry, then as many as fit in `max_size` bytes.
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut size = 0u64;
        // Entries that leave this node carry their data: raft-rs fetches entries it may wait
        // for (`can_async`) only to send them to a follower, which cannot read this device.
        let leaving = context.can_async();
        for e in self.entries.range(from..to) {
            let e = if leaving && crate::place::needs_flush(&e.data) { self.with_data(e)? } else { e.clone() };
            size += e.encoded_len() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.snapshot_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_of(idx).ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(LogStore::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(LogStore::last_index(self))
    }

    /// A single-node group never sends snapshots; the volume's state travels through roots.
    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}
