//! What `LogStore::open` does to recover the log: the scan along the chain, the replay of
//! each record, and the decision whether a bad record is a torn tail or damage; and the
//! read-back of the retained records that volume recovery asks for.

use raft::eraftpb::{ConfState, Entry, HardState};
use slog::warn;

use crate::device::SECTOR_SIZE;

use super::format::{body_tag, decode_entries, sector_tags, Header, HeaderProblem, MAX_RECORD_BLOCKS, NO_TAG};
use super::reader::{read_header, read_record, RingReader};
use super::store::Span;
use super::{LogError, LogStore};

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

/// What recovery found, for logging and `rblk inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    pub records: u64,
    pub entries: u64,
    pub head: u64,
    /// Whether part of a torn batch was dropped (false after a clean stop).
    pub torn_tail: bool,
}

impl LogStore {
    pub(super) fn recover(&mut self, anchor: &Anchor) -> Result<Recovered, LogError> {
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
}

/// Why the record at a position is not valid.
#[derive(Debug)]
pub(super) enum RecordProblem {
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
