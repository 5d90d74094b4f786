//! `rblk serve` under systemd's conventions: readiness, status and watchdog notifications
//! on a test NOTIFY_SOCKET; socket activation by `systemd-socket-activate` with a real
//! client (and with a second socket named `vhost-user`); the shipped unit files accepted by
//! `systemd-analyze verify`.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{have, Scratch, Serve};

/// The notifications received on a datagram socket, one string per datagram.
struct Notifications(UnixDatagram);

impl Notifications {
    fn bind(path: &std::path::Path) -> Notifications {
        let sock = UnixDatagram::bind(path).expect("notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        Notifications(sock)
    }

    /// Everything that arrives within `d`.
    fn collect(&self, d: Duration) -> Vec<String> {
        let until = Instant::now() + d;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            if let Ok(n) = self.0.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    }

    /// Receives until one datagram contains `what`; returns all received, that one last.
    fn until(&self, what: &str, within: Duration) -> Vec<String> {
        let until = Instant::now() + within;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            if let Ok(n) = self.0.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.contains(what);
                got.push(msg);
                if done {
                    return got;
                }
            }
        }
        panic!("no notification containing {what:?} within {within:?}; got {got:?}");
    }
}

fn count(msgs: &[String], what: &str) -> usize {
    msgs.iter().flat_map(|m| m.lines()).filter(|l| *l == what).count()
}

/// READY=1 exactly once, when the first driver serves; STATUS= through a restart; the
/// watchdog pinged while the driver beats, silent while it is hung (SIGSTOP), again once it
/// moves; STOPPING=1 on SIGTERM. None of it reaches the driver's environment.
#[test]
fn notifications_follow_the_driver() {
    let dir = Scratch::new("sd-notify");
    let notify = Notifications::bind(&dir.path("notify"));
    let notify_path = dir.path("notify");
    // The supervisor's own patience is long: only the watchdog pings show the hang.
    let cfg = "[supervisor]\nheartbeat = \"50ms\"\nheartbeat_timeout = \"20s\"\n";
    let mut serve = Serve::start(
        &dir,
        cfg,
        &[("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8")), ("WATCHDOG_USEC", "300000")],
    );
    let first = notify.until("READY=1", Duration::from_secs(60));
    assert!(first.iter().any(|m| m.contains("STATUS=incarnation 1: recovering")), "{first:?}");
    let ready = first.last().expect("the READY datagram");
    assert!(ready.contains("STATUS=serving: incarnation 1, recovery ms="), "{ready:?}");

    let driver = serve.driver_pid();
    let environ = std::fs::read(format!("/proc/{driver}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS"] {
        assert!(!environ.contains(name), "{name} reached the driver");
    }

    // Serving and beating (a node ticks, so an idle driver beats too): pinged every 150 ms.
    let serving = notify.collect(Duration::from_millis(1500));
    assert!(count(&serving, "WATCHDOG=1") >= 4, "{serving:?}");

    // Hung: no beats, so no pings (the supervisor has not given up on it yet).
    kill(Pid::from_raw(driver), Signal::SIGSTOP).expect("SIGSTOP");
    notify.collect(Duration::from_millis(400)); // what was already on its way
    let hung = notify.collect(Duration::from_millis(1500));
    assert_eq!(count(&hung, "WATCHDOG=1"), 0, "pinged while the driver was hung: {hung:?}");
    kill(Pid::from_raw(driver), Signal::SIGCONT).expect("SIGCONT");
    let moving = notify.collect(Duration::from_millis(1500));
    assert!(count(&moving, "WATCHDOG=1") >= 2, "{moving:?}\n{}", serve.log_tail());

    // A restart is reported, but readiness only once.
    kill(Pid::from_raw(driver), Signal::SIGKILL).expect("SIGKILL");
    let restart = notify.until("STATUS=serving: incarnation 2", Duration::from_secs(60));
    assert!(restart.iter().any(|m| m.contains("STATUS=incarnation 1 died (killed by signal 9")), "{restart:?}");
    assert_eq!(count(&restart, "READY=1"), 0, "{restart:?}");

    let supervisor = serve.child.id();
    kill(Pid::from_raw(supervisor as i32), Signal::SIGTERM).expect("SIGTERM");
    notify.until("STOPPING=1", Duration::from_secs(30));
    assert!(serve.child.wait().expect("wait").success());
}

