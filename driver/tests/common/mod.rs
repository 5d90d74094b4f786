//! What the driver's in-process tests share.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// An NBD client connected to `path` through NBD_OPT_EXPORT_NAME (the simplest handshake a
/// client may do), ready for requests.
pub fn nbd_connect(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connect");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).expect("option");
    let mut answer = [0u8; 10];
    s.read_exact(&mut answer).expect("export");
    s
}
