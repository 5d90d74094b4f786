//! The `rblk` command (not yet built).
//!
//! This crate will hold `rblk format`, `rblk serve` (the small, long-lived supervisor that owns
//! the image and the listening socket and restarts the driver when it dies or hangs),
//! `rblk inspect` (roots, log and tree statistics) and `rblk chaos` (fault-injection runs that
//! kill the driver over and over under a verifying workload), with its scenario files.
