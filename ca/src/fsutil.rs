//! Small file helpers the controller needs to keep its state safe on disk.

use std::path::{Path, PathBuf};

/// A state file that could not be read or written, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// Wraps an I/O error on `path` (for `map_err`).
    pub fn at(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        move |source| FileError {
            path: path.to_owned(),
            source,
        }
    }
}

pub use membrane_runtime::fsutil::{ensure_private_dir, write_atomic};
