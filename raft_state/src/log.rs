//! The Raft log on raw sectors: a ring of checksummed records that implements
//! [`raft::Storage`].
//!
//! ```text
//! log region (n blocks), addressed by vblock = lap * n + block; block = vblock % n
//!
//!  record  := sector+            (its blocks, 8 sectors each)
//!  sector  := data (504 bytes) tag tag    (tag = first 4 bytes of the header checksum in
//!                                          the record's first sector, their complement in
//!                                          every other sector)
//!  data of the sectors, concatenated := header (256 bytes) payload zero-padding
//!  header  := magic version volume_id vblock batch_start blocks entry_count payload_len
//!             first_index term vote commit prev_checksum payload_checksum header_checksum
//!  payload := entry*             (each a length-delimited prost `eraftpb::Entry`)
//!  batch   := record+            (written with one or two writes, then ONE flush)
//! ```
//!
//! Invariants this module keeps:
//! - Every record proves where it belongs: the volume id and its vblock (position and lap) are
//!   inside both checksums, so bytes from another volume or an earlier lap never validate.
//! - Records chain: each carries the header checksum of the record before it, so stale records
//!   of the same lap (left behind when a torn tail was dropped and overwritten) are never
//!   taken for a continuation.
//! - An append returns only after its batch is flushed; the entries and hard state are then
//!   visible through `Storage`. Batches are strictly sequential: a batch is written only after
//!   the previous one's flush completed.
//! - Recovery (Protocol-Aware Recovery, FAST 2018): the scan follows the chain from the root's
//!   `log_tail`. At the first bad record it looks ahead: a valid record of a *later* batch
//!   means a flushed record was damaged, and opening refuses; otherwise the bad record was the
//!   torn tail of the last, unflushed batch and is dropped — unless every sector of it carries
//!   its tag: then the whole record reached the media and was damaged later, and opening
//!   refuses. Sectors are written atomically (the media assumption), so a torn write leaves
//!   some sector with older content and another tag, while a damaged sector keeps at least
//!   one copy of its tag (`docs/format.md`, "torn or damaged").
//! - Compaction only moves the in-memory start; ring space before the retained position is
//!   reused. Which position must be retained is decided by the roots (see `docs/format.md`).

use std::collections::VecDeque;
use std::sync::Arc;

use prost::Message;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use slog::{debug, info, warn, Logger};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::device::{AlignedBuf, Device, DeviceError, BLOCK, BLOCK_SIZE, SECTOR_SIZE};
use crate::hash::{self, Hash};

/// Magic at the start of every log record.
pub const LOG_MAGIC: [u8; 8] = *b"RBLKLOG\0";
/// The log record format this code writes and reads.
pub const LOG_FORMAT_VERSION: u32 = 2;
/// Bytes of the record header; the payload starts right after it.
pub const HEADER_SIZE: usize = 256;
/// Record data bytes in each 512-byte sector; the last 8 hold the record's tag twice.
const SECTOR_DATA: usize = SECTOR_SIZE - 8;
/// Record data bytes in each block.
const BLOCK_DATA: usize = BLOCK_SIZE / SECTOR_SIZE * SECTOR_DATA;
/// The largest record, in blocks. A batch larger than this is split into several records;
/// it also bounds how far recovery looks past a bad record.
pub const MAX_RECORD_BLOCKS: u64 = 512;
/// The largest encoded entry a record can hold.
pub const MAX_ENTRY_BYTES: usize = MAX_RECORD_BLOCKS as usize * BLOCK_DATA - HEADER_SIZE - 16;

/// The on-disk record header. Byte offsets (all integers little-endian):
///
/// | offset | size | field            |
/// |-------:|-----:|------------------|
/// |      0 |    8 | magic `RBLKLOG\0` |
/// |      8 |    4 | format_version   |
/// |     12 |    4 | header_size (256)|
/// |     16 |   16 | volume_id        |
/// |     32 |    8 | vblock           |
/// |     40 |    8 | batch_start      |
/// |     48 |    4 | blocks           |
/// |     52 |    4 | entry_count      |
/// |     56 |    8 | payload_len      |
/// |     64 |    8 | first_index      |
/// |     72 |    8 | term             |
/// |     80 |    8 | vote             |
/// |     88 |    8 | commit           |
/// |     96 |   32 | prev_checksum    |
/// |    128 |   32 | payload_checksum |
/// |    160 |   64 | reserved (zero)  |
/// |    224 |   32 | header_checksum  |
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    format_version: U32,
    header_size: U32,
    volume_id: [u8; 16],
    vblock: U64,
    batch_start: U64,
    blocks: U32,
    entry_count: U32,
    payload_len: U64,
    first_index: U64,
    term: U64,
    vote: U64,
    commit: U64,
    prev_checksum: [u8; 32],
    payload_checksum: [u8; 32],
    reserved: [u8; 64],
    header_checksum: [u8; 32],
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_SIZE);
const CHECKED_HEADER: usize = HEADER_SIZE - 32;

/// A record header that passed every check, in native types.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    vblock: u64,
    batch_start: u64,
    blocks: u64,
    entry_count: u32,
    payload_len: usize,
    first_index: u64,
    hard_state: (u64, u64, u64),
    prev_checksum: Hash,
    payload_checksum: Hash,
    checksum: Hash,
}

/// Why the bytes at a position are not a valid record header.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HeaderProblem {
    Magic,
    Checksum,
    Foreign,
    Misplaced { claims: u64 },
    Shape(String),
    Version(u32),
}

impl std::fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Magic => write!(f, "no record magic"),
            Self::Checksum => write!(f, "header checksum mismatch"),
            Self::Foreign => write!(f, "record of another volume"),
            Self::Misplaced { claims } => write!(f, "record claims block {claims}"),
            Self::Shape(why) => write!(f, "malformed header: {why}"),
            Self::Version(v) => write!(f, "unsupported log format version {v}"),
        }
    }
}

/// Errors of the log store. After any device error the store is poisoned (fail-stop).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log I/O failed ({what})")]
    Device {
        what: &'static str,
        #[source]
        source: DeviceError,
    },
    #[error("the log store is poisoned by an earlier I/O error; restart to recover")]
    Poisoned,
    #[error("log region full: the batch needs {needed} blocks, {free} are free; checkpoint and compact first")]
    Full { needed: u64, free: u64 },
    #[error("entry {index} encodes to {size} bytes; a log record holds at most {max}")]
    EntryTooLarge { index: u64, size: usize, max: usize },
    #[error("cannot append entries from index {first}: {why}")]
    BadAppend { first: u64, why: String },
    #[error(
        "log record at block {vblock} (lap {lap}) is damaged ({why}) but a later record follows at block \
         {next}: committed entries would be lost, refusing to open"
    )]
    CorruptMiddle { vblock: u64, lap: u64, why: String, next: u64 },
    #[error(
        "the last log record, at block {vblock}, was written completely but is damaged ({why}): \
         acknowledged entries would be lost, refusing to open"
    )]
    CorruptTail { vblock: u64, why: String },
    #[error("the log ends at block {end} but the root saw it reach block {expected}: refusing to open")]
    ShortLog { end: u64, expected: u64 },
    #[error("log record at block {vblock} has unsupported format version {version}")]
    UnsupportedVersion { vblock: u64, version: u32 },
    #[error("log inconsistent at block {vblock}: {why}")]
    Inconsistent { vblock: u64, why: String },
    #[error("log anchor is invalid: {0}")]
    BadAnchor(String),
}

