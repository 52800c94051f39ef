//! The commands against a scripted ztunnel (a Unix socket in a temporary directory) and a
//! recording probe rule.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::*;
use crate::probes::ProbeRuleError;

/// A ztunnel that answers each op with a fixed line and records the requests.
struct FakeZtunnel {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Value>>>,
    _dir: tempfile::TempDir,
}

impl FakeZtunnel {
    fn start(answers: &[(&str, Value)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("ztunnel.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let answers: BTreeMap<String, Value> = answers
            .iter()
            .map(|(op, v)| ((*op).to_owned(), v.clone()))
            .collect();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                let request: Value = serde_json::from_str(&line).unwrap_or_default();
                let op = request["op"].as_str().unwrap_or_default().to_owned();
                if let Ok(mut all) = seen.lock() {
                    all.push(request);
                }
                let answer = answers
                    .get(&op)
                    .cloned()
                    .unwrap_or_else(|| json!({"ok": false, "error": "unexpected"}));
                let _ = (&stream).write_all(format!("{answer}\n").as_bytes());
            }
        });
        Self {
            socket,
            requests,
            _dir: dir,
        }
    }

    fn ops(&self) -> Vec<String> {
        self.requests
            .lock()
            .map(|r| {
                r.iter()
                    .map(|v| v["op"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn request(&self, op: &str) -> Value {
        self.requests
            .lock()
            .ok()
            .and_then(|r| r.iter().find(|v| v["op"] == op).cloned())
            .unwrap_or_default()
    }
}

/// Records what the plugin asked of the node's rule; fails when told to.
#[derive(Default)]
struct FakeProbes {
    set: Mutex<Vec<Ipv4Addr>>,
    broken: bool,
}

impl ProbeRules for FakeProbes {
    fn ensure(&self, pods: &[Ipv4Addr]) -> Result<(), ProbeRuleError> {
        if self.broken {
            return Err(ProbeRuleError::Nft("broken".into()));
        }
        let mut set = self.set.lock().expect("lock");
        for ip in pods {
            if !set.contains(ip) {
                set.push(*ip);
            }
        }
        Ok(())
    }

    fn remove(&self, pods: &[Ipv4Addr]) -> Result<(), ProbeRuleError> {
        self.set
            .lock()
            .expect("lock")
            .retain(|ip| !pods.contains(ip));
        Ok(())
    }

    fn contains(&self, pod: Ipv4Addr) -> Result<bool, ProbeRuleError> {
        Ok(self.set.lock().expect("lock").contains(&pod))
    }
}

fn env(command: &str) -> BTreeMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "sandbox1"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=uid-1",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
        "ips": [{"address": "10.1.0.5/24", "interface": 0}],
    })
}

fn conf(socket: &Path, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0", "name": "k8s", "type": "membrane-cni",
        "enrollSocket": socket, "timeoutSeconds": 5, "prevResult": prev_result(),
    });
    if let (Some(obj), Value::Object(more)) = (c.as_object_mut(), extra) {
        obj.extend(more);
    }
    c.to_string().into_bytes()
}

fn ip(text: &str) -> Ipv4Addr {
    text.parse().expect("ip")
}

#[test]
fn version_lists_the_supported_versions() {
    let out = run(&env("VERSION"), b"", &FakeProbes::default());
    assert!(out.success);
    assert_eq!(
        out.stdout,
        Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
        )
    );
}

#[test]
fn add_enrolls_passes_the_result_through_and_exempts_probes() {
    let z = FakeZtunnel::start(&[
        ("add", json!({"ok": true, "enrolled": true})),
        (
            "list",
            json!({"ok": true, "pods": [
                {"uid": "uid-1", "enrolled": true, "mesh": true, "ips": ["10.1.0.5"]},
                {"uid": "old", "enrolled": true, "mesh": true, "ips": ["10.1.0.9", "fd00::9"]},
            ]}),
        ),
    ]);
    let probes = FakeProbes::default();
    let out = run(&env("ADD"), &conf(&z.socket, json!({})), &probes);
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, Some(prev_result()));
    assert_eq!(
        z.request("add"),
        json!({"op": "add", "uid": "uid-1", "netns": "/var/run/netns/cni-1",
               "namespace": "shop", "name": "web-0", "ips": ["10.1.0.5"]})
    );
    assert_eq!(
        *probes.set.lock().expect("lock"),
        [ip("10.1.0.5"), ip("10.1.0.9")]
    );
    // CHECK agrees; DEL undoes it.
    let out = run(&env("CHECK"), &conf(&z.socket, json!({})), &probes);
    assert!(out.success && out.stdout.is_none(), "{out:?}");
    let out = run(&env("DEL"), &conf(&z.socket, json!({})), &probes);
    assert!(out.success && out.stdout.is_none(), "{out:?}");
    // With the sandbox's namespace: a pod enrolled in another one (a newer sandbox) stays.
    assert_eq!(
        z.request("remove"),
        json!({"op": "remove", "uid": "uid-1", "netns": "/var/run/netns/cni-1"})
    );
    assert_eq!(z.ops(), ["add", "list", "list", "remove", "list"]);
    assert_eq!(*probes.set.lock().expect("lock"), [ip("10.1.0.9")]);
}

