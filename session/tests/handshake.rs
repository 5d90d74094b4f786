//! The server's handshake, driven byte by byte by a hand-written client (proto.md "Handshake",
//! "Option types", "Option reply types").

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};

use common::*;
use session::wire::*;
use session::{
    handshake, read_request, write_reply, Export, Negotiated, RequestKind, SessionError, BASE_ALLOCATION_ID,
};

type Outcome = (Result<Option<Negotiated>, SessionError>, UnixStream);

const SIZE: u64 = 1 << 20;

fn export() -> Export {
    Export { description: Some("test disk".into()), ..Export::new(SIZE) }
}

/// Runs `handshake` on a thread; returns the client's end (greeting read, client flags sent)
/// and the thread, which hands back the server's end so it stays open.
fn start(export: Export, client_flags: u32) -> (UnixStream, JoinHandle<Outcome>) {
    let (mut client, mut server) = pair();
    let thread = thread::spawn(move || (handshake(&mut server, &export), server));
    // proto.md "Handshake flags": a fixed newstyle server sets FIXED_NEWSTYLE; NO_ZEROES too.
    assert_eq!(read_greeting(&mut client), NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    client.write_all(&client_flags.to_be_bytes()).expect("client flags");
    (client, thread)
}

const FIXED: u32 = NBD_FLAG_C_FIXED_NEWSTYLE;
const FIXED_NO_ZEROES: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

fn finish(thread: JoinHandle<Outcome>) -> Outcome {
    thread.join().expect("server thread")
}

/// Reads the NBD_REP_INFO replies up to the final reply: (infos by type, final reply type).
fn read_infos(client: &mut UnixStream, option: u32) -> (Vec<(u16, Vec<u8>)>, u32) {
    let mut infos = Vec::new();
    loop {
        let (answered, reply_type, data) = read_option_reply(client);
        assert_eq!(answered, option);
        if reply_type != NBD_REP_INFO {
            return (infos, reply_type);
        }
        infos.push((be16(&data[0..2]), data[2..].to_vec()));
    }
}

fn check_export_infos(infos: &[(u16, Vec<u8>)], export: &Export) {
    // NBD_INFO_EXPORT (length 12): size, transmission flags.
    let (_, info) = infos.iter().find(|(t, _)| *t == NBD_INFO_EXPORT).expect("NBD_INFO_EXPORT is mandatory");
    assert_eq!(info.len(), 10);
    assert_eq!(be64(&info[0..8]), export.size);
    assert_eq!(be16(&info[8..10]), export.transmission_flags());
    // NBD_INFO_BLOCK_SIZE (length 14): minimum, preferred, maximum payload.
    let (_, sizes) = infos.iter().find(|(t, _)| *t == NBD_INFO_BLOCK_SIZE).expect("NBD_INFO_BLOCK_SIZE");
    assert_eq!(sizes.len(), 12);
    assert_eq!(
        (be32(&sizes[0..4]), be32(&sizes[4..8]), be32(&sizes[8..12])),
        (export.min_block, export.preferred_block, export.max_block)
    );
    let description = infos.iter().find(|(t, _)| *t == NBD_INFO_DESCRIPTION).map(|(_, d)| d.clone());
    assert_eq!(description, export.description.as_ref().map(|d| d.as_bytes().to_vec()));
}

// proto.md NBD_OPT_GO: NBD_REP_INFO replies (NBD_INFO_EXPORT mandatory), then NBD_REP_ACK, and
// transmission starts at once with no zero padding, whatever NBD_FLAG_C_NO_ZEROES says.
#[test]
fn go_answers_info_then_starts_transmission() {
    let (mut client, thread) = start(export(), FIXED);
    send_option(&mut client, NBD_OPT_GO, &info_request("any name", &[NBD_INFO_BLOCK_SIZE]));
    let (infos, last) = read_infos(&mut client, NBD_OPT_GO);
    assert_eq!(last, NBD_REP_ACK);
    check_export_infos(&infos, &export());

    let (result, mut server) = finish(thread);
    let negotiated = result.expect("handshake").expect("transmission");
    assert_eq!(
        negotiated,
        Negotiated {
            export_name: "any name".into(),
            flags: export().transmission_flags(),
            client_no_zeroes: false,
            block_size_requested: true,
            structured_replies: false,
            base_allocation: None,
        }
    );
    assert_nothing_pending(&client);

    // The next bytes are transmission: a request, and its simple reply.
    client.write_all(&request_bytes(0, NBD_CMD_READ, 42, 0, 512)).expect("request");
    let request = read_request(&mut server, export().payload_limit()).expect("request");
    assert_eq!((request.kind, request.handle, request.length), (RequestKind::Read, 42, 512));
    write_reply(&mut server, request.handle, 0, &[7; 512]).expect("reply");
    assert_eq!(read_simple_reply(&mut client), (0, 42));
    assert_eq!(read_n(&mut client, 512), vec![7; 512]);
}

// proto.md NBD_OPT_INFO: the same replies as GO, but haggling goes on; a GO without
// NBD_INFO_BLOCK_SIZE is still served (servers SHOULD NOT refuse it, "Size constraints").
#[test]
fn info_keeps_haggling_and_go_without_block_size_request_is_served() {
    let plain = Export { description: None, ..export() };
    let (mut client, thread) = start(plain.clone(), FIXED_NO_ZEROES);
    send_option(&mut client, NBD_OPT_INFO, &info_request("", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, 0x7777]));
    let (infos, last) = read_infos(&mut client, NBD_OPT_INFO);
    assert_eq!(last, NBD_REP_ACK);
    check_export_infos(&infos, &plain);

    send_option(&mut client, NBD_OPT_GO, &info_request("", &[]));
    let (infos, last) = read_infos(&mut client, NBD_OPT_GO);
    assert_eq!(last, NBD_REP_ACK);
    check_export_infos(&infos, &plain);
    let negotiated = finish(thread).0.expect("handshake").expect("transmission");
    assert!(!negotiated.block_size_requested);
    assert!(negotiated.client_no_zeroes);
    assert_eq!(negotiated.export_name, "");
}

