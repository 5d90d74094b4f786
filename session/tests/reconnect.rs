//! The reconnecting client (`client.rs` module docs) against servers on a socket path that cut
//! connections at random points and go away for a while, as a killed and restarted driver does.
//!
//! The fault plans are seeded: `RBLK_SEED=n` runs one seed instead of the built-in ones. Thread
//! scheduling still varies from run to run; a failure names the seed and what the server did.

mod common;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use session::wire::*;
use session::{
    check_request, handshake, read_request, write_reply, Client, Export, Options, Reconnect, Request, RequestKind,
    SessionError,
};

const SIZE: u64 = 1 << 20;
const MAX_BLOCK: u32 = 128 * 1024;

fn export() -> Export {
    Export { max_block: MAX_BLOCK, ..Export::new(SIZE) }
}

/// Quick retries, so that hundreds of drops take little time; a give-up time no test reaches.
fn quick() -> Reconnect {
    Reconnect {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        give_up_after: TIMEOUT,
    }
}

fn options(policy: Reconnect) -> Options {
    Options { reconnect: Some(policy) }
}

/// A directory of its own for a test's socket, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rblk-reconnect-{}-{name}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("nbd.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// xorshift64*: small, seeded, good enough to pick faults and data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

fn with_timeouts(stream: UnixStream) -> UnixStream {
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("timeout");
    stream
}

/// Accepts one connection and completes the handshake for `export`.
fn accept(listener: &UnixListener, export: &Export) -> UnixStream {
    let (stream, _) = listener.accept().expect("accept");
    let mut stream = with_timeouts(stream);
    handshake(&mut stream, export).expect("handshake").expect("transmission");
    stream
}

/// Serves `request` from `disk` as a well-behaved server would: (error, read data).
fn apply(request: &Request, export: &Export, disk: &Disk) -> (u32, Vec<u8>) {
    if let Some(errno) = check_request(request, export) {
        return (errno, Vec::new());
    }
    let start = request.offset as usize;
    let range = start..start + request.length as usize;
    let mut disk = disk.lock().expect("disk");
    match request.kind {
        RequestKind::Read => (0, disk[range].to_vec()),
        RequestKind::Write => {
            disk[range].copy_from_slice(&request.data);
            (0, Vec::new())
        }
        RequestKind::Trim | RequestKind::WriteZeroes => {
            disk[range].fill(0);
            (0, Vec::new())
        }
        RequestKind::Flush
        | RequestKind::Cache
        | RequestKind::Disc
        | RequestKind::BlockStatus
        | RequestKind::Other(_) => (0, Vec::new()),
    }
}

fn reply_bytes(handle: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_reply(&mut bytes, handle, error, data).expect("encode reply");
    bytes
}

/// What the flaky server does to one connection.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Hangs up in the middle of its greeting.
    CutInHandshake,
    /// Serves `after` requests, then reads one more (and applies it, or not) and hangs up
    /// without a reply: an acknowledgement lost after the work was done, or before.
    CutBeforeReply { after: u64, apply: bool },
    /// Serves `after` requests, then applies one more and hangs up half-way through its reply.
    CutMidReply { after: u64 },
    /// Serves `after` requests, then answers `NBD_ESHUTDOWN` to every request until the
    /// client's `NBD_CMD_DISC` (proto.md "Terminating the transmission phase").
    Shutdown { after: u64 },
}

/// What the flaky server did.
#[derive(Debug, Default)]
struct Faults {
    connections: u64,
    requests: u64,
    /// Cuts in the handshake (included in `cuts`).
    handshake_cuts: u64,
    cuts: u64,
    shutdowns: u64,
    /// The socket was gone for a while (connect fails with ENOENT).
    restarts_unlinked: u64,
    /// The socket file stayed without a listener for a while (connect fails with ECONNREFUSED).
    restarts_refused: u64,
    /// The server did not accept for a while (the client waits in the listen backlog).
    stalls: u64,
}

