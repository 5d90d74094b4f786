//! Hostile and heavy clients against the real binaries (`rblk serve` with its default
//! configuration unless a test says otherwise): no client can exhaust the driver's memory,
//! lock others out, or make the supervisor abandon the service (issue 11's findings, each
//! reproduced here as it was found).
//!
//! Memory is judged by the driver's peak resident set (`VmHWM`), against the documented
//! bound of 256 MiB for a 1 GiB volume under the default configuration.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{request, status_field, Raw, Scratch, Serve, MIB};

/// The driver's peak resident set must stay below this (default config, 1 GiB volume).
const RSS_BOUND_KIB: u64 = 256 * 1024;

const READ: u16 = 0;
const WRITE: u16 = 1;
const TRIM: u16 = 4;
const WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;

/// Writes all of `bytes` unless `stop` is set while the socket pushes back (the stream has a
/// write timeout) or the connection fails; says whether it wrote them.
fn write_unless(stream: &mut UnixStream, mut bytes: &[u8], stop: &AtomicBool) -> bool {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return false,
            Ok(n) => bytes = &bytes[n..],
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::SeqCst) {
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

fn peak_rss_kib(pid: i32) -> u64 {
    let hwm = status_field(pid, "VmHWM");
    hwm.trim_end_matches(" kB").trim().parse().expect("VmHWM in kB")
}

/// 28-byte WRITE_ZEROES (with NO_HOLE) and TRIM requests of 160 MiB each, 96 of them in flight
/// from 4 connections: once enough to have the driver OOM-killed (each built its zeros in
/// memory), now one small entry each.
#[test]
fn huge_range_commands_cost_constant_memory() {
    let dir = Scratch::new("hostile-ranges");
    let serve = Serve::start_sized(&dir, "1G", "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let driver = serve.driver_pid();
    let len: u32 = 160 << 20;
    let threads: Vec<_> = (0..4u64)
        .map(|c| {
            let socket = serve.socket.clone();
            std::thread::spawn(move || {
                let mut raw = Raw::connect(&socket);
                for i in 0..24u64 {
                    let offset = ((c * 24 + i) * 37 * MIB) % ((1 << 30) - u64::from(len));
                    let (cmd, flags) = if i % 2 == 0 { (WRITE_ZEROES, FLAG_NO_HOLE) } else { (TRIM, 0) };
                    raw.send(cmd, flags, i, offset / 4096 * 4096, len, &[]);
                }
                let mut data = Vec::new();
                for _ in 0..24 {
                    let (error, _) = raw.reply(0, &mut data);
                    assert_eq!(error, 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client");
    }
    assert_eq!(serve.driver_pid(), driver, "the driver was not restarted:\n{}", serve.log());
    let rss = peak_rss_kib(driver);
    eprintln!("driver peak RSS {rss} KiB after 96 range commands of 160 MiB");
    assert!(rss < RSS_BOUND_KIB, "peak RSS {rss} KiB");
    assert!(serve.stop().success());
}

/// Clients that pipeline writes (and reads) faster than the log takes them, from 64
/// connections, each far past its in-flight budget: the driver stops reading their sockets
/// instead of queueing, and its memory stays bounded. Every request is answered.
#[test]
fn write_floods_are_held_back_not_queued() {
    let dir = Scratch::new("hostile-flood");
    let serve = Serve::start_sized(&dir, "1G", "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let driver = serve.driver_pid();
    let payload = Arc::new(vec![0x5au8; 4 << 20]);
    let threads: Vec<_> = (0..64u64)
        .map(|c| {
            let (socket, payload) = (serve.socket.clone(), payload.clone());
            std::thread::spawn(move || {
                let mut raw = Raw::connect(&socket);
                let mut reader = Raw { stream: raw.stream.try_clone().expect("clone") };
                let replies = std::thread::spawn(move || {
                    // A slow reader: it starts late, as a client busy sending would.
                    std::thread::sleep(Duration::from_millis(500));
                    let mut data = Vec::new();
                    for _ in 0..6u64 {
                        let (error, _) = reader.reply_by(|h| if h % 2 == 1 { 4 << 20 } else { 0 }, &mut data);
                        assert_eq!(error, 0);
                    }
                });
                for i in 0..6u64 {
                    let offset = ((c * 6 + i) * 13 * MIB) % (1 << 30) / (4 << 20) * (4 << 20);
                    if i % 2 == 0 {
                        raw.send(WRITE, 0, i, offset, 4 << 20, &payload);
                    } else {
                        raw.send(READ, 0, i, offset, 4 << 20, &[]);
                    }
                }
                replies.join().expect("replies");
            })
        })
        .collect();
    let failed = threads.into_iter().map(|t| t.join()).filter(Result::is_err).count();
    assert_eq!(failed, 0, "clients failed:\n{}", serve.log());
    assert_eq!(serve.driver_pid(), driver, "the driver was not restarted:\n{}", serve.log());
    let rss = peak_rss_kib(driver);
    eprintln!("driver peak RSS {rss} KiB under 64 flooding connections");
    assert!(rss < RSS_BOUND_KIB, "peak RSS {rss} KiB");
    assert!(serve.stop().success());
}

/// 64 sockets that connect and never speak once locked every other client out (the 65th
/// was closed before the greeting). Now silent handshakes are dropped after
/// `handshake_timeout`, and the 65th client waits in the backlog and is then served.
#[test]
fn silent_sockets_time_out_and_extra_clients_wait() {
    let dir = Scratch::new("hostile-silent");
    let serve = Serve::start(&dir, "[server]\nhandshake_timeout = \"2s\"\n", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let silent: Vec<UnixStream> = (0..64).map(|_| UnixStream::connect(&serve.socket).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let client = session::Client::connect(&serve.socket, "").expect("the 65th client is served, not closed");
    client.write(0, &[7u8; 4096], true).expect("write");
    assert_eq!(client.read(0, 4096).expect("read"), vec![7u8; 4096]);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(1), "it had to wait for a slot ({waited:?})");
    assert!(waited < Duration::from_secs(20), "waited {waited:?}");
    // The silent ones were closed: after the greeting, end of stream.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf).expect("closed by the driver");
        assert_eq!(n, 18, "the greeting, then the end");
    }
    drop(client);
    assert!(serve.stop().success());
}

/// Connections that finished the handshake and went quiet keep their slot while nobody
/// waits (an idle VM disk must not lose its connection); while other clients wait for a
/// slot they are closed after `idle_timeout`.
#[test]
fn idle_connections_give_way_only_when_others_wait() {
    let dir = Scratch::new("hostile-idle");
    let serve = Serve::start(&dir, "[server]\nmax_connections = 2\nidle_timeout = \"1s\"\n", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let a = session::Client::connect(&serve.socket, "").expect("a");
    let b = session::Client::connect(&serve.socket, "").expect("b");
    std::thread::sleep(Duration::from_secs(2));
    a.write(0, &[1u8; 4096], false).expect("idle but not crowded: still served");
    let c = session::Client::connect(&serve.socket, "").expect("c waits, then is served");
    c.write(4096, &[2u8; 4096], false).expect("write");
    assert!(serve.log().contains("all connection slots taken"), "c had to wait:\n{}", serve.log());
    assert!(b.read(0, 4096).is_err(), "b was idle while c waited: closed");
    a.write(0, &[1u8; 4096], false).expect("a had just been active: kept");
    drop((a, b, c));
    assert!(serve.stop().success());
}

/// A light client's 4 KiB FUA writes beside clients that flood 1 MiB writes and huge trims:
/// once they waited 7–14 s behind one shared queue. Connections now take turns, so each
/// light write waits for about one batch. (The latency target itself is measured by
/// `scripts/bench.sh`, not asserted here: the machines are noisy.)
#[test]
fn a_light_client_is_served_beside_a_flood() {
    let dir = Scratch::new("hostile-fair");
    let serve = Serve::start_sized(&dir, "1G", "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let floods: Vec<_> = (0..3u64)
        .map(|c| {
            let (socket, stop, flooded) = (serve.socket.clone(), stop.clone(), flooded.clone());
            std::thread::spawn(move || {
                let mut raw = Raw::connect(&socket);
                let mut reader = Raw { stream: raw.stream.try_clone().expect("clone") };
                let sent = Arc::new(AtomicU64::new(0));
                let done = Arc::new(AtomicBool::new(false));
                let (r_sent, r_done, r_flooded) = (sent.clone(), done.clone(), flooded.clone());
                let replies = std::thread::spawn(move || {
                    let mut got = 0;
                    let mut data = Vec::new();
                    while !(r_done.load(Ordering::SeqCst) && got == r_sent.load(Ordering::SeqCst)) {
                        if got < r_sent.load(Ordering::SeqCst) {
                            assert_eq!(reader.reply(0, &mut data).0, 0);
                            got += 1;
                            r_flooded.fetch_add(1, Ordering::Relaxed);
                        } else {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                });
                let payload = vec![c as u8; 1 << 20];
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let offset = (i * 7 + c * 100) % 900 * MIB;
                    sent.fetch_add(1, Ordering::SeqCst);
                    if c == 2 {
                        raw.send(TRIM, 0, i, 0, 512 << 20, &[]);
                    } else {
                        raw.send(WRITE, 0, i, offset, 1 << 20, &payload);
                    }
                    i += 1;
                }
                done.store(true, Ordering::SeqCst);
                replies.join().expect("replies");
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let light = session::Client::connect(&serve.socket, "").expect("light client");
    let mut latencies = Vec::new();
    for i in 0..100u64 {
        let t = Instant::now();
        light.write((950 << 20) + i * 4096, &[9u8; 4096], true).expect("light write");
        latencies.push(t.elapsed());
    }
    stop.store(true, Ordering::SeqCst);
    for f in floods {
        f.join().expect("flood");
    }
    latencies.sort();
    let (p50, p99, max) = (latencies[50], latencies[98], latencies[99]);
    eprintln!(
        "light 4K FUA writes beside {} flood requests: p50 {p50:?} p99 {p99:?} max {max:?}",
        flooded.load(Ordering::Relaxed)
    );
    assert!(max < Duration::from_secs(2), "a light write waited {max:?} behind the flood");
    assert!(serve.stop().success());
}

/// A mixed storm — write floods, huge trims and zeroing, reads whose replies are never read,
/// connections opened and dropped — once starved the heartbeat for 5.8 s, and the supervisor
/// killed a driver that was working. The beat now comes from its own thread and follows the
/// node's and applier's progress, not request load: under a heartbeat timeout of 2 s (a
/// fraction of the default 5 s) the storm never costs the driver its life.
#[test]
fn a_storm_does_not_starve_the_heartbeat() {
    let dir = Scratch::new("hostile-storm");
    let config = "[supervisor]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"2s\"\n";
    let serve = Serve::start_sized(&dir, "1G", config, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let driver = serve.driver_pid();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients: Vec<std::thread::JoinHandle<()>> = (0..12u64)
        .map(|c| {
            let (socket, stop) = (serve.socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut raw = Raw::connect(&socket);
                let mut reader = Raw { stream: raw.stream.try_clone().expect("clone") };
                // A sender blocked by backpressure must still see `stop`.
                raw.stream.set_write_timeout(Some(Duration::from_millis(500))).expect("timeout");
                // Big reads whose replies are never read (they fill the socket and their
                // connection's budget); the other connections read every reply.
                let silent_reads = c % 4 == 3;
                let replies = std::thread::spawn(move || {
                    let mut data = Vec::new();
                    if silent_reads {
                        return;
                    }
                    while let Ok((error, _)) = reader.try_reply_by(|_| 0, &mut data) {
                        assert_eq!(error, 0);
                    }
                });
                let payload = vec![c as u8; 1 << 20];
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let offset = (i * 7 + c * 61) % 960 * MIB;
                    let (command, flags, from, length) = match c % 4 {
                        0 | 1 => (WRITE, 0, offset, 1 << 20),
                        2 if i.is_multiple_of(2) => (TRIM, 0, 0, 960 << 20),
                        2 => (WRITE_ZEROES, FLAG_NO_HOLE, offset % (704 * MIB), 256 << 20),
                        _ => (READ, 0, offset, 32 << 20),
                    };
                    let data: &[u8] = if command == WRITE { &payload } else { &[] };
                    let header = request(command, flags, i, from, length);
                    if !(write_unless(&mut raw.stream, &header, &stop) && write_unless(&mut raw.stream, data, &stop)) {
                        break;
                    }
                    i += 1;
                }
                let _ = raw.stream.shutdown(std::net::Shutdown::Both);
                let _ = replies.join();
            })
        })
        .collect();
    // Connections that come and go, some in the middle of their handshake.
    let (socket, churn_stop) = (serve.socket.clone(), stop.clone());
    clients.push(std::thread::spawn(move || {
        while !churn_stop.load(Ordering::SeqCst) {
            if let Ok(mut s) = UnixStream::connect(&socket) {
                let _ = s.write_all(b"NBDMAGIC");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            serve.try_driver_pid(),
            Some(driver),
            "the driver was replaced during the storm:\n{}",
            serve.log_tail()
        );
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("storm client");
    }
    // Still the same incarnation, and it serves (past the storm's range: requests the driver
    // took before the storm's sockets closed may still be applied).
    let client = session::Client::connect(&serve.socket, "").expect("client after the storm");
    client.write(1000 * MIB, &[7u8; 4096], true).expect("write after the storm");
    assert!(client.read(1000 * MIB, 4096).expect("read after the storm") == vec![7u8; 4096]);
    drop(client);
    let log = serve.log();
    assert!(!log.contains("no heartbeat"), "{log}");
    assert_eq!(serve.driver_pid(), driver, "{log}");
    assert!(serve.stop().success());
}

/// The driver SIGKILLed 20 times within 10 s under the default configuration, while a
/// client writes and reads: the supervisor restarts every incarnation (each had recovered and
/// served) instead of giving up after five, and the reconnecting client completes every
/// request with nothing lost.
#[test]
fn twenty_kills_in_ten_seconds_do_not_end_the_service() {
    let dir = Scratch::new("hostile-kills");
    let mut serve = Serve::start(&dir, "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let stop = Arc::new(AtomicBool::new(false));
    let socket = serve.socket.clone();
    let writer_stop = stop.clone();
    let writer = std::thread::spawn(move || {
        let options = session::Options::reconnecting();
        let client = session::Client::connect_with(&socket, "", &options).expect("client");
        let mut written = 0u64;
        while !writer_stop.load(Ordering::SeqCst) || written < 200 {
            let block = written % 4096;
            let stamp = [(written % 251) as u8 + 1; 4096];
            client.write(block * 4096, &stamp, written.is_multiple_of(3)).expect("write completes through kills");
            assert_eq!(client.read(block * 4096, 4096).expect("read"), stamp.to_vec(), "block {block}");
            written += 1;
        }
        (client, written)
    });
    let mut kills = 0;
    let started = Instant::now();
    while kills < 20 {
        std::thread::sleep(Duration::from_millis(450));
        if kill(Pid::from_raw(serve.driver_pid()), Signal::SIGKILL).is_ok() {
            kills += 1;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(12), "20 kills took {:?}", started.elapsed());
    stop.store(true, Ordering::SeqCst);
    let (client, written) = writer.join().expect("the client completed every request");
    // Everything acknowledged reads back after the last restart.
    for block in 0..written.min(4096) {
        let last = block + (written - 1 - block) / 4096 * 4096;
        assert_eq!(client.read(block * 4096, 4096).expect("read")[0], (last % 251) as u8 + 1, "block {block}");
    }
    drop(client);
    let log = serve.log();
    assert!(!log.contains("giving up"), "{log}");
    assert!(serve.child.try_wait().expect("wait").is_none(), "the supervisor is still serving");
    assert!(serve.stop().success());
}

/// A client that never learned the block sizes (NBD_OPT_EXPORT_NAME) may read and write
/// single bytes; the spec says a server SHOULD accept them (proto.md "Size constraints").
#[test]
fn one_byte_io_without_negotiated_block_sizes() {
    let dir = Scratch::new("hostile-bytes");
    let serve = Serve::start(&dir, "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let mut raw = Raw::connect(&serve.socket);
    let mut data = Vec::new();
    raw.send(WRITE, FLAG_FUA, 1, 4097, 1, &[0xab]);
    assert_eq!(raw.reply(0, &mut data), (0, 1));
    raw.send(WRITE, 0, 2, 8190, 3, &[1, 2, 3]);
    assert_eq!(raw.reply(0, &mut data), (0, 2), "a write across a block boundary");
    raw.send(READ, 0, 3, 4097, 1, &[]);
    assert_eq!(raw.reply(1, &mut data), (0, 3));
    assert_eq!(data, [0xab]);
    raw.send(READ, 0, 4, 4096, 512, &[]);
    raw.reply(512, &mut data);
    assert_eq!(&data[..3], &[0, 0xab, 0]);
    raw.send(READ, 0, 5, 8189, 5, &[]);
    raw.reply(5, &mut data);
    assert_eq!(data, [0, 1, 2, 3, 0]);
    raw.send(TRIM, 0, 6, 8191, 1, &[]);
    assert_eq!(raw.reply(0, &mut data), (0, 6));
    raw.send(READ, 0, 7, 8190, 3, &[]);
    raw.reply(3, &mut data);
    assert_eq!(data, [1, 0, 3]);
    drop(raw);
    assert!(serve.stop().success());
}

/// Finding 3 as it was found: ext4 on qemu-storage-daemon's NBD client (reconnect-delay=60),
/// exported as a file through FUSE and loop-mounted, while the driver is SIGKILLed ten times
/// at 0.1–0.9 s intervals under the default configuration. The supervisor once gave up after
/// the sixth death, and the filesystem got I/O errors and could not be mounted again. Now
/// every file reads back as written, e2fsck finds nothing, and the service is still up.
#[test]
fn ext4_on_qemu_storage_daemon_survives_ten_kills() {
    if !(common::have("qemu-storage-daemon") && common::have("mkfs.ext4") && common::have("e2fsck")) {
        return;
    }
    let required = std::env::var_os("RBLK_REQUIRE_LOOP").is_some();
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        assert!(!required, "root and /dev/fuse are required to loop-mount the FUSE export");
        eprintln!("skipped: needs root (mount) and /dev/fuse (qemu-storage-daemon's FUSE export)");
        return;
    }
    let dir = Scratch::new("hostile-ext4");
    let mut serve = Serve::start_sized(&dir, "256M", "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let export = dir.path("export.raw");
    let mnt = dir.path("mnt");
    std::fs::write(&export, b"").expect("export file");
    std::fs::create_dir(&mnt).expect("mount point");
    let qsd = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=nbd,node-name=rblk,server.type=unix,server.path={},reconnect-delay=60",
            serve.socket.display()
        ))
        .arg("--export")
        .arg(format!("type=fuse,id=fuse,node-name=rblk,mountpoint={},writable=on", export.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path("qsd.log")).expect("qsd log"))
        .spawn()
        .expect("qemu-storage-daemon");
    // Unmounts and stops the daemon however the test ends.
    let guard = Mounted { qsd, mnt: mnt.clone(), export: export.clone() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&export).map_or(0, |m| m.len()) != 256 * MIB {
        assert!(Instant::now() < deadline, "the FUSE export did not appear");
        std::thread::sleep(Duration::from_millis(50));
    }
    sh(&format!("mkfs.ext4 -q -F {}", export.display()));
    sh(&format!("mount -o loop {} {}", export.display(), mnt.display()));

    let seed = std::env::var("RBLK_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(11u64);
    eprintln!("kill schedule seed {seed} (replay with RBLK_KILL_SEED={seed})");
    let killer = {
        let supervisor = serve.child.id();
        std::thread::spawn(move || {
            let mut state = seed;
            let mut kills = 0;
            while kills < 10 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                std::thread::sleep(Duration::from_millis(100 + (state >> 33) % 800));
                let driver = std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                    .ok()
                    .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()));
                if let Some(pid) = driver {
                    if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                        kills += 1;
                    }
                }
            }
        })
    };
    // Files of seeded content written while the driver dies under them.
    let content = |i: u64| -> Vec<u8> {
        let mut state = seed ^ (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (0..MIB / 8)
            .flat_map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                state.to_le_bytes()
            })
            .collect()
    };
    // 64 names, rewritten in turn (the filesystem holds 230 MiB): each keeps its last version.
    let mut files = 0u64;
    while !killer.is_finished() || files < 20 {
        std::fs::write(mnt.join(format!("f{}", files % 64)), content(files)).expect("write a file through the kills");
        if files % 4 == 3 {
            sh("sync");
        }
        files += 1;
    }
    killer.join().expect("killer");
    sh("sync");
    sh(&format!("umount {}", mnt.display()));
    let fsck = std::process::Command::new("e2fsck").arg("-fn").arg(&export).output().expect("e2fsck");
    assert!(fsck.status.success(), "e2fsck:\n{}", String::from_utf8_lossy(&fsck.stdout));
    sh(&format!("mount -o loop {} {}", export.display(), mnt.display()));
    for i in files.saturating_sub(64)..files {
        let name = format!("f{}", i % 64);
        assert!(std::fs::read(mnt.join(&name)).expect("read") == content(i), "file {name} (version {i}) differs");
    }
    drop(guard);
    let log = serve.log();
    assert!(!log.contains("giving up"), "{log}");
    assert!(serve.child.try_wait().expect("wait").is_none(), "the supervisor is still serving");
    // Ten kills, and after the last one (which may have come moments ago, and some may have
    // landed in a recovery) the driver is ready again.
    assert!(log.matches("driver died").count() >= 10, "ten kills:\n{}", serve.log_tail());
    let served_and_died = log.matches("was_ready: true").count();
    serve.wait_for("driver ready", served_and_died + 1, Duration::from_secs(30));
    assert!(serve.stop().success());
    eprintln!("{files} files of 1 MiB written through 10 kills; e2fsck clean; the last 64 verified");
}

/// Runs a shell command and insists that it succeeds.
fn sh(command: &str) {
    let out = std::process::Command::new("sh").arg("-c").arg(command).output().expect("sh");
    assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The loop mount on qemu-storage-daemon's FUSE export, and the daemon.
struct Mounted {
    qsd: std::process::Child,
    mnt: std::path::PathBuf,
    export: std::path::PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).output();
        let _ = kill(Pid::from_raw(self.qsd.id() as i32), Signal::SIGTERM);
        let _ = self.qsd.wait();
        // The FUSE mount goes with the daemon; a lazy unmount in case it did not.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.export).output();
    }
}

/// A data block damaged in the image under a running driver (here through the page cache, as
/// bit rot or a stray writer would): reads of it get EIO, never the damaged bytes, also when
/// it is one of many cached reads answered together (their blocks are checked side by side
/// just before the batch is sent), and every other read in the batch gets its data. The
/// driver serves on, without a restart.
#[test]
fn a_damaged_block_fails_only_its_reads() {
    use std::os::unix::fs::FileExt;
    const BLOCKS: u64 = 64;
    const DAMAGED: u64 = 17;
    let dir = Scratch::new("hostile-damage");
    let serve = Serve::start(&dir, "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let driver = serve.driver_pid();
    let block = |i: u64| -> Vec<u8> { (0..4096u64).map(|j| (i * 131 + j * 7 + j / 256) as u8 ^ 0x5a).collect() };
    let mut raw = Raw::connect(&serve.socket);
    let mut data = Vec::new();
    for i in 0..BLOCKS {
        raw.send(WRITE, FLAG_FUA, i, i * 4096, 4096, &block(i));
        assert_eq!(raw.reply(0, &mut data), (0, i));
    }
    // Every copy of the block in the image (its data block, and its log record's payload),
    // one byte flipped, with buffered writes: what the driver reads from the page cache.
    let image = std::fs::OpenOptions::new().read(true).write(true).open(dir.path("v.img")).expect("image");
    let (want, size) = (block(DAMAGED), image.metadata().expect("size").len());
    let mut buf = vec![0u8; 4096];
    let mut damaged = 0;
    for at in (0..size).step_by(4096) {
        image.read_exact_at(&mut buf, at).expect("read the image");
        if buf == want {
            image.write_all_at(&[buf[100] ^ 0x01], at + 100).expect("damage");
            damaged += 1;
        }
    }
    assert!(damaged >= 1, "the block's data was not found in the image");
    for round in 0..3 {
        // All the reads in one send: they arrive together and are answered as one batch.
        let mut reqs = Vec::new();
        for i in 0..BLOCKS {
            reqs.extend(request(READ, 0, 1000 * round + i, i * 4096, 4096));
        }
        raw.stream.write_all(&reqs).expect("reads");
        let mut seen = vec![false; BLOCKS as usize];
        for _ in 0..BLOCKS {
            let (error, handle) = raw.reply_by(|h| if h % 1000 == DAMAGED { 0 } else { 4096 }, &mut data);
            let i = handle - 1000 * round;
            assert!(i < BLOCKS && !seen[i as usize], "round {round}: unexpected handle {handle}");
            seen[i as usize] = true;
            if i == DAMAGED {
                assert_eq!(error, 5, "round {round}: the damaged block's read gets EIO");
            } else {
                assert_eq!(error, 0, "round {round}: block {i} read");
                assert!(data == block(i), "round {round}: block {i} has its data");
            }
        }
    }
    // A long read over it fails whole; the driver still writes and reads.
    raw.send(READ, 0, 7000, 0, (BLOCKS * 4096) as u32, &[]);
    assert_eq!(raw.reply(0, &mut data), (5, 7000));
    // With structured replies (QEMU negotiates them), long reads are answered by the
    // connection's readers as one data chunk or, over holes, as data and hole chunks: over the
    // damaged block either way is an error, and the others read.
    if common::have("qemu-io") {
        let uri = format!("nbd+unix:///?socket={}", serve.socket.display());
        for over in ["read 0 256k", "read 64k 1M"] {
            let (_, text) = common::qemu_io_output(&uri, &[over]);
            assert!(text.contains("read failed: Input/output error"), "{over}:\n{text}");
        }
        for clean in ["read 128k 128k", "read -P 0 1M 1M", "read 192k 1M"] {
            assert!(common::qemu_io(&uri, &[clean]).contains("read "), "{clean}");
        }
    }
    raw.send(WRITE, FLAG_FUA, 7001, DAMAGED * 4096, 4096, &block(1000));
    assert_eq!(raw.reply(0, &mut data), (0, 7001));
    raw.send(READ, 0, 7002, DAMAGED * 4096, 4096, &[]);
    assert_eq!(raw.reply(4096, &mut data), (0, 7002));
    assert!(data == block(1000), "the block rewritten reads back");
    assert_eq!(serve.driver_pid(), driver, "no restart");
    drop(raw);
    assert!(serve.stop().success());
}
