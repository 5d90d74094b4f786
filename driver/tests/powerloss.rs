//! Power loss under the real driver pipeline, on the simulated disk.
//!
//! Each run formats a small volume on a [`SimDisk`], starts the real `driver::run` in this
//! process (node thread, applier, accept and connection threads: the code that serves users)
//! on a unix socket, and drives a verifying workload through NBD with the project's own
//! client: eight workers on two connections, each with one request in flight at a time —
//! whole-block writes (some FUA), single-sector (512 B) writes, trims, write-zeroes, reads
//! checked while running (read-your-acknowledged-writes), flushes.
//!
//! The power is cut at a seeded random device operation (`crash_after_ops`): the cut lands
//! during log appends, applies and checkpoints alike. The driver fails stop; its threads end.
//! Then every write the disk had not made durable is resolved by the crash (kept, dropped or
//! torn at 512 bytes; in some runs kept or dropped whole, never torn, which is what exposes a
//! block named before it is durable), and a fresh `driver::run` recovers on what is durable.
//! In some runs the power is cut again while it recovers, and then once more recovery runs.
//!
//! The check reads the whole volume back: every 512-byte sector is an independent register
//! (the workload writes single sectors too; a whole-block write stamps all eight of its
//! sectors with one write id). A payload is stamped ⟨sector, write id, checksum⟩, so garbage,
//! misplaced and stale bytes are told apart. After recovery a sector must hold the value of
//! the last acknowledged request that covered it (zeros for a trim or write-zeroes, and for a
//! sector never written), or the value of the one request covering it that was in flight at
//! the cut (sent, not acknowledged).
//!
//! Seeds: `RBLK_SIM_SEEDS=N` runs N seeds (default 200); `RBLK_SIM_SEED=S` replays one seed
//! and prints its steps. A failing run prints its seed and fault schedule: the cut operation,
//! the crash policy, the fate of every pending write, cuts during recovery. The seed fixes the
//! workload of every worker, the cut operation, the crash policy and the fates drawn (the
//! disk's RNG), but not how the threads interleave: which requests share a log append, and so
//! which operation the cut lands on and which writes are pending then, vary from one replay to
//! the next. A failing seed usually fails again; rerun it a few times if not.
//!
//! The suite is known to be able to fail: run on a disk with a planted bug (a `write_durable`
//! that is not durable, a flush that makes nothing durable) it finds lost writes or refused
//! recoveries within a few seeds.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use driver::{DriverConfig, DriverError};
use raft_state::device::{CrashPolicy, Device, Planted, ResolvedWrite, SimDisk, TraceOp, WriteFate, BLOCK};
use raft_state::error_chain as chain;
use raft_state::rng::Rng;
use raft_state::volume::{FormatOptions, Volume};
use session::{Client, SessionError};
use slog::{o, Discard, Logger};

const SECTOR: u64 = 512;
const SECTORS_PER_BLOCK: u64 = BLOCK / SECTOR;
/// 16 MiB seen by clients.
const VOLUME_BLOCKS: u64 = 4096;
/// A 1 MiB log ring: a run wraps it.
const LOG_BLOCKS: u64 = 256;
/// A thin volume (8 MiB of data blocks), yet room for every block a run writes, the copies
/// the two newest roots still name, and the trees: no write fails for space.
const DATA_BLOCKS: u64 = 2048;
const VOL: [u8; 16] = *b"powerloss-sim-v1";
/// Workers, each owning one slice of the volume; they share `CONNECTIONS` clients.
const WORKERS: u64 = 8;
const CONNECTIONS: usize = 2;
const SLICE_BLOCKS: u64 = VOLUME_BLOCKS / WORKERS;
/// Most requests of a worker go to the first blocks of its slice, so blocks are overwritten.
const HOT_BLOCKS: u64 = 32;
/// Requests per worker at most; the cut usually comes first.
const MAX_REQUESTS: u64 = 48;
/// The cut comes after 1..=CUT_RANGE device operations once the workload starts.
const CUT_RANGE: u64 = 400;
/// Any single wait of the test; past it the run fails instead of hanging the suite.
const TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Payloads and the oracle

