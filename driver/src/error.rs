//! The errors that stop the driver (fail-stop), and the helper that prints one with its
//! sources.

use raft_state::log::LogError;
use raft_state::volume::VolumeError;

/// An error with its sources, for logs and the exit message.
pub use raft_state::error_chain;

/// Errors that stop the driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("volume")]
    Volume(#[source] VolumeError),
    #[error("raft log")]
    Log(#[source] LogError),
    /// raft-rs refused a configuration, a start or a proposal.
    #[error("raft: {what}")]
    Raft {
        what: &'static str,
        #[source]
        source: raft::Error,
    },
    /// Something a single-voter group never does happened: a bug, so the driver stops.
    #[error("the single-node Raft group did something it never does: {0}")]
    Unexpected(String),
    /// A thread of the pipeline (the applier, a checkpoint) ended: its own error, if it had
    /// one, is logged or returned separately.
    #[error("the {0} thread stopped")]
    Stopped(&'static str),
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    #[error("I/O")]
    Io(#[from] std::io::Error),
}
