//! Volume tests against a byte model: every acknowledged write reads back after checkpoints,
//! reopenings and crashes; a crash leaves the model state of some prefix of the log between
//! the acknowledged and the attempted entries; damaged data fails only its own reads.

use super::*;
use crate::device::{CrashPolicy, SimDisk, SimFault, WriteFate};
use crate::rng::Rng;
use crate::volume::Checks;
use raft::eraftpb::HardState;

const VOL: [u8; 16] = *b"volume-test-vol1";
const VOLUME_BLOCKS: u64 = 48;
const LOG_BLOCKS: u64 = 64;
const DISK_BLOCKS: u64 = 3 + LOG_BLOCKS + 400;

fn logger() -> Logger {
    Logger::root(slog::Discard, slog::o!())
}

struct Harness {
    disk: Arc<SimDisk>,
    volume: Volume,
    store: LogStore,
    term: u64,
    /// Checkpoints as the driver takes them: sealed when due, made durable and installed
    /// later (`settle`), with entries applied in between.
    pipelined: bool,
    pending: Option<SealedCheckpoint>,
    /// Whole-block writes are placed (written once) before they are logged, as the driver's
    /// node thread does.
    placer: Option<crate::place::Placer>,
    /// Checkpoints when the volume says they are due (else only when a test asks).
    auto_checkpoint: bool,
}

impl Harness {
    fn format(seed: u64) -> Harness {
        Harness::format_with(seed, LOG_BLOCKS)
    }

    fn format_with(seed: u64, log_blocks: u64) -> Harness {
        let disk = Arc::new(SimDisk::new(DISK_BLOCKS * BLOCK, seed));
        let opts = FormatOptions { volume_bytes: VOLUME_BLOCKS * BLOCK, log_blocks, volume_id: VOL };
        Volume::format(&*disk, None, opts).expect("format");
        Harness::open(disk).expect("open")
    }

    fn open(disk: Arc<SimDisk>) -> Result<Harness, VolumeError> {
        let (volume, store) = Volume::open(disk.clone(), None, logger())?;
        let term = store.hard_state().term + 1;
        Ok(Harness { disk, volume, store, term, pipelined: false, pending: None, placer: None, auto_checkpoint: true })
    }

    /// The driver's ways by seed: checkpoints pipelined or not, whole-block writes placed or
    /// carried in the log.
    fn configure(&mut self, seed: u64) {
        self.pipelined = seed % 2 == 1;
        self.placer = (seed % 4 >= 2).then(|| crate::place::Placer::new(self.disk.clone(), BLOCK));
    }

    /// What a single-node Raft group does with a proposal: persist it (durable = committed),
    /// then apply it.
    fn propose(&mut self, cmd: &Command<'_>) -> Result<Applied, String> {
        if self.auto_checkpoint && self.volume.should_checkpoint(&self.store.mark(self.volume.applied_index())) {
            if self.pipelined {
                self.settle()?;
                let mark = self.store.mark(self.volume.applied_index());
                self.pending = Some(self.volume.seal_checkpoint(&mark).map_err(|e| e.to_string())?);
            } else {
                self.checkpoint()?;
            }
        }
        let index = self.store.last_index() + 1;
        let mut entry = Entry { index, term: self.term, data: cmd.encode(), ..Default::default() };
        if let Some(placer) = &mut self.placer {
            let volume = &mut self.volume;
            placer
                .place_entries(std::slice::from_mut(&mut entry), &mut |n| volume.lend(n))
                .map_err(|e| e.to_string())?;
        }
        let hs = HardState { term: self.term, vote: 1, commit: index };
        self.store.append(std::slice::from_ref(&entry), Some(&hs)).map_err(|e| e.to_string())?;
        self.volume.apply(&entry).map_err(|e| e.to_string())
    }

