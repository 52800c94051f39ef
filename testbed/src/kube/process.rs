//! A child process of the harness that is always stopped: by PID, SIGTERM then SIGKILL after
//! 5 s, when [`Child::stop`] is called or the [`Child`] drops (a failing test included).

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running child process whose output goes to a log file.
pub struct Child {
    name: &'static str,
    inner: Option<std::process::Child>,
}

impl Child {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &'static str, command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name,
            inner: Some(child),
        })
    }

    /// Takes over an already started process.
    pub fn adopt(name: &'static str, child: std::process::Child) -> Self {
        Self {
            name,
            inner: Some(child),
        }
    }

    /// The process ID.
    pub fn pid(&self) -> Option<u32> {
        self.inner.as_ref().map(std::process::Child::id)
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.inner.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// Stops the process (SIGTERM, SIGKILL after 5 s) and reaps it.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        self.terminate()
            .with_context(|| format!("{} was already stopped", self.name))
    }

    /// Kills the process at once (SIGKILL), as a crash would, and reaps it.
    pub fn kill(mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.inner.take().context("already stopped")?;
        child.kill()?;
        Ok(child.wait()?)
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.inner.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.terminate();
    }
}
