//! What the benchmark reads from `/proc` (CPU time, resident memory, load), the statistics
//! it reports (medians, latency quantiles), and the loads the egress and gateway benchmarks
//! share (connection rate, one stream's throughput, in-pod servers, TIME_WAIT reuse).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

/// `utime + stime` of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (`state`).
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field =
        |n: usize| -> anyhow::Result<u64> { Ok(fields.get(n - 3).context("short stat")?.parse()?) };
    Ok(field(14)? + field(15)?)
}

/// `VmRSS` of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?)
}

/// The largest resident memory of `pids`, in MiB.
pub fn largest_rss_mib(pids: &[u32]) -> anyhow::Result<f64> {
    let mut max = 0;
    for &pid in pids {
        max = max.max(rss_kib(pid)?);
    }
    Ok(max as f64 / 1024.0)
}

pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub type Samples = BTreeMap<&'static str, Vec<f64>>;

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The `q` quantile (nearest rank) of sorted nanosecond latencies, in µs.
pub fn quantile_us(sorted_ns: &[u32], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted_ns.len() as f64).ceil() as usize;
    f64::from(sorted_ns[rank.clamp(1, sorted_ns.len()) - 1]) / 1000.0
}

pub fn nanos(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

/// `clients` threads inside the network namespace at `netns`, each opening connections to
/// `dst` for `secs` (connect, send a line, read the greeting, close; bounded by time and by
/// count); the connections made. (Not every benchmark including this module uses it.)
#[allow(dead_code)]
pub fn connections(
    netns: std::path::PathBuf,
    dst: std::net::SocketAddr,
    clients: u64,
    secs: u64,
) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut threads = Vec::new();
    for _ in 0..clients {
        let netns = netns.clone();
        threads.push(std::thread::spawn(move || -> anyhow::Result<u64> {
            membrane_tests::netns::run_in_netns(netns, move || -> anyhow::Result<u64> {
                let mut made = 0;
                let mut buf = [0u8; 64];
                while std::time::Instant::now() < deadline && made < 1_000_000 {
                    let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"x\n")?;
                    let n = s.read(&mut buf)?;
                    anyhow::ensure!(n > 0, "no greeting from {dst}");
                    made += 1;
                }
                Ok(made)
            })?
        }));
    }
    let mut total = 0;
    for t in threads {
        total += t
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    Ok(total)
}

/// One stream from `netns` to `dst` for `secs`: bytes written per second.
#[allow(dead_code)]
pub fn throughput(netns: PathBuf, dst: SocketAddr, secs: u64) -> anyhow::Result<f64> {
    membrane_tests::netns::run_in_netns(netns, move || -> anyhow::Result<f64> {
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let chunk = vec![0x5au8; 256 * 1024];
        let started = Instant::now();
        let deadline = started + Duration::from_secs(secs);
        let mut sent = 0u64;
        // Bounded by time and by count.
        while Instant::now() < deadline && sent < 1 << 40 {
            s.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        Ok(sent as f64 / started.elapsed().as_secs_f64())
    })?
}

/// A sink on `sink` and a greeter on `greeter` in the pod at `path` (plain threads, inside
/// its namespace).
#[allow(dead_code)]
pub fn pod_servers(path: PathBuf, sink: u16, greeter: u16) -> anyhow::Result<()> {
    let (sink, greeter) = membrane_tests::netns::run_in_netns(path, || -> std::io::Result<_> {
        Ok((
            std::net::TcpListener::bind(("0.0.0.0", sink))?,
            std::net::TcpListener::bind(("0.0.0.0", greeter))?,
        ))
    })??;
    std::thread::spawn(move || {
        for mut s in sink.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    std::thread::spawn(move || {
        for mut s in greeter.incoming().flatten() {
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"hello\n");
        }
    });
    Ok(())
}

#[allow(dead_code)]
pub fn tw_reuse(netns: &Path) -> anyhow::Result<()> {
    let name = netns
        .file_name()
        .and_then(|n| n.to_str())
        .context("netns name")?;
    let out = membrane_tests::netns::exec_in(name, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    anyhow::ensure!(
        out.status.success(),
        "sysctl in {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The number in environment variable `name`, or `default` when it is unset.
#[allow(dead_code)]
pub fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}
