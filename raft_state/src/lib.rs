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
pub mod rng;
pub mod roots;
pub mod tree;
pub mod volume;