    /// Makes the sealed checkpoint durable and installs it, if there is one.
    fn settle(&mut self) -> Result<(), String> {
        if let Some(mut sealed) = self.pending.take() {
            let durable = sealed.make_durable();
            if let Some(c) = self.volume.finish_checkpoint(&mut sealed, durable).map_err(|e| e.to_string())? {
                self.volume.compact(&mut self.store, c).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// A whole checkpoint now (after the pending one).
    fn checkpoint(&mut self) -> Result<(), String> {
        self.settle()?;
        self.volume.checkpoint(&mut self.store).map_err(|e| e.to_string())
    }

    fn read_all(&self) -> Result<Vec<u8>, VolumeError> {
        let mut buf = vec![0; (VOLUME_BLOCKS * BLOCK) as usize];
        self.volume.read(0, &mut buf)?;
        Ok(buf)
    }
}

/// A random command and its effect on the model.
fn random_command(rng: &mut Rng, data: &mut Vec<u8>) -> (u8, u64, u64) {
    let size = VOLUME_BLOCKS * BLOCK;
    let max = if rng.chance(1, 3) { 40 } else { 8 };
    let (length, offset) = if rng.chance(1, 3) {
        // Whole blocks (which a placing harness writes once).
        let blocks = 1 + rng.below(max / 8 + 1);
        (blocks * BLOCK, rng.below(size / BLOCK - blocks + 1) * BLOCK)
    } else {
        let length = (1 + rng.below(max)) * 512;
        (length, rng.below((size - length) / 512 + 1) * 512)
    };
    let kind = rng.below(10) as u8;
    data.clear();
    if kind < 7 {
        data.resize(length as usize, 0);
        rng.fill(data);
    }
    (kind, offset, length)
}

fn command<'a>(kind: u8, offset: u64, length: u64, data: &'a [u8]) -> Command<'a> {
    match kind {
        0..=6 => Command::Write { offset, data },
        7 | 8 => Command::Trim { offset, length },
        _ => Command::WriteZeroes { offset, length },
    }
}

fn apply_model(model: &mut [u8], kind: u8, offset: u64, length: u64, data: &[u8]) {
    let range = offset as usize..(offset + length) as usize;
    if kind <= 6 {
        model[range].copy_from_slice(data);
    } else {
        model[range].fill(0);
    }
}

#[test]
fn random_commands_match_the_model_across_checkpoints_and_reopens() {
    for seed in 0..12u64 {
        let mut rng = Rng::new(seed);
        let mut h = Harness::format(seed);
        h.configure(seed);
        let mut model = vec![0u8; (VOLUME_BLOCKS * BLOCK) as usize];
        let mut data = Vec::new();
        for step in 0..250 {
            let (kind, offset, length) = random_command(&mut rng, &mut data);
            let applied = h.propose(&command(kind, offset, length, &data)).expect("propose");
            assert_eq!(applied, Applied::Done, "seed {seed} step {step}");
            apply_model(&mut model, kind, offset, length, &data);
            if rng.chance(1, 8) {
                h.checkpoint().expect("checkpoint");
            }
            if rng.chance(1, 4) {
                h.settle().expect("settle");
            }
            if rng.chance(1, 25) {
                // Sometimes with a sealed checkpoint whose root was never written.
                let disk = h.disk.clone();
                drop(h);
                h = Harness::open(disk).expect("reopen");
                h.configure(seed);
            }
            if rng.chance(1, 5) {
                assert!(h.read_all().expect("read") == model, "seed {seed} step {step}: content differs");
                holes_read_as_zeros(&h.volume, &model, seed);
            }
        }
        assert!(h.read_all().expect("read") == model, "seed {seed}: final content differs");
        assert!(h.volume.roots().current().generation > 10, "seed {seed}: checkpoints happened");
    }
}

/// Every run `allocation` calls unmapped reads as zeros, and the runs cover the volume.
fn holes_read_as_zeros(volume: &Volume, model: &[u8], seed: u64) {
    let mut at = 0;
    for (length, mapped) in volume.allocation(0, model.len() as u64, usize::MAX).expect("allocation") {
        let range = at as usize..(at + length) as usize;
        assert!(mapped || model[range].iter().all(|b| *b == 0), "seed {seed}: a hole at {at}+{length} holds data");
        at += length;
    }
    assert_eq!(at, model.len() as u64, "seed {seed}: the runs cover the volume");
}

/// `allocation` answers from the block map: written blocks are mapped, trimmed and
/// write-zeroed ones are holes again (across a checkpoint and a reopen too), a range that
/// starts or ends inside a block is cut to it, and the answer is bounded by `max_runs`.
#[test]
fn allocation_follows_writes_trims_and_write_zeroes() {
    let mut h = Harness::format(3);
    let k = BLOCK;
    let data = vec![0xa5u8; (16 * k) as usize];
    h.propose(&Command::Write { offset: 4 * k, data: &data }).expect("write");
    h.propose(&Command::Write { offset: 40 * k, data: &data[..(2 * k) as usize] }).expect("write");
    h.propose(&Command::Trim { offset: 6 * k, length: 2 * k }).expect("trim");
    h.propose(&Command::WriteZeroes { offset: 12 * k, length: 3 * k }).expect("zero");
    let want = vec![
        (4 * k, false),
        (2 * k, true),
        (2 * k, false),
        (4 * k, true),
        (3 * k, false),
        (5 * k, true),
        (20 * k, false),
        (2 * k, true),
        (VOLUME_BLOCKS * k - 42 * k, false),
    ];
    assert_eq!(h.volume.allocation(0, VOLUME_BLOCKS * k, usize::MAX).expect("allocation"), want);
    h.checkpoint().expect("checkpoint");
    let disk = h.disk.clone();
    drop(h);
    let h = Harness::open(disk).expect("reopen");
    assert_eq!(h.volume.allocation(0, VOLUME_BLOCKS * k, usize::MAX).expect("allocation"), want);
    // Cut to an unaligned range, and to a limit.
    assert_eq!(
        h.volume.allocation(5 * k + 512, 2 * k, usize::MAX).expect("allocation"),
        vec![(k - 512, true), (k + 512, false)]
    );
    assert_eq!(h.volume.allocation(0, VOLUME_BLOCKS * k, 3).expect("allocation"), want[..3].to_vec());
    assert!(matches!(h.volume.allocation(VOLUME_BLOCKS * k - k, 2 * k, 9), Err(VolumeError::OutOfRange { .. })));
}

/// Seeded crash runs: after a power loss at a random device operation, the volume reopens
/// with the content of the model after some prefix of the log that includes every
/// acknowledged entry; then it goes on working.
#[test]
fn crashes_recover_an_acknowledged_prefix() {
    if let Some(seed) = std::env::var("RBLK_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        crash_run(seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        return;
    }
    let seeds: u64 = std::env::var("RBLK_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    for seed in 0..seeds {
        if let Err(e) = crash_run(seed) {
            panic!("seed {seed} failed (replay with RBLK_SIM_SEED={seed}): {e}");
        }
    }
}

fn crash_run(seed: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    let mut h = Harness::format(seed);
    h.configure(seed);
    let mut model = vec![0u8; (VOLUME_BLOCKS * BLOCK) as usize];
    // states[k] = content after k entries (entry 1 is the first command).
    let mut states = vec![model.clone()];
    let mut acked = 0usize;
    let mut data = Vec::new();
    h.disk.crash_after_ops(Some(1 + rng.below(400)));
    for _ in 0..150 {
        let (kind, offset, length) = random_command(&mut rng, &mut data);
        apply_model(&mut model, kind, offset, length, &data);
        states.push(model.clone());
        if h.propose(&command(kind, offset, length, &data)).is_err() {
            break;
        }
        acked = states.len() - 1;
        if rng.chance(1, 6) && h.checkpoint().is_err() {
            break;
        }
        if rng.chance(1, 3) && h.settle().is_err() {
            break;
        }
    }
    let attempted = states.len() - 1;
    let disk = h.disk.clone();
    drop(h);
    disk.crash(CrashPolicy::Random);
    let h = Harness::open(disk).map_err(|e| format!("open after crash: {e}"))?;
    let got = h.read_all().map_err(|e| format!("read after crash: {e}"))?;
    let k = (acked..=attempted).find(|&k| states[k] == got);
    if k.is_none() {
        return Err(format!("content matches no prefix in {acked}..={attempted}"));
    }
    // The recovered volume keeps working and recovering.
    let mut h = h;
    let mut model = got;
    for _ in 0..10 {
        let (kind, offset, length) = random_command(&mut rng, &mut data);
        apply_model(&mut model, kind, offset, length, &data);
        h.propose(&command(kind, offset, length, &data))?;
    }
    h.checkpoint()?;
    let disk = h.disk.clone();
    drop(h);
    disk.crash(CrashPolicy::DropAll);
    let h = Harness::open(disk).map_err(|e| format!("second open: {e}"))?;
    if h.read_all().map_err(|e| e.to_string())? != model {
        return Err("content after the second crash differs".into());
    }
    Ok(())
}

#[test]
fn damaged_data_block_fails_only_its_reads() {
    let mut h = Harness::format(1);
    let data = vec![0x5Au8; 2 * BLOCK_SIZE];
    h.propose(&Command::Write { offset: 0, data: &data }).expect("write");
    h.volume.checkpoint(&mut h.store).expect("checkpoint");
    let ptr = h.volume.map.get(&*h.disk, 1).expect("get").expect("mapped");
    h.disk.inject(SimFault::BitFlip { offset: ptr.block * BLOCK + 100, bit: 1 });
    let mut buf = vec![0u8; BLOCK_SIZE];
    h.volume.read(0, &mut buf).expect("block 0 is intact");
    assert!(buf.iter().all(|&b| b == 0x5A));
    assert!(matches!(h.volume.read(BLOCK, &mut buf), Err(VolumeError::Tree(TreeError::HashMismatch { .. }))));
    // A partial write into it cannot merge with the damaged content: that block stays as it
    // was and the request reports the damage; the rest of the request is applied and the
    // volume keeps serving — also after a restart that replays the same entry.
    let patch = vec![0x11u8; BLOCK_SIZE + 512];
    assert_eq!(h.propose(&Command::Write { offset: 512, data: &patch }).expect("write"), Applied::Damaged);
    let disk = h.disk.clone();
    drop(h);
    disk.crash(CrashPolicy::DropAll);
    let mut h = Harness::open(disk).expect("the damaged entry replays without poisoning");
    h.volume.read(0, &mut buf).expect("block 0 took the write");
    assert!(buf[..512].iter().all(|&b| b == 0x5A) && buf[512..].iter().all(|&b| b == 0x11));
    assert!(matches!(h.volume.read(BLOCK, &mut buf), Err(VolumeError::Tree(TreeError::HashMismatch { .. }))));
    // Overwriting the damaged block heals it.
    h.propose(&Command::Write { offset: BLOCK, data: &data[..BLOCK_SIZE] }).expect("rewrite");
    h.volume.read(BLOCK, &mut buf).expect("healed");
}

#[test]
fn out_of_range_and_replayed_entries() {
    let mut h = Harness::format(2);
    let data = vec![1u8; 512];
    let end = VOLUME_BLOCKS * BLOCK;
    assert!(matches!(h.volume.read(end, &mut [0u8; 512]), Err(VolumeError::OutOfRange { .. })));
    let entry =
        Entry { index: 1, term: 1, data: Command::Write { offset: 512, data: &data }.encode(), ..Default::default() };
    assert_eq!(h.volume.apply(&entry).expect("apply"), Applied::Done);
    assert_eq!(h.volume.apply(&entry).expect("again"), Applied::Done, "at-least-once is safe");
    assert_eq!(h.volume.applied_index(), 1);
    let beyond =
        Entry { index: 2, term: 1, data: Command::Trim { offset: end, length: 512 }.encode(), ..Default::default() };
    assert_eq!(h.volume.apply(&beyond).expect("apply"), Applied::Invalid);
    let garbage = Entry { index: 3, term: 1, data: b"not a command".to_vec(), ..Default::default() };
    assert_eq!(h.volume.apply(&garbage).expect("apply"), Applied::Invalid);
    assert_eq!(h.volume.applied_index(), 3, "invalid entries are applied as no-ops");
    let mut buf = [0u8; 1024];
    h.volume.read(0, &mut buf).expect("still serving");
    assert_eq!(&buf[512..], &data[..]);
}

/// The short workload of the exhaustive test: on a 16-block log ring every step checkpoints
/// (a quarter of the ring), so five steps wrap the ring, rotate the roots and compact.
fn short_workload() -> Vec<(u8, u64, u64, Vec<u8>)> {
    let mut rng = Rng::new(77);
    let mut steps = Vec::new();
    for (kind, offset, length) in
        [(0u8, 0u64, 20480u64), (0, 4096 + 512, 12288), (7, 0, 4096), (0, 8192, 20480), (9, 8192 + 1024, 2048)]
    {
        let mut data = vec![0u8; if kind <= 6 { length as usize } else { 0 }];
        rng.fill(&mut data);
        steps.push((kind, offset, length, data));
    }
    steps
}

fn run_short(h: &mut Harness, states: &mut Vec<Vec<u8>>) -> usize {
    let mut acked = 0;
    let mut model = states[0].clone();
    for (kind, offset, length, data) in short_workload() {
        apply_model(&mut model, kind, offset, length, &data);
        states.push(model.clone());
        if h.propose(&command(kind, offset, length, &data)).is_err() {
            break;
        }
        acked = states.len() - 1;
    }
    acked
}

/// Every crash point of the short workload × fates of the unflushed writes (all combinations
/// of kept, dropped and torn halves when there are few, else 48 seeded samples, plus keep-all
/// and drop-all): recovery gives a prefix state that includes every acknowledged command.
#[test]
fn exhaustive_crash_states_of_a_short_workload() {
    let zero = vec![0u8; (VOLUME_BLOCKS * BLOCK) as usize];
    let total_ops = {
        let mut h = Harness::format_with(0, 16);
        let start = h.disk.ops();
        let mut states = vec![zero.clone()];
        assert_eq!(run_short(&mut h, &mut states), 5);
        assert!(h.store.head() > 16, "the workload must wrap the ring (head {})", h.store.head());
        assert!(h.volume.roots().current().generation >= 2 + 4, "a checkpoint per step");
        h.disk.ops() - start
    };
    let mut tried = 0;
    for n in 0..total_ops {
        let fresh = || {
            let mut h = Harness::format_with(0, 16);
            h.disk.crash_after_ops(Some(n));
            let mut states = vec![zero.clone()];
            let acked = run_short(&mut h, &mut states);
            (h, states, acked)
        };
        let pending = fresh().0.disk.pending_sectors();
        let choices: Vec<Vec<WriteFate>> = pending.iter().map(|&s| WriteFate::choices(s)).collect();
        let combos: u64 = choices.iter().map(|c| c.len() as u64).product();
        let mut picks: Vec<CrashPolicy> = vec![CrashPolicy::KeepAll, CrashPolicy::DropAll];
        let mut rng = Rng::new(n);
        for i in 0..combos.min(48) {
            let mut rest = if combos <= 48 { i } else { rng.below(combos) };
            let fates = choices
                .iter()
                .map(|c| {
                    let f = c[(rest % c.len() as u64) as usize].clone();
                    rest /= c.len() as u64;
                    f
                })
                .collect();
            picks.push(CrashPolicy::Fates(fates));
        }
        for policy in picks {
            let (h, states, acked) = fresh();
            let attempted = states.len() - 1;
            let disk = h.disk.clone();
            drop(h);
            disk.crash(policy.clone());
            let h = Harness::open(disk).unwrap_or_else(|e| panic!("crash after op {n}, {policy:?}: open: {e}"));
            let got = h.read_all().unwrap_or_else(|e| panic!("crash after op {n}, {policy:?}: read: {e}"));
            assert!(
                (acked..=attempted).any(|k| states[k] == got),
                "crash after op {n}, {policy:?}: no prefix in {acked}..={attempted} matches"
            );
            tried += 1;
        }
    }
    assert!(tried > 2 * total_ops as usize, "crash states tried: {tried}");
}

/// A long read checks its blocks' hashes side by side (`hash::data_blocks`): one damaged block
/// among many, in any SIMD lane and beside holes, still fails the read, and reads around it
/// still succeed with the right data.
#[test]
fn damaged_block_in_a_long_read_fails_it() {
    let mut h = Harness::format(1);
    let mut rng = Rng::new(17);
    let mut data = vec![0u8; 40 * BLOCK_SIZE];
    rng.fill(&mut data);
    h.propose(&Command::Write { offset: 0, data: &data }).expect("write");
    // Holes at blocks 3 and 20..22 (they read as zeros).
    h.propose(&Command::Trim { offset: 3 * BLOCK, length: BLOCK }).expect("trim");
    h.propose(&Command::Trim { offset: 20 * BLOCK, length: 2 * BLOCK }).expect("trim");
    for vb in [3, 20, 21] {
        data[vb * BLOCK_SIZE..][..BLOCK_SIZE].fill(0);
    }
    h.volume.checkpoint(&mut h.store).expect("checkpoint");
    let mut buf = vec![0u8; 48 * BLOCK_SIZE];
    h.volume.read(0, &mut buf).expect("intact");
    assert!(buf[..data.len()] == data[..] && buf[data.len()..].iter().all(|&b| b == 0));
    for damaged in [0u64, 17, 39] {
        let ptr = h.volume.map.get(&*h.disk, damaged).expect("get").expect("mapped");
        h.disk.inject(SimFault::BitFlip { offset: ptr.block * BLOCK + 4095, bit: 7 });
        let got = h.volume.read(0, &mut buf);
        assert!(matches!(got, Err(VolumeError::Tree(TreeError::HashMismatch { .. }))), "block {damaged}: {got:?}");
        let before = &mut buf[..damaged as usize * BLOCK_SIZE];
        h.volume.read(0, before).expect("the blocks before it");
        assert!(before[..] == data[..before.len()], "block {damaged}");
        let after = (damaged + 1) * BLOCK;
        let rest = &mut buf[..(48 * BLOCK - after) as usize];
        h.volume.read(after, rest).expect("the blocks after it");
        let want = &data[after as usize..];
        assert!(rest[..want.len()] == want[..], "block {damaged}");
        // Healed by rewriting it, for the next round.
        let block = &data[damaged as usize * BLOCK_SIZE..][..BLOCK_SIZE];
        h.propose(&Command::Write { offset: damaged * BLOCK, data: block }).expect("rewrite");
    }
}

fn corruption_fixture() -> (Harness, Vec<u8>) {
    let mut h = Harness::format(5);
    let mut rng = Rng::new(5);
    let mut model = vec![0u8; (VOLUME_BLOCKS * BLOCK) as usize];
    let mut data = Vec::new();
    for i in 0..60 {
        let (kind, offset, length) = random_command(&mut rng, &mut data);
        apply_model(&mut model, kind, offset, length, &data);
        h.propose(&command(kind, offset, length, &data)).expect("propose");
        if i % 10 == 9 {
            h.volume.checkpoint(&mut h.store).expect("checkpoint");
        }
    }
    // A few commands after the last checkpoint: records the current root needs.
    for _ in 0..3 {
        let (kind, offset, length) = random_command(&mut rng, &mut data);
        apply_model(&mut model, kind, offset, length, &data);
        h.propose(&command(kind, offset, length, &data)).expect("propose");
    }
    (h, model)
}

/// The corruption matrix: each root slot, a data block, the top tree node, a needed log
/// record → exact recovery, EIO for the affected blocks, or a clear refusal; never wrong data.
#[test]
fn corruption_matrix() {
    for slot in 0..3u64 {
        let (h, model) = corruption_fixture();
        let disk = h.disk.clone();
        drop(h);
        disk.flip_random_bit(slot * BLOCK, (slot + 1) * BLOCK);
        let h = Harness::open(disk).unwrap_or_else(|e| panic!("root slot {slot} damaged: {e}"));
        assert!(h.read_all().expect("read") == model, "root slot {slot} damaged: content differs");
    }

    let (h, model) = corruption_fixture();
    let (vb, ptr) = (0..VOLUME_BLOCKS)
        .find_map(|vb| h.volume.map.get(&*h.disk, vb).expect("get").map(|p| (vb, p)))
        .expect("some block is mapped");
    h.disk.inject(SimFault::BitFlip { offset: ptr.block * BLOCK + 9, bit: 0 });
    for other in 0..VOLUME_BLOCKS {
        let mut buf = vec![0u8; BLOCK_SIZE];
        match h.volume.read(other * BLOCK, &mut buf) {
            Ok(()) => assert!(buf[..] == model[(other * BLOCK) as usize..][..BLOCK_SIZE], "block {other}"),
            Err(e) => assert!(other == vb && matches!(e, VolumeError::Tree(TreeError::HashMismatch { .. })), "{e}"),
        }
    }

    let (h, model) = corruption_fixture();
    let top = h.volume.roots().current().payload.tree_root;
    let disk = h.disk.clone();
    drop(h);
    disk.flip_random_bit(top * BLOCK, (top + 1) * BLOCK);
    match Harness::open(disk) {
        Err(e) => assert!(matches!(e, VolumeError::Tree(_) | VolumeError::Alloc(_)), "{e}"),
        Ok(h) => match h.read_all() {
            Err(e) => assert!(matches!(e, VolumeError::Tree(TreeError::HashMismatch { .. })), "{e}"),
            Ok(got) => assert!(got == model, "wrong data after tree damage"),
        },
    }

    let (h, _) = corruption_fixture();
    let tail = h.volume.roots().current().payload.log_tail;
    assert!(h.store.head() > tail + 1, "records after the root's tail");
    let disk = h.disk.clone();
    drop(h);
    let at = (3 + tail % LOG_BLOCKS) * BLOCK;
    disk.flip_random_bit(at, at + 256);
    match Harness::open(disk) {
        Err(VolumeError::Log(LogError::CorruptMiddle { .. })) => {}
        other => panic!("damaged needed log record: expected a refusal, got {:?}", other.map(|_| ())),
    }

    // The log tail: the last record, acknowledged, then damaged (its header, then its
    // payload). Dropping it as if torn would lose an acknowledged write silently.
    for offset in [100, 700] {
        let (mut h, _) = corruption_fixture();
        let before = h.store.head();
        let data = vec![0xA5u8; 2 * BLOCK_SIZE];
        assert_eq!(h.propose(&Command::Write { offset: 0, data: &data }).expect("write"), Applied::Done);
        let disk = h.disk.clone();
        drop(h);
        let at = (3 + before % LOG_BLOCKS) * BLOCK + offset;
        disk.inject(SimFault::BitFlip { offset: at, bit: 5 });
        match Harness::open(disk) {
            Err(VolumeError::Log(LogError::CorruptTail { .. })) => {}
            other => panic!("damaged last log record: expected a refusal, got {:?}", other.map(|_| ())),
        }
    }
}

/// A thin volume (virtual size beyond the data region) filled up: writes fail with NoSpace,
/// while reads, checkpoints, trims and reopening keep working; once trimmed blocks are
/// released (two checkpoints, which space pressure asks for), writes succeed again.
#[test]
fn a_full_volume_fails_writes_and_stays_usable() {
    let disk = Arc::new(SimDisk::new(DISK_BLOCKS * BLOCK, 9));
    let virtual_blocks = 4 * DISK_BLOCKS;
    let opts = FormatOptions { volume_bytes: virtual_blocks * BLOCK, log_blocks: LOG_BLOCKS, volume_id: VOL };
    Volume::format(&*disk, None, opts).expect("format");
    let mut h = Harness::open(disk).expect("open");
    let data_blocks = h.volume.stats().data_blocks;
    let mut model: Vec<Option<u8>> = vec![None; virtual_blocks as usize];
    let block_of = |v: u8| vec![v; BLOCK_SIZE];
    // Fill: one block per write until three in a row fail (a NoSpace asks for checkpoints,
    // which may release a few metadata blocks for more writes).
    let mut written = 0u64;
    let mut failed_in_a_row = 0;
    while failed_in_a_row < 3 {
        let v = (written % 251) as u8 + 1;
        match h.propose(&Command::Write { offset: written * BLOCK, data: &block_of(v) }).expect("propose") {
            Applied::Done => {
                model[written as usize] = Some(v);
                written += 1;
                failed_in_a_row = 0;
            }
            Applied::NoSpace => failed_in_a_row += 1,
            Applied::Invalid | Applied::Damaged => panic!("unexpected outcome"),
        }
        assert!(written < virtual_blocks, "the data region never filled");
    }
    assert!(written > data_blocks / 2, "only {written} of {data_blocks} blocks were writable");
    assert_eq!(h.volume.stats().writable_blocks, 0);
    // Full: checkpoints work, and writes keep failing without changing anything.
    for _ in 0..3 {
        h.volume.checkpoint(&mut h.store).expect("checkpoint while full");
        let at = written * BLOCK;
        assert_eq!(h.propose(&Command::Write { offset: at, data: &block_of(7) }).expect("propose"), Applied::NoSpace);
    }
    let check = |h: &Harness, model: &[Option<u8>]| {
        let mut buf = vec![0u8; BLOCK_SIZE];
        for (vb, want) in model.iter().enumerate() {
            h.volume.read(vb as u64 * BLOCK, &mut buf).expect("read");
            let want = want.unwrap_or(0);
            assert!(buf.iter().all(|&b| b == want), "block {vb}: want {want}, got {}", buf[0]);
        }
    };
    check(&h, &model);
    // Trim every other written block, with a sub-block trim in the mix.
    for vb in (0..written).step_by(2) {
        assert_eq!(h.propose(&Command::Trim { offset: vb * BLOCK, length: BLOCK }).expect("trim"), Applied::Done);
        model[vb as usize] = None;
    }
    check(&h, &model);
    // Reopen (clean close) at this point: the used count comes back from the root.
    let used = {
        let disk = h.disk.clone();
        let Harness { volume, mut store, .. } = h;
        volume.close(&mut store).expect("close");
        let used = {
            let (v, _) = Volume::open(disk.clone(), None, logger()).expect("reopen");
            v.stats().used_blocks
        };
        h = Harness::open(disk).expect("reopen");
        used
    };
    assert_eq!(h.volume.stats().used_blocks, used);
    assert_eq!(h.volume.stats().root_applied_index, h.volume.applied_index(), "closed cleanly: no replay");
    check(&h, &model);
    // Writes succeed again into the trimmed space (the first may still find it unreleased).
    let mut rewritten = 0;
    for vb in (0..written).step_by(2) {
        match h.propose(&Command::Write { offset: vb * BLOCK, data: &block_of(9) }).expect("propose") {
            Applied::Done => {
                model[vb as usize] = Some(9);
                rewritten += 1;
            }
            Applied::NoSpace => {}
            Applied::Invalid | Applied::Damaged => panic!("unexpected outcome"),
        }
    }
    assert!(rewritten >= written / 2 - 4, "only {rewritten} of {} trimmed blocks were writable again", written / 2);
    check(&h, &model);
    let disk = h.disk.clone();
    drop(h);
    disk.crash(CrashPolicy::Random);
    let h = Harness::open(disk).expect("open after crash");
    check(&h, &model);
}

/// Blocks lent to placed writes never take the room an inline write needs: a small write
/// that overtakes placed writes waiting for their flush is applied while all their blocks are
/// lent, and on a volume that is only overwritten it must not fail with NoSpace. (Before the
/// headroom, a light client's 4 KiB writes beside a flood of 1 MiB overwrites on a full
/// 1 GiB volume got ENOSPC.)
#[test]
fn lending_leaves_room_for_inline_writes() {
    let mut h = Harness::format(21);
    for vb in 0..VOLUME_BLOCKS {
        let data = vec![vb as u8; BLOCK_SIZE];
        assert_eq!(h.propose(&Command::Write { offset: vb * BLOCK, data: &data }).expect("fill"), Applied::Done);
    }
    // Release what the fill freed, so that the free blocks are all there are.
    h.checkpoint().expect("checkpoint");
    h.checkpoint().expect("checkpoint");
    let mut lent = 0;
    while h.volume.lend(1).is_ok() {
        lent += 1;
        assert!(lent < DISK_BLOCKS, "lending never stopped");
    }
    assert!(lent > 0, "nothing could be lent");
    for vb in 0..VOLUME_BLOCKS.min(8) {
        let data = vec![0xee; BLOCK_SIZE];
        assert_eq!(
            h.propose(&Command::Write { offset: vb * BLOCK, data: &data }).expect("overwrite"),
            Applied::Done,
            "an inline overwrite of block {vb} with {lent} blocks lent"
        );
    }
}

/// A write of more whole blocks than one placement run, starting and ending mid-block, reads
/// back exactly, before and after a checkpoint and reopen.
#[test]
fn large_unaligned_write_reads_back() {
    let disk = Arc::new(SimDisk::new(2000 * BLOCK, 3));
    let opts = FormatOptions { volume_bytes: 700 * BLOCK, log_blocks: 600, volume_id: VOL };
    Volume::format(&*disk, None, opts).expect("format");
    let mut h = Harness::open(disk).expect("open");
    let mut data = vec![0u8; 400 * BLOCK_SIZE + 1024];
    Rng::new(3).fill(&mut data);
    let offset = 3 * BLOCK + 512;
    assert_eq!(h.propose(&Command::Write { offset, data: &data }).expect("write"), Applied::Done);
    let check = |h: &Harness| {
        let mut buf = vec![0u8; data.len() + 1024];
        h.volume.read(offset - 512, &mut buf).expect("read");
        assert!(buf[..512].iter().all(|&b| b == 0), "before the write");
        assert!(buf[512..512 + data.len()] == data[..], "the write");
        assert!(buf[512 + data.len()..].iter().all(|&b| b == 0), "after the write");
    };
    check(&h);
    let disk = h.disk.clone();
    let Harness { volume, mut store, .. } = h;
    volume.close(&mut store).expect("close");
    drop(store);
    check(&Harness::open(disk).expect("reopen"));
}

/// Checkpoints fall due by log bytes since the root and by time (with something applied),
/// and memory stays within the cache bounds however much of the volume is read.
#[test]
fn checkpoint_triggers_and_bounded_caches() {
    let disk = Arc::new(SimDisk::new(DISK_BLOCKS * BLOCK, 4));
    let opts = FormatOptions { volume_bytes: VOLUME_BLOCKS * BLOCK, log_blocks: LOG_BLOCKS, volume_id: VOL };
    Volume::format(&*disk, None, opts).expect("format");
    let options = VolumeOptions {
        checkpoint_log_bytes: 8 * BLOCK,
        checkpoint_interval: std::time::Duration::from_secs(3600),
        node_cache: 2,
        bitmap_cache: 1,
    };
    let (volume, store) = Volume::open_with(disk.clone(), None, options.clone(), logger()).expect("open");
    let mut h = Harness {
        disk: disk.clone(),
        volume,
        store,
        term: 2,
        pipelined: false,
        pending: None,
        placer: None,
        auto_checkpoint: true,
    };
    assert!(!h.volume.should_checkpoint(&h.store.mark(h.volume.applied_index())), "nothing written yet");
    let data = vec![7u8; BLOCK_SIZE];
    let mut writes = 0;
    let index_before = h.volume.stats().root_applied_index;
    while h.volume.stats().root_applied_index == index_before {
        assert!(writes < 8, "8 blocks of log must trigger a checkpoint");
        h.propose(&Command::Write { offset: writes * BLOCK, data: &data }).expect("write");
        writes += 1;
    }
    assert!(writes >= 3, "a checkpoint came only after about 8 blocks of log ({writes} writes)");
    // By time: due once the interval has passed and something was applied.
    let (volume, store) = {
        let Harness { volume, mut store, .. } = h;
        volume.close(&mut store).expect("close");
        drop(store);
        let quick = VolumeOptions { checkpoint_interval: std::time::Duration::ZERO, ..options };
        Volume::open_with(disk.clone(), None, quick, logger()).expect("open")
    };
    let mut h =
        Harness { disk, volume, store, term: 3, pipelined: false, pending: None, placer: None, auto_checkpoint: true };
    assert!(!h.volume.should_checkpoint(&h.store.mark(h.volume.applied_index())), "nothing applied since the root");
    let index = h.store.last_index() + 1;
    let entry =
        Entry { index, term: 3, data: Command::Trim { offset: 0, length: BLOCK }.encode(), ..Default::default() };
    h.store.append(std::slice::from_ref(&entry), Some(&HardState { term: 3, vote: 1, commit: index })).expect("append");
    h.volume.apply(&entry).expect("apply");
    assert!(
        h.volume.should_checkpoint(&h.store.mark(h.volume.applied_index())),
        "interval passed with something applied"
    );
    // Caches: every block of the volume read, the clean nodes held stay within the bound.
    for vb in 0..VOLUME_BLOCKS {
        h.propose(&Command::Write { offset: vb * BLOCK, data: &data }).expect("write");
    }
    h.volume.checkpoint(&mut h.store).expect("checkpoint");
    let mut buf = vec![0u8; BLOCK_SIZE];
    for vb in 0..VOLUME_BLOCKS {
        h.volume.read(vb * BLOCK, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 7));
    }
    let stats = h.volume.stats();
    assert!(stats.cached_nodes <= 2, "{stats:?}");
    assert!(stats.loaded_bitmaps <= 1, "{stats:?}");
    assert_eq!(stats.dirty_nodes, 0);
}

