//! Real NBD clients against `rblk serve`: qemu-io, qemu-img, nbdinfo, nbdcopy, fio's nbd
//! engine, a filesystem through nbdfuse, clean and hard restarts, and every kind of bad input
//! on a raw socket.
//!
//! The external tools come from Debian packages (qemu-utils, libnbd-bin, nbdfuse, fio) that
//! `scripts/test.sh` installs. It sets `RBLK_REQUIRE_CLIENTS=1`, and then a missing tool fails
//! the test; without it a missing tool skips that test with a message.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{have, Scratch, MIB};

/// A running `rblk serve`.
struct Server {
    child: Option<Child>,
    socket: PathBuf,
    stderr: PathBuf,
    /// Where this server's part of the shared log file starts.
    log_from: usize,
}

impl Server {
    fn start(dir: &Scratch, extra: &[&str]) -> Server {
        let socket = dir.path("s.sock");
        let stderr = dir.path("serve.log");
        let log_from = std::fs::read(&stderr).map_or(0, |b| b.len());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&stderr).expect("log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_rblk"))
            .arg("serve")
            .arg(dir.path("v.img"))
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env("RBLK_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start rblk serve");
        // The URI line means the socket is bound.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("uri");
        assert!(line.starts_with("nbd+unix:///?socket="), "serve printed {line:?}");
        let server = Server { child: Some(child), socket, stderr, log_from };
        // Recovered and elected: the node logs "serving".
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.log().contains("serving") {
            assert!(Instant::now() < deadline, "rblk serve did not start serving:\n{}", server.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// What this server logged so far.
    fn log(&self) -> String {
        let all = std::fs::read(&self.stderr).unwrap_or_default();
        String::from_utf8_lossy(&all[self.log_from.min(all.len())..]).into_owned()
    }

    /// SIGTERM: the server checkpoints and exits 0.
    fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        let status = child.wait().expect("wait");
        assert!(status.success(), "rblk serve exited with {status} after SIGTERM:\n{}", self.log());
    }

    /// SIGKILL: nothing runs on the way down.
    fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn format(dir: &Scratch, size: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .args(["format"])
        .arg(dir.path("v.img"))
        .args(["--size", size, "--log-size", "32M"])
        .output()
        .expect("rblk format");
    assert!(out.status.success(), "format: {}", String::from_utf8_lossy(&out.stderr));
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let text = run(&mut cmd);
    assert!(!text.contains("failed") && !text.contains("error"), "qemu-io reported a failure:\n{text}");
    text
}

/// Offsets and sizes from 512 B to 4 MiB, aligned and not, each with its own pattern.
fn patterns() -> Vec<(u64, u64, u8)> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for (i, size) in [512u64, 1024, 3584, 4096, 8192, 12288 + 512, 65536, 1 << 20, 4 << 20].iter().enumerate() {
        for (j, misalign) in [0u64, 512, 3072].into_iter().enumerate() {
            out.push((at + misalign, *size, 0x11 + (3 * i + j) as u8 * 7));
            at += (size + misalign).div_ceil(4096) * 4096 + 8192;
        }
    }
    out
}

