//! `membrane-cni`: the binary the container runtime runs (see the library's documentation).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use membrane_cni::config::MAX_CONFIG_LEN;
use membrane_cni::probes::NftProbeRules;

fn main() {
    let vars: BTreeMap<String, String> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    // VERSION may come with nothing on stdin; anything over the limit is refused by the
    // parser (one byte more is enough to tell).
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(MAX_CONFIG_LEN as u64 + 1)
        .read_to_end(&mut stdin);
    if let Err(e) = read {
        stdin.clear();
        eprintln!("membrane-cni: cannot read stdin: {e}");
    }
    let outcome = membrane_cni::run(&vars, &stdin, &NftProbeRules);
    let mut stderr = std::io::stderr().lock();
    for warning in &outcome.warnings {
        let _ = writeln!(stderr, "membrane-cni: warning: {warning}");
    }
    if let Some(out) = &outcome.stdout {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{out}");
        let _ = stdout.flush();
    }
    std::process::exit(if outcome.success { 0 } else { 1 });
}