/// Applying entries in batches (new data written at the end of each batch) gives exactly the
/// state of applying them one by one, including partial writes into blocks written earlier in
/// the same batch and blocks overwritten twice; and it survives a crash and reopen.
#[test]
fn batches_apply_like_single_entries() {
    for seed in 0..8u64 {
        let mut rng = Rng::new(seed);
        let mut h = Harness::format(seed);
        let mut model = vec![0u8; (VOLUME_BLOCKS * BLOCK) as usize];
        let mut data = Vec::new();
        let mut pending: Vec<Entry> = Vec::new();
        for step in 0..300 {
            let (kind, offset, length) = random_command(&mut rng, &mut data);
            apply_model(&mut model, kind, offset, length, &data);
            if h.volume.should_checkpoint(&h.store.mark(h.volume.applied_index())) {
                // Everything appended must be applied before a checkpoint.
                h.volume.apply_batch(&pending).expect("apply batch");
                pending.clear();
                h.volume.checkpoint(&mut h.store).expect("checkpoint");
            }
            let index = h.store.last_index() + 1;
            let entry = Entry {
                index,
                term: h.term,
                data: command(kind, offset, length, &data).encode(),
                ..Default::default()
            };
            let hs = HardState { term: h.term, vote: 1, commit: index };
            h.store.append(std::slice::from_ref(&entry), Some(&hs)).expect("append");
            pending.push(entry);
            if rng.chance(1, 6) || step == 299 {
                let results = h.volume.apply_batch(&pending).expect("apply batch");
                assert!(results.iter().all(|r| *r == Applied::Done), "seed {seed}");
                pending.clear();
                assert!(h.read_all().expect("read") == model, "seed {seed} step {step}: content differs");
            }
        }
        let disk = h.disk.clone();
        drop(h);
        disk.crash(CrashPolicy::Random);
        let h = Harness::open(disk).expect("reopen");
        assert!(h.read_all().expect("read") == model, "seed {seed}: after a crash");
    }
}

