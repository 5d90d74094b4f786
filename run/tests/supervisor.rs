//! The supervisor and the sandboxed driver: what the driver holds and who it runs as,
//! restarts after a kill (clients wait instead of failing), a hung driver killed and
//! restarted, and a crash loop given up cleanly.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{have, status_field, Scratch, Serve, MIB};

const QUICK: &str = "[supervisor]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"1s\"\nrestart_backoff = \"20ms\"\n";

/// The driver holds only what it was handed, runs unprivileged with no_new_privs and seccomp,
/// and cannot open a file.
#[test]
fn driver_is_sandboxed_and_holds_only_its_descriptors() {
    let dir = Scratch::new("sandbox");
    let probe = dir.path("probe.txt");
    std::fs::write(&probe, "secret").expect("probe");
    let serve = Serve::start(&dir, QUICK, &[("RBLK_DRIVER_OPEN_PROBE", probe.to_str().expect("utf-8"))]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let pid = serve.driver_pid();
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let root = nix::unistd::Uid::effective().is_root();
    let uids = status_field(pid, "Uid");
    if root {
        assert!(uids.split_whitespace().all(|u| u != "0"), "started as root, the driver must not keep uid 0: {uids}");
        assert_eq!(status_field(pid, "Groups"), "", "no supplementary groups");
    }
    let log = serve.log();
    assert!(log.contains("open probe: denied"), "opening a file inside the driver must fail:\n{log}");
    assert!(!log.contains("opened a file inside the sandbox"), "{log}");
    // Descriptors: stdin/stdout/stderr, the image (direct, and buffered for the page
    // cache), the listening socket, the heartbeat pipe; plus what the running driver made
    // itself: the image's io_uring (and accepted connections: none yet).
    let mut targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n: i32 = e.file_name().to_str()?.parse().ok()?;
            (n > 2).then(|| std::fs::read_link(e.path()).ok().map(|t| t.display().to_string())).flatten()
        })
        .collect();
    targets.sort();
    assert_eq!(targets.len(), 5, "{targets:?}");
    assert!(targets.iter().any(|t| t == "anon_inode:[io_uring]"), "{targets:?}");
    assert_eq!(targets.iter().filter(|t| t.ends_with("v.img")).count(), 2, "{targets:?}");
    assert!(targets.iter().any(|t| t.starts_with("socket:")), "{targets:?}");
    assert!(targets.iter().any(|t| t.starts_with("pipe:")), "{targets:?}");
    assert!(serve.stop().success());
}

/// A killed driver is restarted; a client connecting while it is down waits in the backlog
/// and then works, with every acknowledged write intact.
#[test]
fn killed_driver_is_restarted_and_clients_wait() {
    killed_and_restarted("restart", QUICK);
}

/// The same with the page cache off: data and tree blocks go out as O_DIRECT writes (batched
/// through io_uring), and the driver holds one image descriptor.
#[test]
fn killed_driver_is_restarted_without_the_page_cache() {
    killed_and_restarted("restart-direct", &format!("{QUICK}[cache]\npage_cache = false\n"));
}

fn killed_and_restarted(name: &str, config: &str) {
    let dir = Scratch::new(name);
    let serve = Serve::start(&dir, config, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let images = std::fs::read_dir(format!("/proc/{}/fd", serve.driver_pid()))
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.ends_with("v.img"))
        .count();
    assert_eq!(images, if config.contains("page_cache = false") { 1 } else { 2 }, "image descriptors");
    let client = session::Client::connect(&serve.socket, "").expect("client");
    let data = vec![0x42u8; MIB as usize];
    client.write(0, &data, false).expect("write");
    drop(client);
    for round in 0..3 {
        let pid = serve.driver_pid();
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the driver");
        // Connect as soon as the old driver is gone, while the new one recovers: the listening
        // socket stays with the supervisor, so the connection waits in its backlog.
        serve.wait_for("driver died", round as usize + 1, Duration::from_secs(10));
        let client = session::Client::connect(&serve.socket, "").expect("connect during the restart");
        assert_eq!(client.read(0, MIB as u32).expect("read"), data, "round {round}");
        client.write(MIB * (round + 1), &data, true).expect("write");
        drop(client);
    }
    serve.wait_for("driver died", 3, Duration::from_secs(10));
    let log = serve.log();
    assert!(log.contains("killed by signal 9"), "the cause is logged:\n{log}");
    assert!(log.contains("incarnation: 4"), "incarnations counted:\n{log}");
    assert!(log.matches("driver ready").count() >= 4, "recovery reported by every incarnation:\n{log}");
    assert!(serve.stop().success());
}

