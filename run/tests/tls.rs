//! NBD over TLS (STARTTLS) with real clients: certificates made in the test with certtool,
//! qemu-io with `tls-creds-x509` and nbdinfo with `nbds://`; `--tls require` refuses a
//! plaintext client with NBD_REP_ERR_TLS_REQD and nothing else; client certificates with
//! `--tls-verify-peer`; TLS through a driver restart.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;
use common::{free_port, have, make_pki, Scratch, Serve};

fn tools() -> bool {
    have("certtool") && have("qemu-io") && have("nbdinfo")
}

/// qemu-io over TLS (`creds` names the directory, or plaintext without), its output and success.
fn qemu_io(port: u16, creds: Option<&Path>, commands: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    match creds {
        Some(dir) => {
            cmd.arg("--object").arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display()));
            cmd.args([
                "--image-opts",
                &format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"),
            ]);
        }
        None => {
            cmd.args(["-f", "raw", &format!("nbd://127.0.0.1:{port}")]);
        }
    }
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.output().expect("qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("fail") && !text.contains("rror"), text)
}

fn nbdinfo(uri: &str) -> (bool, String) {
    let out = Command::new("nbdinfo").arg(uri).output().expect("nbdinfo");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn serve_tls(dir: &Scratch, port: u16, mode: &str, pki: &Path, extra: &str) -> Serve {
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[tls]\nmode = \"{mode}\"\ncertificates = \"{}\"\n{extra}\
         [supervisor]\nheartbeat = \"100ms\"\nheartbeat_timeout = \"1s\"\n",
        pki.display()
    );
    let serve = Serve::start(dir, &cfg, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    serve
}

#[test]
fn required_tls_serves_tls_clients_and_refuses_plaintext_ones() {
    if !tools() {
        return;
    }
    let dir = Scratch::new("tls-require");
    let pki = dir.path("pki");
    make_pki(&pki);
    let port = free_port();
    let serve = serve_tls(&dir, port, "require", &pki, "");

    let (ok, text) = qemu_io(port, Some(&pki), &["write -P 0x71 0 1M", "read -P 0x71 0 1M", "write -P 0x72 32M 4k"]);
    assert!(ok, "qemu-io over TLS:\n{text}\n{}", serve.log_tail());
    let (ok, text) = nbdinfo(&format!("nbds://127.0.0.1:{port}/?tls-certificates={}", pki.display()));
    assert!(ok && text.contains("with TLS") && text.contains("67108864"), "nbdinfo nbds://:\n{text}");
    // Structured replies and block status through TLS: the map shows the two written ranges.
    let map = Command::new("qemu-img")
        .arg("map")
        .arg("--output=json")
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", pki.display()))
        .arg("--image-opts")
        .arg(format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"))
        .output()
        .expect("qemu-img map");
    let text = String::from_utf8_lossy(&map.stdout);
    assert!(map.status.success(), "qemu-img map over TLS: {}", String::from_utf8_lossy(&map.stderr));
    let data: Vec<(u64, u64)> = serde_json::from_str::<serde_json::Value>(&text)
        .expect("json")
        .as_array()
        .expect("array")
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| (e["start"].as_u64().expect("start"), e["length"].as_u64().expect("length")))
        .collect();
    assert_eq!(data, vec![(0, 1 << 20), (32 << 20, 4096)], "{text}");

    // Plaintext clients get nothing but the refusal.
    let (ok, text) = nbdinfo(&format!("nbd://127.0.0.1:{port}/"));
    assert!(!ok, "a plaintext nbdinfo was served:\n{text}");
    let (ok, text) = qemu_io(port, None, &["read 0 4k"]);
    assert!(!ok && text.contains("TLS"), "a plaintext qemu-io was served:\n{text}");
    plaintext_options_get_tls_reqd(port);

    // The driver restarts with the same credentials; the data is there.
    kill(Pid::from_raw(serve.driver_pid()), Signal::SIGKILL).expect("SIGKILL");
    let (ok, text) = qemu_io(port, Some(&pki), &["read -P 0x71 0 1M", "read -P 0x72 32M 4k"]);
    assert!(ok, "qemu-io over TLS after a restart:\n{text}\n{}", serve.log_tail());
    serve.wait_for("driver ready", 2, Duration::from_secs(30));
    assert!(serve.stop().success());
}

/// A raw plaintext client: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD,
/// with no export information; NBD_OPT_EXPORT_NAME (which cannot be refused) is hung up on.
fn plaintext_options_get_tls_reqd(port: u16) {
    const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
    const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
    const ERR_TLS_REQD: u32 = (1 << 31) | 5;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).expect("client flags"); // FIXED_NEWSTYLE | NO_ZEROES
    let option = |s: &mut std::net::TcpStream, opt: u32, data: &[u8]| {
        let mut m = OPTS_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).expect("option");
    };
    // NBD_OPT_GO for "", no info requests; NBD_OPT_INFO; NBD_OPT_LIST; STRUCTURED_REPLY.
    let go = [0u8, 0, 0, 0, 0, 0];
    for (opt, data) in [(7u32, &go[..]), (6, &go[..]), (3, &[][..]), (8, &[][..])] {
        option(&mut s, opt, data);
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply).expect("reply");
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().expect("8")), REP_MAGIC);
        assert_eq!(u32::from_be_bytes(reply[8..12].try_into().expect("4")), opt);
        assert_eq!(u32::from_be_bytes(reply[12..16].try_into().expect("4")), ERR_TLS_REQD, "option {opt}");
        let len = u32::from_be_bytes(reply[16..20].try_into().expect("4")) as usize;
        let mut message = vec![0u8; len];
        s.read_exact(&mut message).expect("message");
    }
    option(&mut s, 1, b""); // NBD_OPT_EXPORT_NAME
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "NBD_OPT_EXPORT_NAME without TLS got {} bytes", rest.len());
}

