//! The `rblk` command's package: the `rblk` binary (`src/main.rs`: format, serve — the
//! supervisor —, inspect, chaos), the `rblk-driver` binary, and what its tests share with it.

pub mod stamp;