/// One connection at a time, like a driver process: nothing of a connection is applied after
/// the next one is accepted, so resent requests land after the originals.
fn flaky_server(path: &Path, seed: u64, disk: &Disk, stop: &AtomicBool) -> Faults {
    let export = export();
    let mut rng = Rng::new(seed);
    let mut faults = Faults::default();
    let mut listener = Some(UnixListener::bind(path).expect("bind"));
    while let Some(live) = &listener {
        let (stream, _) = live.accept().expect("accept");
        if stop.load(Ordering::SeqCst) {
            break;
        }
        faults.connections += 1;
        let fault = match rng.below(8) {
            0 => Fault::CutInHandshake,
            1..=3 => Fault::CutBeforeReply { after: rng.below(16), apply: rng.below(2) == 0 },
            4 | 5 => Fault::CutMidReply { after: rng.below(16) },
            _ => Fault::Shutdown { after: rng.below(16) },
        };
        serve_until(with_timeouts(stream), fault, &export, disk, &mut faults);
        match rng.below(6) {
            0 => {
                listener = None;
                std::fs::remove_file(path).expect("remove socket");
                thread::sleep(rng.millis(2, 25));
                faults.restarts_unlinked += 1;
            }
            1 => {
                // The socket file stays: connecting is refused.
                listener = None;
                thread::sleep(rng.millis(2, 25));
                std::fs::remove_file(path).expect("remove socket");
                faults.restarts_refused += 1;
            }
            2 => {
                thread::sleep(rng.millis(2, 25));
                faults.stalls += 1;
            }
            _ => {}
        }
        if listener.is_none() {
            listener = Some(UnixListener::bind(path).expect("bind again"));
        }
    }
    faults
}

fn serve_until(mut stream: UnixStream, fault: Fault, export: &Export, disk: &Disk, faults: &mut Faults) {
    if let Fault::CutInHandshake = fault {
        stream.write_all(b"NBDMAGICIHAV").ok();
        faults.cuts += 1;
        faults.handshake_cuts += 1;
        return;
    }
    match handshake(&mut stream, export) {
        Ok(Some(_)) => {}
        // The client gave up on this connection (it only does when closing).
        Ok(None) | Err(_) => return,
    }
    let mut served = 0;
    let mut shutting_down = false;
    loop {
        let request = match read_request(&mut stream, export.payload_limit()) {
            Ok(request) => request,
            Err(SessionError::Closed { .. }) => return,
            // The client hangs up only after NBD_CMD_DISC, and never sends a broken request.
            Err(e) => panic!("the client broke the stream: {e}"),
        };
        faults.requests += 1;
        if request.kind == RequestKind::Disc {
            return;
        }
        let at_fault = |after: u64| served == after;
        let reply = match fault {
            _ if shutting_down => reply_bytes(request.handle, NBD_ESHUTDOWN, &[]),
            Fault::CutBeforeReply { after, apply: applied } if at_fault(after) => {
                if applied {
                    apply(&request, export, disk);
                }
                faults.cuts += 1;
                return;
            }
            Fault::CutMidReply { after } if at_fault(after) => {
                let (error, data) = apply(&request, export, disk);
                let reply = reply_bytes(request.handle, error, &data);
                // Within the header, or within the data of a read.
                let cut = if data.is_empty() { 8 } else { 16 + data.len() / 2 };
                stream.write_all(&reply[..cut]).ok();
                faults.cuts += 1;
                return;
            }
            Fault::Shutdown { after } if at_fault(after) => {
                shutting_down = true;
                faults.shutdowns += 1;
                reply_bytes(request.handle, NBD_ESHUTDOWN, &[])
            }
            _ => {
                let (error, data) = apply(&request, export, disk);
                served += 1;
                reply_bytes(request.handle, error, &data)
            }
        };
        if stream.write_all(&reply).is_err() {
            return;
        }
    }
}