/// Where the log region is and whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRegion {
    /// First block of the ring on the main device.
    pub start: u64,
    /// Length of the ring in blocks.
    pub blocks: u64,
    pub volume_id: [u8; 16],
}

/// What the roots tell the log when a volume opens.
#[derive(Debug, Clone, PartialEq)]
pub struct Anchor {
    /// The current root's `log_tail`: the scan starts here.
    pub scan_from: u64,
    /// The current root's `log_head`: records before it were durable when the root was
    /// written, so the scan must reach at least this far.
    pub durable_head: u64,
    /// The backup root's `log_tail` (≤ `scan_from`): ring space from here on stays untouched,
    /// so the backup can still become current.
    pub retain_from: u64,
    /// The current root's applied index and term: entries up to it are compacted.
    pub applied_index: u64,
    pub applied_term: u64,
    pub conf_state: ConfState,
}

impl Anchor {
    /// The anchor of a freshly formatted volume.
    pub fn genesis(conf_state: ConfState) -> Self {
        Self { scan_from: 0, durable_head: 0, retain_from: 0, applied_index: 0, applied_term: 0, conf_state }
    }
}

/// One record of the live ring, as the store remembers it.
#[derive(Debug, Clone, Copy)]
struct Span {
    vblock: u64,
    first_index: u64,
    entry_count: u64,
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

/// What recovery found, for logging and `rblk inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    pub records: u64,
    pub entries: u64,
    pub head: u64,
    /// Whether part of a torn batch was dropped (false after a clean stop).
    pub torn_tail: bool,
}

/// The Raft log store. Reads (`raft::Storage`) are served from memory; appends write a batch
/// of records and flush once.
pub struct LogStore {
    dev: Arc<dyn Device>,
    region: LogRegion,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the entry before the first one kept (the compaction point).
    snapshot_index: u64,
    snapshot_term: u64,
    /// Entries `snapshot_index + 1 ..= last_index`.
    entries: VecDeque<Entry>,
    /// Records from `retain` up to `head`, oldest first; the first ones may only be retained.
    spans: VecDeque<Span>,
    /// Where the next record goes.
    head: u64,
    /// Ring space before this vblock is free.
    retain: u64,
    /// Header checksum of the last record written or recovered.
    last_checksum: Hash,
    poisoned: bool,
    /// Reused by every append: a record's data before it is sealed into sectors, and the
    /// sealed batch (grown to the largest batch; every byte of it is written anew each time).
    record: Vec<u8>,
    sealed: AlignedBuf,
    log: Logger,
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

    fn recover(&mut self, anchor: &Anchor) -> Result<Recovered, LogError> {
        let mut out = Recovered::default();
        // While the root we open from was current or backup, the ring kept everything from
        // its tail on, so the log cannot run further than one ring length past it. (The
        // backup's tail may be older: after a fallback the backup is the root that was being
        // overwritten, whose log may already be reused.)
        let limit = anchor.scan_from + self.region.blocks;
        let mut reader = RingReader::streaming(self.region, self.dev.clone(), self.head, limit);
        let mut first = true;
        let bad = loop {
            if self.head >= limit {
                break None;
            }
            let (header, payload) = match read_record(&*self.dev, &mut reader, self.head, limit)? {
                Ok(found) => found,
                Err(problem) => break Some(problem),
            };
            if !first && header.prev_checksum != self.last_checksum {
                break Some(RecordProblem::Chain);
            }
            first = false;
            self.replay(&header, &payload)?;
            self.last_checksum = header.checksum;
            self.spans.push_back(Span {
                vblock: header.vblock,
                first_index: header.first_index,
                entry_count: u64::from(header.entry_count),
            });
            self.head += header.blocks;
            out.records += 1;
            out.entries += u64::from(header.entry_count);
        };
        if let Some(problem) = bad {
            out.torn_tail = problem.is_partial_record();
            self.check_torn_tail(&mut reader, problem, limit)?;
        }
        if self.head < anchor.durable_head {
            return Err(LogError::ShortLog { end: self.head, expected: anchor.durable_head });
        }
        self.retain = self.retain.max(self.head.saturating_sub(self.region.blocks));
        // The root proves its applied index was committed in its term (`docs/format.md`).
        self.hard_state.commit = self.hard_state.commit.max(anchor.applied_index);
        self.hard_state.term = self.hard_state.term.max(anchor.applied_term);
        out.head = self.head;
        Ok(out)
    }

    /// Applies one recovered record to the in-memory log, checking it against what came before.
    fn replay(&mut self, header: &Header, payload: &[u8]) -> Result<(), LogError> {
        let at = header.vblock;
        let inconsistent = |why: String| LogError::Inconsistent { vblock: at, why };
        let mut entries = decode_entries(payload, header.entry_count).map_err(inconsistent)?;
        let (term, vote, commit) = header.hard_state;
        if term < self.hard_state.term {
            return Err(inconsistent(format!("hard state term goes back from {} to {term}", self.hard_state.term)));
        }
        if let Some(first) = entries.first().map(|e| e.index) {
            if first != header.first_index || entries.iter().enumerate().any(|(i, e)| e.index != first + i as u64) {
                return Err(inconsistent(format!("entry indexes do not run from {}", header.first_index)));
            }
            // Entries at or below the root's applied index are already in the tree; the one at
            // the applied index must carry the term the root recorded.
            let skip = (self.snapshot_index + 1).saturating_sub(first).min(entries.len() as u64) as usize;
            if let Some(e) = entries[..skip].iter().find(|e| e.index == self.snapshot_index) {
                if e.term != self.snapshot_term {
                    return Err(inconsistent(format!(
                        "entry {} has term {} but the root applied it in term {}",
                        e.index, e.term, self.snapshot_term
                    )));
                }
            }
            entries.drain(..skip);
        }
        if let Some(first) = entries.first().map(|e| e.index) {
            if first > self.last_index() + 1 {
                return Err(inconsistent(format!(
                    "gap: entry {first} follows {} (the log does not reach back to the root)",
                    self.last_index()
                )));
            }
            // Committed entries are never replaced (Raft §5.3).
            if first <= self.last_index() && first <= self.hard_state.commit {
                return Err(inconsistent(format!(
                    "record replaces committed entries from {first} (commit {})",
                    self.hard_state.commit
                )));
            }
            self.truncate_from(first);
            let floor = self.entries.back().map_or(self.snapshot_term, |p| p.term);
            if entries.iter().any(|e| e.term < floor) || entries.windows(2).any(|w| w[1].term < w[0].term) {
                return Err(inconsistent(format!("entry terms go below {floor} or backwards")));
            }
            self.entries.extend(entries);
        }
        self.hard_state = HardState { term, vote, commit: commit.max(self.hard_state.commit) };
        Ok(())
    }

