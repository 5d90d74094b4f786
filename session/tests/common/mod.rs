//! Test helpers: a server built from the crate's pieces over an in-memory disk, and a raw NBD
//! peer that writes and reads bytes by hand (so the tests do not check the crate against its
//! own encoders).

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use session::wire::*;
use session::{
    check_request, handshake, read_request, write_reply, Client, Export, Request, RequestKind, SessionError,
};

/// Long enough for any test step; a hung test fails instead of hanging the suite.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub type Disk = Arc<Mutex<Vec<u8>>>;

/// What the test server saw.
#[derive(Debug, Default)]
pub struct Served {
    pub requests: usize,
    /// Batches of more than one request answered in reverse order of arrival.
    pub reversed_batches: usize,
    pub saw_disc: bool,
}

pub fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socket pair");
    for s in [&a, &b] {
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(TIMEOUT)).expect("timeout");
    }
    (a, b)
}

/// A whole NBD server: handshake, then requests checked by `check_request` and served from
/// `disk`. Requests are collected `batch` at a time and answered newest first, so a client
/// sees its replies out of order (allowed by proto.md "Transmission").
pub fn serve(mut stream: UnixStream, export: &Export, disk: &Disk, batch: usize) -> Result<Served, SessionError> {
    let mut served = Served::default();
    if handshake(&mut stream, export)?.is_none() {
        return Ok(served);
    }
    let mut queue: Vec<Request> = Vec::new();
    loop {
        let request = match read_request(&mut stream, export.payload_limit()) {
            Ok(request) => request,
            Err(SessionError::Closed { .. }) => break,
            Err(e) => return Err(e),
        };
        served.requests += 1;
        if request.kind == RequestKind::Disc {
            served.saw_disc = true;
            break;
        }
        queue.push(request);
        if queue.len() >= batch {
            served.reversed_batches += usize::from(queue.len() > 1);
            for request in queue.drain(..).rev() {
                answer(&mut stream, export, disk, &request)?;
            }
        }
    }
    // NBD_CMD_DISC: the server MUST handle all outstanding requests before closing.
    for request in queue.drain(..).rev() {
        answer(&mut stream, export, disk, &request)?;
    }
    Ok(served)
}

fn answer(stream: &mut UnixStream, export: &Export, disk: &Disk, request: &Request) -> Result<(), SessionError> {
    let reply_failed = |source| SessionError::Io { what: "reply", source };
    if let Some(errno) = check_request(request, export) {
        return write_reply(stream, request.handle, errno, &[]).map_err(reply_failed);
    }
    let start = request.offset as usize;
    let range = start..start + request.length as usize;
    let mut disk = disk.lock().expect("disk");
    let data = match request.kind {
        RequestKind::Read => disk[range].to_vec(),
        RequestKind::Write => {
            disk[range].copy_from_slice(&request.data);
            Vec::new()
        }
        RequestKind::Trim | RequestKind::WriteZeroes => {
            disk[range].fill(0);
            Vec::new()
        }
        RequestKind::Flush | RequestKind::Cache => Vec::new(),
        RequestKind::Disc | RequestKind::BlockStatus | RequestKind::Other(_) => {
            unreachable!("check_request lets none of them through")
        }
    };
    drop(disk);
    write_reply(stream, request.handle, 0, &data).map_err(reply_failed)
}

/// A client connected to a test server on its own thread.
pub fn start(export: Export, batch: usize) -> (Client, Disk, JoinHandle<Result<Served, SessionError>>) {
    let (client_end, server_end) = pair();
    let disk: Disk = Arc::new(Mutex::new(vec![0; export.size as usize]));
    let server_disk = Arc::clone(&disk);
    let server = thread::spawn(move || serve(server_end, &export, &server_disk, batch));
    let client = Client::from_stream(client_end, "").expect("client handshake");
    (client, disk, server)
}

// ---- Raw bytes, written by hand from proto.md ----

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("2 bytes"))
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

pub fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// Client side: the server greeting (NBDMAGIC, IHAVEOPT, handshake flags) → handshake flags.
pub fn read_greeting(s: &mut UnixStream) -> u16 {
    let hello = read_n(s, 18);
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    be16(&hello[16..18])
}

/// Client side: IHAVEOPT, option, length, data.
pub fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut message = b"IHAVEOPT".to_vec();
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&(data.len() as u32).to_be_bytes());
    message.extend_from_slice(data);
    s.write_all(&message).expect("send option");
}

/// Client side: one option reply → (option, reply type, data).
pub fn read_option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let header = read_n(s, 20);
    assert_eq!(be64(&header[0..8]), 0x3e889045565a9, "option reply magic");
    let length = be32(&header[16..20]) as usize;
    (be32(&header[8..12]), be32(&header[12..16]), read_n(s, length))
}

/// `NBD_OPT_GO`/`NBD_OPT_INFO` data: name length, name, count, information requests.
pub fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        data.extend_from_slice(&r.to_be_bytes());
    }
    data
}

/// Server side: greeting with `handshake_flags`, then the client's flags.
pub fn greet(s: &mut UnixStream, handshake_flags: u16) -> u32 {
    let mut hello = b"NBDMAGICIHAVEOPT".to_vec();
    hello.extend_from_slice(&handshake_flags.to_be_bytes());
    s.write_all(&hello).expect("greeting");
    be32(&read_n(s, 4))
}

/// Server side: one client option → (option, data).
pub fn read_option(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let header = read_n(s, 16);
    assert_eq!(&header[0..8], b"IHAVEOPT");
    let length = be32(&header[12..16]) as usize;
    (be32(&header[8..12]), read_n(s, length))
}

/// Server side: one option reply.
pub fn option_reply_bytes(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut message = NBD_REP_MAGIC.to_be_bytes().to_vec();
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&reply_type.to_be_bytes());
    message.extend_from_slice(&(data.len() as u32).to_be_bytes());
    message.extend_from_slice(data);
    message
}

pub fn send_option_reply(s: &mut UnixStream, option: u32, reply_type: u32, data: &[u8]) {
    s.write_all(&option_reply_bytes(option, reply_type, data)).expect("send option reply");
}

/// Client side: one transmission request header.
pub fn request_bytes(flags: u16, command: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut message = 0x25609513u32.to_be_bytes().to_vec();
    message.extend_from_slice(&flags.to_be_bytes());
    message.extend_from_slice(&command.to_be_bytes());
    message.extend_from_slice(&handle.to_be_bytes());
    message.extend_from_slice(&offset.to_be_bytes());
    message.extend_from_slice(&length.to_be_bytes());
    message
}

/// Client side: one simple reply header → (error, handle).
pub fn read_simple_reply(s: &mut UnixStream) -> (u32, u64) {
    let header = read_n(s, 16);
    assert_eq!(be32(&header[0..4]), 0x67446698, "simple reply magic");
    (be32(&header[4..8]), be64(&header[8..16]))
}

/// Asserts nothing more has been sent on `s` (yet), without blocking.
pub fn assert_nothing_pending(s: &UnixStream) {
    s.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let got = (&*s).read(&mut byte);
    s.set_nonblocking(false).expect("blocking");
    match got {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("expected no pending bytes, got {other:?}"),
    }
}
