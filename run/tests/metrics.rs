//! Metrics and live status of `rblk serve` (`[metrics] listen`): scraped with curl while
//! qemu-io does I/O, checked by `promtool check metrics`, across a SIGKILL and a hang of the driver, read
//! by `rblk status`, and not held up by a silent client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{have, qemu_io, Raw, Scratch, Serve};

/// `curl` of `url` (with `--unix-socket` when `socket` is given); the body.
fn curl(url: &str, socket: Option<&std::path::Path>) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "10"]);
    if let Some(s) = socket {
        cmd.arg("--unix-socket").arg(s);
    }
    let out = cmd.arg(url).output().expect("curl");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The value of the series `series` (name with its labels, exactly as exposed).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .expect("a number")
}

/// The metrics URL the supervisor logged (it listens on port 0: a free one).
fn metrics_url(serve: &Serve) -> String {
    serve.wait_for("serving metrics", 1, Duration::from_secs(30));
    let log = serve.log();
    let at = log.find("http://127.0.0.1:").expect("url in the log");
    log[at..].split(|c: char| c.is_whitespace() || c == '"' || c == ',').next().expect("url").to_owned()
}

fn promtool_accepts(text: &str) {
    if !have("promtool") {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn counters_follow_qemu_io_and_survive_a_driver_kill() {
    if !have("curl") || !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("metrics");
    let config =
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[supervisor]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"1s\"\n";
    let serve = Serve::start(&dir, config, &[]);
    let url = metrics_url(&serve);
    serve.wait_for("driver ready", 1, Duration::from_secs(30));
    let before = curl(&format!("{url}/metrics"), None);
    promtool_accepts(&before);
    assert_eq!(value(&before, "rblk_driver_incarnation"), 1.0);
    assert_eq!(value(&before, "rblk_driver_ready"), 1.0);
    let writes0 = value(&before, "rblk_requests_total{type=\"write\"}");
    let bytes0 = value(&before, "rblk_request_bytes_total{type=\"write\"}");

    let uri = format!("nbd+unix:///?socket={}", serve.socket.display());
    qemu_io(&uri, &["write -P 0xab 0 64k", "write -P 0xcd 1M 4k", "read -P 0xab 0 64k"]);
    let after = curl(&format!("{url}/metrics"), None);
    promtool_accepts(&after);
    assert_eq!(value(&after, "rblk_requests_total{type=\"write\"}") - writes0, 2.0, "two writes");
    assert_eq!(value(&after, "rblk_request_bytes_total{type=\"write\"}") - bytes0, (65536 + 4096) as f64);
    assert!(value(&after, "rblk_request_bytes_total{type=\"read\"}") >= 65536.0);
    assert_eq!(
        value(&after, "rblk_request_duration_seconds_count{type=\"write\"}"),
        value(&after, "rblk_requests_total{type=\"write\"}"),
        "every write acknowledged and timed"
    );
    assert!(value(&after, "rblk_raft_batch_entries_count") >= 2.0, "the writes went through the log");
    assert!(value(&after, "rblk_log_used_bytes") > 0.0);
    assert!(value(&after, "rblk_volume_used_blocks") > 0.0);
    assert!(value(&after, "rblk_volume_free_blocks") > 0.0);
    assert_eq!(value(&after, "rblk_errors_total{errno=\"EIO\"}"), 0.0);

    // Trims, write-zeroes, and requests refused with an error (sent raw: clients check
    // ranges before they send).
    let client = session::Client::connect(&serve.socket, "").expect("client");
    client.trim(0, 8192).expect("trim");
    client.write_zeroes(1 << 20, 4096, false).expect("write zeroes");
    drop(client);
    let size = 64u64 << 20;
    let mut raw = Raw::connect(&serve.socket);
    raw.send(1, 0, 1, size, 4096, &[0u8; 4096]); // a write past the end: ENOSPC
    assert_eq!(raw.reply(0, &mut Vec::new()), (28, 1));
    raw.send(0, 0, 2, size, 4096, &[]); // a read past the end: EINVAL
    assert_eq!(raw.reply(0, &mut Vec::new()), (22, 2));
    drop(raw);
    let refused = curl(&format!("{url}/metrics"), None);
    let delta = |series: &str| value(&refused, series) - value(&after, series);
    assert_eq!(delta("rblk_requests_total{type=\"trim\"}"), 1.0);
    assert_eq!(delta("rblk_request_bytes_total{type=\"trim\"}"), 8192.0);
    assert_eq!(delta("rblk_requests_total{type=\"write_zeroes\"}"), 1.0);
    assert_eq!(delta("rblk_errors_total{errno=\"ENOSPC\"}"), 1.0, "the write past the end");
    assert_eq!(delta("rblk_errors_total{errno=\"EINVAL\"}"), 1.0, "the read past the end");
    let after = refused;

    let pid = serve.driver_pid();
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the driver");
    serve.wait_for("driver ready", 2, Duration::from_secs(30));
    let restarted = curl(&format!("{url}/metrics"), None);
    promtool_accepts(&restarted);
    assert_eq!(value(&restarted, "rblk_driver_restarts_total{cause=\"signal_SIGKILL\"}"), 1.0);
    assert_eq!(value(&restarted, "rblk_driver_incarnation"), 2.0);
    assert_eq!(
        value(&restarted, "rblk_requests_total{type=\"write\"}"),
        value(&after, "rblk_requests_total{type=\"write\"}"),
        "counters outlive the incarnation that counted them"
    );
    assert!(value(&restarted, "rblk_last_recovery_seconds") >= 0.0);
    value(&restarted, "rblk_last_recovery_replayed_entries");

    // A hung driver: killed for its silence, and counted so.
    let pid = serve.driver_pid();
    kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("stop the driver");
    serve.wait_for("driver ready", 3, Duration::from_secs(30));
    let hung = curl(&format!("{url}/metrics"), None);
    assert_eq!(value(&hung, "rblk_driver_restarts_total{cause=\"heartbeat_timeout\"}"), 1.0, "{}", serve.log_tail());
    assert_eq!(value(&hung, "rblk_driver_restarts_total{cause=\"signal_SIGKILL\"}"), 1.0);
    assert_eq!(value(&hung, "rblk_driver_incarnation"), 3.0);

    let status = Command::new(env!("CARGO_BIN_EXE_rblk")).args(["status", &url, "--json"]).output().expect("status");
    assert!(status.status.success(), "rblk status: {}", String::from_utf8_lossy(&status.stderr));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("rblk status --json is JSON");
    assert_eq!(json["incarnation"], 3);
    assert_eq!(json["ready"], true);
    assert_eq!(json["restarts"]["total"], 2);
    assert_eq!(json["restarts"]["by_cause"]["heartbeat_timeout"], 1);
    assert_eq!(json["restarts"]["by_cause"]["signal_SIGKILL"], 1);
    assert_eq!(json["requests"]["write"].as_f64(), Some(value(&after, "rblk_requests_total{type=\"write\"}")));
    assert!(json["last_recovery"]["ms"].is_u64(), "{json}");
    let host_port = url.trim_start_matches("http://");
    let human = Command::new(env!("CARGO_BIN_EXE_rblk")).args(["status", host_port]).output().expect("status");
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success() && text.contains("incarnation 3") && text.contains("signal_SIGKILL 1"), "{text}");
    serve.stop();
}

#[test]
fn a_silent_client_does_not_hold_up_the_next_scrape() {
    if !have("curl") {
        return;
    }
    let dir = Scratch::new("metrics-hostile");
    let socket = dir.path("metrics.sock");
    let serve = Serve::start(&dir, &format!("[metrics]\nlisten = \"{}\"\n", socket.display()), &[]);
    serve.wait_for("serving metrics", 1, Duration::from_secs(30));
    // One says nothing, one sends half a request.
    let mut silent = UnixStream::connect(&socket).expect("connect");
    let mut half = UnixStream::connect(&socket).expect("connect");
    half.write_all(b"GET /metr").expect("half a request");
    let started = Instant::now();
    let body = curl("http://rblk/metrics", Some(&socket));
    assert!(started.elapsed() < Duration::from_secs(2), "the scrape waited {:?}", started.elapsed());
    assert!(body.contains("# TYPE rblk_requests_total counter"), "{body}");
    let status = curl("http://rblk/status", Some(&socket));
    let json: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(json["version"], 1);
    // The silent ones are let go after the client timeout, unanswered.
    for conn in [&mut silent, &mut half] {
        conn.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf).expect("closed by the server, not timed out here");
        assert!(buf.is_empty(), "no answer to no request: {}", String::from_utf8_lossy(&buf));
    }
    // At the connection limit a further client is closed at once, not queued; once the
    // silent ones time out, scrapes are answered again.
    let mut held: Vec<UnixStream> = (0..8).map(|_| UnixStream::connect(&socket).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let over = Command::new("curl")
        .args(["-s", "--max-time", "10", "--unix-socket"])
        .arg(&socket)
        .arg("http://rblk/metrics")
        .output()
        .expect("curl");
    assert!(!over.status.success(), "a ninth client is not served while eight are held");
    assert!(started.elapsed() < Duration::from_secs(2), "and not kept waiting: {:?}", started.elapsed());
    for conn in &mut held {
        conn.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        conn.read_to_end(&mut Vec::new()).expect("closed by the server");
    }
    assert!(curl("http://rblk/metrics", Some(&socket)).contains("rblk_requests_total"));
    // Unknown paths and methods are refused.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket"])
        .arg(&socket)
        .arg("http://rblk/nope")
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    assert!(serve.stop().success());
    assert!(!socket.exists(), "the metrics socket is removed at the end");
}

#[test]
fn a_file_in_the_way_of_the_metrics_socket_is_kept() {
    let dir = Scratch::new("metrics-file");
    let path = dir.path("metrics.sock");
    std::fs::write(&path, b"precious").expect("file");
    let cfg = dir.path("rblk.toml");
    std::fs::write(&cfg, format!("[metrics]\nlisten = \"{}\"\n", path.display())).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("serve")
        .arg(dir.path("v.img"))
        .args(["--size", "64M", "--socket"])
        .arg(dir.path("s.sock"))
        .arg("--config")
        .arg(&cfg)
        .env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver"))
        .output()
        .expect("rblk serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
}

#[test]
fn status_of_nothing_fails_and_says_why() {
    let dir = Scratch::new("metrics-none");
    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("status")
        .arg(dir.path("none.sock"))
        .output()
        .expect("rblk status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("connecting to"), "{stderr}");
}

/// The NBD socket (or an NBD URI) given to `rblk status` gets a clear word about which
/// endpoint status asks, not a "connection reset".
#[test]
fn status_of_the_nbd_socket_says_which_endpoint_to_ask() {
    let dir = Scratch::new("metrics-nbd");
    let serve = Serve::start(&dir, "", &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    for target in [serve.socket.display().to_string(), format!("nbd+unix:///?socket={}", serve.socket.display())] {
        let out = Command::new(env!("CARGO_BIN_EXE_rblk")).arg("status").arg(&target).output().expect("rblk status");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("is an NBD endpoint") && stderr.contains("[metrics] listen"), "{stderr}");
    }
    assert!(serve.stop().success());
}
