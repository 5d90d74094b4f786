//! A driver whose device fails dies without answering what it could not complete.
//!
//! Found as a hostile client would: after a device failure, requests in flight got an NBD
//! EIO reply within a millisecond instead of the connection closing unanswered, and a
//! reconnecting client (QEMU's reconnect-delay) passed that EIO up instead of resending. Here
//! the real `driver::run` serves a simulated disk that goes down (every operation fails)
//! while clients keep reads and writes in flight: no request may be answered with an error;
//! each is answered with success (it completed before the failure) or not at all, and the
//! driver stops with an error. A single bad block, in contrast, is still answered EIO
//! (after a log write proved the driver healthy).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft_state::device::{Device, SimDisk, SimFault, BLOCK};
use raft_state::volume::{FormatOptions, Volume};
use slog::{o, Discard, Logger};

const VOLUME_BLOCKS: u64 = 4096;

struct Raw(UnixStream);

impl Raw {
    /// NBD_OPT_EXPORT_NAME handshake, the simplest a client may do.
    fn connect(path: &std::path::Path) -> Raw {
        Raw(common::nbd_connect(path))
    }

    fn send(&mut self, command: u16, handle: u64, offset: u64, data: &[u8], length: u32) -> std::io::Result<()> {
        let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&command.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&length.to_be_bytes());
        req.extend_from_slice(data);
        self.0.write_all(&req)
    }
}

fn format(disk: &SimDisk) {
    let opts = FormatOptions { volume_bytes: VOLUME_BLOCKS * BLOCK, log_blocks: 256, volume_id: *b"failstop-test-v1" };
    Volume::format(disk, None, opts).expect("format");
    disk.flush().expect("flush");
}

type Driver = std::thread::JoinHandle<Result<(), driver::DriverError>>;

