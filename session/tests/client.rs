//! The client against a server built from the crate's pieces, and against hand-written servers
//! that misbehave (proto.md "Transmission", "Request types", "Error values").

mod common;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread;

use common::*;
use session::client::DEFAULT_BLOCK_SIZES;
use session::wire::*;
use session::{handshake, read_request, write_reply, Client, Export, RequestKind, SessionError};

const SIZE: u64 = 1 << 20;

fn export() -> Export {
    Export { max_block: 256 * 1024, ..Export::new(SIZE) }
}

#[test]
fn client_is_send_and_sync() {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<Client>();
}

// proto.md NBD_CMD_READ, NBD_CMD_WRITE (with NBD_CMD_FLAG_FUA), NBD_CMD_FLUSH, NBD_CMD_TRIM,
// NBD_CMD_WRITE_ZEROES (with NBD_CMD_FLAG_NO_HOLE), NBD_CMD_DISC.
#[test]
fn round_trips() {
    let (client, disk, server) = start(export(), 1);
    assert_eq!(client.size(), SIZE);
    assert_eq!(client.flags(), export().transmission_flags());
    assert_eq!(client.block_sizes(), (512, 4096, 256 * 1024));

    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    client.write(4096, &pattern, false).expect("write");
    assert_eq!(client.read(4096, 8192).expect("read"), pattern);
    assert_eq!(&disk.lock().expect("disk")[4096..4096 + 8192], &pattern[..]);

    client.write(SIZE - 512, &[0xee; 512], true).expect("FUA write at the end");
    assert_eq!(client.read(SIZE - 512, 512).expect("read"), vec![0xee; 512]);
    client.flush().expect("flush");

    client.trim(4096, 4096).expect("trim");
    client.write_zeroes(8192, 2048, true).expect("write zeroes, no hole");
    client.write_zeroes(10240, 2048, false).expect("write zeroes");
    assert_eq!(client.read(4096, 8192).expect("read"), vec![0; 8192]);

    client.disconnect().expect("disconnect");
    let served = server.join().expect("server thread").expect("server");
    assert!(served.saw_disc);
    assert_eq!(served.requests, 10);
}

// proto.md "Terminating the transmission phase": a client ends the session softly; dropping
// the client without disconnect() still sends NBD_CMD_DISC.
#[test]
fn dropping_the_client_disconnects_softly() {
    let (client, _disk, server) = start(export(), 1);
    client.flush().expect("flush");
    drop(client);
    let served = server.join().expect("server thread").expect("server");
    assert_eq!((served.requests, served.saw_disc), (2, true));
}

// A real socket path, as the driver serves it.
#[test]
fn connect_over_a_socket_path() {
    let dir = std::env::temp_dir().join(format!("rblk-session-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("nbd.sock");
    std::fs::remove_file(&path).ok();
    let listener = UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let disk: Disk = Arc::new(std::sync::Mutex::new(vec![0; SIZE as usize]));
        serve(stream, &export(), &disk, 1)
    });
    let client = Client::connect(&path, "by path").expect("connect");
    client.write(0, &[1; 4096], false).expect("write");
    assert_eq!(client.read(0, 4096).expect("read"), vec![1; 4096]);
    client.disconnect().expect("disconnect");
    assert!(server.join().expect("server thread").expect("server").saw_disc);
    std::fs::remove_dir_all(&dir).ok();
}

// proto.md "Transmission": replies need not come in request order; the cookie (handle) matches
// them up. The server answers each batch of 4 requests newest first, and the 4 threads keep
// one request each in flight, so every batch holds one request of each thread.
#[test]
fn concurrent_requests_complete_out_of_order() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 40;
    let (client, disk, server) = start(export(), THREADS);
    let region = SIZE / THREADS as u64;
    thread::scope(|s| {
        for t in 0..THREADS {
            let client = &client;
            s.spawn(move || {
                let base = t as u64 * region;
                for round in 0..ROUNDS {
                    let offset = base + (round as u64 % 8) * 8192;
                    let data = vec![(t * ROUNDS + round) as u8; 8192];
                    client.write(offset, &data, round % 3 == 0).expect("write");
                    assert_eq!(client.read(offset, 8192).expect("read"), data, "thread {t} round {round}");
                }
            });
        }
    });
    client.disconnect().expect("disconnect");
    let served = server.join().expect("server thread").expect("server");
    assert_eq!(served.requests, THREADS * ROUNDS * 2 + 1);
    assert_eq!(served.reversed_batches, ROUNDS * 2, "every batch was answered out of order");
    let disk = disk.lock().expect("disk");
    for t in 0..THREADS {
        for slot in 0..8 {
            // The last round that wrote this slot.
            let round = (0..ROUNDS).rev().find(|r| r % 8 == slot).expect("round");
            let at = (t as u64 * region) as usize + slot * 8192;
            assert!(disk[at..at + 8192].iter().all(|b| *b == (t * ROUNDS + round) as u8));
        }
    }
}

