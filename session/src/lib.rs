//! The block-session protocol (not yet built).
//!
//! This crate will speak NBD as specified by the NBD project's `doc/proto.md`: the fixed
//! newstyle handshake and the transmission phase (READ, WRITE with FUA, FLUSH, TRIM,
//! WRITE_ZEROES, DISC) on the server side, and a client that keeps many requests in flight,
//! reconnects after a driver restart and resends unacknowledged requests. It knows nothing of
//! disks: the driver plugs its volume in behind a trait.