/// Stops a server blocked in `accept` on `path`: raises `stop`, then connects until it notices
/// (it may be between listeners).
fn stop_server<T>(path: &Path, stop: &AtomicBool, server: JoinHandle<T>) -> T {
    stop.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while !server.is_finished() {
        assert!(start.elapsed() < TIMEOUT, "the server does not stop");
        UnixStream::connect(path).ok();
        thread::sleep(Duration::from_millis(5));
    }
    server.join().expect("server thread")
}

fn seeds() -> Vec<u64> {
    match std::env::var("RBLK_SEED") {
        Ok(seed) => vec![seed.parse().expect("RBLK_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    }
}

// The scenario: several threads write, read, trim and flush through one reconnecting
// client while the server cuts connections anywhere and restarts. Every call succeeds, every
// read matches the model (a write applied twice leaves the same state), and the disk ends up as
// the model says.
#[test]
fn many_threads_ride_out_cuts_and_restarts() {
    const THREADS: u64 = 8;
    const OPS: u64 = 120;
    let region = SIZE / THREADS;
    for seed in seeds() {
        let dir = Scratch::new(&format!("flaky-{seed}"));
        let path = dir.socket();
        let disk: Disk = Arc::new(Mutex::new(vec![0; SIZE as usize]));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (path, disk, stop) = (path.clone(), Arc::clone(&disk), Arc::clone(&stop));
            thread::spawn(move || flaky_server(&path, seed, &disk, &stop))
        };
        let client = Client::connect_with(&path, "", &options(quick())).expect("connect");
        let models: Vec<Vec<u8>> = thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let client = &client;
                    s.spawn(move || {
                        let mut rng = Rng::new(seed * 1000 + t);
                        let base = t * region;
                        let mut model = vec![0u8; region as usize];
                        for op in 0..OPS {
                            let sectors = 1 + rng.below(32);
                            let len = sectors * 512;
                            let at = rng.below((region - len) / 512 + 1) * 512;
                            let range = at as usize..(at + len) as usize;
                            let what = format!("seed {seed} thread {t} op {op}");
                            match rng.below(10) {
                                0..=4 => {
                                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                                    let fua = rng.below(4) == 0;
                                    client.write(base + at, &data, fua).unwrap_or_else(|e| panic!("{what}: {e}"));
                                    model[range].copy_from_slice(&data);
                                }
                                5..=7 => {
                                    let got =
                                        client.read(base + at, len as u32).unwrap_or_else(|e| panic!("{what}: {e}"));
                                    assert!(got == model[range], "{what}: read differs from the model");
                                }
                                8 => {
                                    if rng.below(2) == 0 {
                                        client.trim(base + at, len as u32)
                                    } else {
                                        client.write_zeroes(base + at, len as u32, rng.below(2) == 0)
                                    }
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                                    model[range].fill(0);
                                }
                                _ => client.flush().unwrap_or_else(|e| panic!("{what}: {e}")),
                            }
                        }
                        // Everything once more, through the client.
                        for at in (0..region).step_by(MAX_BLOCK as usize) {
                            let len = MAX_BLOCK.min((region - at) as u32);
                            let got = client.read(base + at, len).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                            assert!(
                                got[..] == model[at as usize..at as usize + len as usize],
                                "seed {seed} thread {t}"
                            );
                        }
                        model
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("worker")).collect()
        });
        let reconnects = client.reconnects();
        drop(client);
        let faults = stop_server(&path, &stop, server);
        eprintln!("seed {seed}: {reconnects} reconnects; server: {faults:?}");
        assert!(faults.cuts > 0 && faults.shutdowns > 0, "seed {seed}: too few faults: {faults:?}");
        assert!(reconnects > 0, "seed {seed}: {faults:?}");
        // Every connection but the first was a reconnect, except those cut in the handshake.
        assert_eq!(reconnects, faults.connections - 1 - faults.handshake_cuts, "seed {seed}: {faults:?}");
        let disk = disk.lock().expect("disk");
        for (t, model) in models.iter().enumerate() {
            let base = t * region as usize;
            assert!(disk[base..base + model.len()] == model[..], "seed {seed}: region {t} differs on the server");
        }
    }
}

// proto.md "Error values": an error reply is the answer to the request; it is returned as it
// came and not sent again, and the connection goes on.
#[test]
fn error_replies_are_answers_not_retried() {
    let dir = Scratch::new("einval");
    let path = dir.socket();
    let listener = UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || {
        let mut stream = accept(&listener, &export());
        let mut seen = Vec::new();
        loop {
            let request = read_request(&mut stream, 1 << 25).expect("request");
            seen.push((request.kind, request.offset));
            match request.kind {
                RequestKind::Disc => return seen,
                RequestKind::Read if request.offset == 0 => {
                    write_reply(&mut stream, request.handle, NBD_EINVAL, &[]).expect("reply");
                }
                RequestKind::Read => write_reply(&mut stream, request.handle, NBD_EIO, &[]).expect("reply"),
                _ => write_reply(&mut stream, request.handle, 0, &[]).expect("reply"),
            }
        }
    });
    let client = Client::connect_with(&path, "", &options(quick())).expect("connect");
    let err = client.read(0, 512).expect_err("EINVAL");
    assert!(matches!(err, SessionError::Nbd { errno: NBD_EINVAL, command: RequestKind::Read, .. }), "{err:?}");
    let err = client.read(4096, 512).expect_err("EIO");
    assert!(matches!(err, SessionError::Nbd { errno: NBD_EIO, .. }), "{err:?}");
    client.write(0, &[1; 512], false).expect("the connection goes on");
    assert_eq!(client.reconnects(), 0);
    client.disconnect().expect("disconnect");
    let seen = server.join().expect("server");
    assert_eq!(
        seen,
        [(RequestKind::Read, 0), (RequestKind::Read, 4096), (RequestKind::Write, 0), (RequestKind::Disc, 0)],
        "each request went out once"
    );
}

