//! Volume benchmarks on real sparse files through `FileDevice` (O_DIRECT where the file system
//! allows it): format and open at 1 TiB scale, apply throughput per write size, replay
//! throughput of `Volume::open`, and 4 KiB reads through a dirty and a clean block map. Prints a
//! plain-text table.
//!
//! `cargo bench -p raft_state --bench store [scale|apply|apply4k|apply64k|apply1024k|replay]`.
//! Environment: `RBLK_BENCH_MB` (MiB written per write size, default 256),
//! `RBLK_BENCH_REPLAY_MB` (MiB of 64 KiB writes left in the log for the replay, default 128),
//! `RBLK_BENCH_SECS` (time cap of each write loop, default 8: every entry costs an fdatasync,
//! so on a slow disk the totals are not reached; the notes give what was written),
//! `RBLK_BENCH_READS` (random reads per read row, default 500). Image files go to
//! `std::env::temp_dir()` (set TMPDIR to bench another disk) and are removed at the end, also
//! on panic.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::{Entry, HardState};
use raft_state::command::Command;
use raft_state::device::{FileDevice, BLOCK};
use raft_state::log::LogStore;
use raft_state::rng::Rng;
use raft_state::volume::{FormatOptions, Volume};
use slog::Logger;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A sparse image file under the temp dir, removed when dropped (also when a phase panics).
struct Image {
    path: PathBuf,
    dev: Arc<FileDevice>,
}

impl Image {
    fn create(tag: &str, bytes: u64) -> Image {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("rblk-bench-{}-{nanos}-{tag}.img", std::process::id()));
        let dev = Arc::new(FileDevice::create(&path, bytes).expect("create the sparse image file"));
        Image { path, dev }
    }

    /// Formats a volume on the whole image (roots on the main device) and opens it.
    fn format_open(&self, volume_bytes: u64, log_blocks: u64) -> (Volume, LogStore) {
        let opts = FormatOptions { volume_bytes, log_blocks, volume_id: *b"rblk-bench-vol-1" };
        Volume::format(&*self.dev, None, opts).expect("format the volume");
        self.open()
    }

    fn open(&self) -> (Volume, LogStore) {
        let discard = Logger::root(slog::Discard, slog::o!());
        Volume::open(self.dev.clone(), None, discard).expect("open the volume")
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // Best effort: a leftover sparse file costs only the blocks the bench wrote.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// (VmRSS, VmHWM) in KiB from /proc/self/status; zeros where unavailable (not Linux).
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok());
    (kib("VmRSS:").unwrap_or(0), kib("VmHWM:").unwrap_or(0))
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB as f64 / took.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Rows are printed as they are measured, so a slow phase shows progress.
fn row(measurement: &str, value: impl std::fmt::Display, unit: &str, notes: impl std::fmt::Display) {
    println!("{measurement:<34} {value:>10} {unit:<6} {notes}");
}

/// The time cap of each write loop: the totals are upper bounds, so the default run stays near
/// a minute even where every flush (one per entry) costs milliseconds.
fn time_cap() -> Duration {
    Duration::from_secs(env_u64("RBLK_BENCH_SECS", 8))
}

/// What a single-node Raft group does with a proposal (as the volume tests' `Harness`):
/// persist the entry with commit = its index (durable means committed), then apply it.
/// Returns the time spent in append and in apply.
fn propose(volume: &mut Volume, store: &mut LogStore, cmd: &Command<'_>) -> (Duration, Duration) {
    let index = store.last_index() + 1;
    let term = store.hard_state().term.max(1);
    let entry = Entry { index, term, data: cmd.encode(), ..Default::default() };
    let hs = HardState { term, vote: 1, commit: index };
    let started = Instant::now();
    store.append(std::slice::from_ref(&entry), Some(&hs)).expect("append to the log");
    let appended = started.elapsed();
    let started = Instant::now();
    volume.apply(&entry).expect("apply the entry");
    (appended, started.elapsed())
}

/// Random-ish writes of `size` bytes, aligned to `size`, with data sliced from a random pool at
/// a varying offset so that no two blocks are alike (hashing and writes see real content).
struct Writes {
    rng: Rng,
    pool: Vec<u8>,
    size: u64,
    slots: u64,
}

