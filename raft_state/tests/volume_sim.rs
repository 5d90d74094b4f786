//! Seeded random simulation of the volume on the simulated disk (TigerBeetle VOPR style),
//! checked by a per-sector oracle.
//!
//! Every 512-byte sector is an independent register. A write stamps each sector it covers with
//! ⟨sector, write id, checksum⟩, so any read can be decoded into the write it came from, and
//! garbage (torn, misplaced or stale bytes) is recognised as such. The oracle keeps, per
//! sector, the set of write ids it may legally hold: exactly the last committed write's, plus,
//! while a write's outcome is unknown (in flight at a crash, or failed with NoSpace, which
//! NBD allows to leave part of the range written), the old and the new value.
//!
//! Each run mixes writes, trims, write-zeroes, reads, checkpoints, clean reopens, power
//! losses at a random device operation (unflushed writes kept, dropped or torn), crashes
//! during recovery, transient read errors and, in some runs, a bit flip in the data region.
//! Reads must return a legal value; EIO only while a read error is armed or after media
//! damage; after damage, opening may refuse, but never return wrong data.
//!
//! Environment: `RBLK_SIM_SEEDS=N` runs (default 1000); `RBLK_SIM_SEED=S` replays one run.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use raft::eraftpb::{Entry, HardState};
use raft_state::command::Command;
use raft_state::device::{CrashPolicy, Device, SimDisk, SimFault, BLOCK};
use raft_state::error_chain as chain;
use raft_state::layout::Geometry;
use raft_state::log::LogStore;
use raft_state::rng::Rng;
use raft_state::volume::{Applied, FormatOptions, Volume, VolumeError, VolumeOptions};
use slog::{o, Discard, Logger};

const SECTOR: u64 = 512;
const VOL: [u8; 16] = *b"volume-sim-vol-1";

/// The payload of `sector` written by write `id` (id 0 = zeros: never written, or trimmed).
fn stamp(sector: u64, id: u64, out: &mut [u8]) {
    if id == 0 {
        out.fill(0);
        return;
    }
    let mut rng = Rng::new(sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ id);
    rng.fill(&mut out[24..]);
    out[..8].copy_from_slice(&sector.to_le_bytes());
    out[8..16].copy_from_slice(&id.to_le_bytes());
    let sum = checksum(&out[..16], &out[24..]);
    out[16..24].copy_from_slice(&sum.to_le_bytes());
}

fn checksum(head: &[u8], rest: &[u8]) -> u64 {
    let h = blake3::Hasher::new().update(head).update(rest).finalize();
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Which write `bytes` (one sector read from `sector`) came from, or why it is garbage.
fn decode(sector: u64, bytes: &[u8]) -> Result<u64, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let at = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let id = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let sum = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if sum != checksum(&bytes[..16], &bytes[24..]) {
        return Err(format!("sector {sector}: garbage (checksum fails)"));
    }
    if at != sector {
        return Err(format!("sector {sector}: holds sector {at}'s data (write {id})"));
    }
    Ok(id)
}

/// Per sector, the write ids it may legally hold.
struct Oracle {
    legal: Vec<BTreeSet<u64>>,
}

impl Oracle {
    fn new(sectors: u64) -> Self {
        Oracle { legal: vec![BTreeSet::from([0]); sectors as usize] }
    }

    /// A write whose effect on `range` is known (`certain`) or may be old or new.
    fn record(&mut self, first: u64, count: u64, id: u64, certain: bool) {
        for s in first..first + count {
            let legal = &mut self.legal[s as usize];
            if certain {
                legal.clear();
            }
            legal.insert(id);
        }
    }

    fn check(&self, first: u64, buf: &[u8]) -> Result<(), String> {
        for (i, bytes) in buf.chunks(SECTOR as usize).enumerate() {
            let sector = first + i as u64;
            let id = decode(sector, bytes)?;
            let legal = &self.legal[sector as usize];
            if !legal.contains(&id) {
                return Err(format!("sector {sector}: holds write {id}, legal are {legal:?}"));
            }
        }
        Ok(())
    }