#[test]
fn qemu_io_patterns_and_clean_restart() {
    if !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("qemu-io");
    format(&dir, "256M");
    let server = Server::start(&dir, &[]);
    let writes: Vec<String> = patterns().iter().map(|(o, s, p)| format!("write -P {p} {o} {s}")).collect();
    let reads: Vec<String> = patterns().iter().map(|(o, s, p)| format!("read -P {p} {o} {s}")).collect();
    qemu_io(&server.uri(), &writes);
    qemu_io(&server.uri(), &reads);
    // Write-zeroes and discard inside written data (sub-block and whole blocks), FUA writes.
    let z = 200 * MIB;
    qemu_io(&server.uri(), &[format!("write -P 7 {z} 65536"), format!("write -f -P 9 {} 4096", z + 65536)]);
    qemu_io(&server.uri(), &[format!("write -z {} 1024", z + 512), format!("discard {} 8192", z + 16384)]);
    let after = [
        format!("read -P 7 {z} 512"),
        format!("read -P 0 {} 1024", z + 512),
        format!("read -P 7 {} 14848", z + 1536),
        format!("read -P 0 {} 8192", z + 16384),
        format!("read -P 7 {} 40960", z + 24576),
        format!("read -P 9 {} 4096", z + 65536),
    ];
    qemu_io(&server.uri(), &after);
    server.stop();
    // inspect: three roots with their roles, nothing left to replay, the data mapped.
    let text = run(Command::new(env!("CARGO_BIN_EXE_rblk")).arg("inspect").arg(dir.path("v.img")).arg("--json"));
    let report: serde_json::Value = serde_json::from_str(&text).expect("inspect json");
    let roles: Vec<&str> =
        report["roots"].as_array().expect("roots").iter().filter_map(|r| r["role"].as_str()).collect();
    for role in ["current", "backup", "overwrite"] {
        assert_eq!(roles.iter().filter(|r| **r == role).count(), 1, "{role} in {roles:?}");
    }
    assert_eq!(report["log"]["to_replay"], 0, "{text}");
    assert!(report["block_map"]["entries"].as_u64().unwrap_or(0) > 1000, "{text}");
    assert!(report["current"]["used_blocks"].as_u64().unwrap_or(0) > 1000, "{text}");
    let text = run(Command::new(env!("CARGO_BIN_EXE_rblk")).arg("inspect").arg(dir.path("v.img")));
    assert!(text.contains("current") && text.contains("0 to replay"), "{text}");
    // A clean stop checkpointed: the next start replays nothing and reads the same data.
    let server = Server::start(&dir, &[]);
    let log = server.log();
    assert!(
        log.contains("volume recovered") && log.contains("replayed: 0"),
        "a clean stop must leave nothing to replay:\n{log}"
    );
    qemu_io(&server.uri(), &reads);
    qemu_io(&server.uri(), &after);
    server.stop();
}

#[test]
fn qemu_img_convert_and_nbdcopy_round_trip() {
    if !have("qemu-img") {
        return;
    }
    let dir = Scratch::new("convert");
    format(&dir, "128M");
    let server = Server::start(&dir, &[]);
    let src = dir.path("random.raw");
    let mut data = vec![0u8; (64 * MIB) as usize];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&src, &data).expect("write source");
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(server.uri()));
    let back = dir.path("back.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(server.uri()).arg(&back));
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(got.len() as u64, 128 * MIB);
    assert!(got[..data.len()] == data[..], "qemu-img round trip differs");
    assert!(got[data.len()..].iter().all(|&b| b == 0), "beyond the copy reads zeros");
    if have("nbdcopy") {
        // Into the second half, then the whole export out again.
        let half = dir.path("half.raw");
        std::fs::write(&half, &data[..(32 * MIB) as usize]).expect("write half");
        run(Command::new("nbdcopy").arg(&half).arg(server.uri()));
        let out = dir.path("nbdcopy.raw");
        run(Command::new("nbdcopy").arg(server.uri()).arg(&out));
        let got = std::fs::read(&out).expect("read nbdcopy");
        assert!(got[..(64 * MIB) as usize] == data[..], "nbdcopy round trip differs");
    }
    server.stop();
}

#[test]
fn nbdinfo_shows_size_block_sizes_and_flags() {
    if !have("nbdinfo") {
        return;
    }
    let dir = Scratch::new("nbdinfo");
    format(&dir, "64M");
    let server = Server::start(&dir, &[]);
    let text = run(Command::new("nbdinfo").arg("--json").arg(server.uri()));
    let info: serde_json::Value = serde_json::from_str(&text).expect("nbdinfo json");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 64 * MIB, "{text}");
    assert_eq!(export["block_size_minimum"], 512);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(export[flag], true, "{flag}: {text}");
    }
    assert_eq!(export["is_read_only"], false);
    server.stop();
}

#[test]
fn fio_random_writes_verify() {
    if !have("fio") {
        return;
    }
    let dir = Scratch::new("fio");
    format(&dir, "128M");
    let server = Server::start(&dir, &[]);
    // fio leaves a verify state file (local-verify-0-verify.state) in its working directory:
    // that is the scratch directory, not the source tree.
    let text = run(Command::new("fio").current_dir(&dir.0).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--size=48M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let json = &text[text.find('{').expect("fio json")..];
    let report: serde_json::Value = serde_json::from_str(json).expect("fio json");
    assert_eq!(report["jobs"][0]["error"], 0, "{text}");
    assert!(report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0) >= 48 * MIB);
    server.stop();
}