// proto.md "Newstyle negotiation": NBD_OPT_EXPORT_NAME is answered with size, flags and 124
// zero bytes, which NBD_FLAG_C_NO_ZEROES leaves out.
#[test]
fn export_name_with_no_zeroes_sends_ten_bytes() {
    let (mut client, thread) = start(export(), FIXED_NO_ZEROES);
    send_option(&mut client, NBD_OPT_EXPORT_NAME, b"disk");
    let reply = read_n(&mut client, 10);
    assert_eq!(be64(&reply[0..8]), SIZE);
    assert_eq!(be16(&reply[8..10]), export().transmission_flags());
    // Keep the server's end open, so "nothing pending" is not an end of stream.
    let (result, _server) = finish(thread);
    let negotiated = result.expect("handshake").expect("transmission");
    assert_eq!(negotiated.export_name, "disk");
    assert!(negotiated.client_no_zeroes);
    assert_nothing_pending(&client);
}

#[test]
fn export_name_without_no_zeroes_sends_the_zeroes() {
    let (mut client, thread) = start(export(), FIXED);
    send_option(&mut client, NBD_OPT_EXPORT_NAME, b"");
    let reply = read_n(&mut client, 10 + 124);
    assert_eq!(be64(&reply[0..8]), SIZE);
    assert!(reply[10..].iter().all(|b| *b == 0));
    let (result, _server) = finish(thread);
    let negotiated = result.expect("handshake").expect("transmission");
    assert!(!negotiated.client_no_zeroes);
    assert_nothing_pending(&client);
}

// proto.md "Client flags": servers MAY honour fixed newstyle from clients that did not set
// NBD_FLAG_C_FIXED_NEWSTYLE; an old client sending only NBD_OPT_EXPORT_NAME gets its export.
#[test]
fn client_without_fixed_newstyle_flag_is_served() {
    let (mut client, thread) = start(export(), 0);
    send_option(&mut client, NBD_OPT_EXPORT_NAME, b"");
    assert_eq!(read_n(&mut client, 134).len(), 134);
    assert!(finish(thread).0.expect("handshake").is_some());
}