    /// After a successful read of everything: each sector now holds what was read.
    fn settle(&mut self, buf: &[u8]) {
        for (i, bytes) in buf.chunks(SECTOR as usize).enumerate() {
            if let Ok(id) = decode(i as u64, bytes) {
                self.legal[i] = BTreeSet::from([id]);
            }
        }
    }
}

struct Params {
    volume_blocks: u64,
    log_blocks: u64,
    data_blocks: u64,
    /// Thin: the data region may fill up, so writes may fail with NoSpace.
    thin: bool,
    options: VolumeOptions,
}

impl Params {
    fn draw(rng: &mut Rng) -> Params {
        let log_blocks = 48 + rng.below(48);
        let thin = rng.chance(1, 4);
        // Thin: the data region is smaller than the volume, beyond the reserve the volume keeps
        // for metadata and trims (64 paths of the two-level block map). Not thin: room for
        // three full copies (backup, current, fresh) and the metadata.
        let (volume_blocks, data_blocks) = if thin {
            (128 + rng.below(64), 150 + rng.below(40))
        } else {
            let v = 16 + rng.below(48);
            (v, 3 * v + 400)
        };
        let options = VolumeOptions {
            checkpoint_log_bytes: (4 + rng.below(16)) * BLOCK,
            checkpoint_interval: Duration::from_secs(3600),
            node_cache: [1, 2, 64][rng.below(3) as usize],
            bitmap_cache: 1,
        };
        Params { volume_blocks, log_blocks, data_blocks, thin, options }
    }
}

/// The volume and its log, driven like a single-node Raft group: persist, then apply.
struct Node {
    volume: Volume,
    store: LogStore,
    term: u64,
}

fn logger() -> Logger {
    Logger::root(Discard, o!())
}

fn open(disk: &Arc<SimDisk>, p: &Params) -> Result<Node, VolumeError> {
    let (volume, store) = Volume::open_with(disk.clone(), None, p.options.clone(), logger())?;
    let term = store.hard_state().term + 1;
    Ok(Node { volume, store, term })
}

/// What became of a proposal.
enum Outcome {
    /// Persisted and applied.
    Applied(Applied),
    /// Persisted (committed), then applying failed: the volume is poisoned.
    CommittedNotApplied,
    /// Persisting failed: the entry may or may not be in the log.
    Unknown,
    /// The checkpoint before it failed: the entry was not proposed.
    NotProposed,
}

impl Node {
    fn propose(&mut self, cmd: &Command<'_>) -> Outcome {
        if self.volume.should_checkpoint(&self.store.mark(self.volume.applied_index()))
            && self.volume.checkpoint(&mut self.store).is_err()
        {
            return Outcome::NotProposed;
        }
        let index = self.store.last_index() + 1;
        let entry = Entry { index, term: self.term, data: cmd.encode(), ..Default::default() };
        let hs = HardState { term: self.term, vote: 1, commit: index };
        if self.store.append(std::slice::from_ref(&entry), Some(&hs)).is_err() {
            return Outcome::Unknown;
        }
        match self.volume.apply(&entry) {
            Ok(applied) => Outcome::Applied(applied),
            Err(_) => Outcome::CommittedNotApplied,
        }
    }
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Completed,
    /// Media damage made opening refuse (a legal outcome after a bit flip).
    Refused,
}

struct Run {
    rng: Rng,
    p: Params,
    disk: Arc<SimDisk>,
    oracle: Oracle,
    next_id: u64,
    /// A read error is armed: reads may fail (until the next crash clears it).
    read_error: bool,
    /// A bit was flipped in the data region: EIO is legal from then on.
    damaged: bool,
    crashes: u64,
    /// Recoveries interrupted by a crash, and writes that failed with NoSpace.
    interrupted: u64,
    no_space: u64,
    /// Print what happens (when replaying one seed).
    trace: bool,
}

