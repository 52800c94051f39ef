//! The directory source: Kubernetes-style YAML manifests in a directory, reloaded on change.
//!
//! Every `*.yaml` / `*.yml` file below the directory is read (hidden files and directories are
//! skipped); a file may hold several documents, and `kind: List` is unpacked. `Namespace`,
//! `Pod`, `ServiceAccount`, `Service`, `AuthorizationPolicy` (Membrane's and Istio's API
//! groups), `EgressPolicy` and the Gateway API's `Gateway`, `TCPRoute` and `TLSRoute` are
//! understood; other kinds are ignored. A Service's endpoints are the pods its
//! selector matches (there is no endpoints controller without Kubernetes).
//!
//! A file is applied whole or not at all: when an edit breaks it, the error names the file,
//! the document and the field, and the *last good* version of that file stays in force. A
//! file that never parsed contributes only a deny-all stand-in for each of its policies
//! (`fallback`), and while one cannot even be told apart no first state is published. A
//! deleted file removes its objects. Changes are found by polling (file size, mtime, inode,
//! then a content hash), which works on every filesystem, including bind mounts and
//! ConfigMap volumes where inotify is unreliable.
//!
//! `manifest` turns text into objects (pure); `fallback` turns the text of a file that never
//! parsed into stand-ins (pure); `watch` polls the directory, keeps each file's last good
//! objects and publishes the merged state. `watch` uses the other two, never the other way.

mod fallback;
mod manifest;
mod watch;

pub use fallback::Unidentified;
pub use manifest::{DirService, DocumentError, Object, TargetPort, parse_manifests};
pub use watch::{DirectorySource, MAX_FILE_LEN, SourceError, run};

#[cfg(test)]
mod tests;