/// A device whose cache (the page cache, for a file) may hand out a bad copy of a block.
#[derive(Debug)]
struct BadCache {
    disk: Arc<SimDisk>,
    bad: std::sync::atomic::AtomicBool,
}

impl BadCache {
    fn spoil(&self, buf: &mut [u8]) {
        if self.bad.load(std::sync::atomic::Ordering::SeqCst) {
            buf[7] ^= 0x10;
        }
    }
}

impl Device for BadCache {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.disk.write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.disk.flush()
    }
    fn read_cached_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.disk.read_at(offset, buf)?;
        self.spoil(buf);
        Ok(())
    }
    fn try_read_cached_at(&self, offset: u64, buf: &mut [u8]) -> Result<bool, DeviceError> {
        self.read_cached_at(offset, buf).map(|()| true)
    }
}

/// A fresh volume on a `BadCache` (good for now) over a simulated disk (`seed`), with `data`
/// written at offset 0 and applied.
fn bad_cache_volume(seed: u64, data: &[u8]) -> (Volume, Arc<BadCache>, Arc<SimDisk>) {
    let disk = Arc::new(SimDisk::new(DISK_BLOCKS * BLOCK, seed));
    let opts = FormatOptions { volume_bytes: VOLUME_BLOCKS * BLOCK, log_blocks: LOG_BLOCKS, volume_id: VOL };
    Volume::format(&*disk, None, opts).expect("format");
    let dev = Arc::new(BadCache { disk: disk.clone(), bad: false.into() });
    let (mut volume, mut store) = Volume::open(dev.clone(), None, logger()).expect("open");
    let entry = Entry {
        index: store.last_index() + 1,
        term: 1,
        data: Command::Write { offset: 0, data }.encode(),
        ..Default::default()
    };
    let hs = HardState { term: 1, vote: 1, commit: entry.index };
    store.append(std::slice::from_ref(&entry), Some(&hs)).expect("append");
    assert_eq!(volume.apply(&entry).expect("apply"), Applied::Done);
    (volume, dev, disk)
}