impl Run {
    fn new(seed: u64) -> Run {
        let mut rng = Rng::new(seed);
        let p = Params::draw(&mut rng);
        let meta = 3 + p.log_blocks;
        let disk = Arc::new(SimDisk::new((meta + p.data_blocks) * BLOCK, seed));
        let opts = FormatOptions { volume_bytes: p.volume_blocks * BLOCK, log_blocks: p.log_blocks, volume_id: VOL };
        Volume::format(&*disk, None, opts).expect("format");
        let geometry = Geometry::plan(disk.size(), true, p.log_blocks, p.volume_blocks).expect("plan");
        assert_eq!(geometry.data_blocks, p.data_blocks);
        let oracle = Oracle::new(p.volume_blocks * BLOCK / SECTOR);
        let trace = std::env::var("RBLK_SIM_SEED").is_ok();
        Run {
            rng,
            p,
            disk,
            oracle,
            next_id: 1,
            read_error: false,
            damaged: false,
            crashes: 0,
            interrupted: 0,
            no_space: 0,
            trace,
        }
    }

    fn sectors(&self) -> u64 {
        self.p.volume_blocks * BLOCK / SECTOR
    }

    /// Reads the whole volume and checks every sector.
    fn verify_all(&mut self, node: &Node, settle: bool) -> Result<(), String> {
        let mut buf = vec![0u8; (self.p.volume_blocks * BLOCK) as usize];
        match node.volume.read(0, &mut buf) {
            Ok(()) => {
                self.oracle.check(0, &buf)?;
                if settle {
                    self.oracle.settle(&buf);
                }
                Ok(())
            }
            Err(_) if self.damaged || self.read_error => self.verify_blocks(node),
            Err(e) => Err(format!("read of the whole volume failed: {e}")),
        }
    }

    /// Block by block, where some may fail with EIO.
    fn verify_blocks(&mut self, node: &Node) -> Result<(), String> {
        let mut buf = vec![0u8; BLOCK as usize];
        for vb in 0..self.p.volume_blocks {
            if node.volume.read(vb * BLOCK, &mut buf).is_ok() {
                self.oracle.check(vb * BLOCK / SECTOR, &buf)?;
            }
        }
        Ok(())
    }

    /// Power loss, possibly more during recovery, then a full check. `None` if opening refuses
    /// after media damage.
    fn crash_and_recover(&mut self) -> Result<Option<Node>, String> {
        self.crashes += 1;
        if self.trace {
            eprintln!("crash {} at ops {}", self.crashes, self.disk.ops());
        }
        self.disk.crash(CrashPolicy::Random);
        self.read_error = false;
        // Crashes during recovery: recovery only writes replayed data to free blocks, so it
        // must converge however often it is interrupted.
        while self.rng.chance(1, 2) {
            self.disk.crash_after_ops(Some(self.rng.below(30)));
            let attempt = open(&self.disk, &self.p);
            self.interrupted += u64::from(attempt.is_err());
            if self.trace {
                eprintln!("crash during recovery: open {}", if attempt.is_ok() { "finished" } else { "interrupted" });
            }
            drop(attempt);
            self.disk.crash(CrashPolicy::Random);
        }
        self.disk.crash_after_ops(None);
        let node = match open(&self.disk, &self.p) {
            Ok(node) => node,
            Err(_) if self.damaged => return Ok(None),
            Err(e) => return Err(format!("open after crash {} failed: {}", self.crashes, chain(&e))),
        };
        self.verify_all(&node, true)?;
        Ok(Some(node))
    }

    fn random_range(&mut self) -> (u64, u64) {
        let count = 1 + if self.rng.chance(1, 4) { self.rng.below(32) } else { self.rng.below(9) };
        let count = count.min(self.sectors());
        let first = self.rng.below(self.sectors() - count + 1);
        (first, count)
    }