#[test]
fn a_repeated_del_keeps_the_probe_exemption_of_the_ip_s_new_owner() {
    let z = FakeZtunnel::start(&[
        ("remove", json!({"ok": true})),
        (
            "list",
            json!({"ok": true, "pods": [
                {"uid": "new-owner", "enrolled": true, "mesh": true, "ips": ["10.1.0.5"]},
            ]}),
        ),
    ]);
    let probes = FakeProbes::default();
    probes.ensure(&[ip("10.1.0.5")]).expect("seed");
    let out = run(&env("DEL"), &conf(&z.socket, json!({})), &probes);
    assert!(out.success, "{out:?}");
    assert_eq!(*probes.set.lock().expect("lock"), [ip("10.1.0.5")]);
}

#[test]
fn add_of_a_pod_outside_the_mesh_succeeds() {
    let z = FakeZtunnel::start(&[
        ("add", json!({"ok": true, "enrolled": false})),
        ("list", json!({"ok": true, "pods": []})),
    ]);
    let out = run(
        &env("ADD"),
        &conf(&z.socket, json!({})),
        &FakeProbes::default(),
    );
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, Some(prev_result()));
    // A broken probe rule only warns for a pod that is not captured.
    let broken = FakeProbes {
        broken: true,
        ..FakeProbes::default()
    };
    let out = run(&env("ADD"), &conf(&z.socket, json!({})), &broken);
    assert!(out.success, "{out:?}");
    assert!(out.warnings.iter().any(|w| w.contains("probe rule")));
}

#[test]
fn a_captured_pod_without_its_probe_rule_fails() {
    let z = FakeZtunnel::start(&[
        ("add", json!({"ok": true, "enrolled": true})),
        ("list", json!({"ok": true, "pods": []})),
    ]);
    let broken = FakeProbes {
        broken: true,
        ..FakeProbes::default()
    };
    let out = run(&env("ADD"), &conf(&z.socket, json!({})), &broken);
    assert!(!out.success);
    assert_eq!(out.stdout.expect("error")["code"], 102);
    // CHECK sees the missing address.
    let z = FakeZtunnel::start(&[(
        "list",
        json!({"ok": true, "pods": [{"uid": "uid-1", "enrolled": true, "mesh": true}]}),
    )]);
    let out = run(
        &env("CHECK"),
        &conf(&z.socket, json!({})),
        &FakeProbes::default(),
    );
    assert_eq!(out.stdout.expect("error")["code"], 102);
}

#[test]
fn an_unreachable_ztunnel_fails_closed_unless_configured_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("absent.sock");
    let probes = FakeProbes::default();
    let out = run(&env("ADD"), &conf(&socket, json!({})), &probes);
    assert!(!out.success);
    let err = out.stdout.expect("error");
    assert_eq!(err["code"], 100, "{err}");
    assert_eq!(err["cniVersion"], "1.0.0");
    let msg = err["msg"].as_str().expect("msg");
    assert!(
        msg.contains(&socket.display().to_string()) && msg.contains("failClosed"),
        "{msg}"
    );
    let out = run(
        &env("ADD"),
        &conf(&socket, json!({"failClosed": false})),
        &probes,
    );
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, Some(prev_result()));
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("failClosed is false"))
    );
    // DEL never fails for a missing ztunnel; CHECK does (fail closed).
    let out = run(&env("DEL"), &conf(&socket, json!({})), &probes);
    assert!(out.success && out.stdout.is_none(), "{out:?}");
    let out = run(&env("CHECK"), &conf(&socket, json!({})), &probes);
    assert_eq!(out.stdout.expect("error")["code"], 100);
}

