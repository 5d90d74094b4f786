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

mod format;
mod reader;
mod recovery;
mod store;
#[cfg(test)]
mod tests;

pub use format::{HEADER_SIZE, LOG_FORMAT_VERSION, LOG_MAGIC, MAX_ENTRY_BYTES, MAX_RECORD_BLOCKS};
pub use recovery::{Anchor, Recovered};
pub use store::{LogMark, LogRegion, LogStore};

use crate::device::DeviceError;

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