    fn go(&mut self, steps: u64) -> Result<End, String> {
        let mut node = open(&self.disk, &self.p).map_err(|e| format!("first open: {e}"))?;
        if self.rng.chance(1, 2) {
            self.disk.crash_after_ops(Some(1 + self.rng.below(300)));
        }
        let flip_at = if self.rng.chance(1, 8) { Some(self.rng.below(steps)) } else { None };
        let mut data = Vec::new();
        for step in 0..steps {
            let action = self.rng.below(100);
            if self.trace {
                let stats = node.volume.stats();
                eprintln!(
                    "step {step}: action {action}, ops {}, applied {}, used {}",
                    self.disk.ops(),
                    stats.applied_index,
                    stats.used_blocks
                );
            }
            let crashed = match action {
                0..=54 => {
                    let (first, count) = self.random_range();
                    let id = self.next_id;
                    self.next_id += 1;
                    data.resize((count * SECTOR) as usize, 0);
                    for (i, chunk) in data.chunks_mut(SECTOR as usize).enumerate() {
                        stamp(first + i as u64, id, chunk);
                    }
                    let cmd = Command::Write { offset: first * SECTOR, data: &data };
                    self.propose(&mut node, &cmd, first, count, id)?
                }
                55..=64 => {
                    let (first, count) = self.random_range();
                    let (offset, length) = (first * SECTOR, count * SECTOR);
                    let cmd = if self.rng.chance(1, 2) {
                        Command::Trim { offset, length }
                    } else {
                        Command::WriteZeroes { offset, length }
                    };
                    self.propose(&mut node, &cmd, first, count, 0)?
                }
                65..=84 => {
                    let (first, count) = self.random_range();
                    let mut buf = vec![0u8; (count * SECTOR) as usize];
                    match node.volume.read(first * SECTOR, &mut buf) {
                        Ok(()) => self.oracle.check(first, &buf).map_err(|e| format!("step {step}: {e}"))?,
                        Err(_) if self.read_error || self.damaged || self.disk.is_down() => {}
                        Err(e) => return Err(format!("step {step}: read failed: {e}")),
                    }
                    false
                }
                85..=89 => node.volume.checkpoint(&mut node.store).is_err(),
                90..=92 => {
                    // Clean shutdown and restart: nothing to replay.
                    let Node { volume, mut store, .. } = node;
                    let closed = volume.close(&mut store);
                    drop(store);
                    let reopened = closed.and_then(|()| open(&self.disk, &self.p));
                    match reopened {
                        Ok(n) => {
                            node = n;
                            let stats = node.volume.stats();
                            if stats.applied_index != stats.root_applied_index {
                                return Err(format!("step {step}: replayed after a clean close"));
                            }
                        }
                        Err(e) if !self.disk.is_down() && !self.read_error && !self.damaged => {
                            return Err(format!("step {step}: reopen: {}", chain(&e)))
                        }
                        Err(_) => {
                            node = match self.crash_and_recover()? {
                                Some(n) => n,
                                None => return Ok(End::Refused),
                            }
                        }
                    }
                    false
                }
                93..=95 => {
                    let block = self.disk.size() / BLOCK - 1 - self.rng.below(self.p.data_blocks);
                    self.disk.inject(SimFault::ReadError { offset: block * BLOCK });
                    self.read_error = true;
                    false
                }
                _ => {
                    // Power loss now (the armed crash point, if any, comes later).
                    true
                }
            };
            if flip_at == Some(step) {
                let start = self.disk.size() - self.p.data_blocks * BLOCK;
                self.disk.flip_random_bit(start, self.disk.size());
                self.damaged = true;
            }
            if crashed || self.disk.is_down() {
                drop(node);
                node = match self.crash_and_recover()? {
                    Some(n) => n,
                    None => return Ok(End::Refused),
                };
                if self.rng.chance(1, 2) {
                    self.disk.crash_after_ops(Some(1 + self.rng.below(300)));
                }
            }
        }
        self.disk.crash_after_ops(None);
        // A final power loss and a full check.
        drop(node);
        match self.crash_and_recover()? {
            Some(_) => Ok(End::Completed),
            None => Ok(End::Refused),
        }
    }

