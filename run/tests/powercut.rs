//! Power cuts of the real binaries. The image lives on a lazyfs mount (the `lazyfs` crate): a
//! write reaches the backing directory only once it was made durable (fdatasync, O_DSYNC or
//! RWF_DSYNC); everything else is torn (`tear`: each 512 B sector kept or dropped) or reordered
//! (`reorder`: each 4 KiB piece kept or dropped whole) at the cut. Each cut: format a small
//! volume, serve it, drive a verifying workload over NBD (two connections, eight writers, one
//! request in flight each; 4 KiB blocks stamped ⟨block, write id, checksum⟩), cut at a seeded
//! instant — a random time, or the arrival of the k-th fsync (the window in which written
//! blocks wait for the sync that makes them durable) — SIGKILL the supervisor and the driver,
//! unmount, mount the backing directory again, serve it and read every block back. Each block
//! must hold its last acknowledged write or the write in flight to it when the power went;
//! a block never acknowledged may also be zeros.
//!
//! `RBLK_POWERCUT_CUTS=N` runs N cuts per test (default 15, with and without the page cache:
//! 30 in all); `RBLK_POWERCUT_MODE=tear|reorder` picks the mode (default: alternating);
//! `RBLK_POWERCUT_SEED=S` replays one cut.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use raft_state::rng::Rng;
use run::stamp::{decode, stamp, BLOCK};

mod common;
use common::{have, Scratch, Serve, MIB};

const SIZE: u64 = 32 * MIB;
const WRITERS: u64 = 8;
const CONNECTIONS: u64 = 2;

fn fuse_available() -> bool {
    if !have("fusermount3") {
        return false;
    }
    let dev = Path::new("/dev/fuse").exists();
    if !dev {
        assert!(std::env::var_os("RBLK_REQUIRE_CLIENTS").is_none(), "/dev/fuse is required but missing");
        eprintln!("skipped: /dev/fuse is missing");
    }
    dev
}

/// Per block of a writer's region: the last acknowledged write and the write in flight.
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    acked: u64,
    in_flight: u64,
}

/// One writer: writes 1–4 stamped blocks at a time into its region until the connection dies.
fn writer(
    client: &session::Client,
    first: u64,
    blocks: u64,
    seed: u64,
    next_id: &AtomicU64,
    stop: &AtomicBool,
) -> Vec<Cell> {
    let mut model = vec![Cell::default(); blocks as usize];
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::SeqCst) {
        if rng.chance(1, 20) {
            if client.flush().is_err() {
                break;
            }
            continue;
        }
        let n = 1 + rng.below(4);
        let at = rng.below(blocks - n + 1);
        let id = next_id.fetch_add(1, Ordering::SeqCst);
        let mut data = Vec::with_capacity((n * BLOCK) as usize);
        for b in 0..n {
            data.extend_from_slice(&stamp(first + at + b, id));
            model[(at + b) as usize].in_flight = id;
        }
        if client.write((first + at) * BLOCK, &data, rng.chance(1, 8)).is_err() {
            break; // the power went: this write stays in flight
        }
        for cell in &mut model[at as usize..(at + n) as usize] {
            *cell = Cell { acked: id, in_flight: 0 };
        }
    }
    model
}

/// What one cut did.
struct Outcome {
    acked: u64,
    cut: lazyfs::Stats,
    how: String,
}

fn server_config(page_cache: bool) -> String {
    format!(
        "[checkpoint]\nlog_bytes = \"128K\"\ninterval = \"500ms\"\n[cache]\npage_cache = {page_cache}\n\
         [supervisor]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"2s\"\nrestart_backoff = \"20ms\"\n"
    )
}

/// One cut with `seed`: the run, the cut, the restart and the check of every block.
fn cut_once(seed: u64, page_cache: bool, mode: lazyfs::Mode) -> Result<Outcome, String> {
    let dir = Scratch::new(&format!("powercut-{seed}-{page_cache}"));
    let (backing, mnt) = (dir.path("backing"), dir.path("mnt"));
    std::fs::create_dir_all(&backing).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    let image = mnt.join("v.img");
    let mut rng = Rng::new(seed);
    let options = lazyfs::Options { mode, seed, cached: false };
    let mounted = lazyfs::mount(&backing, &mnt, options).map_err(|e| format!("mount: {e}"))?;

    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .args(["format", image.to_str().ok_or("path")?, "--size", "32M", "--log-size", "2M"])
        .output()
        .map_err(|e| format!("rblk format: {e}"))?;
    if !out.status.success() {
        return Err(format!("rblk format: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let config = server_config(page_cache);
    let serve = Serve::launch(&dir, &image, None, &config, "before", &[]);
    let clients: Vec<session::Client> = (0..CONNECTIONS)
        .map(|_| session::Client::connect(&serve.socket, ""))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("connect: {e}\n{}", serve.log_tail()))?;
    let blocks = SIZE / BLOCK / WRITERS;
    let next_id = AtomicU64::new(1);
    let stop = AtomicBool::new(false);
    let run_for = Duration::from_millis(200 + rng.below(1300));
    let at_fsync = rng.chance(1, 2).then(|| 1 + rng.below(6));
    let (models, how) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (client, next_id, stop) = (&clients[(w % CONNECTIONS) as usize], &next_id, &stop);
                let seed = seed ^ ((w + 1) * 0x1234_5678);
                scope.spawn(move || writer(client, w * blocks, blocks, seed, next_id, stop))
            })
            .collect();
        std::thread::sleep(run_for);
        let layer = mounted.layer();
        let how = match at_fsync {
            Some(k) => {
                layer.arm_at_fsync(k);
                let deadline = Instant::now() + Duration::from_secs(3);
                while !layer.stats().cut && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if layer.stats().cut {
                    format!("at fsync {k} after {run_for:?}")
                } else {
                    let _ = layer.cut();
                    format!("at {run_for:?} + 3s (fsync {k} never came)")
                }
            }
            None => {
                let _ = layer.cut();
                format!("at {run_for:?}")
            }
        };
        stop.store(true, Ordering::SeqCst);
        // The driver fails on the cut mount; kill it and the supervisor, as a power cut would.
        serve.kill_all();
        let models: Vec<Vec<Cell>> = workers.into_iter().map(|w| w.join().expect("writer")).collect();
        (models, how)
    });
    drop(clients);
    let cut = mounted.layer().stats();
    mounted.unmount().map_err(|e| format!("unmount: {e}"))?;

    // Power back: the durable state only.
    let options = lazyfs::Options { mode: lazyfs::Mode::Keep, seed, cached: false };
    let mounted = lazyfs::mount(&backing, &mnt, options).map_err(|e| format!("remount: {e}"))?;
    let serve = Serve::launch(&dir, &image, None, &config, "after", &[]);
    let acked = models.iter().flatten().filter(|c| c.acked != 0).count() as u64;
    let result = verify(&serve, &models, blocks);
    match result {
        Ok(()) => {
            let log = serve.log.clone();
            let status = serve.stop();
            if !status.success() {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                return Err(format!("rblk serve exited with {status} after SIGTERM:\n{log}"));
            }
            mounted.unmount().map_err(|e| format!("unmount: {e}"))?;
            Ok(Outcome { acked, cut, how })
        }
        Err(e) => Err(format!("{e}\ncut {how}: {cut}\nserver log after the cut:\n{}", serve.log_tail())),
    }
}

