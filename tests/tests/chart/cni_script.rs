//! The CNI install script run against a fake node's directories.

use super::*;

// ---------------------------------------------------------------------------------------------
// the CNI install script

/// sh, jq and cmp for the script; an error when one is missing (never a silent pass).
fn script_tools() -> anyhow::Result<()> {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = ["jq", "cmp"].into_iter().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "{missing:?} missing: `source scripts/lib/helm.sh && membrane_install_helm` (as root) \
         installs jq"
    );
}

struct FakeNode {
    _dir: tempfile::TempDir,
    script: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
    source: PathBuf,
    entry: String,
}

impl FakeNode {
    fn new(helm: &Path) -> anyhow::Result<Self> {
        let r = defaults(helm)?;
        let script_text = str_of(&r.one("ConfigMap")?["data"]["install-cni.sh"]).to_owned();
        let file = std::fs::read_to_string(chart_dir().join("files/install-cni.sh"))?;
        assert_eq!(
            script_text, file,
            "the ConfigMap carries files/install-cni.sh unchanged"
        );
        let entry = env_value(
            container(r.daemonset()?, "install-cni")?,
            "MEMBRANE_CNI_ENTRY",
        )?;
        let dir = tempfile::tempdir()?;
        let node = Self {
            script: dir.path().join("install-cni.sh"),
            bin: dir.path().join("opt/cni/bin"),
            conf: dir.path().join("etc/cni/net.d"),
            source: dir.path().join("image/membrane-cni"),
            entry,
            _dir: dir,
        };
        std::fs::write(&node.script, script_text)?;
        std::fs::create_dir_all(&node.bin)?;
        std::fs::create_dir_all(&node.conf)?;
        std::fs::create_dir_all(node.source.parent().context("parent")?)?;
        std::fs::write(&node.source, b"#!/bin/sh\necho membrane-cni v1\n")?;
        Ok(node)
    }

    fn command(&self, mode: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg(&self.script)
            .arg(mode)
            .env("CNI_BIN_DIR", &self.bin)
            .env("CNI_CONF_DIR", &self.conf)
            .env("MEMBRANE_CNI_SOURCE", &self.source)
            .env("MEMBRANE_CNI_ENTRY", &self.entry)
            .env("MEMBRANE_CNI_INTERVAL", "1");
        cmd
    }

    fn run(&self, mode: &str) -> anyhow::Result<bool> {
        let out = self.command(mode).output()?;
        Ok(out.status.success())
    }

    fn conflist(&self, name: &str) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            self.conf.join(name),
        )?)?)
    }

    fn installed_binary(&self) -> PathBuf {
        self.bin.join("membrane-cni")
    }
}

fn primary_conflist() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "primary",
        "plugins": [
            {"type": "ptp", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

#[test]
fn cni_install_script_installs_idempotently_and_removes_everything() -> anyhow::Result<()> {
    let helm = need_helm!();
    script_tools()?;
    let node = FakeNode::new(&helm)?;
    let entry: Value = serde_json::from_str(&node.entry)?;

    // No configuration yet (the primary CNI has not started): nothing to chain into.
    ensure!(
        !node.run("install")?,
        "install succeeded without a CNI configuration"
    );
    ensure!(
        !node.run("check")?,
        "check passed without a CNI configuration"
    );

    let primary = primary_conflist();
    std::fs::write(
        node.conf.join("10-primary.conflist"),
        serde_json::to_string(&primary)?,
    )?;
    let other = "{\"cniVersion\":\"1.0.0\",\"name\":\"other\",\"plugins\":[{\"type\":\"bridge\"}]}";
    std::fs::write(node.conf.join("20-other.conflist"), other)?;
    std::fs::write(node.conf.join("00-readme.txt"), "not a CNI file")?;

    let mut with_entry = primary.clone();
    with_entry["plugins"]
        .as_array_mut()
        .context("plugins")?
        .push(entry.clone());
    for round in 0..2 {
        ensure!(node.run("install")?, "install failed (round {round})");
        assert_eq!(
            node.conflist("10-primary.conflist")?,
            with_entry,
            "round {round}"
        );
        assert_eq!(
            std::fs::read(node.installed_binary())?,
            std::fs::read(&node.source)?
        );
        ensure!(node.run("check")?, "check failed after install");
    }
    assert_eq!(
        std::fs::read_to_string(node.conf.join("20-other.conflist"))?,
        other
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.installed_binary())?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    // The primary CNI rewrites its file (entry gone), an older entry lingers elsewhere in
    // the list, a new binary ships: install repairs all three, still one entry.
    let mut stale = primary.clone();
    let plugins = stale["plugins"].as_array_mut().context("plugins")?;
    plugins.insert(0, json!({"type": "membrane-cni", "failClosed": false}));
    std::fs::write(
        node.conf.join("10-primary.conflist"),
        serde_json::to_string(&stale)?,
    )?;
    std::fs::write(&node.source, b"#!/bin/sh\necho membrane-cni v2\n")?;
    ensure!(
        !node.run("check")?,
        "check passed with a stale entry and binary"
    );
    ensure!(node.run("install")?, "repair failed");
    assert_eq!(node.conflist("10-primary.conflist")?, with_entry);
    assert_eq!(
        std::fs::read(node.installed_binary())?,
        std::fs::read(&node.source)?
    );

    // Uninstall restores the list and removes the binary; a second one is a no-op.
    for round in 0..2 {
        ensure!(node.run("uninstall")?, "uninstall failed (round {round})");
        assert_eq!(node.conflist("10-primary.conflist")?, primary);
        ensure!(!node.installed_binary().exists(), "binary left behind");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&node.conf)?
        .chain(std::fs::read_dir(&node.bin)?)
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("membrane"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    Ok(())
}

#[test]
fn cni_install_script_keeps_the_entry_and_removes_it_on_termination() -> anyhow::Result<()> {
    let helm = need_helm!();
    script_tools()?;
    let node = FakeNode::new(&helm)?;
    let primary = primary_conflist();
    std::fs::write(
        node.conf.join("05-primary.conflist"),
        serde_json::to_string(&primary)?,
    )?;
    let mut child = node
        .command("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let wait_for = |what: &str, done: &dyn Fn() -> anyhow::Result<bool>| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done()? {
            ensure!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    };
    let result = (|| -> anyhow::Result<()> {
        wait_for("the install", &|| node.run("check"))?;
        // The primary CNI rewrites its configuration: the loop puts the entry back.
        std::fs::write(
            node.conf.join("05-primary.conflist"),
            serde_json::to_string(&primary)?,
        )?;
        wait_for("the repair", &|| node.run("check"))?;
        Ok(())
    })();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("install-cni.sh run did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    result?;
    ensure!(status.success(), "run exited with {status}");
    assert_eq!(
        node.conflist("05-primary.conflist")?,
        primary,
        "entry removed on termination"
    );
    ensure!(
        !node.installed_binary().exists(),
        "binary removed on termination"
    );
    Ok(())
}
