//! The transmission phase of the test server (`read_request` + `check_request` +
//! `write_reply`), driven by a hand-written client (proto.md "Transmission", "Request types",
//! "Error values").

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use common::*;
use session::wire::*;
use session::{Export, SessionError};

const SIZE: u64 = 1 << 20;
const MAX_BLOCK: u32 = 64 * 1024;

/// A test server on its own thread, and a raw client already in transmission (via NBD_OPT_GO).
fn start() -> (UnixStream, JoinHandle<Result<Served, SessionError>>) {
    let (mut client, server_end) = pair();
    let export = Export { max_block: MAX_BLOCK, ..Export::new(SIZE) };
    let disk: Disk = Arc::new(Mutex::new(vec![0; SIZE as usize]));
    let server = thread::spawn(move || serve(server_end, &export, &disk, 1));
    read_greeting(&mut client);
    client.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
    send_option(&mut client, NBD_OPT_GO, &info_request("", &[NBD_INFO_BLOCK_SIZE]));
    while read_option_reply(&mut client).1 != NBD_REP_ACK {}
    (client, server)
}

fn send(client: &mut UnixStream, flags: u16, command: u16, handle: u64, offset: u64, length: u32, payload: &[u8]) {
    let mut message = request_bytes(flags, command, handle, offset, length);
    message.extend_from_slice(payload);
    client.write_all(&message).expect("request");
}

// proto.md "Error values": refused requests get an error reply with no payload, and the session
// goes on; a refused WRITE's payload is still consumed, so the next request parses.
#[test]
fn refused_requests_are_answered_and_the_session_goes_on() {
    let (mut client, server) = start();
    let cases: &[(&str, u16, u16, u64, u32, u32)] = &[
        ("unaligned read", 0, NBD_CMD_READ, 100, 512, NBD_EINVAL),
        ("read past the end", 0, NBD_CMD_READ, SIZE, 512, NBD_EINVAL),
        ("write past the end", 0, NBD_CMD_WRITE, SIZE, 512, NBD_ENOSPC),
        ("write with NO_HOLE", NBD_CMD_FLAG_NO_HOLE, NBD_CMD_WRITE, 0, 512, NBD_EINVAL),
        ("write above max payload", 0, NBD_CMD_WRITE, 0, 2 * MAX_BLOCK, NBD_EINVAL),
        ("trim past the end", 0, NBD_CMD_TRIM, SIZE - 512, 1024, NBD_EINVAL),
        ("flush with a length", 0, NBD_CMD_FLUSH, 0, 512, NBD_EINVAL),
        ("cache past the end", 0, NBD_CMD_CACHE, SIZE, 512, NBD_EINVAL),
        ("block status without a context", 0, NBD_CMD_BLOCK_STATUS, 0, 512, NBD_EINVAL),
        ("read with DF, no structured replies", NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 512, NBD_EINVAL),
        ("unknown command", 0, 0x55, 0, 512, NBD_EINVAL),
    ];
    for (i, &(name, flags, command, offset, length, errno)) in cases.iter().enumerate() {
        let handle = 1000 + i as u64;
        // Only a WRITE is followed by its payload (proto.md "Request message").
        let payload = if command == NBD_CMD_WRITE { vec![0xaa; length as usize] } else { Vec::new() };
        send(&mut client, flags, command, handle, offset, length, &payload);
        assert_eq!(read_simple_reply(&mut client), (errno, handle), "{name}");
    }
    // Nothing was written, and the session still serves.
    send(&mut client, 0, NBD_CMD_WRITE, 1, 0, 512, &[0x11; 512]);
    assert_eq!(read_simple_reply(&mut client), (0, 1));
    send(&mut client, 0, NBD_CMD_READ, 2, 0, 1024, &[]);
    assert_eq!(read_simple_reply(&mut client), (0, 2));
    assert_eq!(read_n(&mut client, 1024), [vec![0x11; 512], vec![0; 512]].concat());
    send(&mut client, 0, NBD_CMD_DISC, 3, 0, 0, &[]);
    let served = server.join().expect("server").expect("served");
    assert!(served.saw_disc);
}

// proto.md "Request message": every request starts with NBD_REQUEST_MAGIC; past a wrong magic
// the stream cannot be followed, so the server ends the connection.
#[test]
fn wrong_request_magic_ends_the_connection() {
    let (mut client, server) = start();
    let mut request = request_bytes(0, NBD_CMD_READ, 1, 0, 512);
    request[0] ^= 0xff;
    client.write_all(&request).expect("request");
    let result = server.join().expect("server");
    assert!(matches!(result, Err(SessionError::BadMagic { what: "request header", .. })), "{result:?}");
}

// proto.md "Size constraints": a payload over 32 MiB (and over the maximum payload) MAY be
// deemed a denial of service; the server cannot skip it without reading it, so it hangs up.
#[test]
fn oversized_write_payload_ends_the_connection() {
    let (mut client, server) = start();
    client.write_all(&request_bytes(0, NBD_CMD_WRITE, 7, 0, (1 << 25) + 512)).expect("request");
    let result = server.join().expect("server");
    assert!(matches!(result, Err(SessionError::PayloadTooLong { handle: 7, .. })), "{result:?}");
}

#[test]
fn truncated_write_payload_is_an_error() {
    let (mut client, server) = start();
    send(&mut client, 0, NBD_CMD_WRITE, 7, 0, 4096, &[1; 1000]);
    drop(client);
    let result = server.join().expect("server");
    assert!(matches!(result, Err(SessionError::Truncated { what: "write payload" })), "{result:?}");
}

// A client that goes away between requests ends the session cleanly.
#[test]
fn client_hanging_up_between_requests_ends_cleanly() {
    let (mut client, server) = start();
    send(&mut client, 0, NBD_CMD_FLUSH, 1, 0, 0, &[]);
    assert_eq!(read_simple_reply(&mut client), (0, 1));
    drop(client);
    let served = server.join().expect("server").expect("served");
    assert_eq!((served.requests, served.saw_disc), (1, false));
}