/// A cached copy that fails its hash check is read again from the media, by `read` and by
/// `try_read`; only when the media's copy is bad too does the read fail.
#[test]
fn a_bad_cached_copy_is_read_again_from_the_media() {
    let data = vec![0x3Cu8; 2 * BLOCK_SIZE];
    let (volume, dev, disk) = bad_cache_volume(3, &data);
    dev.bad.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut buf = vec![0u8; 2 * BLOCK_SIZE];
    volume.read(0, &mut buf).expect("read: the media's copy is good");
    assert_eq!(buf, data);
    let mut hot = vec![0u8; 2 * BLOCK_SIZE];
    assert!(volume.try_read(0, &mut hot).expect("try_read"), "answered without waiting");
    assert_eq!(hot, data);
    let mut part = vec![0u8; 1024];
    volume.read(512, &mut part).expect("a partial block too");
    assert!(part.iter().all(|&b| b == 0x3C));
    let ptr = volume.map.get(&*disk, 1).expect("get").expect("mapped");
    disk.inject(SimFault::BitFlip { offset: ptr.block * BLOCK + 9, bit: 2 });
    assert!(matches!(volume.read(0, &mut buf), Err(VolumeError::Tree(TreeError::HashMismatch { .. }))));
    assert!(matches!(volume.try_read(0, &mut hot), Err(VolumeError::Tree(TreeError::HashMismatch { .. }))));
}