// proto.md NBD_OPT_LIST: one NBD_REP_SERVER per export, then NBD_REP_ACK; NBD_REP_SERVER holds
// the name length, the name and then a description for humans. Data with NBD_OPT_LIST is
// refused with NBD_REP_ERR_INVALID.
#[test]
fn list_names_the_one_export() {
    let (mut client, thread) = start(export(), FIXED);
    send_option(&mut client, NBD_OPT_LIST, &[]);
    let (option, reply_type, data) = read_option_reply(&mut client);
    assert_eq!((option, reply_type), (NBD_OPT_LIST, NBD_REP_SERVER));
    assert_eq!(be32(&data[0..4]), 0, "the export is named \"\"");
    assert_eq!(&data[4..], b"test disk");
    assert_eq!(read_option_reply(&mut client), (NBD_OPT_LIST, NBD_REP_ACK, vec![]));

    send_option(&mut client, NBD_OPT_LIST, b"junk");
    let (option, reply_type, _) = read_option_reply(&mut client);
    assert_eq!((option, reply_type), (NBD_OPT_LIST, NBD_REP_ERR_INVALID));

    send_option(&mut client, NBD_OPT_GO, &info_request("", &[]));
    assert_eq!(read_infos(&mut client, NBD_OPT_GO).1, NBD_REP_ACK);
    assert!(finish(thread).0.expect("handshake").is_some());
}

// proto.md NBD_OPT_ABORT: the server MUST reply with NBD_REP_ACK; data is ignored.
#[test]
fn abort_is_acknowledged_and_ends_the_handshake() {
    let (mut client, thread) = start(export(), FIXED);
    send_option(&mut client, NBD_OPT_ABORT, b"ignored");
    assert_eq!(read_option_reply(&mut client), (NBD_OPT_ABORT, NBD_REP_ACK, vec![]));
    assert!(finish(thread).0.expect("handshake").is_none());
}

// proto.md NBD_OPT_ABORT: the server SHOULD gracefully handle a client that closes without
// waiting for the reply.
#[test]
fn abort_from_a_client_that_hangs_up_at_once() {
    let (mut client, thread) = start(export(), FIXED);
    send_option(&mut client, NBD_OPT_ABORT, &[]);
    drop(client);
    assert!(finish(thread).0.expect("handshake").is_none());
}

// proto.md "Baseline": servers MUST reply NBD_REP_ERR_UNSUP to options they do not implement
// and MUST NOT fail to parse the next one. Includes NBD_OPT_STARTTLS ("NOTLS mode") and
// NBD_OPT_EXTENDED_HEADERS (11).
#[test]
fn unknown_options_are_unsupported_and_haggling_continues() {
    let (mut client, thread) = start(export(), FIXED);
    for (option, data) in [(99, &b"some data"[..]), (NBD_OPT_STARTTLS, &[][..]), (11, &[][..]), (4, &[][..])] {
        send_option(&mut client, option, data);
        let (answered, reply_type, _) = read_option_reply(&mut client);
        assert_eq!((answered, reply_type), (option, NBD_REP_ERR_UNSUP), "option {option}");
    }
    send_option(&mut client, NBD_OPT_GO, &info_request("", &[NBD_INFO_BLOCK_SIZE]));
    assert_eq!(read_infos(&mut client, NBD_OPT_GO).1, NBD_REP_ACK);
    assert!(finish(thread).0.expect("handshake").is_some());
}

// proto.md NBD_OPT_GO data: the name length MUST be no larger than the option length - 6; a
// syntactically invalid option is NBD_REP_ERR_INVALID and haggling continues.
#[test]
fn malformed_go_is_invalid_and_haggling_continues() {
    let (mut client, thread) = start(export(), FIXED);
    let mut bad_name_length = info_request("abc", &[]);
    bad_name_length[3] = 200;
    let mut bad_count = info_request("abc", &[NBD_INFO_BLOCK_SIZE]);
    bad_count.pop();
    for data in [bad_name_length, bad_count, vec![0, 0]] {
        send_option(&mut client, NBD_OPT_GO, &data);
        let (option, reply_type, message) = read_option_reply(&mut client);
        assert_eq!((option, reply_type), (NBD_OPT_GO, NBD_REP_ERR_INVALID));
        assert!(!message.is_empty(), "error replies carry a message for humans");
    }
    send_option(&mut client, NBD_OPT_GO, &info_request("abc", &[]));
    assert_eq!(read_infos(&mut client, NBD_OPT_GO).1, NBD_REP_ACK);
    assert!(finish(thread).0.expect("handshake").is_some());
}

