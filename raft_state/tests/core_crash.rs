//! Crash tests of the persistent core on the simulated disk: the three roots and the Raft log
//! together, driven the way the volume drives them (append, replace an uncommitted suffix,
//! checkpoint = root rotation + compaction), crashed after every write and every flush.
//!
//! After each recovery: no flushed entry or root is lost, nothing unflushed was reported
//! durable (an append that returned Ok left no pending write), entries of the batch in flight
//! appear all-or-prefix, and the roots' hash chain holds.
//!
//! Environment: `RBLK_SIM_SEEDS=N` random runs (default 2000); `RBLK_SIM_SEED=S` replays one.

use std::collections::BTreeMap;
use std::sync::Arc;

use raft::eraftpb::{ConfState, Entry, HardState};
use raft_state::device::{CrashPolicy, Device, SimDisk, WriteFate, BLOCK};
use raft_state::hash;
use raft_state::layout::Geometry;
use raft_state::log::{Anchor, LogError, LogRegion, LogStore};
use raft_state::rng::Rng;
use raft_state::roots::{self, Root, RootPayload, Roots};
use slog::{o, Discard, Logger};

const VOL: [u8; 16] = *b"crash-test-vol-1";
const LOG_BLOCKS: u64 = 24;
const DISK_BLOCKS: u64 = 3 + LOG_BLOCKS + 8;

fn voters() -> ConfState {
    ConfState { voters: vec![1], ..Default::default() }
}

fn region() -> LogRegion {
    LogRegion { start: 3, blocks: LOG_BLOCKS, volume_id: VOL }
}

/// The persistent core as the volume uses it.
struct Core {
    disk: Arc<SimDisk>,
    roots: Roots,
    log: LogStore,
}

fn anchor_of(current: &Root, backup: Option<&Root>) -> Anchor {
    let p = &current.payload;
    Anchor {
        scan_from: p.log_tail,
        durable_head: p.log_head,
        retain_from: backup.map_or(p.log_tail, |b| b.payload.log_tail),
        applied_index: p.applied_index,
        applied_term: p.applied_term,
        conf_state: p.conf_state.clone(),
    }
}

impl Core {
    fn format(disk: Arc<SimDisk>) -> Core {
        let geometry = Geometry::plan(DISK_BLOCKS * BLOCK, true, LOG_BLOCKS, 1024).expect("geometry");
        let payload = RootPayload { conf_state: voters(), ..Default::default() };
        roots::format(&*disk, VOL, geometry, payload).expect("format");
        disk.flush().expect("flush");
        Core::open(disk).expect("open after format")
    }

    fn open(disk: Arc<SimDisk>) -> Result<Core, String> {
        let roots = roots::open(&*disk).map_err(|e| format!("roots: {e}"))?;
        let anchor = anchor_of(roots.current(), roots.backup());
        let dev: Arc<dyn Device> = disk.clone();
        let log =
            LogStore::open(dev, region(), &anchor, Logger::root(Discard, o!())).map_err(|e| format!("log: {e}"))?;
        Ok(Core { disk, roots, log })
    }

    /// A checkpoint: the state machine applied everything committed; rotate the roots, then
    /// compact the log to what the (new) backup still needs.
    fn checkpoint(&mut self) -> Result<(), String> {
        let applied = self.log.hard_state().commit;
        let applied_term = raft::Storage::term(&self.log, applied).map_err(|e| e.to_string())?;
        let payload = RootPayload {
            applied_index: applied,
            applied_term,
            conf_state: self.log.conf_state().clone(),
            log_tail: self.log.tail_for(applied + 1),
            log_head: self.log.head(),
            ..Default::default()
        };
        self.roots.commit(&*self.disk, payload).map_err(|e| e.to_string())?;
        let backup = self.roots.backup().expect("a backup right after a commit");
        let (index, keep) = (backup.payload.applied_index + 1, backup.payload.log_tail);
        self.log.compact(index, keep).map_err(|e| e.to_string())
    }
}

/// One step of a workload.
#[derive(Debug, Clone)]
enum Op {
    /// Append `count` entries of `size` bytes in `term`, then mark all but the last `uncommitted` committed.
    Append { count: u64, size: usize, uncommitted: u64 },
    /// Replace the last `back` uncommitted entries with `count` new ones in a higher term.
    Replace { back: u64, count: u64 },
    /// Rotate the roots and compact.
    Checkpoint,
}

/// What the test knows was made durable, and what was in flight.
#[derive(Debug, Clone, Default)]
struct Oracle {
    /// index → (term, data) of every entry whose append returned Ok (live copies).
    log: BTreeMap<u64, (u64, Vec<u8>)>,
    hard_state: HardState,
    /// The batch of the append that did not return.
    in_flight: Vec<Entry>,
    /// Generation of the newest root whose commit returned Ok, and of the one attempted.
    flushed_root: u64,
    attempted_root: u64,
    /// Payload committed with each generation.
    payloads: BTreeMap<u64, (u64, u64)>,
    /// Appends refused because the ring was full (nothing written).
    full: u64,
}