impl Writes {
    fn new(seed: u64, size: u64, volume_bytes: u64) -> Writes {
        let mut rng = Rng::new(seed);
        let mut pool = vec![0u8; (size + MIB) as usize];
        rng.fill(&mut pool);
        Writes { rng, pool, size, slots: volume_bytes / size }
    }

    fn next(&mut self) -> Command<'_> {
        let offset = self.rng.below(self.slots) * self.size;
        let start = (self.rng.below(MIB / 512) * 512) as usize;
        Command::Write { offset, data: &self.pool[start..start + self.size as usize] }
    }
}

/// Times `count` 4 KiB reads of blocks picked at random from `written` (so each read walks
/// the map to a leaf and reads and verifies a data block) and prints their row.
fn read_row(volume: &Volume, rng: &mut Rng, written: &[u64], count: u64, label: &str, notes: String) {
    let mut buf = vec![0u8; 4096];
    let started = Instant::now();
    for _ in 0..count {
        let offset = written[rng.below(written.len() as u64) as usize];
        volume.read(offset, &mut buf).expect("read from the volume");
    }
    row(label, format!("{:.1}", mib_per_s(count * 4096, started.elapsed())), "MiB/s", notes);
}

/// 1. Scale: a 1 TiB virtual volume (sparse image with a 1 TiB data region) formats and opens
///    in constant time and memory: nothing is read or held per block until it is used.
fn scale() {
    let log_blocks = 16384;
    let image = Image::create("scale", TIB + (3 + log_blocks) * BLOCK);
    let opts = FormatOptions { volume_bytes: TIB, log_blocks, volume_id: *b"rblk-bench-scale" };
    let started = Instant::now();
    Volume::format(&*image.dev, None, opts).expect("format the 1 TiB volume");
    row("scale 1 TiB: format", ms(started.elapsed()), "ms", format!("log ring {} MiB", log_blocks * BLOCK / MIB));
    let started = Instant::now();
    // Held (not dropped) while the memory is read: the idle footprint of an open volume.
    let _held = image.open();
    row("scale 1 TiB: open", ms(started.elapsed()), "ms", format!("O_DIRECT: {}", image.dev.direct()));
    let (rss, hwm) = memory_kib();
    row("scale 1 TiB: VmRSS after open", rss, "KiB", "idle, volume and log store held");
    row("scale 1 TiB: VmHWM after open", hwm, "KiB", "");
}

/// 2. Apply throughput for one write size on a fresh 4 GiB volume (8 GiB sparse image, 64 MiB
///    ring), checkpointing when the volume asks, as the driver does. For 4 KiB it also times
///    reads of written blocks: just before the first checkpoint (a full interval of changes
///    dirty in memory) and just after it (the map clean: on disk or in the node cache).
fn apply_throughput(size: u64, total: u64, reads: u64) {
    let volume_bytes = 4 * GIB;
    let image = Image::create("apply", 2 * volume_bytes);
    let (mut volume, mut store) = image.format_open(volume_bytes, 16384);
    let mut writes = Writes::new(size, size, volume_bytes);
    let mut reads = if size == 4 * KIB { reads } else { 0 };
    let (mut rng, mut written) = (Rng::new(99), Vec::new());
    let (mut append, mut apply, mut checkpoint, mut checkpoints) = (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0);
    let (started, mut count) = (Instant::now(), 0);
    while count < (total / size).max(1) && started.elapsed() < time_cap() {
        if volume.should_checkpoint(&store.mark(volume.applied_index())) {
            if reads > 0 {
                let notes = format!("{reads} reads; {count} entries, {} dirty nodes", volume.stats().dirty_nodes);
                read_row(&volume, &mut rng, &written, reads, "read 4 KiB written: dirty map", notes);
            }
            let at = Instant::now();
            volume.checkpoint(&mut store).expect("checkpoint");
            checkpoint += at.elapsed();
            checkpoints += 1;
            if reads > 0 {
                let notes = format!("{reads} reads after the checkpoint; {} cached nodes", volume.stats().cached_nodes);
                read_row(&volume, &mut rng, &written, reads, "read 4 KiB written: clean map", notes);
                reads = 0;
            }
        }
        let cmd = writes.next();
        if reads > 0 {
            written.push(cmd.range().0);
        }
        let (a, b) = propose(&mut volume, &mut store, &cmd);
        append += a;
        apply += b;
        count += 1;
    }
    if reads > 0 && count > 0 {
        // Too few entries for a checkpoint: the map is dirty since format.
        let notes = format!("{reads} reads; {count} entries, no checkpoint");
        read_row(&volume, &mut rng, &written, reads, "read 4 KiB written: dirty map", notes);
    }
    let bytes = count * size;
    let label = format!("{} KiB", size / KIB);
    let (mib, append_rate, ckpt_ms) = (bytes / MIB, mib_per_s(bytes, append), ms(checkpoint));
    let notes =
        format!("{count} entries, {mib} MiB; append alone {append_rate:.1} MiB/s; {checkpoints} ckpts {ckpt_ms} ms");
    let end_to_end = mib_per_s(bytes, append + apply + checkpoint);
    row(&format!("apply {label}: append+apply+ckpt"), format!("{end_to_end:.1}"), "MiB/s", notes);
    row(&format!("apply {label}: apply alone"), format!("{:.1}", mib_per_s(bytes, apply)), "MiB/s", "");
}