/// Deferred checks (`try_read_deferred`, `Checks::failed`): several reads into one buffer,
/// checked at once; exactly the read that got a bad cached copy fails, and a read of the
/// volume (which checks at once) answers it from the media.
#[test]
fn deferred_checks_name_the_read_with_a_bad_copy() {
    let data: Vec<u8> = (0..4 * BLOCK_SIZE).map(|i| (i / BLOCK_SIZE * 7 + i % 251) as u8).collect();
    let (volume, dev, _) = bad_cache_volume(4, &data);
    let mut checks = Checks::default();
    assert!(checks.is_empty());
    let mut out = vec![0u8; 10 * BLOCK_SIZE];
    // Read 10: blocks 0-1 at 1 block into `out`; read 11: block 3 (unaligned within `out`
    // does not matter); read 12: nothing; read 13: block 2, from a bad cache; read 14:
    // unmapped blocks (nothing to check either).
    let read = |offset: u64, at: usize, len: usize, number: usize, out: &mut Vec<u8>, checks: &mut Checks| {
        volume.try_read_deferred(offset, &mut out[at..at + len], at, number, checks).expect("read")
    };
    assert!(read(0, BLOCK_SIZE, 2 * BLOCK_SIZE, 10, &mut out, &mut checks));
    assert!(read(3 * BLOCK, 3 * BLOCK_SIZE + 100, BLOCK_SIZE, 11, &mut out, &mut checks));
    assert!(read(0, 0, 0, 12, &mut out, &mut checks), "an empty read: nothing to check");
    dev.bad.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(read(2 * BLOCK, 5 * BLOCK_SIZE, BLOCK_SIZE, 13, &mut out, &mut checks));
    dev.bad.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(read(8 * BLOCK, 6 * BLOCK_SIZE, 2 * BLOCK_SIZE, 14, &mut out, &mut checks));
    assert!(!read(512, 0, BLOCK_SIZE, 15, &mut out, &mut checks), "not whole blocks: not deferred");
    assert!(!checks.is_empty());
    assert_eq!(out[BLOCK_SIZE..3 * BLOCK_SIZE], data[..2 * BLOCK_SIZE]);
    assert!(out[6 * BLOCK_SIZE..8 * BLOCK_SIZE].iter().all(|&b| b == 0));
    assert_eq!(checks.failed(&out), vec![13], "only the read of the bad copy");
    assert!(checks.is_empty(), "failed() forgets the checks");
    assert_eq!(checks.failed(&out), Vec::<usize>::new());
    // Checked against a buffer that lost the data (a caller's mistake): fails, never passes.
    assert!(read(0, 0, BLOCK_SIZE, 0, &mut out, &mut checks));
    assert_eq!(checks.failed(&out[..BLOCK_SIZE / 2]), vec![0]);
    let mut again = vec![0u8; BLOCK_SIZE];
    dev.bad.store(true, std::sync::atomic::Ordering::SeqCst);
    volume.read(2 * BLOCK, &mut again).expect("from the media");
    assert_eq!(again, data[2 * BLOCK_SIZE..3 * BLOCK_SIZE]);
}