impl Oracle {
    /// What a freshly opened core has made durable.
    fn start(core: &Core) -> Oracle {
        let generation = core.roots.current().generation;
        Oracle { flushed_root: generation, attempted_root: generation, ..Default::default() }
    }
}

fn entry(index: u64, term: u64, size: usize, salt: u64) -> Entry {
    let mut data = vec![0; size];
    Rng::new(index ^ (term << 32) ^ (salt << 48)).fill(&mut data);
    Entry { index, term, data, ..Default::default() }
}

/// Runs `ops` until the disk goes down; returns the oracle at that point.
fn run(core: &mut Core, ops: &[Op], oracle: &mut Oracle, salt: u64) {
    for op in ops {
        let last = core.log.last_index();
        let term = core.log.hard_state().term.max(1);
        let (entries, hs) = match *op {
            Op::Append { count, size, uncommitted } => {
                let es: Vec<Entry> = (1..=count).map(|i| entry(last + i, term, size, salt)).collect();
                let commit = (last + count).saturating_sub(uncommitted).max(core.log.hard_state().commit);
                (es, HardState { term, vote: 1, commit })
            }
            Op::Replace { back, count } => {
                let commit = core.log.hard_state().commit;
                let from = (last + 1).saturating_sub(back).max(commit + 1);
                let es: Vec<Entry> = (0..count).map(|i| entry(from + i, term + 1, 100 + i as usize, salt)).collect();
                (es, HardState { term: term + 1, vote: 1, commit })
            }
            Op::Checkpoint => {
                oracle.attempted_root = core.roots.current().generation + 1;
                if let Err(e) = core.checkpoint() {
                    assert!(core.disk.is_down(), "checkpoint failed without a crash: {e}");
                    return;
                }
                let root = core.roots.current();
                oracle.flushed_root = root.generation;
                oracle.payloads.insert(root.generation, (root.payload.applied_index, root.payload.applied_term));
                continue;
            }
        };
        oracle.in_flight = entries.clone();
        match core.log.append(&entries, Some(&hs)) {
            Ok(()) => {
                assert_eq!(core.disk.pending_writes(), 0, "append returned before its flush");
                if let Some(first) = entries.first() {
                    oracle.log.split_off(&first.index);
                }
                for e in &entries {
                    oracle.log.insert(e.index, (e.term, e.data.clone()));
                }
                oracle.hard_state = hs;
                oracle.in_flight.clear();
            }
            Err(LogError::Full { .. }) => {
                oracle.in_flight.clear();
                oracle.full += 1;
            }
            Err(e) => {
                assert!(core.disk.is_down(), "append failed without a crash: {e}");
                return;
            }
        }
    }
}

/// Checks a recovered core against the oracle.
fn check(core: &Core, oracle: &Oracle) -> Result<(), String> {
    let current = core.roots.current();
    // Roots: never below a flushed root, never beyond the attempted one, chain intact.
    if current.generation < oracle.flushed_root || current.generation > oracle.attempted_root.max(oracle.flushed_root) {
        return Err(format!(
            "root generation {} outside [{}, {}]",
            current.generation, oracle.flushed_root, oracle.attempted_root
        ));
    }
    if current.generation >= 2 && current.version != hash::root_version(&current.parent_b, &current.parent_c) {
        return Err("current root's version is not H(parents)".into());
    }
    if let Some(&(applied, term)) = oracle.payloads.get(&current.generation) {
        if (current.payload.applied_index, current.payload.applied_term) != (applied, term) {
            return Err(format!("root {} payload differs from what was committed", current.generation));
        }
    }
    // Log: the acknowledged log, plus possibly a prefix of the in-flight batch.
    let first = core.log.first_index();
    let last = core.log.last_index();
    let got: Vec<(u64, (u64, Vec<u8>))> = if last >= first {
        raft::Storage::entries(&core.log, first, last + 1, None, raft::GetEntriesContext::empty(false))
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|e| (e.index, (e.term, e.data)))
            .collect()
    } else {
        Vec::new()
    };
    let legal = (0..=oracle.in_flight.len()).any(|k| {
        let mut want = oracle.log.clone();
        if let Some(e) = oracle.in_flight.first().filter(|_| k > 0) {
            want.split_off(&e.index);
        }
        for e in &oracle.in_flight[..k] {
            want.insert(e.index, (e.term, e.data.clone()));
        }
        let want: Vec<_> = want.range(first..).map(|(i, v)| (*i, v.clone())).collect();
        want == got
    });
    if !legal {
        return Err(format!(
            "recovered log {first}..={last} is neither the acknowledged log nor it plus a prefix of the in-flight batch"
        ));
    }
    let hs = core.log.hard_state();
    if hs.term < oracle.hard_state.term || hs.commit < oracle.hard_state.commit {
        return Err(format!("hard state went back: {hs:?} < {:?}", oracle.hard_state));
    }
    Ok(())
}