#[test]
fn ext4_on_the_export_is_clean() {
    if !(have("nbdfuse") && have("mkfs.ext4") && have("e2fsck")) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: /dev/fuse is missing, so nbdfuse cannot expose the export as a file");
        return;
    }
    let dir = Scratch::new("ext4");
    format(&dir, "256M");
    let server = Server::start(&dir, &[]);
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).expect("mountpoint");
    let pidfile = dir.path("nbdfuse.pid");
    let mut fuse = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(mnt.join("disk"))
        .arg("--unix")
        .arg(&server.socket)
        .spawn()
        .expect("nbdfuse");
    let disk = mnt.join("disk");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) != 256 * MIB {
        assert!(Instant::now() < deadline, "nbdfuse did not expose the export");
        std::thread::sleep(Duration::from_millis(100));
    }
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk));
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&disk));
    let _ = kill(Pid::from_raw(fuse.id() as i32), Signal::SIGTERM);
    let _ = fuse.wait();
    let _ = Command::new("umount").arg(&mnt).stderr(Stdio::null()).status();
    server.stop();
}

/// SIGKILL in the middle of a stream of writes: after a restart, every write qemu-io
/// reported done reads back.
#[test]
fn kill_during_writes_loses_nothing_acknowledged() {
    if !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("kill");
    format(&dir, "128M");
    let server = Server::start(&dir, &[]);
    let writes: Vec<String> = (0..400u64).map(|i| format!("write -P {} {} 65536", i % 250 + 1, i * 65536)).collect();
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &server.uri()]);
    for w in &writes {
        cmd.arg("-c").arg(w);
    }
    let mut io = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("qemu-io");
    let mut out = BufReader::new(io.stdout.take().expect("stdout"));
    let mut done: Vec<u64> = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).expect("read") > 0 {
        if let Some(rest) = line.strip_prefix("wrote 65536/65536 bytes at offset ") {
            done.push(rest.trim().parse().expect("offset"));
            if done.len() == 60 {
                break;
            }
        }
        line.clear();
    }
    server.kill();
    let _ = io.kill();
    let _ = io.wait();
    assert!(done.len() >= 60, "qemu-io wrote only {} before the kill", done.len());
    let server = Server::start(&dir, &[]);
    let reads: Vec<String> = done.iter().map(|o| format!("read -P {} {} 65536", (o / 65536) % 250 + 1, o)).collect();
    qemu_io(&server.uri(), &reads);
    server.stop();
}

// Raw-socket bad input. NBD proto.md: "Transmission" and "Error values".

fn hello(stream: &mut UnixStream) {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&1u32.to_be_bytes()).expect("client flags"); // FIXED_NEWSTYLE
                                                                  // NBD_OPT_EXPORT_NAME "" (the simplest path to transmission)
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    stream.write_all(&opt).expect("option");
    let mut reply = [0u8; 8 + 2 + 124];
    stream.read_exact(&mut reply).expect("export reply");
}

fn request(kind: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&length.to_be_bytes());
    r
}

fn reply_error(stream: &mut UnixStream, handle: u64) -> u32 {
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().expect("8")), handle);
    u32::from_be_bytes(reply[4..8].try_into().expect("4"))
}

fn connect(server: &Server) -> UnixStream {
    let s = UnixStream::connect(&server.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// The connection is closed by the server (EOF), not left hanging.
fn closed(stream: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf), Ok(0) | Err(_))
}

