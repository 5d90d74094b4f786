//! Helpers the integration tests share.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const MIB: u64 = 1 << 20;

/// Whether `tool` can run; a missing one fails under `RBLK_REQUIRE_CLIENTS=1`, else skips.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var_os("RBLK_REQUIRE_CLIENTS").is_none(), "{tool} is required but missing");
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// A scratch directory removed at the end.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rblk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `rblk serve` on an image in a scratch directory, its log in a file.
pub struct Serve {
    pub child: Child,
    pub log: PathBuf,
    pub socket: PathBuf,
}

impl Serve {
    pub fn start(dir: &Scratch, config: &str, env: &[(&str, &str)]) -> Serve {
        Serve::start_sized(dir, "64M", config, env)
    }

    /// Formats a volume of `size` (if missing) and serves it.
    pub fn start_sized(dir: &Scratch, size: &str, config: &str, env: &[(&str, &str)]) -> Serve {
        Serve::launch(dir, &dir.path("v.img"), Some(size), config, "serve", env)
    }

    /// Serves `image` (formatted at `size` if given and missing), with its socket and log
    /// named after `name` in `dir`.
    pub fn launch(
        dir: &Scratch,
        image: &std::path::Path,
        size: Option<&str>,
        config: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> Serve {
        Serve::launch_with(dir, image, size, config, name, &[], env)
    }

    /// Like `launch`, with more arguments for `rblk serve` (e.g. `--vhost-user PATH`).
    pub fn launch_with(
        dir: &Scratch,
        image: &std::path::Path,
        size: Option<&str>,
        config: &str,
        name: &str,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
    ) -> Serve {
        let cfg = dir.path("rblk.toml");
        std::fs::write(&cfg, config).expect("config");
        let log = dir.path(&format!("{name}.log"));
        let socket = dir.path(&format!("{name}.sock"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rblk"));
        cmd.arg("serve").arg(image).arg("--socket").arg(&socket).arg("--config").arg(&cfg);
        if let Some(size) = size {
            cmd.arg("--size").arg(size);
        }
        cmd.args(args);
        cmd.env("RBLK_LOG", "info").env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let file = std::fs::File::create(&log).expect("log");
        let mut child = cmd.stdout(Stdio::piped()).stderr(file).spawn().expect("rblk serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("uri");
        Serve { child, log, socket }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `what` `count` times.
    pub fn wait_for(&self, what: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.log().matches(what).count() < count {
            assert!(Instant::now() < deadline, "waited for {count} × {what:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last 30 lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The current driver's pid (the supervisor's only child).
    pub fn driver_pid(&self) -> i32 {
        self.try_driver_pid().expect("a driver is running")
    }

    /// The current driver's pid, if one is running.
    pub fn try_driver_pid(&self) -> Option<i32> {
        let pid = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// SIGKILL for the supervisor and its driver; returns once neither holds the image.
    pub fn kill_all(mut self) {
        let driver = self.try_driver_pid();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = driver {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            // Gone, or a zombie (which holds no descriptors).
            while let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'))
                    || Instant::now() > deadline
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        self.child.wait().expect("wait")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// A raw NBD client: the oldest handshake a client may use (`NBD_OPT_EXPORT_NAME`, no block
/// sizes negotiated), then requests and replies by hand, so a test can pipeline without
/// reading replies, or send what a well-behaved client never would.
pub struct Raw {
    pub stream: UnixStream,
}

impl Raw {
    pub fn connect(socket: &std::path::Path) -> Raw {
        let mut stream = UnixStream::connect(socket).expect("connect");
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello).expect("greeting");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        stream.write_all(&3u32.to_be_bytes()).expect("client flags"); // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = Vec::new();
        opt.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&0u32.to_be_bytes());
        stream.write_all(&opt).expect("export name");
        let mut answer = [0u8; 10];
        stream.read_exact(&mut answer).expect("export size and flags");
        Raw { stream }
    }

    pub fn send(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32, data: &[u8]) {
        self.stream.write_all(&request(command, flags, handle, offset, length)).expect("request");
        self.stream.write_all(data).expect("payload");
    }

    /// One simple reply: (error, handle); a successful read's `read_len` bytes into `data`.
    pub fn reply(&mut self, read_len: usize, data: &mut Vec<u8>) -> (u32, u64) {
        self.reply_by(|_| read_len, data)
    }

    /// Like `reply`, for replies in any order: `read_len` says, by handle, how much data a
    /// successful reply carries.
    pub fn reply_by(&mut self, read_len: impl Fn(u64) -> usize, data: &mut Vec<u8>) -> (u32, u64) {
        self.try_reply_by(read_len, data).expect("reply")
    }

    pub fn try_reply_by(&mut self, read_len: impl Fn(u64) -> usize, data: &mut Vec<u8>) -> std::io::Result<(u32, u64)> {
        let mut head = [0u8; 16];
        self.stream.read_exact(&mut head)?;
        assert_eq!(u32::from_be_bytes(head[..4].try_into().expect("4")), 0x6744_6698, "reply magic");
        let error = u32::from_be_bytes(head[4..8].try_into().expect("4"));
        let handle = u64::from_be_bytes(head[8..].try_into().expect("8"));
        let read_len = read_len(handle);
        if error == 0 && read_len > 0 {
            data.resize(read_len, 0);
            self.stream.read_exact(data)?;
        }
        Ok((error, handle))
    }
}

/// A request's 28-byte header.
pub fn request(command: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut req = Vec::with_capacity(28);
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&flags.to_be_bytes());
    req.extend_from_slice(&command.to_be_bytes());
    req.extend_from_slice(&handle.to_be_bytes());
    req.extend_from_slice(&offset.to_be_bytes());
    req.extend_from_slice(&length.to_be_bytes());
    req
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// qemu-io on a raw NBD `uri` with `commands`; its output, after checking that every command
/// succeeded.
pub fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let (success, text) = qemu_io_output(uri, commands);
    assert!(success && !text.contains("failed") && !text.contains("error"), "qemu-io {commands:?}:\n{text}");
    text
}

/// qemu-io on a raw NBD `uri` with `commands`, for commands that may fail: whether it exited
/// with success, and its output.
pub fn qemu_io_output(uri: &str, commands: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.output().expect("qemu-io");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Runs certtool with `args`, writing `out`.
fn certtool(args: &[&str], out: &std::path::Path) {
    let run = Command::new("certtool").args(args).arg("--outfile").arg(out).output().expect("certtool");
    assert!(run.status.success(), "certtool {args:?}: {}", String::from_utf8_lossy(&run.stderr));
}

/// A CA, a server certificate for 127.0.0.1 / localhost and a client certificate, in QEMU's
/// tls-creds-x509 layout (the client looks for client-cert.pem / client-key.pem there).
pub fn make_pki(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("pki dir");
    let p = |name: &str| dir.join(name);
    let s = |path: &std::path::Path| path.to_str().expect("utf-8").to_string();
    std::fs::write(p("ca.info"), "cn = rblk test CA\nca\ncert_signing_key\nexpiration_days = 2\n").expect("ca.info");
    std::fs::write(
        p("server.info"),
        "organization = rblk\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n\
         encryption_key\nsigning_key\nexpiration_days = 2\n",
    )
    .expect("server.info");
    std::fs::write(
        p("client.info"),
        "organization = rblk\ncn = rblk test client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n",
    )
    .expect("client.info");
    for key in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
        certtool(&["--generate-privkey"], &p(key));
    }
    certtool(
        &["--generate-self-signed", "--load-privkey", &s(&p("ca-key.pem")), "--template", &s(&p("ca.info"))],
        &p("ca-cert.pem"),
    );
    for who in ["server", "client"] {
        certtool(
            &[
                "--generate-certificate",
                "--load-ca-certificate",
                &s(&p("ca-cert.pem")),
                "--load-ca-privkey",
                &s(&p("ca-key.pem")),
                "--load-privkey",
                &s(&p(&format!("{who}-key.pem"))),
                "--template",
                &s(&p(&format!("{who}.info"))),
            ],
            &p(&format!("{who}-cert.pem")),
        );
    }
}