// proto.md "Termination of the session during option haggling": a server MAY hard-disconnect a
// client whose behaviour it deems a denial of service; it says why first (NBD_REP_ERR_TOO_BIG).
#[test]
fn oversized_option_ends_the_session() {
    let (mut client, thread) = start(export(), FIXED);
    let mut header = b"IHAVEOPT".to_vec();
    header.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    header.extend_from_slice(&(1u32 << 30).to_be_bytes());
    client.write_all(&header).expect("header");
    let (option, reply_type, _) = read_option_reply(&mut client);
    assert_eq!((option, reply_type), (NBD_OPT_GO, NBD_REP_ERR_TOO_BIG));
    let (result, _) = finish(thread);
    assert!(matches!(result, Err(SessionError::OptionTooLong { length: 0x4000_0000, .. })), "{result:?}");
}

// proto.md "Newstyle negotiation": every option starts with IHAVEOPT. Anything else is not
// NBD, and the stream cannot be followed.
#[test]
fn wrong_option_magic_is_an_error() {
    let (mut client, thread) = start(export(), FIXED);
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("junk");
    let (result, _) = finish(thread);
    assert!(matches!(result, Err(SessionError::BadMagic { what: "option header", .. })), "{result:?}");
}

// proto.md "Client flags": the server MUST drop the connection if the client sets an unknown
// flag.
#[test]
fn unknown_client_flags_drop_the_connection() {
    let (_client, thread) = start(export(), FIXED | 1 << 7);
    let (result, _) = finish(thread);
    assert!(matches!(result, Err(SessionError::Protocol { what: "client flags", .. })), "{result:?}");
}

#[test]
fn client_hanging_up_is_an_error_not_a_panic() {
    // Before the client flags: a clean end between messages.
    let (mut client, mut server) = pair();
    let thread = thread::spawn(move || handshake(&mut server, &export()));
    read_greeting(&mut client);
    drop(client);
    assert!(matches!(thread.join().expect("thread"), Err(SessionError::Closed { what: "client flags" })));

    // In the middle of an option's data.
    let (mut client, thread) = start(export(), FIXED);
    let mut option = b"IHAVEOPT".to_vec();
    option.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    option.extend_from_slice(&100u32.to_be_bytes());
    option.extend_from_slice(&[0; 10]);
    client.write_all(&option).expect("partial option");
    drop(client);
    let (result, _) = finish(thread);
    assert!(matches!(result, Err(SessionError::Truncated { what: "option data" })), "{result:?}");
}

// proto.md "Transmission flags": READ_ONLY for a read-only export, CAN_MULTI_CONN when the
// cache is shared; the server MUST NOT advertise what it does not support, so a read-only
// export offers no TRIM, WRITE_ZEROES or FUA.
#[test]
fn read_only_and_multi_conn_exports_advertise_accordingly() {
    let ro = Export { read_only: true, multi_conn: true, ..export() };
    let (mut client, thread) = start(ro.clone(), FIXED);
    send_option(&mut client, NBD_OPT_GO, &info_request("", &[NBD_INFO_BLOCK_SIZE]));
    let (infos, last) = read_infos(&mut client, NBD_OPT_GO);
    assert_eq!(last, NBD_REP_ACK);
    check_export_infos(&infos, &ro);
    let flags = finish(thread).0.expect("handshake").expect("transmission").flags;
    assert_eq!(
        flags,
        NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN
    );
}