/// An entry that skips an index is refused (the write before it would be lost), and the
/// volume goes on from where it was once the missing entry comes.
#[test]
fn an_entry_that_skips_an_index_is_refused() {
    let mut h = Harness::format(3);
    let write = |index: u64, byte: u8| Entry {
        index,
        term: 1,
        data: Command::Write { offset: 0, data: &[byte; 4096] }.encode(),
        ..Default::default()
    };
    let applied = h.volume.applied_index();
    assert!(matches!(h.volume.apply(&write(applied + 2, 1)), Err(VolumeError::Gap { .. })));
    assert_eq!(h.volume.applied_index(), applied, "nothing applied");
    assert_eq!(h.volume.apply(&write(applied + 1, 2)).expect("in order"), Applied::Done);
    assert_eq!(h.volume.apply(&write(applied + 2, 3)).expect("in order"), Applied::Done);
    assert_eq!(h.read_all().expect("read")[..4096], [3u8; 4096]);
}

/// A placed block that the tree adopted and freed again before the next checkpoint must not be
/// handed out while a root that may still be opened replays its record: here the current root
/// is damaged later (after a restart, in one round), so the backup, which predates the
/// record, is opened; its replay links the block again and a sub-block write patches it. Had
/// the block been reused meanwhile, the patch would fail its hash check.
#[test]
fn a_freed_placed_block_is_kept_while_a_replay_from_the_backup_may_link_it() {
    for restart in [false, true] {
        let mut h = Harness::format_with(7, 128);
        h.configure(2);
        h.auto_checkpoint = false;
        let mut model = vec![0u8; (VOLUME_BLOCKS * BLOCK) as usize];
        let write = |h: &mut Harness, model: &mut Vec<u8>, offset: u64, data: &[u8]| {
            assert_eq!(h.propose(&Command::Write { offset, data }).expect("write"), Applied::Done);
            model[offset as usize..][..data.len()].copy_from_slice(data);
        };
        write(&mut h, &mut model, 40 * BLOCK, &[1; BLOCK_SIZE]);
        h.checkpoint().expect("checkpoint C0");
        let c0 = h.volume.roots().current().generation;
        write(&mut h, &mut model, 0, &[2; 8 * BLOCK_SIZE]);
        let placed = h.volume.map.get(&*h.disk, 3).expect("get").expect("mapped").block;
        write(&mut h, &mut model, 3 * BLOCK + 512, &[3; 512]);
        assert_ne!(h.volume.map.get(&*h.disk, 3).expect("get").expect("mapped").block, placed);
        h.checkpoint().expect("checkpoint C1");
        if restart {
            let disk = h.disk.clone();
            drop(h);
            h = Harness::open(disk).expect("reopen");
            h.configure(2);
            h.auto_checkpoint = false;
        }
        // The freed placed block is the allocator's next candidate (by next fit) for these.
        h.volume.alloc.rewind();
        for i in 0..10u8 {
            write(&mut h, &mut model, 16 * BLOCK, &[10 + i; 8 * BLOCK_SIZE]);
        }
        assert!(h.read_all().expect("read") == model);
        let slot = h.volume.roots().current().slot;
        let disk = h.disk.clone();
        drop(h);
        disk.flip_random_bit(u64::from(slot) * BLOCK, u64::from(slot + 1) * BLOCK);
        let h = Harness::open(disk).expect("open from the backup");
        assert_eq!(h.volume.roots().current().generation, c0, "restart {restart}: the backup was opened");
        let got = h.read_all().unwrap_or_else(|e| panic!("restart {restart}: read after the fallback: {e}"));
        assert!(got == model, "restart {restart}: content after the fallback differs");
    }
}