#[test]
fn bad_input_gets_errors_or_a_dropped_connection_and_others_are_unaffected() {
    let dir = Scratch::new("bad-input");
    format(&dir, "16M");
    let server = Server::start(&dir, &[]);
    let client = session::Client::connect(&server.socket, "").expect("client");
    client.write(0, &[0x5Au8; 8192], false).expect("write");
    let size = 16 * MIB;
    // Garbage instead of a handshake reply, and a wrong option magic.
    for garbage in
        [&b"hello there, this is not NBD at all"[..], &[0u8; 40][..], b"\x00\x00\x00\x01BADMAGIC\x00\x00\x00\x01"]
    {
        let mut s = connect(&server);
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).expect("greeting");
        let _ = s.write_all(garbage);
        assert!(closed(&mut s), "garbage in the handshake must drop the connection");
    }
    // Transmission errors that keep the connection: the spec names an errno for each. This
    // client entered with NBD_OPT_EXPORT_NAME and never learned the block sizes, so a
    // misaligned request is not an error for it (the server SHOULD accept any alignment,
    // proto.md "Size constraints": `hostile.rs` tests 1-byte I/O; `session`'s check_request
    // tests refuse misaligned requests from clients that did learn them).
    let mut s = connect(&server);
    hello(&mut s);
    let cases: Vec<(Vec<u8>, u32, &str)> = vec![
        (request(0, 0, 1, size, 4096), 22, "read past the end: EINVAL"),
        (request(0, 0, 3, 0, 0), 22, "zero length: EINVAL"),
        (request(0, 0, 4, 0, 64 << 20), 22, "read above the maximum: EINVAL"),
        (request(4, 0, 5, size - 4096, 8192), 22, "trim past the end: EINVAL"),
        (request(6, 0, 6, size, 4096), 28, "write-zeroes past the end: ENOSPC"),
        (request(99, 0, 7, 0, 4096), 22, "unknown command: EINVAL"),
        (request(0, 0x8000, 8, 0, 4096), 22, "unknown flag: EINVAL"),
    ];
    for (bytes, want, what) in cases {
        s.write_all(&bytes).expect("send");
        let handle = u64::from_be_bytes(bytes[8..16].try_into().expect("8"));
        assert_eq!(reply_error(&mut s, handle), want, "{what}");
    }
    // A write past the end carries its payload: ENOSPC, and the stream stays in step.
    let mut w = request(1, 0, 9, size, 4096);
    w.extend_from_slice(&[1u8; 4096]);
    s.write_all(&w).expect("send");
    assert_eq!(reply_error(&mut s, 9), 28, "write past the end: ENOSPC");
    s.write_all(&request(3, 0, 10, 0, 0)).expect("flush");
    assert_eq!(reply_error(&mut s, 10), 0, "the connection still works");
    // A wrong request magic cannot be resynchronised: dropped.
    let mut bad = request(0, 0, 11, 0, 4096);
    bad[0] = 0xFF;
    s.write_all(&bad).expect("send");
    assert!(closed(&mut s), "a wrong request magic must drop the connection");
    // A client vanishing in the middle of a write payload.
    let mut s = connect(&server);
    hello(&mut s);
    let mut w = request(1, 0, 12, 0, 65536);
    w.extend_from_slice(&[7u8; 1000]);
    s.write_all(&w).expect("send");
    drop(s);
    // An over-long write payload (beyond what the server accepts at all): dropped.
    let mut s = connect(&server);
    hello(&mut s);
    let _ = s.write_all(&request(1, 0, 13, 0, u32::MAX));
    assert!(closed(&mut s), "an impossible payload length must drop the connection");
    // Nothing of this reached the volume, and a fresh client works.
    std::thread::sleep(Duration::from_millis(200));
    let fresh = session::Client::connect(&server.socket, "rblk").expect("fresh client");
    assert_eq!(fresh.read(0, 8192).expect("read"), vec![0x5Au8; 8192], "data intact");
    fresh.write(65536, &[3u8; 4096], true).expect("write");
    assert_eq!(client.read(65536, 4096).expect("read"), vec![3u8; 4096], "the first client still works");
    drop(client);
    drop(fresh);
    server.stop();
}

/// `[server] read_only = true` in the file, or `--read-only` on the command line: writes get
/// EPERM, reads work.
#[test]
fn read_only_export_refuses_writes() {
    for by_flag in [false, true] {
        let dir = Scratch::new(if by_flag { "read-only-flag" } else { "read-only" });
        format(&dir, "16M");
        let server = if by_flag {
            Server::start(&dir, &["--read-only"])
        } else {
            std::fs::write(dir.path("ro.toml"), "[server]\nread_only = true\n").expect("config");
            let config = dir.path("ro.toml");
            Server::start(&dir, &["--config", config.to_str().expect("utf-8")])
        };
        let mut s = connect(&server);
        hello(&mut s);
        let mut w = request(1, 0, 1, 0, 4096);
        w.extend_from_slice(&[1u8; 4096]);
        s.write_all(&w).expect("send");
        assert_eq!(reply_error(&mut s, 1), 1, "write on a read-only export: EPERM (by flag: {by_flag})");
        s.write_all(&request(0, 0, 2, 0, 4096)).expect("read");
        assert_eq!(reply_error(&mut s, 2), 0);
        server.stop();
    }
}