/// A workload that wraps the 24-block ring several times, replaces uncommitted suffixes and
/// rotates the roots, with entries from a few bytes to several blocks.
fn script() -> Vec<Op> {
    use Op::*;
    vec![
        Append { count: 2, size: 100, uncommitted: 0 },
        Append { count: 1, size: 6000, uncommitted: 1 },
        Replace { back: 1, count: 2 },
        Checkpoint,
        Append { count: 3, size: 3000, uncommitted: 0 },
        Checkpoint,
        Append { count: 1, size: 9000, uncommitted: 0 },
        Append { count: 2, size: 10, uncommitted: 2 },
        Replace { back: 2, count: 1 },
        Checkpoint,
        Append { count: 4, size: 4000, uncommitted: 0 },
        Checkpoint,
        Append { count: 2, size: 8000, uncommitted: 0 },
        Checkpoint,
        Append { count: 1, size: 12000, uncommitted: 0 },
        Checkpoint,
        Append { count: 3, size: 5000, uncommitted: 0 },
        Checkpoint,
        Append { count: 2, size: 9000, uncommitted: 1 },
        Replace { back: 1, count: 1 },
        Checkpoint,
        Append { count: 3, size: 7000, uncommitted: 0 },
        Checkpoint,
        Append { count: 1, size: 20000, uncommitted: 0 },
        Checkpoint,
        Append { count: 4, size: 2000, uncommitted: 0 },
        Checkpoint,
        Append { count: 2, size: 11000, uncommitted: 0 },
        Checkpoint,
    ]
}

fn fresh(seed: u64) -> Core {
    Core::format(Arc::new(SimDisk::new(DISK_BLOCKS * BLOCK, seed)))
}

/// After a crash and recovery the core must accept writes and recover them again.
fn continue_after(mut core: Core, salt: u64) -> Result<(), String> {
    let mut oracle = Oracle { hard_state: core.log.hard_state().clone(), ..Oracle::start(&core) };
    let first = core.log.first_index();
    for e in
        raft::Storage::entries(&core.log, first, core.log.last_index() + 1, None, raft::GetEntriesContext::empty(false))
            .map_err(|e| e.to_string())?
    {
        oracle.log.insert(e.index, (e.term, e.data));
    }
    run(&mut core, &[Op::Append { count: 2, size: 700, uncommitted: 0 }, Op::Checkpoint], &mut oracle, salt);
    let disk = core.disk.clone();
    drop(core);
    disk.crash(CrashPolicy::DropAll);
    let core = Core::open(disk)?;
    check(&core, &oracle)
}

#[test]
fn script_without_crash_wraps_the_ring_and_recovers_exactly() {
    let mut core = fresh(0);
    let mut oracle = Oracle::start(&core);
    run(&mut core, &script(), &mut oracle, 0);
    assert!(oracle.in_flight.is_empty() && oracle.full == 0, "no append may fail without a crash");
    assert!(core.log.head() > 2 * LOG_BLOCKS, "the script must wrap the ring (head {})", core.log.head());
    assert_eq!(core.roots.current().generation, 2 + 12, "one root per checkpoint");
    let disk = core.disk.clone();
    drop(core);
    disk.crash(CrashPolicy::DropAll);
    let core = Core::open(disk).expect("reopen");
    check(&core, &oracle).expect("oracle");
}

/// Every crash point of the script × every fate (kept, dropped, torn halves) of each pending write.
#[test]
fn exhaustive_crash_points_of_the_script() {
    let total_ops = {
        let mut core = fresh(0);
        let start = core.disk.ops();
        run(&mut core, &script(), &mut Oracle::default(), 0);
        core.disk.ops() - start
    };
    let mut states = 0;
    for n in 0..total_ops {
        // Learn which writes are pending at this crash point, then try every fate combination.
        let pending = {
            let mut core = fresh(0);
            core.disk.crash_after_ops(Some(n));
            run(&mut core, &script(), &mut Oracle::default(), 0);
            core.disk.pending_sectors()
        };
        let choices: Vec<Vec<WriteFate>> = pending.iter().map(|&s| WriteFate::choices(s)).collect();
        let combos: usize = choices.iter().map(Vec::len).product();
        for combo in 0..combos {
            let mut rest = combo;
            let fates: Vec<WriteFate> = choices
                .iter()
                .map(|c| {
                    let f = c[rest % c.len()].clone();
                    rest /= c.len();
                    f
                })
                .collect();
            let mut core = fresh(0);
            let mut oracle = Oracle::start(&core);
            core.disk.crash_after_ops(Some(n));
            run(&mut core, &script(), &mut oracle, 0);
            let disk = core.disk.clone();
            drop(core);
            disk.crash(CrashPolicy::Fates(fates.clone()));
            let core =
                Core::open(disk).unwrap_or_else(|e| panic!("crash after op {n}, fates {fates:?}: open failed: {e}"));
            check(&core, &oracle).unwrap_or_else(|e| panic!("crash after op {n}, fates {fates:?}: {e}"));
            continue_after(core, 1).unwrap_or_else(|e| panic!("crash after op {n}, fates {fates:?}, then: {e}"));
            states += 1;
        }
    }
    assert!(states > total_ops as usize, "crash states tried: {states}");
}

