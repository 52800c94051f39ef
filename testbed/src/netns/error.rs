//! The testbed's error type.

use std::fmt;
use std::io;
use std::process::ExitStatus;

/// Result alias for the testbed.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while building, using or tearing down a testbed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An external command (usually `ip`) could not be started.
    Spawn {
        /// The command line, for humans.
        command: String,
        /// Why it could not be started.
        source: io::Error,
    },
    /// An external command (usually `ip`) exited unsuccessfully.
    Command {
        /// The command line, for humans.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it wrote on standard error (trimmed).
        stderr: String,
    },
    /// A system call or file operation failed.
    Sys {
        /// What was being done, e.g. `setns into /run/netns/x`.
        op: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A name (testbed prefix, node, pod or namespace name) is not acceptable.
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Something with this name already exists: in the testbed, or a network namespace on
    /// the host that this testbed did not create (it is never adopted or deleted).
    AlreadyExists {
        /// What kind of thing (`"node"`, `"pod"`, `"network namespace"`, ...).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// No node with this name in the testbed.
    UnknownNode(String),
    /// A requested pod address is unusable.
    InvalidAddress {
        /// The address.
        ip: std::net::Ipv4Addr,
        /// Why it was refused.
        reason: String,
    },
    /// The addressing plan has no room left (nodes or pod addresses of a node).
    Exhausted(String),
    /// A closure or capture thread panicked; the payload's message if it had one.
    Panicked(String),
    /// Tearing down reported one or more errors (everything was still attempted).
    Teardown(Vec<Error>),
}

impl Error {
    pub(crate) fn sys(op: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Sys {
            op: op.into(),
            source: source.into(),
        }
    }

    pub(crate) fn invalid_name(name: &str, reason: &'static str) -> Self {
        Error::InvalidName {
            name: name.to_owned(),
            reason,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn { command, source } => write!(f, "cannot run `{command}`: {source}"),
            Error::Command {
                command,
                status,
                stderr,
            } => {
                write!(f, "`{command}` failed ({status})")?;
                if !stderr.is_empty() {
                    write!(f, ": {stderr}")?;
                }
                Ok(())
            }
            Error::Sys { op, source } => write!(f, "{op}: {source}"),
            Error::InvalidName { name, reason } => write!(f, "invalid name {name:?}: {reason}"),
            Error::AlreadyExists { what, name } => write!(f, "{what} {name:?} already exists"),
            Error::UnknownNode(name) => write!(f, "no node named {name:?} in this testbed"),
            Error::InvalidAddress { ip, reason } => write!(f, "cannot use address {ip}: {reason}"),
            Error::Exhausted(what) => write!(f, "address plan exhausted: {what}"),
            Error::Panicked(message) => write!(f, "thread panicked: {message}"),
            Error::Teardown(errors) => {
                write!(f, "teardown failed with {} error(s)", errors.len())?;
                for error in errors {
                    write!(f, "; {error}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Spawn { source, .. } | Error::Sys { source, .. } => Some(source),
            Error::Teardown(errors) => errors
                .first()
                .map(|e| e as &(dyn std::error::Error + 'static)),
            _ => None,
        }
    }
}

/// The message of a panic payload, for [`Error::Panicked`].
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