/// The payload write `id` puts in `sector` (id 0: zeros, never written or trimmed).
fn stamp(sector: u64, id: u64, out: &mut [u8]) {
    if id == 0 {
        out.fill(0);
        return;
    }
    Rng::new(sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ id).fill(&mut out[24..]);
    out[..8].copy_from_slice(&sector.to_le_bytes());
    out[8..16].copy_from_slice(&id.to_le_bytes());
    let sum = checksum(&out[..16], &out[24..]);
    out[16..24].copy_from_slice(&sum);
}

fn checksum(head: &[u8], rest: &[u8]) -> [u8; 8] {
    let h = blake3::Hasher::new().update(head).update(rest).finalize();
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&h.as_bytes()[..8]);
    sum
}

/// Which write the bytes read from `sector` came from, or why they are garbage.
fn decode(sector: u64, bytes: &[u8]) -> Result<u64, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let (at, id) = (word(0), word(8));
    if bytes[16..24] != checksum(&bytes[..16], &bytes[24..]) {
        return Err(format!("sector {sector}: garbage (checksum fails)"));
    }
    if at != sector {
        return Err(format!("sector {sector}: holds sector {at}'s data (write {id:#x})"));
    }
    Ok(id)
}

/// A request whose reply never came: it may or may not have taken effect.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    first: u64,
    count: u64,
    /// The write id it puts in every sector it covers, 0 for zeros.
    value: u64,
}

/// What a worker knows about its slice once it stopped.
#[derive(Debug)]
struct WorkerLog {
    /// First sector of the slice, and per sector the last acknowledged value.
    first: u64,
    acked: Vec<u64>,
    in_flight: Option<InFlight>,
    requests: u64,
    acknowledged_writes: u64,
    violations: Vec<String>,
}

impl WorkerLog {
    /// The values `sector` (of this slice) may hold after a crash.
    fn legal(&self, sector: u64) -> (u64, Option<u64>) {
        let acked = self.acked[(sector - self.first) as usize];
        let maybe = self.in_flight.filter(|f| (f.first..f.first + f.count).contains(&sector)).map(|f| f.value);
        (acked, maybe)
    }
}

// ---------------------------------------------------------------------------------------
// The schedule a seed draws

#[derive(Debug, Clone)]
struct Schedule {
    seed: u64,
    planted: Option<Planted>,
    checkpoint_log_bytes: u64,
    node_cache: usize,
    /// Whole-block writes of at least this size are written once (placed); 0 none.
    write_once_min: u64,
    /// The power goes off after this many device operations of the workload.
    cut_after_ops: u64,
    /// Whole-write fates only (kept or dropped), else kept, dropped or torn.
    whole_writes: bool,
    /// Cuts during recovery: the operations after which the power goes off again.
    recovery_cuts: Vec<u64>,
}

impl Schedule {
    fn draw(seed: u64, planted: Option<Planted>) -> Schedule {
        let mut rng = Rng::new(seed ^ 0x5EED_0FC0_FFEE);
        let checkpoint_log_bytes = [64u64 << 10, 128 << 10, 256 << 10][rng.below(3) as usize];
        let node_cache = [4usize, 64, 16384][rng.below(3) as usize];
        // Most runs place writes (every whole-block write, or those of two blocks or more).
        let write_once_min = [0u64, 4096, 4096, 8192][rng.below(4) as usize];
        let cut_after_ops = 1 + rng.below(CUT_RANGE);
        let whole_writes = rng.chance(1, 2);
        let mut recovery_cuts = Vec::new();
        // Recovery takes a few operations (replayed data, the new leader's entry, perhaps a
        // checkpoint): most of these land in it.
        while recovery_cuts.len() < 3 && rng.chance(1, 2) {
            recovery_cuts.push(rng.below(12));
        }
        Schedule {
            seed,
            planted,
            checkpoint_log_bytes,
            node_cache,
            write_once_min,
            cut_after_ops,
            whole_writes,
            recovery_cuts,
        }
    }

