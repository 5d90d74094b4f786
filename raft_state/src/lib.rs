//! rblk's persistent state.
//!
//! Everything rblk keeps on disk lives here, and nothing here knows about sockets:
//! - [`device`]: raw sector devices (files, block devices, and a simulated faulty disk);
//! - [`roots`]: the three fixed root blocks and the seed's rule H(a,b)=c that names the
//!   overwrite, backup and current slot;
//! - [`log`]: the Raft log (`raft::Storage`) kept as a ring of checksummed records on raw
//!   sectors;
//! - [`tree`]: the copy-on-write Merkle tree that maps virtual blocks to physical blocks
//!   (and allocator bitmap indexes to bitmap blocks), with a bounded node [`cache`];
//! - [`alloc`]: the free-space bitmaps and the two-root reuse rule;
//! - [`command`]: the block commands carried in Raft entries;
//! - [`place`]: large writes written once, to their blocks, before their records name them;
//! - [`volume`]: the state machine: apply, checkpoint, open and recover;
//! - [`layout`]: the geometry that places the regions;
//! - [`hash`]: the domain-separated BLAKE3 hashes all formats use;
//! - [`rng`]: the small seeded generator the simulations use.
//!
//! The byte layout of every structure is in `docs/format.md`.

pub mod alloc;
pub mod cache;
pub mod command;
pub mod device;
pub mod hash;
pub mod layout;
pub mod log;
pub mod place;
pub mod rng;
pub mod roots;
pub mod tree;
pub mod volume;

/// Whether this build carries the failpoints (the `failpoints` feature). A default build does
/// not: it ignores `FAILPOINTS`, so a stray environment variable cannot crash a production
/// driver.
pub const FAILPOINTS_BUILT: bool = cfg!(feature = "failpoints");

/// Configures the failpoints from the `FAILPOINTS` environment variable (`name=action;...`),
/// once at process start; without the `failpoints` feature, nothing.
pub fn failpoints_from_env() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}

/// A named failpoint (the `fail` crate, compiled in with the `failpoints` feature): configured
/// with the action `return` (e.g. `FAILPOINTS=log::after_append=5%return`), the process dies
/// on the spot, as a SIGKILL would, without unwinding or flushing anything. The fault-injection
/// runs (`rblk chaos`) use them to crash at the exact steps of the commit protocols.
#[inline]
pub fn failpoint(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |_| {
        eprintln!("failpoint {name}: dying here");
        std::process::abort()
    });
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// An error with its chain of sources, `outer: inner: innermost`, for logs and messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
