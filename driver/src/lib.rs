//! The `rblk-driver` process (not yet built).
//!
//! This crate will hold the restartable driver: it drops privileges, opens the volume from the
//! file descriptors its supervisor hands over, recovers (three roots → current root →
//! copy-on-write tree; Raft log → replay of committed entries), runs a single-node Raft group
//! (raft-rs `RawNode` with group commit on the log store of `raft_state`) and serves NBD block
//! sessions on the inherited listening socket. Every write is acknowledged only after its Raft
//! entry is durable. See `docs/format.md` and the README.
