use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, StorageError};
use slog::Logger;

use super::format::{decode_entries, gather, parse_header};
use super::reader::{read_header, RingReader, READ_AHEAD_BLOCKS};
use super::*;
use crate::device::{CrashPolicy, Device, SimDisk, SimFault, BLOCK};
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
    d.crash(CrashPolicy::Fates(vec![crate::device::WriteFate::Torn { kept: (0..sectors).map(|i| i != 0).collect() }]));
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
