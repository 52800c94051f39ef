//! The benchmark's workloads: iperf3 runs, the request/response loop and the connection-rate
//! clients and server, each inside the pods' network namespaces.

use super::*;

impl Bench<'_> {
    /// One iperf3 run with `streams` parallel streams; the server serves one test (`-1`).
    pub(super) fn iperf(&self, streams: u32) -> anyhow::Result<Iperf> {
        let port = IPERF_PORT.to_string();
        let server = command_in(&self.server_ns, "iperf3")
            .args(["-s", "-1", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (is iperf3 installed?)")?;
        let result = wait_listening(&self.server_ns, IPERF_PORT).and_then(|()| {
            // `timeout` bounds a client that would hang (a stalled control connection).
            let bound = (self.cfg.bulk.as_secs() + 30).to_string();
            let out = command_in(&self.client_ns, "timeout")
                .args(["--kill-after=5", &bound, "iperf3"])
                .args(["-c", &self.server_ip.to_string(), "-p", &port, "--json"])
                .args(["-t", &self.cfg.bulk.as_secs().to_string()])
                .args(["-P", &streams.to_string(), "--connect-timeout", "5000"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .context("running iperf3 -c")?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("iperf3 -c printed no JSON ({})", out.status))?;
            if let Some(e) = v.get("error") {
                bail!("iperf3: {e}");
            }
            let sum = &v["end"]["sum_received"];
            Ok(Iperf {
                bits_per_second: sum["bits_per_second"].as_f64().context("no bits/s")?,
                bytes: sum["bytes"].as_f64().context("no bytes")?,
            })
        });
        reap(server, Duration::from_secs(3));
        result
    }

    /// Four-stream iperf3 while a thread samples both ztunnels' RSS every 100 ms; returns the
    /// run and the peak of the larger ztunnel, in MiB.
    pub(super) fn iperf_sampling_rss(&self, streams: u32) -> (anyhow::Result<Iperf>, f64) {
        let stop = AtomicBool::new(false);
        let pids = self.pids.as_slice();
        std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut peak = 0.0f64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(rss) = largest_rss_mib(pids) {
                        peak = peak.max(rss);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                peak
            });
            let run = self.iperf(streams);
            stop.store(true, Ordering::Relaxed);
            (run, sampler.join().unwrap_or(f64::NAN))
        })
    }

    /// 1-byte ping-pong over one connection for the configured time: (transactions/s, sorted
    /// latencies in ns). Blocking sockets on both ends, `TCP_NODELAY`.
    pub(super) fn request_response(&self) -> anyhow::Result<(f64, Vec<u32>)> {
        let listener = run_in_netns(self.path(self.server), || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, RR_PORT))
        })??;
        let server = std::thread::spawn(move || -> io::Result<()> {
            let (mut s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut b = [0u8; 1];
            while s.read(&mut b)? == 1 {
                s.write_all(&b)?;
            }
            Ok(())
        });
        let dst = SocketAddr::from((self.server_ip, RR_PORT));
        let duration = self.cfg.rr;
        let client = run_in_netns(self.path(self.client), move || -> io::Result<_> {
            let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut b = [1u8; 1];
            for _ in 0..100 {
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
            }
            let mut lat = Vec::with_capacity(1 << 20);
            let start = Instant::now();
            let deadline = start + duration;
            while lat.len() < MAX_RR_SAMPLES {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
                lat.push(nanos(t0.elapsed()));
            }
            Ok((lat, start.elapsed()))
        })?;
        let served = server.join();
        let (mut lat, elapsed) = client?;
        match served {
            Ok(r) => r.context("request/response server")?,
            Err(_) => bail!("request/response server panicked"),
        }
        lat.sort_unstable();
        Ok((lat.len() as f64 / elapsed.as_secs_f64(), lat))
    }

    /// Connect + 1-byte request/response + close, `inflight` blocking clients in the client
    /// pod against a tokio server: (successes/s, sorted latencies in ns, errors).
    pub(super) fn connection_rate(&self) -> anyhow::Result<(f64, Vec<u32>, usize)> {
        let listener = run_in_netns(self.path(self.server), || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, CONN_PORT))
        })??;
        listener.set_nonblocking(true)?;
        let server = self.rt.spawn(conn_server(listener));
        let dst = SocketAddr::from((self.server_ip, CONN_PORT));
        let client_path = self.path(self.client);
        let start = Instant::now();
        let deadline = start + self.cfg.conn;
        let outcomes: Vec<_> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..self.cfg.inflight)
                .map(|_| s.spawn(|| run_in_netns(&client_path, || connect_loop(dst, deadline))))
                .collect();
            workers.into_iter().map(|w| w.join()).collect()
        });
        let elapsed = start.elapsed();
        server.abort();
        let (mut lat, mut errors) = (Vec::new(), 0);
        for outcome in outcomes {
            match outcome {
                Ok(Ok(Ok((l, e)))) => {
                    lat.extend(l);
                    errors += e;
                }
                Ok(Ok(Err(e))) => bail!("client thread: {e}"),
                Ok(Err(e)) => bail!("client thread: {e}"),
                Err(_) => bail!("client thread panicked"),
            }
        }
        lat.sort_unstable();
        Ok((lat.len() as f64 / elapsed.as_secs_f64(), lat, errors))
    }
}

/// One client of the connection-rate test, inside the client pod's namespace.
fn connect_loop(dst: SocketAddr, deadline: Instant) -> io::Result<(Vec<u32>, usize)> {
    let mut lat = Vec::with_capacity(64 * 1024);
    let mut errors = 0;
    while Instant::now() < deadline && lat.len() < MAX_CONNS_PER_WORKER {
        let t0 = Instant::now();
        let attempt = (|| -> io::Result<()> {
            let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut b = [1u8; 1];
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
            Ok(())
        })();
        match attempt {
            Ok(()) => lat.push(nanos(t0.elapsed())),
            Err(_) if errors < MAX_CONN_ERRORS => errors += 1,
            Err(e) => return Err(e),
        }
    }
    Ok((lat, errors))
}

/// The connection-rate server: one task per accepted connection, until aborted.
async fn conn_server(listener: TcpListener) -> io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (s, _) = listener.accept().await?;
        tokio::spawn(serve_one(s));
    }
}

/// The connection-rate server's side of one connection: answer one byte, wait for the close.
async fn serve_one(mut s: tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        let mut b = [0u8; 64];
        if s.read(&mut b).await? == 0 {
            return Ok(());
        }
        s.write_all(&b[..1]).await?;
        while s.read(&mut b).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}