/// Recovery holds the blocks that unapplied records name; a record naming a block the root
/// marks in use (the log and the root disagree) is refused, not replayed over live data.
#[test]
fn a_record_naming_a_block_in_use_is_refused() {
    let mut h = Harness::format(3);
    h.configure(2);
    h.auto_checkpoint = false;
    assert_eq!(h.propose(&Command::Write { offset: 0, data: &[7; BLOCK_SIZE] }).expect("write"), Applied::Done);
    h.checkpoint().expect("checkpoint");
    let used = h.volume.map.get(&*h.disk, 0).expect("get").expect("mapped").block;
    // A forged placed record (checksummed like any other) naming that block, logged but not
    // applied.
    let blocks = [crate::command::PlacedBlock::new(used, [0; 32])];
    let index = h.store.last_index() + 1;
    let data = Command::Placed { offset: 8 * BLOCK, blocks: &blocks }.encode();
    let entry = Entry { index, term: h.term, data, ..Default::default() };
    let hs = HardState { term: h.term, vote: 1, commit: index };
    h.store.append(&[entry], Some(&hs)).expect("append");
    let disk = h.disk.clone();
    drop(h);
    match Harness::open(disk) {
        Err(VolumeError::Alloc(AllocError::BadLogBlock { block, .. })) => assert_eq!(block, used),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// On a real device the release set of `open` (the blocks only the backup reaches) is walked on
/// a thread of its own while recovery and serving go on; the first checkpoint takes it. The
/// same writes, checkpoints and frees with and without a reopen in the middle must end with
/// the same blocks in use: nothing leaked because the walk came late.
#[test]
fn the_release_set_walked_beside_recovery_reaches_the_next_checkpoint() {
    let dir = std::env::temp_dir().join(format!("rblk-release-walk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut used = Vec::new();
    for reopen in [false, true] {
        let path = dir.join(format!("v{reopen}.img"));
        let dev: Arc<dyn Device> =
            Arc::new(crate::device::FileDevice::create(&path, DISK_BLOCKS * BLOCK).expect("create"));
        assert!(dev.read_ahead(), "a file device walks in the background");
        let opts = FormatOptions { volume_bytes: VOLUME_BLOCKS * BLOCK, log_blocks: LOG_BLOCKS, volume_id: VOL };
        Volume::format(&*dev, None, opts).expect("format");
        let (mut volume, mut store) = Volume::open(dev.clone(), None, logger()).expect("open");
        let write = |volume: &mut Volume, store: &mut LogStore, byte: u8| {
            let index = store.last_index() + 1;
            let data = Command::Write { offset: 0, data: &[byte; 16 * BLOCK_SIZE] }.encode();
            let entry = Entry { index, term: 1, data, ..Default::default() };
            store
                .append(std::slice::from_ref(&entry), Some(&HardState { term: 1, vote: 1, commit: index }))
                .expect("append");
            volume.apply(&entry).expect("apply");
        };
        write(&mut volume, &mut store, 1);
        volume.checkpoint(&mut store).expect("checkpoint 1");
        write(&mut volume, &mut store, 2); // frees what root 1 reaches: the backup's, after the next
        volume.checkpoint(&mut store).expect("checkpoint 2");
        if reopen {
            drop((volume, store));
            (volume, store) = Volume::open(dev.clone(), None, logger()).expect("reopen");
        }
        write(&mut volume, &mut store, 3);
        volume.checkpoint(&mut store).expect("checkpoint 3");
        volume.checkpoint(&mut store).expect("checkpoint 4");
        used.push(volume.stats().used_blocks);
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(used[0], used[1], "blocks in use without and with a reopen");
}

/// An entry that leaves the node (raft-rs fetches it to send to a follower) carries a placed
/// write's data, read back and verified; fetched to apply here, it stays as logged. A damaged
/// block fails the fetch: never wrong data.
#[test]
fn a_placed_entry_leaves_the_node_with_its_data() {
    use raft::{GetEntriesContext, Storage};
    let mut h = Harness::format(5);
    h.placer = Some(crate::place::Placer::new(h.disk.clone(), BLOCK));
    h.auto_checkpoint = false;
    let data: Vec<u8> = (0..3 * BLOCK_SIZE).map(|i| (i % 251) as u8).collect();
    assert_eq!(h.propose(&Command::Write { offset: 2 * BLOCK, data: &data }).expect("write"), Applied::Done);
    let index = h.store.last_index();
    let local = h.store.entries(index, index + 1, None, GetEntriesContext::empty(false)).expect("local");
    assert!(crate::place::needs_flush(&local[0].data), "fetched to apply here: as logged");
    let sent = h.store.entries(index, index + 1, None, GetEntriesContext::empty(true)).expect("sent");
    assert_eq!((sent[0].index, sent[0].term), (local[0].index, local[0].term));
    match Command::decode(&sent[0].data).expect("decode") {
        Command::Write { offset, data: carried } => {
            assert_eq!(offset, 2 * BLOCK);
            assert!(carried == &data[..], "the data read back differs");
        }
        _ => panic!("a placed entry left the node without its data"),
    }
    let Ok(Command::Placed { blocks, .. }) = Command::decode(&local[0].data) else { panic!("not placed") };
    h.disk.inject(SimFault::BitFlip { offset: blocks[1].block() * BLOCK + 7, bit: 3 });
    assert!(h.store.entries(index, index + 1, None, GetEntriesContext::empty(true)).is_err());
}