/// `systemd-socket-activate` holds the socket and starts `rblk serve` on the first
/// connection; that client (waiting in the backlog) is served. The socket file is the
/// manager's: rblk leaves it in place.
#[test]
fn socket_activation_serves_the_first_client() {
    if !have("systemd-socket-activate") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("sd-activate");
    let socket = dir.path("activated.sock");
    let image = dir.path("v.img");
    let format = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("format")
        .arg(&image)
        .args(["--size", "64M"])
        .output()
        .expect("rblk format");
    assert!(format.status.success(), "{format:?}");
    let log = std::fs::File::create(dir.path("serve.log")).expect("log");
    let mut activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(format!("--setenv=RBLK_DRIVER={}", env!("CARGO_BIN_EXE_rblk-driver")))
        .arg("--setenv=RBLK_LOG=info")
        .arg(env!("CARGO_BIN_EXE_rblk"))
        .arg("serve")
        .arg(&image)
        // A socket path that must not be used: the inherited one wins.
        .arg("--socket")
        .arg(dir.path("unused.sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "systemd-socket-activate did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let io = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x5a 4096 1M", "-c", "read -P 0x5a 4096 1M"])
        .output()
        .expect("qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&io.stdout), String::from_utf8_lossy(&io.stderr));
    let served = std::fs::read_to_string(dir.path("serve.log")).unwrap_or_default();
    assert!(io.status.success() && !text.contains("fail"), "qemu-io:\n{text}\nserve log:\n{served}");
    assert!(!dir.path("unused.sock").exists(), "rblk bound its own socket instead of the inherited one");

    kill(Pid::from_raw(activator.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = activator.wait().expect("wait");
    let served = std::fs::read_to_string(dir.path("serve.log")).unwrap_or_default();
    assert!(status.success(), "rblk serve under systemd-socket-activate ended with {status}:\n{served}");
    assert!(socket.exists(), "rblk removed the socket file it did not create");
}

/// Two sockets, the second named `vhost-user` (a socket unit's `FileDescriptorName=`): the
/// supervisor serves NBD on the first and hands the second to each driver as the
/// vhost-user-blk socket, binding neither path of its own, and leaves both files to the
/// manager.
#[test]
fn socket_activation_passes_a_named_vhost_user_socket() {
    use std::os::unix::net::UnixStream;
    if !have("systemd-socket-activate") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("sd-activate-vhost");
    let (nbd, vhost) = (dir.path("nbd.sock"), dir.path("vhost.sock"));
    let log = std::fs::File::create(dir.path("serve.log")).expect("log");
    let mut activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&nbd)
        .arg("-l")
        .arg(&vhost)
        .arg("--fdname=nbd:vhost-user")
        .arg(format!("--setenv=RBLK_DRIVER={}", env!("CARGO_BIN_EXE_rblk-driver")))
        .arg("--setenv=RBLK_LOG=info")
        .arg(env!("CARGO_BIN_EXE_rblk"))
        .arg("serve")
        .arg(dir.path("v.img"))
        .args(["--size", "64M", "--socket"])
        .arg(dir.path("unused.sock"))
        .arg("--vhost-user")
        .arg(dir.path("unused-vhost.sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(nbd.exists() && vhost.exists()) {
        assert!(Instant::now() < deadline, "systemd-socket-activate did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A front-end's connection starts the service (and waits in the manager's backlog).
    let _front_end = UnixStream::connect(&vhost).expect("connect to the vhost-user socket");
    let uri = format!("nbd+unix:///?socket={}", nbd.display());
    common::qemu_io(&uri, &["write -P 0x5a 4096 1M", "read -P 0x5a 4096 1M"]);
    // systemd-socket-activate execs the service in place: its pid is the supervisor's.
    let pid = activator.id();
    let driver = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).expect("children");
    let driver = driver.split_whitespace().next().expect("a driver runs").to_string();
    let cmdline = std::fs::read(format!("/proc/{driver}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--vhost-user-fd 4 "), "the driver was not handed descriptor 4: {cmdline}");
    assert!(cmdline.contains("--socket-fd 3 "), "the driver was not handed descriptor 3: {cmdline}");
    for unused in ["unused.sock", "unused-vhost.sock"] {
        assert!(!dir.path(unused).exists(), "rblk bound {unused} instead of the inherited socket");
    }
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = activator.wait().expect("wait");
    let served = std::fs::read_to_string(dir.path("serve.log")).unwrap_or_default();
    assert!(status.success(), "rblk serve ended with {status}:\n{served}");
    assert!(nbd.exists() && vhost.exists(), "rblk removed a socket file it did not create");
}

/// Two inherited sockets that are not one NBD and one `vhost-user` are refused, naming
/// LISTEN_FDNAMES.
#[test]
fn inherited_sockets_with_a_name_twice_are_refused() {
    if !have("python3") {
        return;
    }
    let dir = Scratch::new("sd-twice");
    // Python binds two listening sockets, moves them to descriptors 3 and 4 and execs rblk
    // in place (the socket objects are kept alive until the exec).
    let script = format!(
        "import os, socket\n\
         keep = [socket.socket(socket.AF_UNIX) for _ in range(2)]\n\
         moved = []\n\
         for s, name in zip(keep, ('a.sock', 'b.sock')):\n\
         \x20   s.bind('{dir}/' + name); s.listen(1); moved.append(os.dup(s.fileno()))\n\
         for fd, high in zip((3, 4), moved):\n\
         \x20   os.dup2(high, fd, inheritable=True)\n\
         os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', LISTEN_FDNAMES='vhost-user:vhost-user')\n\
         os.execv('{rblk}', ['rblk', 'serve', '{dir}/v.img', '--socket', '{dir}/s.sock', '--size', '64M'])\n",
        dir = dir.0.display(),
        rblk = env!("CARGO_BIN_EXE_rblk"),
    );
    let out = Command::new("python3").arg("-c").arg(script).output().expect("python3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served two vhost-user sockets: {err}");
    assert!(err.contains("LISTEN_FDNAMES=\"vhost-user:vhost-user\": more than one vhost-user socket"), "{err}");
    assert!(!dir.path("s.sock").exists());
}

/// An inherited descriptor that is not a listening unix stream socket is refused with a
/// clear error, not served.
#[test]
fn a_wrong_inherited_descriptor_is_refused() {
    let dir = Scratch::new("sd-wrongfd");
    let file = dir.path("not-a-socket");
    std::fs::write(&file, b"x").expect("file");
    // A shell makes descriptor 3 a plain file and execs rblk with its own pid as LISTEN_PID.
    let script = format!(
        "exec 3<'{}'; LISTEN_PID=$$ LISTEN_FDS=1 exec '{}' serve '{}' --socket '{}' --size 64M",
        file.display(),
        env!("CARGO_BIN_EXE_rblk"),
        dir.path("v.img").display(),
        dir.path("s.sock").display()
    );
    let out = Command::new("sh").arg("-c").arg(script).output().expect("sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served a plain file as a socket: {err}");
    assert!(err.contains("is not a listening unix stream socket (not a socket)"), "{err}");
    assert!(!dir.path("s.sock").exists());
}

/// The unit files as shipped pass `systemd-analyze verify` (the ExecStart binary pointed at
/// the one just built, since nothing is installed).
#[test]
fn unit_files_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = Scratch::new("sd-units");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    let service = std::fs::read_to_string(src.join("rblk@.service")).expect("rblk@.service");
    assert!(service.contains("ExecStart=/usr/bin/rblk serve"), "{service}");
    assert!(service.contains("Type=notify") && service.contains("WatchdogSec="), "{service}");
    let service = service.replace("/usr/bin/rblk", env!("CARGO_BIN_EXE_rblk"));
    std::fs::write(dir.path("rblk@vol0.service"), service).expect("write");
    std::fs::copy(src.join("rblk@.socket"), dir.path("rblk@vol0.socket")).expect("copy");
    let vhost = std::fs::read_to_string(src.join("rblk-vhost@.socket")).expect("rblk-vhost@.socket");
    assert!(vhost.contains("FileDescriptorName=vhost-user\n"), "{vhost}");
    std::fs::write(dir.path("rblk-vhost@vol0.socket"), vhost).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path("rblk@vol0.service"))
        .arg(dir.path("rblk@vol0.socket"))
        .arg(dir.path("rblk-vhost@vol0.socket"))
        .output()
        .expect("systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
}

/// Something at NOTIFY_SOCKET that never reads: once its queue is full the pings are
/// dropped, not waited on, and the supervisor goes on restarting a killed driver.
#[test]
fn a_notify_socket_nobody_reads_does_not_stop_the_supervisor() {
    let dir = Scratch::new("sd-deaf");
    let path = dir.path("deaf");
    let _deaf = UnixDatagram::bind(&path).expect("notify socket");
    let cfg = "[supervisor]\nheartbeat = \"20ms\"\nheartbeat_timeout = \"2s\"\n";
    // A ping every 5 ms fills the queue (a few hundred datagrams) within seconds.
    let serve =
        Serve::start(&dir, cfg, &[("NOTIFY_SOCKET", path.to_str().expect("utf-8")), ("WATCHDOG_USEC", "10000")]);
    serve.wait_for("driver ready", 1, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(6));
    kill(Pid::from_raw(serve.driver_pid()), Signal::SIGKILL).expect("SIGKILL");
    serve.wait_for("driver ready", 2, Duration::from_secs(30));
    assert!(serve.stop().success());
}