// proto.md "Error values": an NBD error reply reaches the caller as SessionError::Nbd and the
// session goes on; the server SHOULD return NBD_EPERM for a write on a read-only export.
// Features not advertised are refused by the client itself ("Transmission flags": the client
// MUST NOT use a feature unless its flag was set).
#[test]
fn server_errors_and_missing_features() {
    let (client, _disk, server) = start(Export { read_only: true, ..export() }, 1);
    let err = client.write(0, &[1; 512], false).expect_err("read-only");
    assert!(
        matches!(err, SessionError::Nbd { errno: NBD_EPERM, command: RequestKind::Write, offset: 0, length: 512 }),
        "{err:?}"
    );
    assert!(matches!(client.write(0, &[1; 512], true), Err(SessionError::Unsupported("NBD_CMD_FLAG_FUA"))));
    assert!(matches!(client.trim(0, 512), Err(SessionError::Unsupported("NBD_CMD_TRIM"))));
    assert!(matches!(client.write_zeroes(0, 512, false), Err(SessionError::Unsupported("NBD_CMD_WRITE_ZEROES"))));
    assert_eq!(client.read(0, 512).expect("read still works"), vec![0; 512]);
    client.flush().expect("flush");
    client.disconnect().expect("disconnect");
    assert!(server.join().expect("server thread").expect("server").saw_disc);
}

// proto.md "Size constraints": a client that asked for NBD_INFO_BLOCK_SIZE MUST honour it:
// aligned offsets and lengths, within the export, READ/WRITE within the maximum payload.
#[test]
fn client_refuses_requests_it_must_not_send() {
    let (client, _disk, server) = start(export(), 1);
    let refused = [
        client.read(100, 512).map(drop),
        client.read(0, 100).map(drop),
        client.read(0, 0).map(drop),
        client.read(SIZE, 512).map(drop),
        client.read(u64::MAX - 511, 512).map(drop),
        client.read(0, 512 * 1024).map(drop),
        client.write(0, &vec![0; 512 * 1024], false),
        client.write(SIZE - 512, &[0; 1024], false),
        client.trim(0, 100),
        client.write_zeroes(SIZE, 512, false),
    ];
    for (i, result) in refused.into_iter().enumerate() {
        assert!(matches!(result, Err(SessionError::InvalidArgument(_))), "case {i}: {result:?}");
    }
    // Effect lengths above the maximum payload are allowed for TRIM and WRITE_ZEROES.
    client.trim(0, 512 * 1024).expect("large trim");
    client.write_zeroes(0, 512 * 1024, false).expect("large write zeroes");
    client.disconnect().expect("disconnect");
    assert_eq!(server.join().expect("server thread").expect("server").requests, 3);
}

/// A server that completes the handshake, then runs `then` on the stream.
fn custom_server<T: Send + 'static>(
    then: impl FnOnce(&mut UnixStream) -> T + Send + 'static,
) -> (UnixStream, thread::JoinHandle<T>) {
    let (client_end, mut server_end) = pair();
    let server = thread::spawn(move || {
        handshake(&mut server_end, &export()).expect("handshake").expect("transmission");
        then(&mut server_end)
    });
    (client_end, server)
}

// proto.md "Terminating the transmission phase": a hard disconnect by the server leaves
// requests unanswered; every one of them, and every later one, fails with Disconnected so a
// reconnecting client can send them again.
#[test]
fn dropped_connection_fails_every_pending_request() {
    const PENDING: usize = 6;
    let (client_end, server) = custom_server(|stream| {
        for _ in 0..PENDING {
            read_request(stream, 1 << 25).expect("request");
        }
        // Drop the connection with all of them in flight.
        stream.shutdown(std::net::Shutdown::Both).expect("shutdown");
    });
    let client = Client::from_stream(client_end, "").expect("client");
    thread::scope(|s| {
        let workers: Vec<_> = (0..PENDING)
            .map(|i| {
                let client = &client;
                s.spawn(move || client.read(i as u64 * 4096, 4096))
            })
            .collect();
        for worker in workers {
            let result = worker.join().expect("worker");
            assert!(matches!(result, Err(SessionError::Disconnected { .. })), "{result:?}");
        }
    });
    server.join().expect("server");
    assert!(matches!(client.read(0, 512), Err(SessionError::Disconnected { .. })));
    assert!(matches!(client.flush(), Err(SessionError::Disconnected { .. })));
    assert!(matches!(client.disconnect(), Err(SessionError::Disconnected { .. })));
}