// proto.md "Size constraints": the server refuses to advertise constraints the spec forbids,
// before a byte goes out.
#[test]
fn misconfigured_export_is_refused_before_anything_is_sent() {
    let (mut client, mut server) = pair();
    let bad = Export { min_block: 1000, ..export() };
    let result = handshake(&mut server, &bad);
    assert!(matches!(result, Err(SessionError::BadExport(_))), "{result:?}");
    drop(server);
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut client, &mut rest).expect("read");
    assert!(rest.is_empty());
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`: export name, number of
/// queries, each query with its length.
fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    data
}

/// Reads `NBD_REP_META_CONTEXT` replies up to the final reply: ((id, name) each, final type).
fn read_contexts(client: &mut UnixStream, option: u32) -> (Vec<(u32, String)>, u32) {
    let mut contexts = Vec::new();
    loop {
        let (answered, reply_type, data) = read_option_reply(client);
        assert_eq!(answered, option);
        if reply_type != NBD_REP_META_CONTEXT {
            return (contexts, reply_type);
        }
        contexts.push((be32(&data[0..4]), String::from_utf8(data[4..].to_vec()).expect("utf-8")));
    }
}

fn named() -> Export {
    Export { name: Some("vol".into()), ..export() }
}

// A named export: NBD_OPT_LIST names it; NBD_OPT_INFO / GO for another name get
// NBD_REP_ERR_UNKNOWN and haggling goes on; its name and "" reach it, and NBD_INFO_NAME is
// answered when asked.
#[test]
fn a_named_export_answers_to_its_name_and_the_default_only() {
    let (mut client, thread) = start(named(), FIXED);
    send_option(&mut client, NBD_OPT_LIST, &[]);
    let (option, reply_type, data) = read_option_reply(&mut client);
    assert_eq!((option, reply_type), (NBD_OPT_LIST, NBD_REP_SERVER));
    assert_eq!(be32(&data[0..4]), 3);
    assert_eq!(&data[4..7], b"vol");
    assert_eq!(&data[7..], b"test disk");
    assert_eq!(read_option_reply(&mut client), (NBD_OPT_LIST, NBD_REP_ACK, vec![]));

    for option in [NBD_OPT_INFO, NBD_OPT_GO] {
        send_option(&mut client, option, &info_request("other", &[NBD_INFO_NAME]));
        let (answered, reply_type, message) = read_option_reply(&mut client);
        assert_eq!((answered, reply_type), (option, NBD_REP_ERR_UNKNOWN));
        assert!(!message.is_empty());
    }
    send_option(&mut client, NBD_OPT_INFO, &info_request("vol", &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION]));
    let (infos, last) = read_infos(&mut client, NBD_OPT_INFO);
    assert_eq!(last, NBD_REP_ACK);
    assert!(infos.contains(&(NBD_INFO_NAME, b"vol".to_vec())), "{infos:?}");
    assert!(infos.contains(&(NBD_INFO_DESCRIPTION, b"test disk".to_vec())), "{infos:?}");
    send_option(&mut client, NBD_OPT_INFO, &info_request("", &[]));
    let (infos, last) = read_infos(&mut client, NBD_OPT_INFO);
    assert_eq!(last, NBD_REP_ACK);
    assert!(infos.iter().all(|(t, _)| *t != NBD_INFO_NAME), "not asked for");

    send_option(&mut client, NBD_OPT_GO, &info_request("", &[]));
    assert_eq!(read_infos(&mut client, NBD_OPT_GO).1, NBD_REP_ACK);
    assert_eq!(finish(thread).0.expect("handshake").expect("transmission").export_name, "");
}

// proto.md "Newstyle negotiation": NBD_OPT_EXPORT_NAME has no error reply, so an unknown name
// ends the session; the export's own name is served.
#[test]
fn export_name_for_an_unknown_export_ends_the_session() {
    let (mut client, thread) = start(named(), FIXED_NO_ZEROES);
    send_option(&mut client, NBD_OPT_EXPORT_NAME, b"nope");
    let (result, server) = finish(thread);
    assert!(matches!(&result, Err(SessionError::UnknownExport(n)) if n == "nope"), "{result:?}");
    drop(server);
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut client, &mut rest).expect("read");
    assert!(rest.is_empty(), "nothing was sent: {rest:?}");

    let (mut client, thread) = start(named(), FIXED_NO_ZEROES);
    send_option(&mut client, NBD_OPT_EXPORT_NAME, b"vol");
    assert_eq!(be64(&read_n(&mut client, 10)[0..8]), SIZE);
    assert_eq!(finish(thread).0.expect("handshake").expect("transmission").export_name, "vol");
}

// proto.md NBD_OPT_STRUCTURED_REPLY, NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT:
// contexts only after structured replies; `base:allocation` listed for no query and for
// `base:`; queries in unknown namespaces select nothing (no error); a SET replaces the last
// one; a wrong export name is NBD_REP_ERR_UNKNOWN; what the last SET chose is what GO takes
// into transmission, with NBD_FLAG_SEND_DF.
#[test]
fn structured_replies_and_base_allocation_are_negotiated() {
    let (mut client, thread) = start(named(), FIXED);
    send_option(&mut client, NBD_OPT_SET_META_CONTEXT, &meta_request("vol", &["base:allocation"]));
    assert_eq!(read_contexts(&mut client, NBD_OPT_SET_META_CONTEXT).1, NBD_REP_ERR_INVALID, "before structured");
    send_option(&mut client, NBD_OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(read_option_reply(&mut client).1, NBD_REP_ERR_INVALID, "data with the option");
    send_option(&mut client, NBD_OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(read_option_reply(&mut client), (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, vec![]));

    let base = (0, BASE_ALLOCATION.to_string());
    for queries in [&[][..], &["base:"][..], &["x-other:thing", "base:allocation"][..]] {
        send_option(&mut client, NBD_OPT_LIST_META_CONTEXT, &meta_request("", queries));
        assert_eq!(read_contexts(&mut client, NBD_OPT_LIST_META_CONTEXT), (vec![base.clone()], NBD_REP_ACK));
    }
    send_option(&mut client, NBD_OPT_LIST_META_CONTEXT, &meta_request("vol", &["qemu:dirty-bitmap:x"]));
    assert_eq!(read_contexts(&mut client, NBD_OPT_LIST_META_CONTEXT), (vec![], NBD_REP_ACK));
    send_option(&mut client, NBD_OPT_LIST_META_CONTEXT, &meta_request("other", &[]));
    assert_eq!(read_contexts(&mut client, NBD_OPT_LIST_META_CONTEXT).1, NBD_REP_ERR_UNKNOWN);
    let mut lying = meta_request("vol", &["base:allocation"]);
    lying[10] = 9;
    for bad in [lying, vec![0, 0, 0], [meta_request("vol", &[]), vec![0]].concat()] {
        send_option(&mut client, NBD_OPT_SET_META_CONTEXT, &bad);
        assert_eq!(read_contexts(&mut client, NBD_OPT_SET_META_CONTEXT).1, NBD_REP_ERR_INVALID, "{bad:?}");
    }

    send_option(&mut client, NBD_OPT_SET_META_CONTEXT, &meta_request("vol", &["x-foo:bar", "base:allocation"]));
    let (contexts, last) = read_contexts(&mut client, NBD_OPT_SET_META_CONTEXT);
    assert_eq!((contexts, last), (vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION.to_string())], NBD_REP_ACK));
    send_option(&mut client, NBD_OPT_GO, &info_request("vol", &[NBD_INFO_BLOCK_SIZE]));
    let (infos, last) = read_infos(&mut client, NBD_OPT_GO);
    assert_eq!(last, NBD_REP_ACK);
    let (_, info) = infos.iter().find(|(t, _)| *t == NBD_INFO_EXPORT).expect("export info");
    let flags = be16(&info[8..10]);
    assert_eq!(flags, named().transmission_flags() | NBD_FLAG_SEND_DF);
    let negotiated = finish(thread).0.expect("handshake").expect("transmission");
    assert!(negotiated.structured_replies);
    assert_eq!(negotiated.base_allocation, Some(BASE_ALLOCATION_ID));
    assert_eq!(negotiated.flags, flags);
}

// A SET that selects nothing clears an earlier selection: block status is then refused.
#[test]
fn a_later_set_meta_context_replaces_the_earlier_one() {
    let (mut client, thread) = start(export(), FIXED);
    send_option(&mut client, NBD_OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(read_option_reply(&mut client).1, NBD_REP_ACK);
    send_option(&mut client, NBD_OPT_SET_META_CONTEXT, &meta_request("", &["base:allocation"]));
    assert_eq!(read_contexts(&mut client, NBD_OPT_SET_META_CONTEXT).0.len(), 1);
    send_option(&mut client, NBD_OPT_SET_META_CONTEXT, &meta_request("", &["x-unknown:a"]));
    assert_eq!(read_contexts(&mut client, NBD_OPT_SET_META_CONTEXT), (vec![], NBD_REP_ACK));
    send_option(&mut client, NBD_OPT_GO, &info_request("", &[]));
    assert_eq!(read_infos(&mut client, NBD_OPT_GO).1, NBD_REP_ACK);
    let negotiated = finish(thread).0.expect("handshake").expect("transmission");
    assert!(negotiated.structured_replies);
    assert_eq!(negotiated.base_allocation, None);
    let status = session::Request {
        handle: 1,
        kind: RequestKind::BlockStatus,
        flags: 0,
        offset: 0,
        length: 4096,
        data: Vec::new(),
    };
    assert_eq!(session::check_request_for(&status, &export(), &negotiated), Some(NBD_EINVAL));
}