fn random_ops(rng: &mut Rng, len: usize) -> Vec<Op> {
    (0..len)
        .map(|_| match rng.below(10) {
            0..=5 => Op::Append {
                count: 1 + rng.below(4),
                size: [0, 10, 500, 4000, 9000][rng.below(5) as usize],
                uncommitted: rng.below(3),
            },
            6 => Op::Replace { back: 1 + rng.below(3), count: 1 + rng.below(3) },
            _ => Op::Checkpoint,
        })
        .collect()
}

/// One seeded random run: a random workload, a crash at a random op with random fates,
/// recovery, a check, more work, a second crash and recovery.
fn random_run(seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let ops = random_ops(&mut rng, 40);
    let mut core = fresh(seed);
    let mut oracle = Oracle::start(&core);
    core.disk.crash_after_ops(Some(rng.below(120)));
    run(&mut core, &ops, &mut oracle, seed);
    let disk = core.disk.clone();
    drop(core);
    disk.crash(CrashPolicy::Random);
    let core = Core::open(disk).map_err(|e| format!("open: {e}"))?;
    check(&core, &oracle)?;
    continue_after(core, seed ^ 1)
}

#[test]
fn seeded_random_crash_runs() {
    if let Some(seed) = std::env::var("RBLK_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        random_run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        return;
    }
    let seeds: u64 = std::env::var("RBLK_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    for seed in 0..seeds {
        if let Err(e) = random_run(seed) {
            panic!("seed {seed} failed (replay with RBLK_SIM_SEED={seed}): {e}");
        }
    }
}

/// A flushed current root damaged afterwards: opening falls back to the backup root, and the
/// log, retained back to the backup's `log_tail`, still replays every acknowledged entry.
#[test]
fn damaged_current_root_falls_back_and_loses_nothing() {
    let script = script();
    for prefix in 1..=script.len() {
        let mut core = fresh(0);
        let mut oracle = Oracle::start(&core);
        run(&mut core, &script[..prefix], &mut oracle, 0);
        // Fill the ring: every block not retained for the backup root gets reused.
        let full = oracle.full;
        while oracle.full == full {
            run(&mut core, &[Op::Append { count: 1, size: 3000, uncommitted: 0 }], &mut oracle, 0);
        }
        let current = core.roots.current().clone();
        let backup = core.roots.backup().cloned().expect("backup");
        let disk = core.disk.clone();
        drop(core);
        disk.flip_random_bit(u64::from(current.slot) * BLOCK, u64::from(current.slot + 1) * BLOCK);
        let core = Core::open(disk).unwrap_or_else(|e| panic!("prefix {prefix}: {e}"));
        assert_eq!(core.roots.current(), &backup, "prefix {prefix}: fell back to the backup");
        assert_eq!(core.log.first_index(), backup.payload.applied_index + 1);
        let want: Vec<(u64, (u64, Vec<u8>))> =
            oracle.log.range(core.log.first_index()..).map(|(i, v)| (*i, v.clone())).collect();
        let got: Vec<(u64, (u64, Vec<u8>))> = raft::Storage::entries(
            &core.log,
            core.log.first_index(),
            core.log.last_index() + 1,
            None,
            raft::GetEntriesContext::empty(false),
        )
        .expect("entries")
        .into_iter()
        .map(|e| (e.index, (e.term, e.data)))
        .collect();
        let summary = |v: &[(u64, (u64, Vec<u8>))]| v.iter().map(|(i, (t, d))| (*i, *t, d.len())).collect::<Vec<_>>();
        assert!(
            got == want,
            "prefix {prefix}: every acknowledged entry after the backup must replay:\n got  {:?}\n want {:?}",
            summary(&got),
            summary(&want)
        );
        continue_after(core, 2).unwrap_or_else(|e| panic!("prefix {prefix}, then: {e}"));
    }
}
