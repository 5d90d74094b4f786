//! What a build does and does not carry. A default build ignores `FAILPOINTS` (failpoints
//! exist only in a build with the `failpoints` feature, which `scripts/test.sh` makes for the
//! chaos tests and runs this file with too); the sandboxed driver polls with ppoll and stats
//! with newfstatat/statx only, the calls that exist on aarch64 as on x86_64 (traced with
//! strace).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{have, Scratch, Serve};

/// A failpoint that would kill the driver at its first log append.
const CRASH_AT_FIRST_APPEND: &str = "log::after_append=return";

/// The default build: FAILPOINTS is ignored, said once in the log, and writes are served by
/// the same incarnation.
#[cfg(not(feature = "failpoints"))]
#[test]
fn a_default_build_ignores_failpoints() {
    let dir = Scratch::new("no-failpoints");
    let serve = Serve::start(&dir, "", &[("FAILPOINTS", CRASH_AT_FIRST_APPEND)]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let pid = serve.driver_pid();
    let client = session::Client::connect(&serve.socket, "").expect("client");
    let mib = common::MIB;
    let data = vec![0x5au8; mib as usize];
    for i in 0..8 {
        client.write(i * mib, &data, i % 2 == 0).expect("write");
    }
    client.flush().expect("flush");
    assert_eq!(client.read(3 * mib, mib as u32).expect("read"), data);
    drop(client);
    assert_eq!(serve.driver_pid(), pid, "the driver was restarted:\n{}", serve.log_tail());
    let log = serve.log();
    assert!(log.contains("FAILPOINTS ignored"), "{log}");
    assert!(!log.contains("dying here") && !log.contains("driver died"), "{log}");
    assert!(serve.stop().success());
}

/// The same run with a failpoints build: the driver dies at the failpoint (what the test
/// above would see if the default build carried them).
#[cfg(feature = "failpoints")]
#[test]
fn a_failpoints_build_dies_at_the_failpoint() {
    let dir = Scratch::new("failpoints");
    let serve = Serve::start(&dir, "", &[("FAILPOINTS", CRASH_AT_FIRST_APPEND)]);
    serve.wait_for("failpoints armed", 1, Duration::from_secs(30));
    // The first write's append kills the driver; the supervisor restarts it, and it dies again.
    let client = session::Client::connect(&serve.socket, "");
    if let Ok(client) = client {
        let _ = client.write(0, &[1u8; 4096], true);
    }
    serve.wait_for("failpoint log::after_append: dying here", 1, Duration::from_secs(30));
    assert!(!serve.log().contains("FAILPOINTS ignored"));
    serve.kill_all();
}

/// `rblk chaos` with a scenario that sets failpoints and a driver without them says so and
/// fails at once, instead of waiting for failpoints that never fire.
#[cfg(not(feature = "failpoints"))]
#[test]
fn chaos_refuses_a_driver_without_failpoints() {
    let dir = Scratch::new("chaos-no-failpoints");
    let scenario = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/crash-loop.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("chaos")
        .arg(&scenario)
        .args(["--seed", "1", "--dir"])
        .arg(dir.path("run"))
        .env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver"))
        .output()
        .expect("rblk chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("was built without them") && stdout.contains("--features failpoints"), "{stdout}");
}

/// The syscalls of a serving driver, traced by strace attached to it: ppoll (the accept loop
/// checking for waiting clients with every slot taken), never poll or fstat, which aarch64
/// does not have and the sandbox does not allow.
#[test]
fn the_sandboxed_driver_makes_no_poll_or_fstat_calls() {
    if !have("strace") {
        return;
    }
    let dir = Scratch::new("strace");
    // One slot, so that a second client waits and the accept loop polls; small checkpoints,
    // so that the writes below run checkpoints too.
    let config = "[server]\nmax_connections = 1\n[checkpoint]\nlog_bytes = \"64K\"\n";
    let serve = Serve::start(&dir, config, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let driver = serve.driver_pid();
    let trace = dir.path("strace.txt");
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=poll,ppoll,fstat,newfstatat,statx,pwrite64,pwritev,io_uring_enter", "-o"])
        .arg(&trace)
        .args(["-p", &driver.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace");
    // Attached: the driver's TracerPid is strace.
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::status_field(driver, "TracerPid") == "0" {
        if Instant::now() > deadline || strace.try_wait().is_ok_and(|s| s.is_some()) {
            let _ = strace.kill();
            let out = strace.wait_with_output().expect("strace output");
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(!nix::unistd::Uid::effective().is_root(), "strace could not attach to the driver as root: {why}");
            eprintln!("skipped: strace cannot attach to the driver here (not root): {why}");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let client = session::Client::connect(&serve.socket, "").expect("client");
    let mut waiting = UnixStream::connect(&serve.socket).expect("second client");
    serve.wait_for("all connection slots taken", 1, Duration::from_secs(10));
    let data = vec![0xc3u8; 256 << 10];
    for i in 0..16 {
        client.write(i * (256 << 10), &data, false).expect("write");
    }
    client.flush().expect("flush");
    assert_eq!(client.read(0, 256 << 10).expect("read"), data);
    drop(client);
    let _ = waiting.write_all(b"x");
    drop(waiting);
    std::thread::sleep(Duration::from_millis(300));
    kill(Pid::from_raw(strace.id() as i32), Signal::SIGINT).expect("stop strace");
    let _ = strace.wait();
    let text = std::fs::read_to_string(&trace).expect("trace");
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        // `PID name(args...) = r`, or `PID <... name resumed>...`
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        let name = match rest.strip_prefix("<... ") {
            Some(resumed) => resumed.split(' ').next().unwrap_or(""),
            None => rest.split('(').next().unwrap_or(""),
        };
        names.insert(name.to_string());
    }
    assert!(names.contains("ppoll"), "the accept loop did not poll for waiting clients: {names:?}\n{text}");
    assert!(
        names.contains("pwrite64") || names.contains("pwritev") || names.contains("io_uring_enter"),
        "no write was traced: {names:?}"
    );
    for denied in ["poll", "fstat"] {
        assert!(!names.contains(denied), "the driver called {denied}:\n{text}");
    }
    assert!(serve.stop().success());
}
