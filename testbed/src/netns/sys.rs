//! Thin wrappers over `ip`, `setns(2)` and `/proc`.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::error::{Error, Result, panic_message};

/// Where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Serialises `ip netns add`: the first one on a host turns `/run/netns` into a shared
/// mount point, which races when several run at once.
static NETNS_ADD: Mutex<()> = Mutex::new(());

fn render(program: &OsStr, args: &[&OsStr]) -> String {
    let mut line = program.to_string_lossy().into_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `ip ARGS...` and fails unless it exits successfully.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<()> {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    let command = render(OsStr::new("ip"), &args);
    let output = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `ip -n NETNS ARGS...`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    ip(&full)
}

/// Creates the named network namespace; fails if it already exists.
pub(crate) fn netns_add(name: &str) -> Result<()> {
    if netns_path(name).exists() {
        return Err(Error::AlreadyExists {
            what: "network namespace",
            name: name.to_owned(),
        });
    }
    let _guard = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
    ip(&["netns", "add", name])
}

/// Deletes the named network namespace handle (`ip netns del`).
pub(crate) fn netns_del(name: &str) -> Result<()> {
    ip(&["netns", "del", name])
}

/// Runs `f` on a fresh thread whose network namespace is the one at `netns_path`, and
/// returns its result.
///
/// Only that thread changes namespace: the caller and every other thread stay where they
/// are. Sockets created by `f` belong to the namespace for their whole life, wherever they
/// are used afterwards, so this is the way to get a listener or a connection "inside" a pod:
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use membrane_testbed::netns::run_in_netns;
/// let bind = || std::net::TcpListener::bind("0.0.0.0:8080");
/// let listener = run_in_netns("/run/netns/my-pod", bind)??;
/// # drop(listener); Ok(()) }
/// ```
///
/// `f` may borrow from the caller (the thread is scoped). A panic in `f` is resumed in the
/// caller. Nothing else (mount namespace, `/sys`) changes; tasks `f` hands to other threads
/// (e.g. a tokio runtime) run in *their* thread's namespace. For tokio, create the std
/// socket here, then `set_nonblocking(true)` and `tokio::net::TcpListener::from_std` it.
pub fn run_in_netns<T, F>(netns_path: impl AsRef<Path>, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = netns_path.as_ref();
    let file = File::open(path).map_err(|e| Error::sys(format!("open {}", path.display()), e))?;
    let outcome = std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("netns".to_owned())
            .spawn_scoped(scope, move || -> Result<T> {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::sys(format!("setns into {}", path.display()), e))?;
                drop(file);
                Ok(f())
            })
            .map_err(|e| Error::sys("spawn namespace thread", e))?;
        Ok(handle.join())
    })?;
    match outcome {
        Ok(result) => result,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// A [`Command`] that runs `program` inside the named namespace (`ip netns exec NAME
/// program`); add arguments, environment and stdio to it as usual.
pub fn command_in(netns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns]).arg(program);
    command
}

/// Runs `args[0] args[1..]` inside the named namespace and collects its output.
///
/// Only failing to start is an error: a non-zero exit is reported in the returned
/// [`Output`], as with [`Command::output`].
pub fn exec_in(netns: &str, args: &[&str]) -> Result<Output> {
    let Some((program, rest)) = args.split_first() else {
        return Err(Error::sys(
            format!("exec in {netns}"),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        ));
    };
    let mut command = command_in(netns, program);
    command.args(rest).stdin(Stdio::null());
    command.output().map_err(|source| Error::Spawn {
        command: format!("ip netns exec {netns} {}", args.join(" ")),
        source,
    })
}

/// Spawns `command` inside the named namespace.
///
/// The program, arguments, environment changes and working directory of `command` are carried
/// over to an `ip netns exec` wrapper (which `exec`s the program, so the [`Child`] is the
/// program itself). Stdio settings cannot be read back from a [`Command`]: the child
/// inherits them. Use [`command_in`] to control stdio.
///
/// Returns once the process is inside the namespace (or has exited; at most 5 s), so a
/// testbed torn down right afterwards finds and kills it.
pub fn spawn_in(netns: &str, command: &Command) -> Result<Child> {
    let mut wrapped = command_in(netns, command.get_program());
    wrapped.args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    let target = ns_id(&netns_path(netns));
    let mut child = wrapped.spawn().map_err(|source| Error::Spawn {
        command: format!(
            "ip netns exec {netns} {}",
            command.get_program().to_string_lossy()
        ),
        source,
    })?;
    if let Some(target) = target {
        wait_entered(&mut child, target, Duration::from_secs(5));
    }
    Ok(child)
}

/// Writes a sysctl (`net/ipv4/ip_forward`, ...) of the namespace at `netns_path`.
pub(crate) fn write_sysctl(netns_path: &Path, key: &str, value: &str) -> Result<()> {
    let file = Path::new("/proc/sys").join(key);
    run_in_netns(netns_path, || std::fs::write(&file, value))?.map_err(|e| {
        Error::sys(
            format!("write {} in {}", file.display(), netns_path.display()),
            e,
        )
    })
}

/// Identity of a network namespace: the nsfs (device, inode) pair. It stays the same while the
/// namespace exists, also after its `/run/netns` name is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NsId {
    dev: u64,
    ino: u64,
}

/// The identity of the namespace at `path`, if it exists.
pub(crate) fn ns_id(path: &Path) -> Option<NsId> {
    let meta = std::fs::metadata(path).ok()?;
    Some(NsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// The network namespace process `pid` (its main thread) is in.
fn ns_of_pid(pid: u32) -> Option<NsId> {
    ns_id(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// Sends SIGKILL to every process (other than this one) whose network namespace is one of
/// `namespaces`. Only processes of our pid namespace are visible.
pub(crate) fn kill_all_in(namespaces: &[NsId]) {
    if namespaces.is_empty() {
        return;
    }
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if pid == own || !ns_of_pid(pid).is_some_and(|ns| namespaces.contains(&ns)) {
            continue;
        }
        if let Ok(pid) = i32::try_from(pid) {
            // Already gone is fine.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Waits (at most `timeout`) until process `pid` is inside the namespace `target`, or has
/// exited. `ip netns exec` enters the namespace shortly after it starts.
fn wait_entered(child: &mut Child, target: NsId, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ns_of_pid(child.id()) == Some(target) || !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether a process with this pid exists (in our pid namespace).
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Turns a scoped-thread panic payload into an error (for threads that must not unwind into
/// the caller).
pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> Error {
    Error::Panicked(panic_message(payload))
}

/// Waits (5 s at most) until something listens on TCP `port` in namespace `ns`.
pub fn wait_listening(ns: &str, port: u16) -> anyhow::Result<()> {
    let filter = format!("sport = :{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let out = exec_in(ns, &["ss", "-Htln", &filter])?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::bail!("nothing listens on {port} in {ns}")
}