    /// Proposes `cmd` covering sectors `first..first+count` with write `id`; returns whether
    /// the node must crash and recover.
    fn propose(&mut self, node: &mut Node, cmd: &Command<'_>, first: u64, count: u64, id: u64) -> Result<bool, String> {
        match node.propose(cmd) {
            Outcome::Applied(Applied::Done) => {
                self.oracle.record(first, count, id, true);
                Ok(false)
            }
            Outcome::Applied(Applied::NoSpace) if self.p.thin => {
                self.no_space += 1;
                self.oracle.record(first, count, id, false);
                Ok(false)
            }
            // Unreadable old content (a read error or damage) left some blocks as they were.
            Outcome::Applied(Applied::Damaged) if self.read_error || self.damaged => {
                self.oracle.record(first, count, id, false);
                Ok(false)
            }
            Outcome::Applied(other) => Err(format!("unexpected {other:?} on a volume that cannot fill")),
            // Committed: replay will apply it (on a thin volume it may hit NoSpace again).
            Outcome::CommittedNotApplied => {
                self.oracle.record(first, count, id, !self.p.thin);
                Ok(true)
            }
            Outcome::Unknown => {
                self.oracle.record(first, count, id, false);
                Ok(true)
            }
            Outcome::NotProposed => Ok(true),
        }
    }
}

#[derive(Debug, Default)]
struct Totals {
    completed: u64,
    refused: u64,
    crashes: u64,
    interrupted: u64,
    no_space: u64,
}

fn run(seed: u64, totals: &mut Totals) -> Result<End, String> {
    let mut r = Run::new(seed);
    let end = r.go(160)?;
    totals.crashes += r.crashes;
    totals.interrupted += r.interrupted;
    totals.no_space += r.no_space;
    match end {
        End::Completed => totals.completed += 1,
        End::Refused => totals.refused += 1,
    }
    Ok(end)
}

#[test]
fn seeded_runs_match_the_oracle() {
    if let Some(seed) = std::env::var("RBLK_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        let end = run(seed, &mut Totals::default()).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        eprintln!("seed {seed}: {end:?}");
        return;
    }
    let seeds: u64 = std::env::var("RBLK_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let mut totals = Totals::default();
    for seed in 0..seeds {
        if let Err(e) = run(seed, &mut totals) {
            panic!("seed {seed} failed (replay with RBLK_SIM_SEED={seed}): {e}");
        }
    }
    eprintln!("{seeds} runs: {totals:?}");
    // Damage is injected in one run in eight, and most damage is survivable.
    assert!(totals.refused * 10 < seeds.max(10), "{totals:?}: too many refusals to open");
    if seeds >= 100 {
        assert!(totals.crashes > 2 * seeds && totals.interrupted > seeds / 4, "{totals:?}: too few crashes");
        assert!(totals.no_space > 0, "{totals:?}: no run filled its volume");
    }
}

/// The oracle itself: stamps decode, and garbage, misplaced and illegal values are caught.
#[test]
fn the_oracle_catches_wrong_data() {
    let mut buf = vec![0u8; 2 * SECTOR as usize];
    stamp(5, 9, &mut buf[..512]);
    stamp(6, 9, &mut buf[512..]);
    let mut o = Oracle::new(8);
    assert!(o.check(5, &buf).is_err(), "write 9 was never recorded");
    o.record(5, 2, 9, true);
    o.check(5, &buf).expect("legal");
    assert!(o.check(4, &buf).is_err(), "misplaced by one sector");
    buf[100] ^= 1;
    assert!(o.check(5, &buf).is_err(), "a flipped bit");
    o.record(5, 1, 10, false);
    let mut one = vec![0u8; 512];
    stamp(5, 10, &mut one);
    o.check(5, &one).expect("new value legal while uncertain");
    stamp(5, 9, &mut one);
    o.check(5, &one).expect("old value legal while uncertain");
    assert!(o.check(5, &[0u8; 512]).is_err(), "zeros are no longer legal");
}