/// Many connections and many threads per connection, writes of every size in flight at once
/// (group commit, replies out of order): every acknowledged write reads back, also after a
/// SIGKILL and restart.
#[test]
fn concurrent_clients_see_every_acknowledged_write() {
    let dir = Scratch::new("concurrent");
    format(&dir, "64M");
    let server = Server::start(&dir, &[]);
    let region = 4 * MIB;
    let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let shared = std::sync::Arc::new(session::Client::connect(&server.socket, "").expect("client"));
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let shared = shared.clone();
                let socket = server.socket.clone();
                scope.spawn(move || {
                    // Half the threads share one connection, half have their own.
                    let own = (t % 2 == 1).then(|| session::Client::connect(&socket, "").expect("client"));
                    let client = own.as_ref().unwrap_or(&shared);
                    let base = t * region;
                    let mut model = vec![0u8; region as usize];
                    let mut x = t + 1;
                    let mut next = || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for i in 0..150u64 {
                        let sectors = 1 + next() % 128;
                        let len = sectors * 512;
                        let at = (next() % ((region - len) / 512)) * 512;
                        match next() % 8 {
                            0 => {
                                client.trim(base + at, len as u32).expect("trim");
                                model[at as usize..(at + len) as usize].fill(0);
                            }
                            1 => {
                                let got = client.read(base + at, len as u32).expect("read");
                                assert!(got[..] == model[at as usize..(at + len) as usize], "thread {t} step {i}");
                            }
                            _ => {
                                let data: Vec<u8> = (0..len).map(|k| (k as u8) ^ (i as u8) ^ (t as u8 * 31)).collect();
                                client.write(base + at, &data, i % 5 == 0).expect("write");
                                model[at as usize..(at + len) as usize].copy_from_slice(&data);
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    server.kill();
    let server = Server::start(&dir, &[]);
    let client = session::Client::connect(&server.socket, "").expect("client");
    for (t, model) in models.iter().enumerate() {
        let got = client.read(t as u64 * region, region as u32).expect("read");
        assert!(got == *model, "region {t} differs after a kill and restart");
    }
    drop(client);
    server.stop();
}

/// `rblk serve` without arguments: `./rblk.img` formatted with 1 GiB, `./rblk.sock`, and the
/// URI printed.
#[test]
fn serve_without_arguments_uses_the_defaults() {
    let dir = Scratch::new("defaults");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("serve")
        .current_dir(&dir.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("rblk serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("uri");
    let socket = std::fs::canonicalize(dir.path("rblk.sock")).expect("socket exists");
    assert_eq!(line.trim(), format!("nbd+unix:///?socket={}", socket.display()));
    let client = session::Client::connect(&socket, "").expect("client");
    assert_eq!(client.size(), 1 << 30);
    drop(client);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert!(child.wait().expect("wait").success());
    assert!(dir.path("rblk.img").exists() && !dir.path("rblk.sock").exists(), "image kept, socket removed");
}

/// A real block device (a loop device over a file): format, serve, write, restart, read.
/// Runs as root where loop devices work; `RBLK_REQUIRE_LOOP=1` makes it mandatory.
#[test]
fn block_device_volume() {
    let dir = Scratch::new("loop");
    let backing = dir.path("backing.raw");
    std::fs::File::create(&backing).and_then(|f| f.set_len(300 * MIB)).expect("backing file");
    let attached = Command::new("losetup").args(["--find", "--show"]).arg(&backing).output();
    let loopdev = match attached {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => {
            assert!(std::env::var_os("RBLK_REQUIRE_LOOP").is_none(), "a loop device is required but losetup failed");
            eprintln!("skipped: no loop device (needs root and losetup)");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(loopdev.clone());
    run(Command::new(env!("CARGO_BIN_EXE_rblk")).args(["format", &loopdev, "--size", "128M", "--log-size", "16M"]));
    let refused = Command::new(env!("CARGO_BIN_EXE_rblk")).args(["format", &loopdev, "--size", "128M"]).output();
    assert!(!refused.expect("rblk format").status.success(), "formatting over a volume needs --force");
    let start = |dir: &Scratch| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rblk"))
            .args(["serve", &loopdev, "--socket"])
            .arg(dir.path("loop.sock"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("rblk serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("uri");
        child
    };
    let stop = |mut child: Child| {
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        assert!(child.wait().expect("wait").success());
    };
    let child = start(&dir);
    let client = session::Client::connect(&dir.path("loop.sock"), "").expect("client");
    assert_eq!(client.size(), 128 * MIB);
    let data: Vec<u8> = (0..(3 * MIB)).map(|i| (i % 251) as u8).collect();
    client.write(5 * MIB + 512, &data, false).expect("write");
    drop(client);
    stop(child);
    let child = start(&dir);
    let client = session::Client::connect(&dir.path("loop.sock"), "").expect("client");
    assert!(client.read(5 * MIB + 512, data.len() as u32).expect("read") == data);
    drop(client);
    stop(child);
}