#[test]
fn refusals_map_to_codes() {
    let z = FakeZtunnel::start(&[(
        "add",
        json!({"ok": false, "retry": true, "error": "no mesh state yet"}),
    )]);
    let out = run(
        &env("ADD"),
        &conf(&z.socket, json!({})),
        &FakeProbes::default(),
    );
    assert_eq!(out.stdout.expect("error")["code"], 11);
    let z = FakeZtunnel::start(&[("add", json!({"ok": false, "error": "pod runs on node b"}))]);
    let out = run(
        &env("ADD"),
        &conf(&z.socket, json!({})),
        &FakeProbes::default(),
    );
    let err = out.stdout.expect("error");
    assert_eq!(err["code"], 101);
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("shop/web-0") && m.contains("node b")),
        "{err}"
    );
}

#[test]
fn check_requires_a_mesh_pod_to_be_captured() {
    let z = FakeZtunnel::start(&[(
        "list",
        json!({"ok": true, "pods": [
            {"uid": "uid-1", "enrolled": false, "mesh": true, "error": "nft failed"},
        ]}),
    )]);
    let out = run(
        &env("CHECK"),
        &conf(&z.socket, json!({})),
        &FakeProbes::default(),
    );
    let err = out.stdout.expect("error");
    assert_eq!(err["code"], 103);
    assert!(
        err["msg"]
            .as_str()
            .is_some_and(|m| m.contains("nft failed")),
        "{err}"
    );
    // A pod the ztunnel does not know at all.
    let z = FakeZtunnel::start(&[("list", json!({"ok": true, "pods": []}))]);
    let out = run(
        &env("CHECK"),
        &conf(&z.socket, json!({})),
        &FakeProbes::default(),
    );
    assert_eq!(out.stdout.expect("error")["code"], 103);
    // A known pod outside the mesh is fine.
    let z = FakeZtunnel::start(&[(
        "list",
        json!({"ok": true, "pods": [{"uid": "uid-1", "enrolled": false, "mesh": false}]}),
    )]);
    let out = run(
        &env("CHECK"),
        &conf(&z.socket, json!({})),
        &FakeProbes::default(),
    );
    assert!(out.success, "{out:?}");
    // CHECK before 0.4.0 does not exist.
    let out = run(
        &env("CHECK"),
        &conf(
            &z.socket,
            json!({"cniVersion": "0.3.1", "prevResult": {"cniVersion": "0.3.1"}}),
        ),
        &FakeProbes::default(),
    );
    let err = out.stdout.expect("error");
    assert_eq!(err["code"], 1);
    assert_eq!(err["cniVersion"], "0.3.1");
}

#[test]
fn invocation_errors_come_first_and_carry_codes() {
    let probes = FakeProbes::default();
    let mut no_command = env("ADD");
    no_command.remove("CNI_COMMAND");
    let out = run(&no_command, b"garbage", &probes);
    assert_eq!(out.stdout.expect("error")["code"], 4);
    let out = run(&env("ADD"), b"{not json", &probes);
    assert_eq!(out.stdout.expect("error")["code"], 6);
    let out = run(
        &env("ADD"),
        br#"{"cniVersion":"0.2.0","name":"n","type":"membrane-cni"}"#,
        &probes,
    );
    assert_eq!(out.stdout.expect("error")["code"], 1);
    let out = run(
        &env("ADD"),
        br#"{"cniVersion":"0.4.0","name":"n","type":"membrane-cni","failClosed":1}"#,
        &probes,
    );
    let err = out.stdout.expect("error");
    assert_eq!(err["code"], 7);
    assert_eq!(err["cniVersion"], "0.4.0");
}

#[test]
fn pods_without_kubernetes_arguments_are_passed_through() {
    let z = FakeZtunnel::start(&[]);
    let socket = z.socket.clone();
    let mut vars = env("ADD");
    vars.remove("CNI_ARGS");
    let out = run(&vars, &conf(&socket, json!({})), &FakeProbes::default());
    assert!(out.success, "{out:?}");
    assert_eq!(out.stdout, Some(prev_result()));
    assert!(z.ops().is_empty(), "nothing to tell the ztunnel");
    // A Kubernetes pod without its UID: the runtime is too old, fail closed.
    vars.insert(
        "CNI_ARGS".into(),
        "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b".into(),
    );
    let out = run(&vars, &conf(&socket, json!({})), &FakeProbes::default());
    assert_eq!(out.stdout.expect("error")["code"], 4);
}