/// 3. Replay: 64 KiB writes stay in the log with no checkpoint at all, the volume and store are
///    dropped (a crash after the last append), and `Volume::open` replays every entry.
fn replay(total: u64) {
    let size = 64 * KIB;
    let wanted = (total / size).max(1);
    // A 64 KiB entry is a 17-block record (payload, command and record headers); the ring must
    // hold every one of them: at least 512 MiB, else twice what the entries need.
    let log_blocks = (128 * KIB).max(2 * wanted * 17);
    let volume_bytes = 4 * GIB;
    let image = Image::create("replay", 2 * volume_bytes + log_blocks * BLOCK);
    let (mut volume, mut store) = image.format_open(volume_bytes, log_blocks);
    let mut writes = Writes::new(3, size, volume_bytes);
    let (started, mut count) = (Instant::now(), 0);
    while count < wanted && started.elapsed() < time_cap() {
        propose(&mut volume, &mut store, &writes.next());
        count += 1;
    }
    // Formatting put the log tail at ring position 0, so the head is the log's length.
    let log_bytes = store.head() * BLOCK;
    drop((volume, store));
    let hwm_before = memory_kib().1;
    let started = Instant::now();
    let (volume, _store) = image.open();
    let took = started.elapsed();
    assert_eq!(volume.applied_index(), count, "open replayed every entry");
    let (rss, hwm) = memory_kib();
    row(
        "replay 64 KiB: open",
        format!("{:.1}", mib_per_s(log_bytes, took)),
        "MiB/s",
        format!(
            "{count} entries, {} MiB of log in {} ms; ring {} MiB",
            log_bytes / MIB,
            ms(took),
            log_blocks * BLOCK / MIB
        ),
    );
    row("replay 64 KiB: VmRSS after open", rss, "KiB", format!("VmHWM {hwm} KiB, {hwm_before} before open"));
}

fn main() {
    // `cargo bench` passes `--bench`; other arguments select phases by name (scale, apply,
    // replay), as a filter does for libtest benches.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let run = |phase: &str| filters.is_empty() || filters.iter().any(|f| phase.contains(f.as_str()));
    let total = env_u64("RBLK_BENCH_MB", 256) * MIB;
    let reads = env_u64("RBLK_BENCH_READS", 500);
    let started = Instant::now();
    println!("{:<34} {:>10} {:<6} notes", "measurement", "value", "unit");
    if run("scale") {
        scale();
    }
    for size in [4 * KIB, 64 * KIB, MIB] {
        if run(&format!("apply{}k", size / KIB)) {
            apply_throughput(size, total, reads);
        }
    }
    if run("replay") {
        replay(env_u64("RBLK_BENCH_REPLAY_MB", 128) * MIB);
    }
    let (rss, hwm) = memory_kib();
    let notes = format!("VmRSS {rss} KiB; total {:.1} s", started.elapsed().as_secs_f64());
    row("end: VmHWM", hwm, "KiB", notes);
}