// proto.md "Terminating the transmission phase": on NBD_ESHUTDOWN the client lets the request in
// flight finish, then disconnects softly; reconnecting, it then sends the refused request again
// on a new connection, and requests made meanwhile wait for it.
#[test]
fn eshutdown_is_a_reconnect_when_reconnecting() {
    let dir = Scratch::new("eshutdown");
    let path = dir.socket();
    let listener = UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || {
        let disk: Disk = Arc::new(Mutex::new(vec![7; SIZE as usize]));
        let mut first = accept(&listener, &export());
        let a = read_request(&mut first, 1 << 25).expect("a");
        let b = read_request(&mut first, 1 << 25).expect("b");
        write_reply(&mut first, a.handle, NBD_ESHUTDOWN, &[]).expect("reply");
        thread::sleep(Duration::from_millis(30));
        assert_nothing_pending(&first);
        let (_, data) = apply(&b, &export(), &disk);
        write_reply(&mut first, b.handle, 0, &data).expect("reply");
        assert_eq!(read_request(&mut first, 1 << 25).expect("disc").kind, RequestKind::Disc);
        drop(first);
        let mut second = accept(&listener, &export());
        let mut resent = Vec::new();
        loop {
            let request = read_request(&mut second, 1 << 25).expect("request");
            if request.kind == RequestKind::Disc {
                return resent;
            }
            resent.push(request.offset);
            let (error, data) = apply(&request, &export(), &disk);
            write_reply(&mut second, request.handle, error, &data).expect("reply");
        }
    });
    let client = Client::connect_with(&path, "", &options(quick())).expect("connect");
    let results: Vec<_> = thread::scope(|s| {
        let reads: Vec<_> = [0u64, 4096]
            .into_iter()
            .map(|at| {
                let client = &client;
                s.spawn(move || client.read(at, 512))
            })
            .collect();
        reads.into_iter().map(|r| r.join().expect("reader")).collect()
    });
    for result in results {
        assert_eq!(result.expect("read"), vec![7; 512]);
    }
    assert_eq!(client.read(8192, 512).expect("read on the new connection"), vec![7; 512]);
    assert_eq!(client.reconnects(), 1);
    client.disconnect().expect("disconnect");
    let mut resent = server.join().expect("server");
    resent.sort();
    // The one answered NBD_ESHUTDOWN (either), and the later read.
    assert_eq!(resent.len(), 2, "{resent:?}");
    assert_eq!(resent[1], 8192);
}