#[test]
fn offered_tls_serves_both_and_client_certificates_are_checked() {
    if !tools() {
        return;
    }
    let dir = Scratch::new("tls-on");
    let pki = dir.path("pki");
    make_pki(&pki);
    let port = free_port();
    let serve = serve_tls(&dir, port, "on", &pki, "");
    let (ok, text) = qemu_io(port, Some(&pki), &["write -P 0x61 0 64k"]);
    assert!(ok, "{text}");
    let (ok, text) = qemu_io(port, None, &["read -P 0x61 0 64k"]);
    assert!(ok, "a plaintext client with tls on:\n{text}");
    assert!(serve.stop().success());

    // verify_peer: a client with a certificate from the CA is served, one without is not.
    let dir = Scratch::new("tls-peer");
    let bare = dir.path("bare");
    std::fs::create_dir_all(&bare).expect("dir");
    std::fs::copy(pki.join("ca-cert.pem"), bare.join("ca-cert.pem")).expect("copy");
    let port = free_port();
    let serve = serve_tls(&dir, port, "require", &pki, "verify_peer = true\n");
    let (ok, text) = qemu_io(port, Some(&pki), &["write -P 0x62 0 64k", "read -P 0x62 0 64k"]);
    assert!(ok, "a client with a certificate:\n{text}\n{}", serve.log_tail());
    let (ok, text) = qemu_io(port, Some(&bare), &["read 0 4k"]);
    assert!(!ok, "a client without a certificate was served:\n{text}");
    assert!(serve.stop().success());
}

#[test]
fn a_bad_certificate_directory_stops_serve_with_a_clear_error() {
    let dir = Scratch::new("tls-bad");
    std::fs::create_dir_all(dir.path("pki")).expect("dir");
    std::fs::write(dir.path("pki/server-cert.pem"), "not a certificate").expect("write");
    std::fs::write(dir.path("pki/server-key.pem"), "not a key").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("serve")
        .arg(dir.path("v.img"))
        .arg("--socket")
        .arg(dir.path("s.sock"))
        .args(["--size", "64M", "--tls", "require", "--tls-certificates"])
        .arg(dir.path("pki"))
        .output()
        .expect("rblk serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("TLS credentials in") && err.contains("server-cert.pem"), "{err}");
    let missing = Command::new(env!("CARGO_BIN_EXE_rblk"))
        .arg("serve")
        .arg(dir.path("v.img"))
        .args(["--tls", "on"])
        .output()
        .expect("rblk serve");
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && err.contains("tls.certificates"), "{err}");
}