/// A freshly formatted simulated disk (`seed` for its faults) served by the real `driver::run`
/// in a scratch directory named `name`: the directory, the disk, the socket, the driver.
fn start(name: &str, seed: u64) -> (std::path::PathBuf, Arc<SimDisk>, std::path::PathBuf, Driver) {
    let dir = scratch(name);
    let disk = Arc::new(SimDisk::new((VOLUME_BLOCKS + 1024) * BLOCK, seed));
    format(&disk);
    let path = dir.join("s.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let mut cfg = driver::driver_config(&config::Config::default());
    cfg.node.tick = Duration::from_millis(2);
    let dev = disk.clone() as Arc<dyn Device>;
    let log = Logger::root(Discard, o!());
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::spawn(move || {
        driver::run(dev, None, driver::Listeners { unix: Some(listener), tcp: None, vhost: None }, cfg, stop, None, log)
    });
    (dir, disk, path, thread)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rblk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

/// Clients keep writes and (uncached: the simulated disk has no page cache) reads in
/// flight; the device goes down mid-stream. Every reply that arrives says success.
#[test]
fn a_failing_device_closes_connections_without_error_replies() {
    for round in 0..5u64 {
        let (dir, disk, path, driver) = start(&format!("failstop-{round}"), round);
        let ok = Arc::new(AtomicU64::new(0));
        let mut sockets = Vec::new();
        let clients: Vec<_> = (0..3u64)
            .map(|c| {
                let ok = ok.clone();
                let mut raw = Raw::connect(&path);
                sockets.push(raw.0.try_clone().expect("clone"));
                std::thread::spawn(move || -> Vec<(u64, u32)> {
                    let mut replies = Raw(raw.0.try_clone().expect("clone"));
                    let reader = std::thread::spawn(move || {
                        let mut errors = Vec::new();
                        let mut head = [0u8; 16];
                        while replies.0.read_exact(&mut head).is_ok() {
                            let error = u32::from_be_bytes(head[4..8].try_into().expect("4"));
                            let handle = u64::from_be_bytes(head[8..].try_into().expect("8"));
                            if error != 0 {
                                errors.push((handle, error));
                                continue;
                            }
                            if handle % 2 == 1 {
                                let mut data = [0u8; 4096];
                                if replies.0.read_exact(&mut data).is_err() {
                                    break;
                                }
                            }
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        errors
                    });
                    let block = [c as u8 + 1; 4096];
                    for i in 0u64.. {
                        let offset = ((c * 1000 + i) % VOLUME_BLOCKS) * BLOCK;
                        // Even handles write, odd handles read.
                        let sent = if i % 2 == 0 {
                            raw.send(1, i, offset, &block, 4096)
                        } else {
                            raw.send(0, i, offset, &[], 4096)
                        };
                        if sent.is_err() {
                            break;
                        }
                    }
                    reader.join().expect("reader")
                })
            })
            .collect();
        // Let requests flow, then the device dies.
        let until = Instant::now() + Duration::from_secs(10);
        while ok.load(Ordering::Relaxed) < 200 {
            assert!(Instant::now() < until, "round {round}: the workload does not run");
            std::thread::sleep(Duration::from_millis(1));
        }
        disk.crash_after_ops(Some(0));
        let result = driver.join().expect("driver::run");
        assert!(result.is_err(), "round {round}: the driver stops with an error");
        // The process would exit now and close every connection; in a test the clients close
        // them, a moment later (a reply still on its way would arrive meanwhile).
        std::thread::sleep(Duration::from_millis(200));
        for s in &sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        drop(UnixStream::connect(&path));
        for client in clients {
            let errors = client.join().expect("client");
            let first: Vec<_> = errors.iter().take(5).collect();
            assert!(
                errors.is_empty(),
                "round {round}: {} replies with errors on the way down, first {first:?}",
                errors.len()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// One write at a time, so the node thread applies each batch itself (nothing waits to be
/// appended and the applier is idle): the device goes down at the k-th operation after the
/// workload ran a while, which lands on a log append, an applied batch's data write or a
/// checkpoint. The driver stops with an error, and no reply says anything but success.
#[test]
fn a_failing_device_stops_the_driver_when_the_node_applies() {
    for k in 0..6u64 {
        let (dir, disk, path, driver) = start(&format!("failstop-qd1-{k}"), k);
        let mut raw = Raw::connect(&path);
        let block = [k as u8 + 1; 4096];
        let mut head = [0u8; 16];
        let mut answered = 0u64;
        for i in 0u64.. {
            if i == 100 {
                disk.crash_after_ops(Some(k));
            }
            if raw.send(1, i, (i % VOLUME_BLOCKS) * BLOCK, &block, 4096).is_err() {
                break;
            }
            // The driver stops; the test closes the connection once it has (below).
            let stopped = Instant::now() + Duration::from_secs(10);
            raw.0.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
            let replied = loop {
                match raw.0.read_exact(&mut head) {
                    Ok(()) => break true,
                    Err(_) if driver.is_finished() => break false,
                    Err(_) => assert!(Instant::now() < stopped, "k {k}: the driver neither answers nor stops"),
                }
            };
            if !replied {
                break;
            }
            let error = u32::from_be_bytes(head[4..8].try_into().expect("4"));
            assert_eq!(error, 0, "k {k}: write {i} answered with error {error}");
            answered += 1;
        }
        assert!(answered >= 100, "k {k}: only {answered} writes answered before the failure");
        let result = driver.join().expect("driver::run");
        assert!(result.is_err(), "k {k}: the driver stops with an error");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A latent read error on one data block is that request's EIO (never wrong data), answered
/// once the next log write confirmed the driver as a whole is healthy; the driver serves on.
#[test]
fn a_bad_block_is_still_answered_eio() {
    let (dir, disk, path, driver) = start("failstop-badblock", 1);
    let client = session::Client::connect(&path, "").expect("client");
    client.write(0, &[5u8; 4096], true).expect("write");
    // Find the data block by its content (past the roots and the log ring, which holds the
    // payload too) and make it unreadable. An acknowledged write's block is written just after
    // the reply: look again until it is there.
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        let found =
            (3 + 256..disk.size() / BLOCK).find(|b| disk.read_at(b * BLOCK, &mut buf).is_ok() && buf == [5u8; 4096]);
        if let Some(at) = found {
            break at;
        }
        assert!(Instant::now() < deadline, "the data block was never written");
        std::thread::sleep(Duration::from_millis(5));
    };
    disk.inject(SimFault::ReadError { offset: at * BLOCK });
    match client.read(0, 4096) {
        Err(session::SessionError::Nbd { errno, .. }) => assert_eq!(errno, session::NBD_EIO),
        other => panic!("expected EIO, got {other:?}"),
    }
    // A longer read over the bad block too, and then reads that do not touch it: the replies
    // stay in step (an error carries no data).
    match client.read(0, 32 << 10) {
        Err(session::SessionError::Nbd { errno, .. }) => assert_eq!(errno, session::NBD_EIO),
        other => panic!("expected EIO, got {other:?}"),
    }
    client.write(8192, &[6u8; 4096], false).expect("the driver serves on");
    assert_eq!(client.read(8192, 4096).expect("read"), vec![6u8; 4096]);
    assert_eq!(client.read(1 << 20, 1 << 20).expect("read"), vec![0u8; 1 << 20]);
    client.write(1 << 20, &[7u8; 256 << 10], false).expect("write");
    assert_eq!(client.read(1 << 20, 256 << 10).expect("read"), vec![7u8; 256 << 10]);
    drop(client);
    assert!(!driver.is_finished());
    let _ = std::fs::remove_dir_all(&dir);
}
