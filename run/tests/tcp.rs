//! NBD over TCP (`[server] listen`): the supervisor holds the TCP listener like the unix
//! socket, both reach the same volume, a client that connects during a restart waits in the
//! TCP backlog, and a silent TCP client is dropped after the handshake timeout like a unix one.

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{free_port, have, qemu_io, Scratch, Serve};

#[test]
fn tcp_and_unix_serve_one_volume_through_a_restart() {
    if !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("tcp");
    let port = free_port();
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[supervisor]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"1s\"\n"
    );
    let serve = Serve::start(&dir, &cfg, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let tcp = format!("nbd://127.0.0.1:{port}");
    let unix = format!("nbd+unix:///?socket={}", serve.socket.display());
    qemu_io(&tcp, &["write -P 0x3c 0 1M", "write -P 0x3d 8M 64k"]);
    qemu_io(&unix, &["read -P 0x3c 0 1M", "read -P 0x3d 8M 64k", "write -P 0x3e 16M 4k"]);
    qemu_io(&tcp, &["read -P 0x3e 16M 4k"]);

    // Killed: a TCP client connecting meanwhile waits in the backlog and is served.
    kill(Pid::from_raw(serve.driver_pid()), Signal::SIGKILL).expect("SIGKILL");
    qemu_io(&tcp, &["read -P 0x3c 0 1M", "read -P 0x3d 8M 64k", "read -P 0x3e 16M 4k"]);
    serve.wait_for("driver ready", 2, Duration::from_secs(30));
    assert!(serve.stop().success());
}

#[test]
fn a_silent_tcp_client_is_dropped_after_the_handshake_timeout() {
    let dir = Scratch::new("tcp-silent");
    let port = free_port();
    let cfg = format!("[server]\nlisten = \"127.0.0.1:{port}\"\nhandshake_timeout = \"1s\"\n");
    let serve = Serve::start(&dir, &cfg, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    silent.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let mut got = 0;
    // The server's greeting, then the end of the stream when the timeout closes it.
    loop {
        match silent.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("the silent client was not dropped: {e} after {:?}", started.elapsed()),
        }
    }
    assert!(got >= 18, "no NBD greeting ({got} bytes)");
    assert!(started.elapsed() < Duration::from_secs(8), "dropped only after {:?}", started.elapsed());
    assert!(serve.stop().success());
}

#[test]
fn a_bad_listen_address_is_refused_before_serving() {
    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .args(["serve", "--listen", "127.0.0.1:0x50"])
        .output()
        .expect("rblk serve");
    let err = String::from_utf8_lossy(&out.stderr);
    // A usage error (status 2), refused by the command line before anything is opened.
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("'--listen <HOST:PORT>'") && err.contains("port must be 1 to 65535"), "{err}");
}

/// `socket = ""` with `listen`: TCP only, no unix socket made, one URI printed.
#[test]
fn tcp_only_instead_of_the_unix_socket() {
    if !have("qemu-io") {
        return;
    }
    let dir = Scratch::new("tcp-only");
    let port = free_port();
    std::fs::write(dir.path("rblk.toml"), format!("[server]\nsocket = \"\"\nlisten = \"127.0.0.1:{port}\"\n"))
        .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("serve")
        .arg(dir.path("v.img"))
        .args(["--size", "64M", "--config"])
        .arg(dir.path("rblk.toml"))
        .current_dir(&dir.0)
        .env("RBLK_DRIVER", env!("CARGO_BIN_EXE_rblk-driver"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("rblk serve");
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut out, &mut line).expect("uri");
    assert_eq!(line.trim(), format!("nbd://127.0.0.1:{port}/"));
    let uri = format!("nbd://127.0.0.1:{port}");
    qemu_io(&uri, &["write -P 0x4f 0 64k", "read -P 0x4f 0 64k"]);
    let socks: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
        .collect();
    assert!(socks.is_empty(), "a unix socket was made: {socks:?}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert!(child.wait().expect("wait").success());
}