/// `--vhost-user PATH`: the supervisor binds the vhost-user-blk socket itself and holds it
/// like the NBD socket. Every incarnation is handed it (`--vhost-user-fd`), a front-end that
/// connects while the driver is dead waits in the backlog instead of being refused, and a
/// clean stop removes the file.
#[test]
fn the_vhost_user_socket_is_held_across_driver_kills() {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixStream;

    let dir = Scratch::new("vhost-held");
    let vhost = dir.path("vhost.sock");
    let args = [std::ffi::OsStr::new("--vhost-user"), vhost.as_os_str()];
    let serve = Serve::launch_with(&dir, &dir.path("v.img"), Some("64M"), QUICK, "serve", &args, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let kind = std::fs::symlink_metadata(&vhost).expect("the vhost-user socket exists").file_type();
    assert!(kind.is_socket(), "{} is not a socket", vhost.display());
    UnixStream::connect(&vhost).expect("connect before any kill");
    for round in 1..=3 {
        let pid = serve.driver_pid();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("--vhost-user-fd "), "incarnation {round} was not handed the socket: {cmdline}");
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the driver");
        // While the next incarnation recovers (or before it starts), the supervisor's socket
        // still takes connections into its backlog.
        serve.wait_for("driver died", round, Duration::from_secs(10));
        UnixStream::connect(&vhost).unwrap_or_else(|e| panic!("connect after kill {round}: {e}"));
        serve.wait_for("driver ready", round + 1, Duration::from_secs(30));
        UnixStream::connect(&vhost).unwrap_or_else(|e| panic!("connect after restart {round}: {e}"));
    }
    // The NBD socket serves beside it.
    let client = session::Client::connect(&serve.socket, "").expect("NBD client");
    client.write(0, &[7u8; 4096], true).expect("NBD write");
    assert_eq!(client.read(0, 4096).expect("NBD read"), vec![7u8; 4096]);
    drop(client);
    let socket = serve.socket.clone();
    assert!(serve.stop().success());
    assert!(!vhost.exists(), "the vhost-user socket is removed at a clean stop");
    assert!(!socket.exists(), "the NBD socket is removed at a clean stop");
}

