//! Typed configuration (not yet built).
//!
//! This crate will parse rblk's TOML configuration into typed structs with a default for every
//! option (log region size, checkpoint triggers, heartbeat and restart policy, unprivileged
//! uid/gid, log level), validate it, and report errors that name the key and what is wrong.
//! Example files will live beside it.