// Replies with a write still pending: the data never arrives in full.
#[test]
fn connection_dropped_in_the_middle_of_read_data() {
    let (client_end, server) = custom_server(|stream| {
        let request = read_request(stream, 1 << 25).expect("request");
        let mut reply = 0x67446698u32.to_be_bytes().to_vec();
        reply.extend_from_slice(&0u32.to_be_bytes());
        reply.extend_from_slice(&request.handle.to_be_bytes());
        reply.extend_from_slice(&[5; 100]);
        stream.write_all(&reply).expect("partial reply");
    });
    let client = Client::from_stream(client_end, "").expect("client");
    let result = client.read(0, 4096);
    server.join().expect("server");
    assert!(matches!(result, Err(SessionError::Disconnected { .. })), "{result:?}");
}

// proto.md "Transmission": the server MUST use the cookie of the request it answers. A reply
// to a cookie not in flight means the stream cannot be trusted: hard disconnect.
#[test]
fn reply_to_an_unknown_handle_drops_the_connection() {
    let (client_end, server) = custom_server(|stream| {
        let request = read_request(stream, 1 << 25).expect("request");
        write_reply(stream, request.handle ^ 0xdead, 0, &[]).expect("reply");
        // Hold the connection open: the client must hang up by itself.
        read_request(stream, 1 << 25)
    });
    let client = Client::from_stream(client_end, "").expect("client");
    let result = client.flush();
    assert!(matches!(result, Err(SessionError::Disconnected { .. })), "{result:?}");
    let after = server.join().expect("server");
    assert!(matches!(after, Err(SessionError::Closed { .. })), "{after:?}");
}

// proto.md "Structured reply chunk message": the server MUST NOT send one unless structured
// replies were negotiated; this client never negotiates them.
#[test]
fn structured_reply_without_negotiation_drops_the_connection() {
    let (client_end, server) = custom_server(|stream| {
        let request = read_request(stream, 1 << 25).expect("request");
        let mut chunk = 0x668e33efu32.to_be_bytes().to_vec();
        chunk.extend_from_slice(&[0, 1, 0, 0]);
        chunk.extend_from_slice(&request.handle.to_be_bytes());
        chunk.extend_from_slice(&0u32.to_be_bytes());
        stream.write_all(&chunk).expect("chunk");
    });
    let client = Client::from_stream(client_end, "").expect("client");
    let result = client.read(0, 512);
    server.join().expect("server");
    assert!(matches!(result, Err(SessionError::Disconnected { .. })), "{result:?}");
}

// proto.md "Terminating the transmission phase": a client that receives NBD_ESHUTDOWN MUST
// initiate a soft disconnect (NBD_CMD_DISC), and SHOULD first wait for the requests in flight.
#[test]
fn eshutdown_leads_to_a_soft_disconnect() {
    let (client_end, server) = custom_server(|stream| {
        let first = read_request(stream, 1 << 25).expect("first");
        let second = read_request(stream, 1 << 25).expect("second");
        write_reply(stream, first.handle, NBD_ESHUTDOWN, &[]).expect("reply");
        // No DISC while the second request is unanswered.
        thread::sleep(std::time::Duration::from_millis(50));
        assert_nothing_pending(stream);
        write_reply(stream, second.handle, 0, &[9; 512]).expect("reply");
        let disc = read_request(stream, 1 << 25).expect("disc");
        assert_eq!(disc.kind, RequestKind::Disc);
        // Nothing may follow NBD_CMD_DISC.
        read_request(stream, 1 << 25)
    });
    let client = Client::from_stream(client_end, "").expect("client");
    let mut results: Vec<_> = thread::scope(|s| {
        let workers: Vec<_> = (0..2).map(|_| s.spawn(|| client.read(0, 512))).collect();
        workers.into_iter().map(|w| w.join().expect("worker")).collect()
    });
    results.sort_by_key(|r| r.is_ok());
    assert!(matches!(results[0], Err(SessionError::Nbd { errno: NBD_ESHUTDOWN, .. })), "{results:?}");
    assert_eq!(results[1].as_ref().expect("the request in flight completes"), &vec![9; 512]);
    assert!(matches!(client.read(0, 512), Err(SessionError::Disconnected { .. })));
    client.disconnect().expect("already disconnected softly");
    let after = server.join().expect("server");
    assert!(matches!(after, Err(SessionError::Closed { .. })), "{after:?}");
}