    fn policy(&self) -> CrashPolicy {
        if self.whole_writes {
            CrashPolicy::RandomWhole
        } else {
            CrashPolicy::Random
        }
    }
}

// ---------------------------------------------------------------------------------------
// One incarnation of the driver

/// `driver::run` on its own thread, serving a socket of its own.
struct Incarnation {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), DriverError>>>,
}

impl Incarnation {
    fn start(disk: &Arc<SimDisk>, cfg: &DriverConfig, path: PathBuf, log: &Logger) -> Result<Incarnation, String> {
        let listener = UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (dev, cfg, flag, log) = (disk.clone() as Arc<dyn Device>, cfg.clone(), stop.clone(), log.clone());
        let thread = std::thread::Builder::new()
            .name("driver-run".into())
            .spawn(move || {
                driver::run(
                    dev,
                    None,
                    driver::Listeners { unix: Some(listener), tcp: None, vhost: None },
                    cfg,
                    flag,
                    None,
                    log,
                )
            })
            .map_err(|e| format!("spawn the driver: {e}"))?;
        Ok(Incarnation { path, stop, thread: Some(thread) })
    }

    fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Asks the driver to stop (it may be stopping already), waits for `driver::run` to
    /// return, and wakes its accept thread so that it ends too.
    fn stop(&mut self) -> Result<Result<(), DriverError>, String> {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + TIMEOUT;
        while !self.finished() {
            if Instant::now() > deadline {
                return Err("driver::run did not return after a stop request".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let result = match self.thread.take() {
            Some(t) => t.join().map_err(|_| "driver::run panicked".to_string())?,
            None => Ok(()),
        };
        // The accept thread ends at its next connection once the node is done (refused when
        // the listener is gone already).
        drop(UnixStream::connect(&self.path));
        Ok(result)
    }
}

/// A client connection, and a handle on its socket to cut it from outside (which fails the
/// requests waiting on it: the workers stop instead of waiting for replies that never come).
struct Conn {
    client: Client,
    socket: UnixStream,
}

impl Conn {
    fn open(path: &Path) -> Result<Conn, String> {
        let socket = UnixStream::connect(path).map_err(|e| format!("connect: {e}"))?;
        for set in [UnixStream::set_read_timeout, UnixStream::set_write_timeout] {
            set(&socket, Some(TIMEOUT)).map_err(|e| format!("socket timeout: {e}"))?;
        }
        let keep = socket.try_clone().map_err(|e| format!("clone the socket: {e}"))?;
        let client = Client::from_stream(socket, "").map_err(|e| format!("handshake: {}", chain(&e)))?;
        Ok(Conn { client, socket: keep })
    }

    fn cut(&self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// Waits until only the test holds the disk: every thread of the stopped driver has ended.
fn wait_released(disk: &Arc<SimDisk>) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    while Arc::strong_count(disk) > 1 {
        if Instant::now() > deadline {
            return Err(format!("{} driver references to the disk outlived driver::run", Arc::strong_count(disk) - 1));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The workload

struct Worker<'a> {
    index: u64,
    rng: Rng,
    client: &'a Client,
    disk: &'a SimDisk,
    /// Set by the test once it cuts the connections: errors are expected from then on.
    cut: &'a AtomicBool,
    log: WorkerLog,
    next_id: u64,
    trace: bool,
}

impl Worker<'_> {
    fn first_block(&self) -> u64 {
        self.index * SLICE_BLOCKS
    }

    /// A block of the slice: mostly a hot one.
    fn pick_block(&mut self) -> u64 {
        let span = if self.rng.chance(6, 7) { HOT_BLOCKS } else { SLICE_BLOCKS };
        self.first_block() + self.rng.below(span)
    }

    fn run(mut self) -> WorkerLog {
        let slice_end = (self.first_block() + SLICE_BLOCKS) * SECTORS_PER_BLOCK;
        while self.log.requests < MAX_REQUESTS && self.log.in_flight.is_none() {
            self.log.requests += 1;
            let action = self.rng.below(100);
            let fua = self.rng.chance(1, 4);
            let (first, count, value, result) = match action {
                // Whole blocks, 1 to 4.
                0..45 => {
                    let block = self.pick_block();
                    let blocks = (1 + self.rng.below(4)).min(self.first_block() + SLICE_BLOCKS - block);
                    let id = self.new_id();
                    let (first, count) = (block * SECTORS_PER_BLOCK, blocks * SECTORS_PER_BLOCK);
                    let data = payload(first, count, id);
                    (first, count, id, self.client.write(first * SECTOR, &data, fua))
                }
                // One sector of a block.
                45..60 => {
                    let first = self.pick_block() * SECTORS_PER_BLOCK + self.rng.below(SECTORS_PER_BLOCK);
                    let id = self.new_id();
                    let data = payload(first, 1, id);
                    (first, 1, id, self.client.write(first * SECTOR, &data, fua))
                }
                // Trim or write-zeroes of 1 to 64 sectors, anywhere in a block.
                60..75 => {
                    let first = self.pick_block() * SECTORS_PER_BLOCK + self.rng.below(SECTORS_PER_BLOCK);
                    let count = (1 + self.rng.below(64)).min(slice_end - first);
                    let len = (count * SECTOR) as u32;
                    let result = if action < 68 {
                        self.client.trim(first * SECTOR, len)
                    } else {
                        self.client.write_zeroes(first * SECTOR, len, self.rng.chance(1, 2))
                    };
                    (first, count, 0, result)
                }
                75..95 => {
                    let block = self.pick_block();
                    let blocks = (1 + self.rng.below(8)).min(self.first_block() + SLICE_BLOCKS - block);
                    self.read_back(block, blocks);
                    continue;
                }
                _ => {
                    if let Err(e) = self.client.flush() {
                        self.failed("flush", &e);
                        break;
                    }
                    continue;
                }
            };
            match result {
                Ok(()) => {
                    for s in first..first + count {
                        self.log.acked[(s - self.log.first) as usize] = value;
                    }
                    self.log.acknowledged_writes += 1;
                }
                Err(e) => {
                    self.failed("write", &e);
                    self.log.in_flight = Some(InFlight { first, count, value });
                }
            }
        }
        self.log
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        ((self.index + 1) << 32) | self.next_id
    }

    /// Reads blocks back while the driver runs: each sector must hold exactly its last
    /// acknowledged value (nothing of this worker is in flight).
    fn read_back(&mut self, block: u64, blocks: u64) {
        let data = match self.client.read(block * BLOCK, (blocks * BLOCK) as u32) {
            Ok(data) => data,
            Err(e) => {
                self.failed("read", &e);
                // Nothing was in flight: stop with what is known.
                self.log.requests = MAX_REQUESTS;
                return;
            }
        };
        let first = block * SECTORS_PER_BLOCK;
        for (i, bytes) in data.chunks(SECTOR as usize).enumerate() {
            let sector = first + i as u64;
            let want = self.log.acked[(sector - self.log.first) as usize];
            match decode(sector, bytes) {
                Ok(id) if id == want => {}
                Ok(id) => {
                    self.violation(format!("live read: sector {sector} holds write {id:#x}, acknowledged {want:#x}"))
                }
                Err(e) => self.violation(format!("live read: {e}")),
            }
        }
    }

    /// A request failed: expected once the power is off (or the test cut the connection).
    fn failed(&mut self, what: &str, e: &SessionError) {
        if self.trace {
            eprintln!("worker {}: {what} failed: {}", self.index, chain(e));
        }
        if !(self.disk.is_down() || self.cut.load(Ordering::SeqCst)) {
            self.violation(format!("{what} failed before the power cut: {}", chain(e)));
        }
    }

    fn violation(&mut self, v: String) {
        if self.trace {
            eprintln!("worker {}: VIOLATION {v}", self.index);
        }
        self.log.violations.push(v);
    }
}

/// `count` sectors from `first`, each stamped by write `id`.
fn payload(first: u64, count: u64, id: u64) -> Vec<u8> {
    let mut data = vec![0u8; (count * SECTOR) as usize];
    for (i, out) in data.chunks_mut(SECTOR as usize).enumerate() {
        stamp(first + i as u64, id, out);
    }
    data
}

// ---------------------------------------------------------------------------------------
// One run

/// What one run did (for the summary), or why it failed.
#[derive(Debug, Default)]
struct Report {
    acknowledged_writes: u64,
    ops_at_cut: u64,
    cut_reached: bool,
    /// What the last operation before the cut was.
    cut_after: CutAfter,
    recovery_cuts: usize,
    fates: Vec<String>,
    violations: Vec<String>,
}

impl Report {
    fn violation(&mut self, v: String) {
        self.violations.push(v);
    }
}

/// Where a cut landed, told by the last operation that completed before it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum CutAfter {
    #[default]
    Nothing,
    /// A log append.
    Append,
    /// Data or tree blocks (applying, or a checkpoint writing its trees).
    Blocks,
    /// A flush (a checkpoint's, before or after its root).
    Flush,
    /// A root slot.
    Root,
}

impl CutAfter {
    fn of(disk: &SimDisk) -> CutAfter {
        match disk.trace().last() {
            None => CutAfter::Nothing,
            Some(TraceOp::WriteDurable { .. }) => CutAfter::Append,
            Some(TraceOp::Flush) => CutAfter::Flush,
            Some(TraceOp::Write { offset, .. }) if *offset < 3 * BLOCK => CutAfter::Root,
            Some(TraceOp::Write { .. }) => CutAfter::Blocks,
        }
    }
}

/// A compact account of a crash's fates: per pending write K(ept), D(ropped) or T(orn, with
/// the sectors kept of all), at its first block + length in blocks.
fn describe_fates(resolved: &[ResolvedWrite]) -> String {
    let (mut k, mut d, mut t) = (0, 0, 0);
    let list: Vec<String> = resolved
        .iter()
        .map(|r| {
            let f = match &r.fate {
                WriteFate::Keep => {
                    k += 1;
                    "K".to_string()
                }
                WriteFate::Drop => {
                    d += 1;
                    "D".to_string()
                }
                WriteFate::Torn { kept } => {
                    t += 1;
                    format!("T{}/{}", kept.iter().filter(|&&x| x).count(), kept.len())
                }
            };
            format!("{f}@{}+{}", r.offset / BLOCK, r.len as u64 / BLOCK)
        })
        .collect();
    format!("{} pending: {k} kept, {d} dropped, {t} torn [{}]", resolved.len(), list.join(" "))
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(seed: u64) -> Scratch {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("rblk-powerloss-{}-{seed}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(schedule: &Schedule, trace: bool) -> Report {
    let mut report = Report::default();
    if let Err(e) = run_inner(schedule, trace, &mut report) {
        report.violation(e);
    }
    report
}

fn run_inner(schedule: &Schedule, trace: bool, report: &mut Report) -> Result<(), String> {
    let seed = schedule.seed;
    let disk = Arc::new(SimDisk::new((3 + LOG_BLOCKS + DATA_BLOCKS) * BLOCK, seed));
    let opts = FormatOptions { volume_bytes: VOLUME_BLOCKS * BLOCK, log_blocks: LOG_BLOCKS, volume_id: VOL };
    Volume::format(&*disk, None, opts).map_err(|e| format!("format: {}", chain(&e)))?;
    disk.flush().map_err(|e| format!("flush after format: {}", chain(&e)))?;
    if let Some(bug) = schedule.planted {
        disk.plant(bug);
    }
    let mut cfg = driver::driver_config(&config::Config::default());
    cfg.volume.checkpoint_log_bytes = schedule.checkpoint_log_bytes;
    // Checkpoints by log size only: time would make runs depend on the machine's speed.
    cfg.volume.checkpoint_interval = Duration::from_secs(3600);
    cfg.volume.node_cache = schedule.node_cache;
    cfg.node.write_once_min = schedule.write_once_min;
    // The node looks at its stop flag once per tick: a short one makes each stop quick.
    cfg.node.tick = Duration::from_millis(2);
    let log = if trace { driver::logger(&config::LogConfig::default()) } else { Logger::root(Discard, o!()) };
    let scratch = Scratch::new(seed);
    let mut incarnations = 0;
    let mut socket = || {
        incarnations += 1;
        scratch.0.join(format!("driver-{incarnations}.sock"))
    };

    // The first incarnation, and the workload until the power goes off.
    let mut first = Incarnation::start(&disk, &cfg, socket(), &log)?;
    let conns = (0..CONNECTIONS).map(|_| Conn::open(&first.path)).collect::<Result<Vec<_>, _>>()?;
    disk.crash_after_ops(Some(schedule.cut_after_ops));
    let cut = AtomicBool::new(false);
    let (logs, stopped) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let first_sector = w * SLICE_BLOCKS * SECTORS_PER_BLOCK;
                let worker = Worker {
                    index: w,
                    rng: Rng::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (w + 1)),
                    client: &conns[w as usize % CONNECTIONS].client,
                    disk: &disk,
                    cut: &cut,
                    log: WorkerLog {
                        first: first_sector,
                        acked: vec![0; (SLICE_BLOCKS * SECTORS_PER_BLOCK) as usize],
                        in_flight: None,
                        requests: 0,
                        acknowledged_writes: 0,
                        violations: Vec::new(),
                    },
                    next_id: 0,
                    trace,
                };
                scope.spawn(move || worker.run())
            })
            .collect();
        let deadline = Instant::now() + TIMEOUT;
        while !(disk.is_down() || first.finished() || workers.iter().all(|w| w.is_finished())) {
            if Instant::now() > deadline {
                report.violation("the workload did not end".into());
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        report.cut_reached = disk.is_down();
        report.cut_after = CutAfter::of(&disk);
        // The driver stops only when the device does (or when told to).
        let died_first = first.finished() && !disk.is_down();
        // The power goes off now if the workload ended first. Nothing becomes durable after
        // this; acknowledgements of entries already durable may still come.
        disk.crash_after_ops(Some(0));
        report.ops_at_cut = disk.ops();
        let stopped = first.stop().and_then(|result| match (died_first, result) {
            (true, Err(e)) => Err(format!("the driver stopped before the power cut: {}", chain(&e))),
            (true, Ok(())) => Err("the driver stopped before the power cut, unasked".into()),
            (false, result) => Ok(result),
        });
        cut.store(true, Ordering::SeqCst);
        for c in &conns {
            c.cut();
        }
        let logs: Vec<WorkerLog> = workers.into_iter().map(|w| w.join().expect("a worker panicked")).collect();
        (logs, stopped)
    });
    drop(conns);
    let result = stopped?;
    if trace {
        eprintln!("first driver ended: {:?}", result.as_ref().map_err(|e| chain(e)));
    }
    wait_released(&disk)?;
    for l in &logs {
        report.acknowledged_writes += l.acknowledged_writes;
        report.violations.extend(l.violations.iter().cloned());
    }
    report.fates.push(describe_fates(&disk.crash(schedule.policy())));

    // Recovery, cut again as the schedule says, until one incarnation serves.
    let mut cuts = schedule.recovery_cuts.iter().copied();
    let (mut serving, conn) = loop {
        let cut = cuts.next();
        disk.crash_after_ops(cut);
        let mut inc = Incarnation::start(&disk, &cfg, socket(), &log)?;
        let opened = Conn::open(&inc.path);
        if let Ok(conn) = opened {
            if !disk.is_down() {
                disk.crash_after_ops(None);
                break (inc, conn);
            }
            conn.cut();
        }
        let result = inc.stop()?;
        wait_released(&disk)?;
        match cut {
            Some(at) if disk.is_down() => {
                report.recovery_cuts += 1;
                if trace {
                    eprintln!("cut during recovery after {at} ops: {:?}", result.as_ref().map_err(|e| chain(e)));
                }
                report.fates.push(describe_fates(&disk.crash(schedule.policy())));
            }
            _ => {
                let why = match result {
                    Err(e) => chain(&e),
                    Ok(()) => "it stopped without serving".into(),
                };
                return Err(format!("recovery failed (not by a cut): {why}"));
            }
        }
    };

    // Every sector against the oracle.
    let chunk = 64 * BLOCK;
    for at in (0..VOLUME_BLOCKS * BLOCK).step_by(chunk as usize) {
        if report.violations.len() > 20 {
            break;
        }
        let data = match conn.client.read(at, chunk as u32) {
            Ok(data) => data,
            Err(e) => {
                report.violation(format!("read at {at} after recovery: {}", chain(&e)));
                continue;
            }
        };
        for (i, bytes) in data.chunks(SECTOR as usize).enumerate() {
            let sector = at / SECTOR + i as u64;
            let owner = &logs[(sector / (SLICE_BLOCKS * SECTORS_PER_BLOCK)) as usize];
            let (acked, maybe) = owner.legal(sector);
            match decode(sector, bytes) {
                Ok(id) if id == acked || Some(id) == maybe => {}
                Ok(id) => report.violation(format!(
                    "sector {sector} (block {}): holds write {id:#x}; last acknowledged {acked:#x}, in flight {}",
                    sector / SECTORS_PER_BLOCK,
                    maybe.map_or("none".into(), |m| format!("{m:#x}")),
                )),
                Err(e) => report.violation(e),
            }
            if report.violations.len() > 20 {
                break;
            }
        }
    }
    conn.cut();
    drop(conn);
    match serving.stop()? {
        Ok(()) => {}
        Err(e) => report.violation(format!("clean stop after recovery failed: {}", chain(&e))),
    }
    wait_released(&disk)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tests

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn describe(schedule: &Schedule, report: &Report) -> String {
    let replay = match schedule.planted {
        None => format!("replay: RBLK_SIM_SEED={} cargo test -p driver --test powerloss every", schedule.seed),
        Some(bug) => format!("planted {bug:?}"),
    };
    let mut out = format!(
        "seed {} ({replay}): {:?}\n  cut after {} ops ({}, {} ops in all, last before it: {:?}), {:?}, {} recovery \
         cuts, {} writes acknowledged\n",
        schedule.seed,
        schedule,
        schedule.cut_after_ops,
        if report.cut_reached { "reached" } else { "workload ended first" },
        report.ops_at_cut,
        report.cut_after,
        schedule.policy(),
        report.recovery_cuts,
        report.acknowledged_writes,
    );
    for (i, f) in report.fates.iter().enumerate() {
        let f = if f.len() > 2000 { format!("{}…", &f[..2000]) } else { f.clone() };
        out.push_str(&format!("  crash {i}: {f}\n"));
    }
    for v in report.violations.iter().take(10) {
        out.push_str(&format!("  VIOLATION {v}\n"));
    }
    if report.violations.len() > 10 {
        out.push_str(&format!("  … {} violations in all\n", report.violations.len()));
    }
    out
}

#[test]
fn every_acknowledged_write_survives_power_cuts_of_the_driver_pipeline() {
    let started = Instant::now();
    let (seeds, trace): (Vec<u64>, bool) = match env_u64("RBLK_SIM_SEED") {
        Some(seed) => (vec![seed], true),
        None => ((0..env_u64("RBLK_SIM_SEEDS").unwrap_or(200)).collect(), false),
    };
    let mut failures = Vec::new();
    let (mut acknowledged, mut reached, mut recovery_cuts) = (0, 0, 0);
    let mut cut_after = std::collections::BTreeMap::<String, u64>::new();
    for &seed in &seeds {
        let schedule = Schedule::draw(seed, None);
        let report = run(&schedule, trace);
        acknowledged += report.acknowledged_writes;
        reached += u64::from(report.cut_reached);
        recovery_cuts += report.recovery_cuts;
        *cut_after.entry(format!("{:?}", report.cut_after)).or_default() += 1;
        if trace || !report.violations.is_empty() {
            eprintln!("{}", describe(&schedule, &report));
        }
        if !report.violations.is_empty() {
            failures.push(seed);
        }
    }
    eprintln!(
        "powerloss: {} runs in {:.1?}: {acknowledged} writes acknowledged, the cut came during the workload in \
         {reached} runs (last op before it: {cut_after:?}), {recovery_cuts} cuts during recovery",
        seeds.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "acknowledged writes lost or recovery failed; seeds {failures:?}");
}

/// Runs seeds with `bug` planted in the disk (`whole`: crashes keep or drop whole writes
/// only) until the suite finds a violation that `wanted` accepts.
fn finds(bug: Planted, whole: Option<bool>, max_seeds: u64, wanted: fn(&str) -> bool) -> Option<(Schedule, Report)> {
    (0..max_seeds).find_map(|seed| {
        let mut schedule = Schedule::draw(seed, Some(bug));
        schedule.whole_writes = whole.unwrap_or(schedule.whole_writes);
        let report = run(&schedule, false);
        report.violations.iter().any(|v| wanted(v)).then_some((schedule, report))
    })
}

fn any(_: &str) -> bool {
    true
}

/// A sector read back after recovery holds something other than what the oracle allows: an
/// acknowledged write was lost (not merely a recovery that refused).
fn lost_write(v: &str) -> bool {
    v.starts_with("sector ")
}

#[test]
fn the_suite_finds_writes_acknowledged_before_their_log_record_is_durable() {
    let Some((schedule, report)) = finds(Planted::DsyncNotDurable, None, 40, any) else {
        panic!("40 seeds with write_durable not durable found nothing: the suite cannot see lost log records");
    };
    eprintln!("planted DsyncNotDurable caught:\n{}", describe(&schedule, &report));
    // Most runs end in a refused recovery (a hole in the log); some must show the loss itself.
    // Which ones depends on how the threads interleave: alone it takes 1–15 seeds, but beside
    // the other tests of this file on 2 cores one CI run needed more than 60.
    let Some((schedule, report)) = finds(Planted::DsyncNotDurable, None, 300, lost_write) else {
        panic!("300 seeds with write_durable not durable never showed a lost write: the oracle check is blind");
    };
    eprintln!("planted DsyncNotDurable, an acknowledged write lost:\n{}", describe(&schedule, &report));
}

/// Written once: a record that names placed blocks must be logged only after their bytes are
/// durable. On a disk whose placed writes never become durable, acknowledged placed writes
/// must come back damaged or old after a cut — and the suite must say so.
#[test]
fn the_suite_finds_placed_writes_whose_bytes_are_not_durable() {
    let Some((schedule, report)) = finds(Planted::DirectWritesLost, None, 60, any) else {
        panic!("60 seeds with placed bytes never durable found nothing: the suite cannot see lost placed data");
    };
    eprintln!("planted DirectWritesLost caught:\n{}", describe(&schedule, &report));
}

/// Torn roots alone would show it (a torn slot fails its checksum); with whole writes only,
/// the suite must see a root that reached the media while blocks it names did not.
#[test]
fn the_suite_finds_roots_written_without_a_flush_before_them() {
    for whole in [false, true] {
        let Some((schedule, report)) = finds(Planted::FlushIgnored, Some(whole), 40, any) else {
            panic!("40 seeds with flush ignored (whole writes: {whole}) found nothing");
        };
        eprintln!("planted FlushIgnored caught:\n{}", describe(&schedule, &report));
    }
}