// Requests in flight when the server goes away for good fail once the give-up time has passed,
// and so does every later one, with an error that says why.
#[test]
fn gives_up_when_the_server_stays_away() {
    const PENDING: usize = 4;
    let give_up = Duration::from_millis(300);
    let dir = Scratch::new("give-up");
    let path = dir.socket();
    let listener = UnixListener::bind(&path).expect("bind");
    let server_path = path.clone();
    let server = thread::spawn(move || {
        let mut stream = accept(&listener, &export());
        for _ in 0..PENDING {
            read_request(&mut stream, 1 << 25).expect("request");
        }
        // Gone for good, socket file and all.
        drop(listener);
        std::fs::remove_file(&server_path).expect("remove socket");
        // Before the cut: the client cannot notice it earlier.
        let cut = Instant::now();
        drop(stream);
        cut
    });
    let policy = Reconnect { give_up_after: give_up, ..quick() };
    let client = Client::connect_with(&path, "", &options(policy)).expect("connect");
    let results: Vec<_> = thread::scope(|s| {
        let workers: Vec<_> = (0..PENDING as u64)
            .map(|i| {
                let client = &client;
                s.spawn(move || (client.read(i * 4096, 4096), Instant::now()))
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker")).collect()
    });
    let cut = server.join().expect("server");
    for (result, done) in results {
        let err = result.expect_err("no server");
        let SessionError::GaveUp { waited, attempts, ref last } = err else { panic!("{err:?}") };
        assert!(waited >= give_up && attempts > 1, "{err}");
        assert!(last.contains("connect") && last.contains("No such file"), "{err}");
        let message = err.to_string();
        assert!(message.contains("gave up"), "{message}");
        let after = done.duration_since(cut);
        assert!(after >= give_up && after < give_up + Duration::from_secs(5), "{after:?}");
    }
    let start = Instant::now();
    assert!(matches!(client.flush(), Err(SessionError::GaveUp { .. })));
    assert!(start.elapsed() < Duration::from_secs(1), "a later request fails at once");
    assert_eq!(client.reconnects(), 0);
    assert!(matches!(client.disconnect(), Err(SessionError::GaveUp { .. })));
}

// A server that accepts and handshakes but drops every connection before answering: the
// outage does not end with each new connection, so the client still gives up.
#[test]
fn gives_up_when_no_connection_answers() {
    let give_up = Duration::from_millis(300);
    let dir = Scratch::new("no-answer");
    let path = dir.socket();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (path, stop) = (path.clone(), Arc::clone(&stop));
        let listener = UnixListener::bind(&path).expect("bind");
        thread::spawn(move || {
            let mut connections = 0;
            loop {
                let (stream, _) = listener.accept().expect("accept");
                if stop.load(Ordering::SeqCst) {
                    return connections;
                }
                connections += 1;
                let mut stream = with_timeouts(stream);
                handshake(&mut stream, &export()).expect("handshake").expect("transmission");
                read_request(&mut stream, 1 << 25).expect("request");
            }
        })
    };
    let policy = Reconnect { give_up_after: give_up, ..quick() };
    let client = Client::connect_with(&path, "", &options(policy)).expect("connect");
    let start = Instant::now();
    let err = client.read(0, 512).expect_err("never answered");
    let elapsed = start.elapsed();
    assert!(matches!(err, SessionError::GaveUp { .. }), "{err:?}");
    assert!(err.to_string().contains("before it answered anything"), "{err}");
    assert!(elapsed >= give_up && elapsed < give_up + Duration::from_secs(5), "{elapsed:?}");
    let reconnects = client.reconnects();
    assert!(reconnects > 1, "{reconnects}");
    drop(client);
    let connections = stop_server(&path, &stop, server);
    assert_eq!(connections, reconnects + 1);
}

// The export of the new connection must be the one the client was told about.
#[test]
fn a_changed_export_fails_pending_requests() {
    let dir = Scratch::new("resized");
    let path = dir.socket();
    let listener = UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || {
        let mut first = accept(&listener, &export());
        read_request(&mut first, 1 << 25).expect("request");
        drop(first);
        let mut second = accept(&listener, &Export { size: 2 * SIZE, ..export() });
        // The client hangs up softly, sending nothing else.
        read_request(&mut second, 1 << 25).expect("disc").kind
    });
    let client = Client::connect_with(&path, "", &options(quick())).expect("connect");
    let err = client.read(0, 512).expect_err("export changed");
    assert!(
        matches!(err, SessionError::ExportChanged { what: "size", before: SIZE, after } if after == 2 * SIZE),
        "{err:?}"
    );
    assert!(err.to_string().contains("size changed across a reconnect from 1048576 to 2097152"), "{err}");
    assert_eq!(server.join().expect("server"), RequestKind::Disc);
    assert!(matches!(client.write(0, &[1; 512], false), Err(SessionError::ExportChanged { .. })));
    assert_eq!(client.size(), SIZE);
}