// proto.md NBD_OPT_INFO/GO: "clients SHOULD be prepared to also handle NBD_REP_ERR_UNSUP by
// falling back to using NBD_OPT_EXPORT_NAME"; a server without fixed newstyle knows only
// NBD_OPT_EXPORT_NAME ("Newstyle negotiation"). The 124 zeroes come unless the server offered
// NBD_FLAG_NO_ZEROES and the client took it; the client sets no flag that was not offered
// ("Client flags").
#[test]
fn falls_back_to_export_name_when_go_is_unsupported() {
    for (fixed, no_zeroes) in [(true, false), (true, true), (false, false), (false, true)] {
        let (client_end, mut server_end) = pair();
        let server = thread::spawn(move || {
            let bit = |on: bool, flag: u16| if on { flag } else { 0 };
            let offered = bit(fixed, NBD_FLAG_FIXED_NEWSTYLE) | bit(no_zeroes, NBD_FLAG_NO_ZEROES);
            let client_flags = greet(&mut server_end, offered);
            assert_eq!(client_flags, u32::from(offered), "the client echoes exactly what was offered");
            if fixed {
                let (option, data) = read_option(&mut server_end);
                assert_eq!(option, NBD_OPT_GO);
                assert_eq!(data, info_request("name", &[NBD_INFO_BLOCK_SIZE]));
                send_option_reply(&mut server_end, option, NBD_REP_ERR_UNSUP, &[]);
            }
            let (option, data) = read_option(&mut server_end);
            assert_eq!((option, data.as_slice()), (NBD_OPT_EXPORT_NAME, &b"name"[..]));
            let mut reply = SIZE.to_be_bytes().to_vec();
            reply.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes());
            if !no_zeroes {
                reply.extend_from_slice(&[0; 124]);
            }
            server_end.write_all(&reply).expect("export name reply");
            let request = read_request(&mut server_end, 1 << 25).expect("request");
            write_reply(&mut server_end, request.handle, 0, &[3; 512]).expect("reply");
            read_request(&mut server_end, 1 << 25).expect("disc").kind
        });
        let client = Client::from_stream(client_end, "name").expect("client");
        assert_eq!((client.size(), client.block_sizes()), (SIZE, DEFAULT_BLOCK_SIZES));
        assert_eq!(client.read(0, 512).expect("read"), vec![3; 512]);
        assert!(matches!(client.trim(0, 512), Err(SessionError::Unsupported(_))));
        client.disconnect().expect("disconnect");
        assert_eq!(server.join().expect("server"), RequestKind::Disc);
    }
}