    /// Decides whether the bad record at `self.head` is a torn tail (dropped) or damage in the
    /// middle of the log (refused).
    fn check_torn_tail(&self, reader: &mut RingReader, problem: RecordProblem, limit: u64) -> Result<(), LogError> {
        let torn_at = self.head;
        // A record of a later batch than the torn one proves the torn one had been flushed.
        // Stale records of the same lap beyond the head all belong to batches that started at
        // or before it (recovery only ever drops part of the last batch), so they do not count.
        let mut cursor = match &problem {
            RecordProblem::Payload { blocks, .. } => torn_at + blocks,
            _ => torn_at + 1,
        };
        let mut window_end = cursor + MAX_RECORD_BLOCKS;
        while cursor < limit.min(window_end) {
            match read_header(&*self.dev, reader, cursor, self.region.volume_id)? {
                Ok(h) => {
                    if h.batch_start > torn_at {
                        return Err(LogError::CorruptMiddle {
                            vblock: torn_at,
                            lap: torn_at / self.region.blocks,
                            why: problem.to_string(),
                            next: cursor,
                        });
                    }
                    // A record of the torn batch itself: skip it and look past it.
                    cursor += h.blocks;
                    window_end = cursor + MAX_RECORD_BLOCKS;
                }
                Err(HeaderProblem::Version(version)) => {
                    return Err(LogError::UnsupportedVersion { vblock: cursor, version });
                }
                Err(_) => cursor += 1,
            }
        }
        if self.written_whole(reader, torn_at, &problem)? {
            return Err(LogError::CorruptTail { vblock: torn_at, why: problem.to_string() });
        }
        if problem.is_partial_record() {
            warn!(self.log, "dropped torn log tail"; "vblock" => torn_at, "why" => problem.to_string());
        }
        Ok(())
    }

    /// Whether every sector of the bad record at `vblock` was written by that record (then it
    /// is damaged, not torn). With a valid header the tag is known; with a damaged one, the
    /// first block decides: its other seven sectors agree on a body tag and the header sector
    /// still carries a copy of the matching header tag (so the block is a record's first).
    fn written_whole(&self, reader: &mut RingReader, vblock: u64, problem: &RecordProblem) -> Result<bool, LogError> {
        let read = |reader: &mut RingReader, blocks: u64| -> Result<Vec<u8>, LogError> {
            let bytes = reader
                .blocks(&*self.dev, vblock, blocks)
                .map_err(|source| LogError::Device { what: "read log record", source })?;
            Ok(bytes.to_vec())
        };
        match problem {
            RecordProblem::Payload { blocks, tag } => {
                let bytes = read(reader, *blocks)?;
                let body = body_tag(*tag);
                Ok(bytes
                    .chunks(SECTOR_SIZE)
                    .enumerate()
                    .all(|(i, sector)| sector_tags(sector).contains(if i == 0 { tag } else { &body })))
            }
            RecordProblem::Header(HeaderProblem::Magic | HeaderProblem::Checksum | HeaderProblem::Shape(_)) => {
                let bytes = read(reader, 1)?;
                let mut sectors = bytes.chunks(SECTOR_SIZE);
                let header_tags = sector_tags(sectors.next().unwrap_or_default());
                let [body, again] = sector_tags(&bytes[SECTOR_SIZE..]);
                let agreed = body == again && body != NO_TAG && sectors.all(|s| sector_tags(s) == [body, body]);
                Ok(agreed && header_tags.contains(&body_tag(body)))
            }
            // Another volume's or lap's record, a newer format, or a complete record that does
            // not chain: nothing of this record reached the media there.
            RecordProblem::Header(_) | RecordProblem::Chain => Ok(false),
        }
    }

