//! Binding a unix socket where an earlier server may have left one: the NBD socket, the
//! vhost-user-blk socket and the metrics socket follow the same rule.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{} exists and is not a socket: not replaced", .0.display())]
    NotASocket(PathBuf),
    #[error("{} is in use by a running server", .0.display())]
    InUse(PathBuf),
    #[error("removing the stale socket {}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path`. A leftover socket nobody listens on is replaced; a live one is an error
/// (another server), and so is anything there that is not a socket: a mistyped path must not
/// cost a file.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_path_buf()));
        }
        // A server that was just killed may take a moment to let go of it.
        let live = (0..20).all(|_| {
            let up = UnixStream::connect(path).is_ok();
            if up {
                std::thread::sleep(Duration::from_millis(100));
            }
            up
        });
        if live {
            return Err(BindError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| BindError::RemoveStale { path: path.to_path_buf(), source })?;
    }
    UnixListener::bind(path).map_err(|source| BindError::Bind { path: path.to_path_buf(), source })
}