fn verify(serve: &Serve, models: &[Vec<Cell>], blocks: u64) -> Result<(), String> {
    let client = session::Client::connect(&serve.socket, "").map_err(|e| format!("connect after the cut: {e}"))?;
    let mut violations = Vec::new();
    for (w, model) in models.iter().enumerate() {
        let first = w as u64 * blocks;
        for chunk in (0..blocks).step_by(256) {
            let n = 256.min(blocks - chunk);
            let got = client
                .read((first + chunk) * BLOCK, (n * BLOCK) as u32)
                .map_err(|e| format!("read of blocks {}.. after the cut: {e}", first + chunk))?;
            for b in 0..n {
                let block = first + chunk + b;
                let cell = model[(chunk + b) as usize];
                match decode(block, &got[(b * BLOCK) as usize..][..BLOCK as usize]) {
                    Ok(id) if id == cell.acked || (cell.in_flight != 0 && id == cell.in_flight) => {}
                    Ok(id) => violations.push(format!(
                        "block {block}: holds write {id}, acknowledged was {} (in flight: {})",
                        cell.acked, cell.in_flight
                    )),
                    Err(e) => violations.push(e.to_string()),
                }
            }
        }
    }
    if violations.is_empty() {
        return Ok(());
    }
    let shown: Vec<&String> = violations.iter().take(8).collect();
    Err(format!("{} blocks violate the oracle, e.g. {shown:?}", violations.len()))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run_cuts(page_cache: bool, test: &str) {
    if !fuse_available() {
        return;
    }
    let forced_mode: Option<lazyfs::Mode> = std::env::var("RBLK_POWERCUT_MODE").ok().map(|m| m.parse().expect("mode"));
    let seeds: Vec<u64> = match env_u64("RBLK_POWERCUT_SEED") {
        Some(seed) => vec![seed],
        None => {
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                & !0xFFFF;
            (0..env_u64("RBLK_POWERCUT_CUTS").unwrap_or(15)).map(|i| base + i).collect()
        }
    };
    let started = Instant::now();
    let mut failures = Vec::new();
    for &seed in &seeds {
        let mode = forced_mode.unwrap_or(if seed % 2 == 0 { lazyfs::Mode::Tear } else { lazyfs::Mode::Reorder });
        match cut_once(seed, page_cache, mode) {
            Ok(o) => eprintln!(
                "seed {seed} page_cache={page_cache} {mode}: {} blocks acknowledged, cut {}: {}; every block verified",
                o.acked, o.how, o.cut
            ),
            Err(e) => {
                eprintln!("seed {seed} page_cache={page_cache} {mode}: FAILED: {e}");
                failures.push(format!(
                    "seed {seed} ({mode}): replay with RBLK_POWERCUT_SEED={seed} RBLK_POWERCUT_MODE={mode} \
                     cargo test -p run --test powercut {test}"
                ));
            }
        }
    }
    eprintln!("{} cuts, {} violations, {:?}", seeds.len(), failures.len(), started.elapsed());
    assert!(failures.is_empty(), "{} of {} cuts failed:\n{}", failures.len(), seeds.len(), failures.join("\n"));
}

/// Power cuts with data and tree blocks written through the page cache (made durable by the
/// checkpoint's fdatasync before the root is written).
#[test]
fn power_cuts_with_the_page_cache_lose_no_acknowledged_write() {
    run_cuts(true, "power_cuts_with_the_page_cache");
}

/// Power cuts with every block written with O_DIRECT (durable only after the fdatasync).
#[test]
fn power_cuts_without_the_page_cache_lose_no_acknowledged_write() {
    run_cuts(false, "power_cuts_without_the_page_cache");
}