// With a reconnect policy the first connection is made like later ones: a client that starts
// while the server is not there yet waits for it.
#[test]
fn connect_waits_for_the_server() {
    let dir = Scratch::new("late");
    let path = dir.socket();
    let server_path = path.clone();
    let server = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        let listener = UnixListener::bind(&server_path).expect("bind");
        let disk: Disk = Arc::new(Mutex::new(vec![0; SIZE as usize]));
        let (stream, _) = listener.accept().expect("accept");
        serve(with_timeouts(stream), &export(), &disk, 1).expect("serve")
    });
    let client = Client::connect_with(&path, "", &options(quick())).expect("connect");
    client.write(0, &[3; 4096], true).expect("write");
    assert_eq!(client.read(0, 4096).expect("read"), vec![3; 4096]);
    assert_eq!(client.reconnects(), 0);
    client.disconnect().expect("disconnect");
    assert!(server.join().expect("server").saw_disc);

    // Without a server at all, connecting gives up in time and says why.
    let policy = Reconnect { give_up_after: Duration::from_millis(100), ..quick() };
    let err = Client::connect_with(&dir.0.join("nobody.sock"), "", &options(policy)).expect_err("nobody");
    assert!(matches!(err, SessionError::GaveUp { .. }) && err.to_string().contains("No such file"), "{err}");
}

// Dropping a client between connections neither hangs nor reconnects, long before the give-up
// time.
#[test]
fn dropping_a_reconnecting_client_is_prompt() {
    let dir = Scratch::new("drop");
    let path = dir.socket();
    let listener = UnixListener::bind(&path).expect("bind");
    let server_path = path.clone();
    let server = thread::spawn(move || {
        let stream = accept(&listener, &export());
        drop(listener);
        std::fs::remove_file(&server_path).expect("remove socket");
        drop(stream);
    });
    let policy = Reconnect { give_up_after: Duration::from_secs(600), ..quick() };
    let client = Client::connect_with(&path, "", &options(policy)).expect("connect");
    server.join().expect("server");
    thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    assert!(matches!(client.disconnect(), Err(SessionError::Disconnected { .. })), "no connection to end");
    assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
}

// Without a policy nothing changes: a cut connection fails the request, and the client stays
// disconnected even though the server is back.
#[test]
fn without_a_policy_the_client_does_not_reconnect() {
    let dir = Scratch::new("no-policy");
    let path = dir.socket();
    let listener = UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || {
        let mut stream = accept(&listener, &export());
        read_request(&mut stream, 1 << 25).expect("request");
        drop(stream);
        listener
    });
    let client = Client::connect(&path, "").expect("connect");
    assert!(matches!(client.read(0, 512), Err(SessionError::Disconnected { .. })));
    let _listener = server.join().expect("server");
    assert!(matches!(client.read(0, 512), Err(SessionError::Disconnected { .. })));
    assert_eq!(client.reconnects(), 0);
}