/// A driver that stops beating (SIGSTOP: hung) is killed and replaced.
#[test]
fn hung_driver_is_killed_and_restarted() {
    let dir = Scratch::new("hung");
    let serve = Serve::start(&dir, QUICK, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let pid = serve.driver_pid();
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("stop the driver");
    serve.wait_for("no heartbeat", 1, Duration::from_secs(10));
    serve.wait_for("serving", 2, Duration::from_secs(30));
    assert_ne!(serve.driver_pid(), pid, "a new driver");
    let client = session::Client::connect(&serve.socket, "").expect("client");
    client.write(0, &[1u8; 4096], false).expect("write");
    drop(client);
    assert!(serve.stop().success());
}

/// A driver that dies at start-up, before it is ever ready: the supervisor backs off, gives
/// up after `max_failed_starts` such starts in a row with a clear error and a non-zero exit,
/// and removes its socket.
#[test]
fn crash_loop_is_given_up() {
    let dir = Scratch::new("crashloop");
    let config = "[supervisor]\nrestart_backoff = \"10ms\"\nmax_failed_starts = 3\n";
    let mut serve = Serve::start(&dir, config, &[("RBLK_DRIVER", "/bin/false")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the supervisor did not give up:\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let log = serve.log();
    assert!(log.contains("crash loop") && log.contains("giving up"), "{log}");
    assert_eq!(log.matches("driver died").count(), 3, "starts before giving up:\n{log}");
    assert!(log.contains("backing off"), "{log}");
    assert!(!Path::new(&serve.socket).exists(), "socket removed");
}

/// Writes of one qemu-io run (4 KiB every 16 KiB of the 64 MiB volume).
const WRITES: u64 = 4000;

/// qemu-io with `reconnect-delay` writes patterns while the driver is killed again and again;
/// QEMU resends what was in flight after reconnecting, and every pattern reads back.
fn qemu_io_through_kills(dir: &Scratch, config: &str) {
    let serve = Serve::start(dir, &format!("{QUICK}{config}"), &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let opts = format!("driver=nbd,server.type=unix,server.path={},reconnect-delay=30", serve.socket.display());
    let pattern = |i: u64| i % 250 + 1;
    let mut writer = Command::new("qemu-io");
    writer.args(["--image-opts", &opts]);
    for i in 0..WRITES {
        writer.arg("-c").arg(format!("write -P {} {} 4096", pattern(i), i * 16384));
        // Pauses make the run last at least 4 s however fast the writes are, so the five
        // kills land while it writes (it once finished first on a fast run).
        if i % 100 == 99 {
            writer.arg("-c").arg("sleep 100");
        }
    }
    let mut child = writer.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("qemu-io");
    let mut kills = 0;
    while kills < 5 {
        std::thread::sleep(Duration::from_millis(50));
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        let pid = serve.driver_pid();
        if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            kills += 1;
            serve.wait_for("driver ready", kills + 1, Duration::from_secs(30));
        }
    }
    let out = child.wait_with_output().expect("qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("failed"), "qemu-io through restarts:\n{text}");
    assert!(kills >= 5, "only {kills} kills happened while qemu-io wrote");
    assert_eq!(text.matches("wrote 4096/4096").count() as u64, WRITES, "every write completed");
    let mut reader = Command::new("qemu-io");
    reader.args(["--image-opts", &opts]);
    for i in 0..WRITES {
        reader.arg("-c").arg(format!("read -P {} {} 4096", pattern(i), i * 16384));
    }
    let out = reader.output().expect("qemu-io read");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("fail"), "patterns after the kills:\n{text}");
    assert!(serve.stop().success());
}

#[test]
fn qemu_io_reconnects_through_driver_kills() {
    if !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("qemu-reconnect");
    qemu_io_through_kills(&dir, "");
}

#[test]
fn qemu_io_reconnects_through_driver_kills_with_roots_on_a_separate_device() {
    if !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("qemu-reconnect-roots");
    let roots = dir.path("roots.img");
    std::fs::File::create(&roots).and_then(|f| f.set_len(1 << 20)).expect("root device");
    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("format")
        .arg(dir.path("v.img"))
        .args(["--size", "64M", "--root-device"])
        .arg(&roots)
        .output()
        .expect("format");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    qemu_io_through_kills(&dir, &format!("[volume]\nroot_device = \"{}\"\n", roots.display()));
    // The roots live on the separate device: the image's first blocks hold none.
    let image = std::fs::read(dir.path("v.img")).expect("image");
    assert!(!image[..3 * 4096].windows(8).any(|w| w == b"RBLKROOT"), "roots must not be on the image");
}

/// A driver stopped and continued (a debugger, the cgroup freezer) goes on beating: the
/// kernel resumes its interrupted sleeps with restart_syscall, which the sandbox allows
/// (denied, the heartbeat thread died on the EPERM and the supervisor killed a healthy
/// driver for silence).
#[test]
fn a_stopped_and_continued_driver_keeps_serving() {
    let dir = Scratch::new("sigstop");
    let serve = Serve::start(&dir, QUICK, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let pid = serve.driver_pid();
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
    std::thread::sleep(Duration::from_millis(400));
    kill(Pid::from_raw(pid), Signal::SIGCONT).expect("SIGCONT");
    // Three heartbeat timeouts later it is still the same, unrestarted driver.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(serve.driver_pid(), pid, "{}", serve.log_tail());
    assert!(!serve.log().contains("driver died"), "{}", serve.log_tail());
    assert!(serve.stop().success());
}