// proto.md NBD_OPT_GO: an error reply other than ERR_UNSUP ends the attempt; the message is
// for humans.
#[test]
fn go_refused_is_reported() {
    let (client_end, mut server_end) = pair();
    let server = thread::spawn(move || {
        greet(&mut server_end, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let (option, _) = read_option(&mut server_end);
        send_option_reply(&mut server_end, option, NBD_REP_ERR_UNKNOWN, b"no such export");
    });
    let result = Client::from_stream(client_end, "missing");
    server.join().expect("server");
    match result {
        Err(SessionError::OptionRefused { option, reply, message }) => {
            assert_eq!((option, reply, message.as_str()), (NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, "no such export"));
        }
        other => panic!("{other:?}"),
    }
}

/// Connects the client to a server that sends `bytes` and hangs up.
fn connect_to_server_sending(bytes: Vec<u8>) -> Result<Client, SessionError> {
    let (client_end, mut server_end) = pair();
    let server = thread::spawn(move || {
        server_end.write_all(&bytes).ok();
        server_end.shutdown(std::net::Shutdown::Write).ok();
        // Read what the client sends until it gives up, so it never sees a reset first.
        std::io::copy(&mut server_end, &mut std::io::sink()).ok();
    });
    let result = Client::from_stream(client_end, "");
    server.join().expect("server");
    result
}

// proto.md "Newstyle negotiation" and "Oldstyle negotiation": what the client accepts as a
// greeting; anything else is an error, never a panic.
#[test]
fn malformed_greetings_are_errors() {
    let result = connect_to_server_sending(b"HTTP/1.1 200 OK\r\n\r\n".to_vec());
    assert!(matches!(result, Err(SessionError::BadMagic { what: "server greeting", .. })), "{result:?}");

    let mut oldstyle = b"NBDMAGIC".to_vec();
    oldstyle.extend_from_slice(&0x00420281861253u64.to_be_bytes());
    oldstyle.extend_from_slice(&[0; 2]);
    let result = connect_to_server_sending(oldstyle);
    assert!(matches!(result, Err(SessionError::Protocol { .. })), "{result:?}");

    let result = connect_to_server_sending(b"NBDMAGIC".to_vec());
    assert!(matches!(result, Err(SessionError::Truncated { what: "server greeting" })), "{result:?}");

    let result = connect_to_server_sending(Vec::new());
    assert!(matches!(result, Err(SessionError::Closed { what: "server greeting" })), "{result:?}");
}

// proto.md NBD_REP_INFO / NBD_INFO_EXPORT: mandatory before NBD_REP_ACK, and of length 12;
// "Size constraints": advertised sizes the spec forbids are not trusted.
#[test]
fn malformed_go_replies_are_errors() {
    let sizes = |min: u32, preferred: u32, max: u32| {
        let mut info = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, preferred, max] {
            info.extend_from_slice(&v.to_be_bytes());
        }
        info
    };
    let export_info = |flags: u16| {
        let mut info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&SIZE.to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        info
    };
    let cases: Vec<Vec<(u32, Vec<u8>)>> = vec![
        vec![(NBD_REP_ACK, vec![])],
        vec![(NBD_REP_INFO, vec![0, 0, 1]), (NBD_REP_ACK, vec![])],
        vec![(NBD_REP_INFO, export_info(0)), (NBD_REP_ACK, vec![])],
        vec![(NBD_REP_INFO, export_info(1)), (NBD_REP_INFO, sizes(3, 4096, 1 << 20)), (NBD_REP_ACK, vec![])],
        vec![(NBD_REP_INFO, export_info(1)), (NBD_REP_INFO, sizes(512, 4096, 1024)), (NBD_REP_ACK, vec![])],
        vec![(NBD_REP_SERVER, vec![0, 0, 0, 0])],
    ];
    for (i, replies) in cases.into_iter().enumerate() {
        let (client_end, mut server_end) = pair();
        let server = thread::spawn(move || {
            greet(&mut server_end, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
            let (option, _) = read_option(&mut server_end);
            for (reply_type, data) in replies {
                // The client may already have hung up on an earlier bad reply.
                server_end.write_all(&option_reply_bytes(option, reply_type, &data)).ok();
            }
            std::io::copy(&mut server_end, &mut std::io::sink()).ok();
        });
        let result = Client::from_stream(client_end, "");
        server.join().expect("server");
        assert!(matches!(result, Err(SessionError::Protocol { .. })), "case {i}: {result:?}");
    }
}

// proto.md NBD_REP_INFO: "A client MUST ignore information types that it does not recognize";
// without NBD_INFO_BLOCK_SIZE the client keeps to the interoperable defaults.
#[test]
fn unknown_info_is_ignored_and_missing_block_sizes_default() {
    let (client_end, mut server_end) = pair();
    let server = thread::spawn(move || {
        greet(&mut server_end, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        let (option, _) = read_option(&mut server_end);
        send_option_reply(&mut server_end, option, NBD_REP_INFO, &[0x12, 0x34, 1, 2, 3]);
        let mut info = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&SIZE.to_be_bytes());
        info.extend_from_slice(&(NBD_FLAG_HAS_FLAGS).to_be_bytes());
        send_option_reply(&mut server_end, option, NBD_REP_INFO, &info);
        send_option_reply(&mut server_end, option, NBD_REP_ACK, &[]);
        read_request(&mut server_end, 1 << 25).expect("disc").kind
    });
    let client = Client::from_stream(client_end, "").expect("client");
    assert_eq!(client.block_sizes(), DEFAULT_BLOCK_SIZES);
    assert!(matches!(client.flush(), Err(SessionError::Unsupported("NBD_CMD_FLUSH"))));
    client.disconnect().expect("disconnect");
    assert_eq!(server.join().expect("server"), RequestKind::Disc);
}