    fn truncate_from(&mut self, index: u64) {
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
    fn encode_batch(&mut self, entries: &[Entry], hs: &HardState) -> Result<(usize, Vec<Span>, Hash), LogError> {
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

    /// Reads the entries `low .. high` back from the ring space retained for the backup root
    /// (records from `retain` on; they were compacted out of memory) and shows each to `visit`.
    /// Recovery uses it to learn which blocks those records name. Stops at the first record
    /// past `high`, or with an error at the first that is not valid.
    pub fn read_retained(
        &self,
        low: u64,
        high: u64,
        visit: &mut dyn FnMut(&Entry) -> Result<(), crate::alloc::AllocError>,
    ) -> Result<(), LogError> {
        let mut reader = RingReader::new(self.region);
        let mut at = self.retain;
        while at < self.head {
            let (header, payload) = match read_record(&*self.dev, &mut reader, at, self.head)? {
                Ok(found) => found,
                Err(problem) => {
                    return Err(LogError::Inconsistent { vblock: at, why: format!("retained record: {problem}") })
                }
            };
            let entries = decode_entries(&payload, header.entry_count)
                .map_err(|why| LogError::Inconsistent { vblock: at, why })?;
            for e in entries.iter().filter(|e| (low..high).contains(&e.index)) {
                visit(e).map_err(|e| LogError::Inconsistent { vblock: at, why: crate::error_chain(&e) })?;
            }
            if header.first_index + u64::from(header.entry_count) >= high {
                break;
            }
            at += header.blocks;
        }
        Ok(())
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

impl raft::Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState { hard_state: self.hard_state.clone(), conf_state: self.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
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
        for e in self.entries.range(from..to) {
            size += e.encoded_len() as u64;
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e.clone());
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

/// Why the record at a position is not valid.
#[derive(Debug)]
enum RecordProblem {
    Header(HeaderProblem),
    /// The header is valid (so its length and tag are known) but the payload is not.
    Payload {
        blocks: u64,
        tag: [u8; 4],
    },
    /// Valid, but it does not follow the record before it.
    Chain,
}

impl RecordProblem {
    /// Whether part of a record is there (a torn batch), rather than zeros, another lap's or
    /// volume's record, or a complete record that does not chain: where the log just ends.
    fn is_partial_record(&self) -> bool {
        matches!(self, Self::Payload { .. } | Self::Header(HeaderProblem::Checksum | HeaderProblem::Shape(_)))
    }
}

impl std::fmt::Display for RecordProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(p) => write!(f, "{p}"),
            Self::Payload { .. } => write!(f, "payload checksum mismatch"),
            Self::Chain => write!(f, "does not chain to the previous record"),
        }
    }
}

/// Reads the ring through a read-ahead window, so a replay issues few large reads. On a
/// device that wants it (`Device::read_ahead`), a helper thread streams the ring in windows
/// while the records already read are checked and decoded.
struct RingReader {
    region: LogRegion,
    buf: AlignedBuf,
    /// vblock of `buf[0]` and how many blocks of it are valid.
    at: u64,
    valid: u64,
    stream: Option<Stream>,
}

/// Windows a helper thread reads ahead, in ring order.
struct Stream {
    rx: std::sync::mpsc::Receiver<Result<AlignedBuf, DeviceError>>,
    /// Windows received and still needed: (first vblock, blocks).
    windows: VecDeque<(u64, AlignedBuf)>,
    /// Where the next window from the thread starts.
    next: u64,
    /// A request that spans two windows is copied together here.
    joined: Vec<u8>,
    /// Windows done with go back to the thread for reuse (no fresh pages per window).
    spent: std::sync::mpsc::Sender<AlignedBuf>,
}

const READ_AHEAD_BLOCKS: u64 = 2 * MAX_RECORD_BLOCKS;
/// Windows the helper thread reads before it waits for the reader to catch up.
const STREAM_AHEAD: usize = 2;

impl RingReader {
    fn new(region: LogRegion) -> Self {
        let cap = READ_AHEAD_BLOCKS.min(region.blocks);
        Self { region, buf: AlignedBuf::blocks(cap as usize), at: 0, valid: 0, stream: None }
    }

    /// A reader whose helper thread streams the ring from `from` up to `limit` (vblocks).
    fn streaming(region: LogRegion, dev: Arc<dyn Device>, from: u64, limit: u64) -> Self {
        let mut reader = Self::new(region);
        if !dev.read_ahead() || limit <= from {
            return reader;
        }
        let cap = READ_AHEAD_BLOCKS.min(region.blocks);
        let (tx, rx) = std::sync::mpsc::sync_channel(STREAM_AHEAD);
        let (spent, reuse) = std::sync::mpsc::channel::<AlignedBuf>();
        let spawned = std::thread::Builder::new().name("rblk-log-scan".into()).spawn(move || {
            let mut at = from;
            while at < limit {
                let mut window = reuse.try_recv().unwrap_or_else(|_| AlignedBuf::blocks(cap as usize));
                let read = read_window(&*dev, region, &mut window, at, cap).map(|()| window);
                let failed = read.is_err();
                // The reader went away (it found the end) or the read failed: stop.
                if tx.send(read).is_err() || failed {
                    return;
                }
                at += cap;
            }
        });
        if spawned.is_ok() {
            reader.stream = Some(Stream { rx, windows: VecDeque::new(), next: from, joined: Vec::new(), spent });
        }
        reader
    }

    /// The bytes of blocks `vblock .. vblock + count` (`count` ≤ the window size).
    fn blocks(&mut self, dev: &dyn Device, vblock: u64, count: u64) -> Result<&[u8], DeviceError> {
        let covered = match &mut self.stream {
            Some(stream) => Some(stream.cover(vblock, count)?),
            None => None,
        };
        match covered {
            Some(true) => {
                if let Some(stream) = &mut self.stream {
                    return Ok(stream.slice(vblock, count));
                }
            }
            // A jump back, or past the end of the stream: read the plain way from now on.
            Some(false) => self.stream = None,
            None => {}
        }
        if !(vblock >= self.at && vblock + count <= self.at + self.valid) {
            let cap = self.buf.len() as u64 / BLOCK;
            let want = cap.max(count);
            if want > cap {
                self.buf = AlignedBuf::blocks(want as usize);
            }
            read_window(dev, self.region, &mut self.buf, vblock, want)?;
            self.at = vblock;
            self.valid = want;
        }
        let from = ((vblock - self.at) * BLOCK) as usize;
        Ok(&self.buf[from..from + (count * BLOCK) as usize])
    }
}

impl Stream {
    /// Makes the windows in hand cover `vblock .. vblock + count`, dropping the ones before
    /// it; false if they cannot (it lies before them, or the stream ended first).
    fn cover(&mut self, vblock: u64, count: u64) -> Result<bool, DeviceError> {
        let start = self.windows.front().map_or(self.next, |(at, _)| *at);
        if vblock < start {
            return Ok(false);
        }
        while self.windows.front().is_some_and(|(at, w)| at + w.len() as u64 / BLOCK <= vblock) {
            if let Some((_, window)) = self.windows.pop_front() {
                // The thread may be gone (end of the ring): then the window is just freed.
                let _ = self.spent.send(window);
            }
        }
        while self.next < vblock + count {
            match self.rx.recv() {
                Ok(Ok(window)) => {
                    let blocks = window.len() as u64 / BLOCK;
                    if self.next + blocks > vblock {
                        self.windows.push_back((self.next, window));
                    } else {
                        let _ = self.spent.send(window);
                    }
                    self.next += blocks;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    }

    /// The bytes `cover` made sure of: a slice of one window, or joined from two or more.
    fn slice(&mut self, vblock: u64, count: u64) -> &[u8] {
        let len = (count * BLOCK) as usize;
        let (at, first) = &self.windows[0];
        let from = ((vblock - at) * BLOCK) as usize;
        if from + len <= first.len() {
            return &self.windows[0].1[from..from + len];
        }
        self.joined.clear();
        let mut pos = vblock;
        for (at, window) in &self.windows {
            let end = at + window.len() as u64 / BLOCK;
            if pos >= vblock + count {
                break;
            }
            let upto = end.min(vblock + count);
            self.joined.extend_from_slice(&window[((pos - at) * BLOCK) as usize..((upto - at) * BLOCK) as usize]);
            pos = upto;
        }
        &self.joined
    }
}

/// Reads `want` blocks of the ring from `vblock` on into `buf`, wrapping at its end.
fn read_window(dev: &dyn Device, region: LogRegion, buf: &mut [u8], vblock: u64, want: u64) -> Result<(), DeviceError> {
    let n = region.blocks;
    let pos = vblock % n;
    let first = (n - pos).min(want);
    dev.read_at((region.start + pos) * BLOCK, &mut buf[..(first * BLOCK) as usize])?;
    if want > first {
        let rest = (want - first) as usize * BLOCK_SIZE;
        dev.read_at(region.start * BLOCK, &mut buf[(first * BLOCK) as usize..][..rest])?;
    }
    Ok(())
}

fn parse_header(bytes: &[u8], vblock: u64, volume_id: [u8; 16]) -> Result<Header, HeaderProblem> {
    let raw = RawHeader::read_from_bytes(&bytes[..HEADER_SIZE]).map_err(|_| HeaderProblem::Shape("short".into()))?;
    if raw.magic != LOG_MAGIC {
        return Err(HeaderProblem::Magic);
    }
    if raw.header_checksum != hash::log_header_checksum(&bytes[..CHECKED_HEADER]) {
        return Err(HeaderProblem::Checksum);
    }
    if raw.format_version.get() != LOG_FORMAT_VERSION {
        return Err(HeaderProblem::Version(raw.format_version.get()));
    }
    if raw.volume_id != volume_id {
        return Err(HeaderProblem::Foreign);
    }
    if raw.vblock.get() != vblock {
        return Err(HeaderProblem::Misplaced { claims: raw.vblock.get() });
    }
    let blocks = u64::from(raw.blocks.get());
    let payload_len = raw.payload_len.get();
    if raw.header_size.get() as usize != HEADER_SIZE
        || blocks == 0
        || blocks > MAX_RECORD_BLOCKS
        || HEADER_SIZE as u64 + payload_len > blocks * BLOCK_DATA as u64
        || raw.batch_start.get() > vblock
    {
        return Err(HeaderProblem::Shape(format!("{blocks} blocks, payload {payload_len}")));
    }
    Ok(Header {
        vblock,
        batch_start: raw.batch_start.get(),
        blocks,
        entry_count: raw.entry_count.get(),
        payload_len: payload_len as usize,
        first_index: raw.first_index.get(),
        hard_state: (raw.term.get(), raw.vote.get(), raw.commit.get()),
        prev_checksum: raw.prev_checksum,
        payload_checksum: raw.payload_checksum,
        checksum: raw.header_checksum,
    })
}

/// Reads and checks the header at `vblock`. Device errors are real errors; a bad header is not.
fn read_header(
    dev: &dyn Device,
    reader: &mut RingReader,
    vblock: u64,
    volume_id: [u8; 16],
) -> Result<Result<Header, HeaderProblem>, LogError> {
    let bytes = reader.blocks(dev, vblock, 1).map_err(|source| LogError::Device { what: "read log header", source })?;
    Ok(parse_header(bytes, vblock, volume_id))
}

/// Reads and checks the whole record at `vblock`.
fn read_record(
    dev: &dyn Device,
    reader: &mut RingReader,
    vblock: u64,
    limit: u64,
) -> Result<Result<(Header, Vec<u8>), RecordProblem>, LogError> {
    let header = match read_header(dev, reader, vblock, reader.region.volume_id)? {
        Ok(h) => h,
        Err(HeaderProblem::Version(version)) => return Err(LogError::UnsupportedVersion { vblock, version }),
        Err(p) => return Ok(Err(RecordProblem::Header(p))),
    };
    if vblock + header.blocks > limit {
        // It would overlap retained records: it cannot be one we wrote in this lap.
        return Ok(Err(RecordProblem::Header(HeaderProblem::Shape("runs past the ring".into()))));
    }
    let volume_id = reader.region.volume_id;
    let bytes = reader
        .blocks(dev, vblock, header.blocks)
        .map_err(|source| LogError::Device { what: "read log record", source })?;
    let payload = gather(bytes, HEADER_SIZE, header.payload_len);
    if hash::log_payload_checksum(&volume_id, vblock, &payload) != header.payload_checksum {
        return Ok(Err(RecordProblem::Payload { blocks: header.blocks, tag: tag_of(&header.checksum) }));
    }
    Ok(Ok((header, payload)))
}

/// A tag no record has: what never-written (zeroed) sectors carry.
const NO_TAG: [u8; 4] = [0; 4];

/// The tag a record writes into its first sector; the others carry `body_tag` of it, so the
/// first block of a record is told apart from a block in the middle of one.
fn tag_of(header_checksum: &Hash) -> [u8; 4] {
    let tag = [header_checksum[0], header_checksum[1], header_checksum[2], header_checksum[3]];
    if tag == NO_TAG || body_tag(tag) == NO_TAG {
        [1, 0, 0, 0]
    } else {
        tag
    }
}

/// The tag of a record's sectors after the first: the complement of its first sector's.
fn body_tag(tag: [u8; 4]) -> [u8; 4] {
    tag.map(|b| !b)
}

/// The two tag copies at the end of a sector.
fn sector_tags(sector: &[u8]) -> [[u8; 4]; 2] {
    let mut out = [NO_TAG; 2];
    if sector.len() >= SECTOR_SIZE {
        out[0].copy_from_slice(&sector[SECTOR_DATA..SECTOR_DATA + 4]);
        out[1].copy_from_slice(&sector[SECTOR_DATA + 4..SECTOR_SIZE]);
    }
    out
}

/// Lays the record data `data` out in sectors of `out` (whole blocks), each ending with its
/// tag twice (`tag` in the first, `body_tag` in the rest); the data's tail is zero-padded.
fn seal(data: &[u8], out: &mut [u8], first_tag: [u8; 4]) {
    for (i, sector) in out.chunks_mut(SECTOR_SIZE).enumerate() {
        let tag = if i == 0 { first_tag } else { body_tag(first_tag) };
        let from = (i * SECTOR_DATA).min(data.len());
        let to = ((i + 1) * SECTOR_DATA).min(data.len());
        sector[..to - from].copy_from_slice(&data[from..to]);
        sector[to - from..SECTOR_DATA].fill(0);
        sector[SECTOR_DATA..SECTOR_DATA + 4].copy_from_slice(&tag);
        sector[SECTOR_DATA + 4..].copy_from_slice(&tag);
    }
}

/// `len` bytes of record data from offset `from`, gathered from the sectors of `bytes`.
fn gather(bytes: &[u8], from: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut at = from;
    while out.len() < len {
        let (sector, within) = (at / SECTOR_DATA, at % SECTOR_DATA);
        let n = (SECTOR_DATA - within).min(len - out.len());
        out.extend_from_slice(&bytes[sector * SECTOR_SIZE + within..][..n]);
        at += n;
    }
    out
}

fn decode_entries(mut payload: &[u8], count: u32) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count {
        let e = Entry::decode_length_delimited(&mut payload).map_err(|err| format!("entry {i} of {count}: {err}"))?;
        entries.push(e);
    }
    if !payload.is_empty() {
        return Err(format!("{} bytes after the last entry", payload.len()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{CrashPolicy, SimDisk, SimFault};
    use proptest::prelude::*;
    use raft::Storage;

    const VOL: [u8; 16] = *b"test-volume-0001";

    fn logger() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    fn region(blocks: u64) -> LogRegion {
        LogRegion { start: 3, blocks, volume_id: VOL }
    }

    fn disk(blocks: u64) -> Arc<SimDisk> {
        Arc::new(SimDisk::new((blocks + 8) * BLOCK, 1))
    }

    fn voters() -> ConfState {
        ConfState { voters: vec![1], ..Default::default() }
    }

    fn open(d: &Arc<SimDisk>, blocks: u64, anchor: &Anchor) -> Result<LogStore, LogError> {
        LogStore::open(d.clone(), region(blocks), anchor, logger())
    }

    fn entry(index: u64, term: u64, len: usize) -> Entry {
        let data = (0..len).map(|i| (index as usize * 31 + i) as u8).collect();
        Entry { index, term, data, ..Default::default() }
    }

    fn hs(term: u64, commit: u64) -> HardState {
        HardState { term, vote: 1, commit }
    }

    fn all(store: &LogStore) -> Vec<Entry> {
        let (lo, hi) = (store.first_index(), store.last_index() + 1);
        store.entries(lo, hi, None, GetEntriesContext::empty(false)).expect("entries")
    }

    /// On a file, recovery streams the ring in windows on a helper thread: records that
    /// straddle windows (and records longer than the rest of a window) read back the same.
    #[test]
    fn streamed_scan_of_a_file_reads_every_record() {
        let path = std::env::temp_dir().join(format!("rblk-log-stream-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let blocks = 4 * READ_AHEAD_BLOCKS + 100;
        let dev: Arc<dyn Device> =
            Arc::new(crate::device::FileDevice::create(&path, (blocks + 8) * BLOCK).expect("create"));
        assert!(dev.read_ahead());
        let mut s = LogStore::open(dev.clone(), region(blocks), &Anchor::genesis(voters()), logger()).expect("open");
        let mut index = 1;
        let mut batch = 0usize;
        while s.head() + 2 * MAX_RECORD_BLOCKS < blocks {
            // Small batches, and now and then entries of hundreds of KiB.
            let len = if batch % 5 == 4 { 300_000 + batch * 1000 } else { 4096 + batch };
            let es: Vec<Entry> = (0..1 + batch % 4).map(|k| entry(index + k as u64, 1, len)).collect();
            index += es.len() as u64;
            s.append(&es, Some(&hs(1, index - 1))).expect("append");
            batch += 1;
        }
        assert!(s.head() > 3 * READ_AHEAD_BLOCKS, "the log spans several windows");
        let r = LogStore::open(dev, region(blocks), &Anchor::genesis(voters()), logger()).expect("reopen");
        assert_eq!((r.head(), r.last_index()), (s.head(), s.last_index()));
        assert!(all(&r) == all(&s), "every entry reads back");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn append_then_reopen_sees_the_same_log_and_hard_state() {
        let d = disk(64);
        let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
        s.append(&[entry(1, 1, 10), entry(2, 1, 5000)], Some(&hs(1, 0))).expect("append");
        s.append(&[entry(3, 2, 0)], Some(&hs(2, 2))).expect("append");
        s.append(&[], Some(&HardState { term: 3, vote: 0, commit: 3 })).expect("hard state only");
        let r = open(&d, 64, &Anchor::genesis(voters())).expect("reopen");
        assert_eq!(all(&r), all(&s));
        assert_eq!(r.hard_state(), &HardState { term: 3, vote: 0, commit: 3 });
        assert_eq!(r.initial_state().expect("state").conf_state, voters());
        assert_eq!((r.first_index(), r.last_index(), r.head()), (1, 3, s.head()));
    }

    #[test]
    fn conflicting_suffix_is_replaced_and_stays_replaced() {
        let d = disk(64);
        let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
        s.append(&[entry(1, 1, 1), entry(2, 1, 1), entry(3, 1, 1)], Some(&hs(1, 1))).expect("append");
        s.append(&[entry(2, 2, 7), entry(3, 2, 7), entry(4, 2, 7)], Some(&hs(2, 1))).expect("replace");
        let want = vec![entry(1, 1, 1), entry(2, 2, 7), entry(3, 2, 7), entry(4, 2, 7)];
        assert_eq!(all(&s), want);
        assert_eq!(all(&open(&d, 64, &Anchor::genesis(voters())).expect("reopen")), want);
        // Replacing a committed entry is refused before anything is written.
        let before = d.ops();
        assert!(matches!(s.append(&[entry(1, 3, 0)], None), Err(LogError::BadAppend { .. })));
        assert!(matches!(s.append(&[entry(9, 3, 0)], None), Err(LogError::BadAppend { .. })), "gap");
        assert_eq!(d.ops(), before);
    }

    /// Borrowed chunks cover the same entries as `entries`, in order, whatever the sizes and
    /// however the in-memory queue wraps (compaction pops its front).
    #[test]
    fn entries_view_chunks_cover_what_entries_returns() {
        let d = disk(4096);
        let mut s = open(&d, 4096, &Anchor::genesis(voters())).expect("open");
        let mut next = 1u64;
        for round in 0..6u64 {
            let es: Vec<Entry> = (0..40).map(|k| entry(next + k, 1, 100 + (k as usize * 37) % 900)).collect();
            next += 40;
            s.append(&es, Some(&hs(1, next - 1))).expect("append");
            if round % 2 == 1 {
                let keep = s.tail_for(next - 30);
                s.compact(next - 30, keep).expect("compact");
            }
            let (lo, hi) = (s.first_index(), s.last_index() + 1);
            for max in [0u64, 1, 500, 5000, u64::MAX] {
                let mut got = Vec::new();
                let mut at = lo;
                while at < hi {
                    let chunk = s.entries_view(at, hi, max).expect("view");
                    assert!(!chunk.is_empty());
                    at += chunk.len() as u64;
                    got.extend_from_slice(chunk);
                }
                assert_eq!(got, all(&s), "round {round}, max {max}");
            }
            assert!(s.entries_view(hi, hi + 1, 1).is_none(), "past the end");
            assert!(s.entries_view(lo - 1, hi, 1).is_none() || lo == 1, "compacted");
        }
    }

    #[test]
    fn compaction_keeps_the_term_of_the_truncation_point() {
        let d = disk(64);
        let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
        let es: Vec<Entry> = (1..=10).map(|i| entry(i, 1 + i / 4, 3)).collect();
        s.append(&es, Some(&hs(3, 10))).expect("append");
        let keep = s.tail_for(6);
        s.compact(6, keep).expect("compact");
        assert_eq!(s.first_index(), 6);
        assert_eq!(s.term(5).expect("term of first-1"), es[4].term);
        assert!(matches!(s.term(4), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(
            s.entries(5, 7, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(matches!(s.term(11), Err(raft::Error::Store(StorageError::Unavailable))));
        assert_eq!(all(&s), es[5..].to_vec());
    }

    /// Appends and compacts through several laps of a small ring; every reopen from the
    /// anchor a root would hold sees exactly the live entries.
    #[test]
    fn ring_wraps_over_many_laps() {
        let blocks = 24;
        let d = disk(blocks);
        let mut anchor = Anchor::genesis(voters());
        let mut s = open(&d, blocks, &anchor).expect("open");
        let mut index = 0;
        for round in 0..60u64 {
            let batch: Vec<Entry> = (0..1 + round % 3)
                .map(|_| {
                    index += 1;
                    entry(index, 1, (round as usize * 997) % 9000)
                })
                .collect();
            s.append(&batch, Some(&hs(1, index))).expect("append");
            // A checkpoint at `index`: the new root keeps the log from index + 1.
            let tail = s.tail_for(index + 1);
            anchor = Anchor {
                scan_from: tail,
                durable_head: s.head(),
                retain_from: anchor.scan_from,
                applied_index: index,
                applied_term: 1,
                conf_state: voters(),
            };
            s.compact(index + 1, anchor.retain_from).expect("compact");
            let r = open(&d, blocks, &anchor).expect("reopen");
            assert_eq!((r.first_index(), r.last_index()), (index + 1, index));
            assert_eq!(r.hard_state().commit, index);
        }
        assert!(s.head() > 3 * blocks, "the test must wrap the ring several times (head {})", s.head());
    }

    #[test]
    fn full_ring_refuses_without_writing() {
        let d = disk(16);
        let mut s = open(&d, 16, &Anchor::genesis(voters())).expect("open");
        let mut i = 0;
        let err = loop {
            i += 1;
            if let Err(e) = s.append(&[entry(i, 1, 6000)], None) {
                break e;
            }
        };
        assert!(matches!(err, LogError::Full { .. }), "{err}");
        assert_eq!(s.last_index(), i - 1);
        assert!(s.usage().0 <= 16);
    }

    #[test]
    fn oversized_entry_is_refused() {
        let d = disk(2048);
        let mut s = open(&d, 2048, &Anchor::genesis(voters())).expect("open");
        let big = entry(1, 1, MAX_ENTRY_BYTES);
        assert!(matches!(s.append(&[big], None), Err(LogError::EntryTooLarge { .. })));
        // A large batch is split into several records and still reads back.
        let batch: Vec<Entry> = (1..=5).map(|i| entry(i, 1, 1 << 20)).collect();
        s.append(&batch, None).expect("append big batch");
        assert!(s.spans.len() >= 3, "batch of 5 MiB must span several records");
        assert_eq!(all(&open(&d, 2048, &Anchor::genesis(voters())).expect("reopen")), batch);
    }

    #[test]
    fn torn_tail_is_dropped_but_flushed_records_survive() {
        for policy in [CrashPolicy::DropAll, CrashPolicy::Random, CrashPolicy::KeepAll] {
            for seed in 0..20 {
                let d = Arc::new(SimDisk::new(72 * BLOCK, seed));
                let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
                s.append(&[entry(1, 1, 100)], Some(&hs(1, 1))).expect("append");
                // The power goes off in the next batch's durable write: it may be kept or torn.
                d.crash_after_ops(Some(0));
                assert!(s.append(&[entry(2, 1, 9000), entry(3, 1, 10)], Some(&hs(1, 1))).is_err());
                assert!(matches!(s.append(&[], None), Err(LogError::Poisoned)), "fail-stop");
                d.crash(policy.clone());
                let r = open(&d, 64, &Anchor::genesis(voters())).expect("reopen");
                let got = all(&r);
                assert!(
                    got == vec![entry(1, 1, 100)] || got == vec![entry(1, 1, 100), entry(2, 1, 9000), entry(3, 1, 10)],
                    "policy {policy:?} seed {seed}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn damaged_middle_record_refuses_to_open() {
        let d = disk(64);
        let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
        for i in 1..=4 {
            s.append(&[entry(i, 1, 5000)], Some(&hs(1, i))).expect("append");
        }
        let second = s.spans[1].vblock;
        // Damage the payload of the second record (its header stays valid) ...
        d.inject(SimFault::BitFlip { offset: (3 + second) * BLOCK + 300, bit: 2 });
        let err = open(&d, 64, &Anchor::genesis(voters())).expect_err("must refuse");
        assert!(matches!(err, LogError::CorruptMiddle { vblock, .. } if vblock == second), "{err}");
        // ... and its header: still refused, found by the look-ahead.
        d.inject(SimFault::BitFlip { offset: (3 + second) * BLOCK + 40, bit: 0 });
        let err = open(&d, 64, &Anchor::genesis(voters())).expect_err("must refuse");
        assert!(matches!(err, LogError::CorruptMiddle { vblock, .. } if vblock == second), "{err}");
    }

    /// The last record, written completely and then damaged, is refused; torn, it is dropped.
    #[test]
    fn damaged_last_record_is_refused_and_a_torn_one_dropped() {
        let setup = |len: usize| {
            let d = disk(64);
            let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
            s.append(&[entry(1, 1, 10)], Some(&hs(1, 0))).expect("append");
            s.append(&[entry(2, 1, len)], Some(&hs(1, 0))).expect("append");
            let last = (3 + s.spans[1].vblock) * BLOCK;
            (d, last, s.head())
        };
        // Damage to its header or payload (in the first sector, a later one, a later block).
        for (len, offset) in [(10, 8), (10, 40), (200, 300), (9000, 600), (9000, 5000), (9000, 8192 + 100)] {
            let (d, last, _) = setup(len);
            d.inject(SimFault::BitFlip { offset: last + offset, bit: 3 });
            let err = open(&d, 64, &Anchor::genesis(voters())).map(|_| ()).expect_err("damage is refused");
            assert!(matches!(err, LogError::CorruptTail { .. }), "offset {offset}: {err}");
        }
        // Damage to padding or a tag copy loses nothing: the record still validates.
        for (len, offset) in [(10, 2000), (10, 504), (10, 4095), (9000, 8192 + 511)] {
            let (d, last, _) = setup(len);
            d.inject(SimFault::BitFlip { offset: last + offset, bit: 3 });
            assert_eq!(open(&d, 64, &Anchor::genesis(voters())).expect("open").last_index(), 2, "offset {offset}");
        }
        // Torn: one sector holding record data kept its old content (zeros here).
        for (len, sector) in [(3000, 0), (3000, 3), (3000, 6), (9000, 9), (9000, 17)] {
            let (d, last, head) = setup(len);
            let mut image = d.durable_image();
            let at = (last + sector * 512) as usize;
            image[at..at + 512].fill(0);
            let d = Arc::new(SimDisk::from_image(image, 1));
            let r = open(&d, 64, &Anchor::genesis(voters())).expect("a torn tail is dropped");
            assert_eq!(r.last_index(), 1, "sector {sector}");
            // A root written after the record was durable knows the log reached the head.
            let anchor = Anchor { durable_head: head, ..Anchor::genesis(voters()) };
            assert!(matches!(open(&d, 64, &anchor), Err(LogError::ShortLog { .. })));
        }
    }

    #[test]
    fn stale_records_of_an_earlier_lap_or_volume_never_validate() {
        let blocks = 16;
        let d = disk(blocks);
        let mut s = open(&d, blocks, &Anchor::genesis(voters())).expect("open");
        // Fill most of the first lap, then compact everything and write one record in lap 2.
        for i in 1..=12 {
            s.append(&[entry(i, 1, 10)], Some(&hs(1, i))).expect("append");
        }
        let keep = s.tail_for(13);
        s.compact(13, keep).expect("compact");
        s.append(&[entry(13, 1, 10)], Some(&hs(1, 13))).expect("append");
        let anchor = Anchor {
            scan_from: keep,
            durable_head: keep,
            retain_from: keep,
            applied_index: 12,
            applied_term: 1,
            conf_state: voters(),
        };
        let r = open(&d, blocks, &anchor).expect("reopen");
        assert_eq!((r.first_index(), r.last_index()), (13, 13));
        // The same bytes opened as another volume show no records at all.
        let other = LogRegion { volume_id: *b"another-volume!!", ..region(blocks) };
        let r = LogStore::open(d.clone(), other, &Anchor::genesis(voters()), logger()).expect("foreign");
        assert_eq!(r.last_index(), 0);
    }

    #[test]
    fn stale_tail_of_the_same_lap_is_not_a_continuation() {
        // A torn batch leaves valid records behind; after the tail is dropped and overwritten
        // by a shorter batch, those leftovers must not be replayed.
        let d = Arc::new(SimDisk::new(2056 * BLOCK, 9));
        let mut s = open(&d, 2048, &Anchor::genesis(voters())).expect("open");
        s.append(&[entry(1, 1, 10)], Some(&hs(1, 1))).expect("append");
        let batch: Vec<Entry> = (2..=6).map(|i| entry(i, 1, 1 << 20)).collect(); // several records
                                                                                 // The append is one durable write: the power goes off in it, so it stays pending.
        d.crash_after_ops(Some(0));
        assert!(matches!(s.append(&batch, Some(&hs(1, 1))), Err(LogError::Device { .. })));
        let sectors = d.pending_sectors()[0];
        // Only the first sector (the first record's header) is lost.
        d.crash(CrashPolicy::Fates(vec![crate::device::WriteFate::Torn {
            kept: (0..sectors).map(|i| i != 0).collect(),
        }]));
        let mut r = open(&d, 2048, &Anchor::genesis(voters())).expect("torn tail");
        assert_eq!(r.last_index(), 1);
        // Same size as the torn batch's first record: the next block holds a stale record of
        // this lap at exactly the right position, which only the chain tells apart.
        r.append(&[entry(2, 2, 1 << 20)], Some(&hs(2, 2))).expect("append after recovery");
        let stale = r.head();
        let mut reader = RingReader::new(region(2048));
        let h = read_header(&*d, &mut reader, stale, VOL).expect("read").expect("a stale but well-placed record");
        assert_ne!(h.prev_checksum, r.last_checksum);
        let r = open(&d, 2048, &Anchor::genesis(voters())).expect("reopen");
        assert_eq!(all(&r), vec![entry(1, 1, 10), entry(2, 2, 1 << 20)]);
    }

    #[test]
    fn flush_error_poisons_the_store() {
        let d = disk(64);
        let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
        d.inject(SimFault::FlushError);
        assert!(matches!(s.append(&[entry(1, 1, 1)], None), Err(LogError::Device { .. })));
        assert!(matches!(s.append(&[entry(1, 1, 1)], None), Err(LogError::Poisoned)));
        assert_eq!(s.last_index(), 0, "nothing reported durable");
    }

    #[test]
    fn read_error_during_recovery_is_an_error_not_an_empty_log() {
        let d = disk(64);
        let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
        s.append(&[entry(1, 1, 1)], None).expect("append");
        d.inject(SimFault::ReadError { offset: 3 * BLOCK });
        assert!(matches!(open(&d, 64, &Anchor::genesis(voters())), Err(LogError::Device { .. })));
    }

    #[test]
    fn anchor_disagreeing_with_the_log_is_refused() {
        let d = disk(64);
        let mut s = open(&d, 64, &Anchor::genesis(voters())).expect("open");
        s.append(&[entry(1, 1, 1), entry(2, 1, 1)], Some(&hs(1, 2))).expect("append");
        let wrong_term = Anchor { applied_index: 2, applied_term: 7, ..Anchor::genesis(voters()) };
        assert!(matches!(open(&d, 64, &wrong_term), Err(LogError::Inconsistent { .. })));
        let backwards = Anchor { scan_from: 5, retain_from: 6, durable_head: 7, ..Anchor::genesis(voters()) };
        assert!(matches!(open(&d, 64, &backwards), Err(LogError::BadAnchor(_))));
    }

    proptest! {
        /// Header encoding round-trips, and any single bit flip in a header is detected.
        #[test]
        fn header_round_trip_and_bit_flips(n in 0usize..4, len in 0usize..3000, flip in 0usize..(HEADER_SIZE * 8)) {
            let d = disk(32);
            let mut s = open(&d, 32, &Anchor::genesis(voters())).expect("open");
            let es: Vec<Entry> = (1..=n as u64).map(|i| entry(i, 2, len)).collect();
            let (bytes, spans, last) = s.encode_batch(&es, &hs(2, 0)).expect("encode");
            let mut buf = s.sealed[..bytes].to_vec();
            prop_assert_eq!(spans.len(), 1);
            let h = parse_header(&buf, 0, VOL).expect("parse");
            prop_assert_eq!(h.checksum, last);
            prop_assert_eq!(h.entry_count as usize, n);
            prop_assert_eq!(decode_entries(&gather(&buf, HEADER_SIZE, h.payload_len), h.entry_count).expect("decode"), es);
            prop_assert!(parse_header(&buf, 1, VOL).is_err(), "bound to its position");
            buf[flip / 8] ^= 1 << (flip % 8);
            prop_assert!(parse_header(&buf, 0, VOL).is_err());
        }
    }
}