/// After STARTTLS, a client that stalls in the TLS handshake is dropped at the handshake
/// timeout and one that sends garbage instead of a ClientHello at once; the driver serves on,
/// unrestarted.
#[test]
fn hostile_tls_handshakes_are_dropped() {
    if !tools() {
        return;
    }
    let dir = Scratch::new("tls-hostile");
    let pki = dir.path("pki");
    make_pki(&pki);
    let port = free_port();
    let serve = serve_tls(&dir, port, "require", &pki, "");
    let driver = serve.driver_pid();
    // Greets, sends STARTTLS and reads its ACK.
    let start_tls = || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("greeting");
        s.write_all(&3u32.to_be_bytes()).expect("flags");
        let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&5u32.to_be_bytes()); // NBD_OPT_STARTTLS
        m.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&m).expect("STARTTLS");
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply).expect("ACK");
        assert_eq!(u32::from_be_bytes(reply[12..16].try_into().expect("4")), 1, "NBD_REP_ACK");
        s
    };
    let ends_within = |mut s: std::net::TcpStream, limit: Duration| {
        let started = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // an alert
            }
        }
        assert!(started.elapsed() < limit, "dropped only after {:?}", started.elapsed());
    };
    let silent = start_tls();
    let mut garbage = start_tls();
    garbage.write_all(&[0x5a; 1024]).expect("garbage");
    ends_within(garbage, Duration::from_secs(5));
    ends_within(silent, Duration::from_secs(20)); // handshake_timeout is 10 s
    let (ok, text) = qemu_io(port, Some(&pki), &["write -P 0x44 0 64k", "read -P 0x44 0 64k"]);
    assert!(ok, "{text}");
    assert_eq!(serve.driver_pid(), driver, "the driver restarted:\n{}", serve.log_tail());
    assert!(serve.stop().success());
}

/// A TLS client that floods read requests and never reads a reply: the driver drops it at
/// the stall timeout, and its TLS pump ends with it (it must not spin, nor stay behind).
#[test]
fn a_tls_client_that_stops_reading_is_dropped_and_its_pump_ends() {
    if !tools() {
        return;
    }
    let dir = Scratch::new("tls-stall");
    let pki = dir.path("pki");
    make_pki(&pki);
    let port = free_port();
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nstall_timeout = \"2s\"\n[tls]\nmode = \"require\"\ncertificates = \"{}\"\n",
        pki.display()
    );
    let serve = Serve::start(&dir, &cfg, &[]);
    serve.wait_for("serving", 1, Duration::from_secs(30));
    let driver = serve.driver_pid();

    // TLS with our own client, then NBD_OPT_GO and a flood of 1 MiB reads, never read.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.join("ca-cert.pem")).expect("ca");
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(cert.expect("ca cert")).expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut hello = [0u8; 18];
    tcp.read_exact(&mut hello).expect("greeting");
    tcp.write_all(&3u32.to_be_bytes()).expect("flags");
    let option = |s: &mut dyn Write, opt: u32, data: &[u8]| {
        let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).expect("option");
    };
    option(&mut tcp, 5, &[]); // STARTTLS
    let mut ack = [0u8; 20];
    tcp.read_exact(&mut ack).expect("STARTTLS ACK");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    option(&mut tls, 7, &[0, 0, 0, 0, 0, 0]); // NBD_OPT_GO "", no info requests
    tls.flush().expect("flush");
    // NBD_REP_INFO (export) and NBD_REP_ACK.
    let mut info = [0u8; 20];
    loop {
        tls.read_exact(&mut info).expect("GO reply");
        let len = u32::from_be_bytes(info[16..20].try_into().expect("4")) as usize;
        let mut data = vec![0u8; len];
        tls.read_exact(&mut data).expect("GO data");
        if u32::from_be_bytes(info[12..16].try_into().expect("4")) == 1 {
            break;
        }
    }
    let mut flood = Vec::new();
    for handle in 0..64u64 {
        flood.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        flood.extend_from_slice(&0u16.to_be_bytes()); // flags
        flood.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        flood.extend_from_slice(&handle.to_be_bytes());
        flood.extend_from_slice(&0u64.to_be_bytes());
        flood.extend_from_slice(&(1u32 << 20).to_be_bytes());
    }
    tls.write_all(&flood).expect("flood");
    tls.flush().expect("flush");

    // Dropped at the stall timeout; then no TLS pump is left, and the driver is idle.
    let pumps = || {
        std::fs::read_dir(format!("/proc/{driver}/task"))
            .expect("tasks")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "rblk-tls")
            .count()
    };
    assert_eq!(pumps(), 1, "the pump of the one TLS connection");
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while pumps() > 0 {
        assert!(std::time::Instant::now() < until, "the TLS pump outlived its connection:\n{}", serve.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = |pid: i32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    };
    let before = cpu(driver);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu(driver) - before;
    assert!(spent < 50, "the driver spent {spent} ticks in 2 s with no client");
    assert_eq!(serve.driver_pid(), driver);
    drop(tls);
    assert!(serve.stop().success());
}
