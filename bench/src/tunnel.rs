//! `ud-bench tunnel`: a session through the node's link, on the real
//! platform (hub, leaf over a TLS-less loopback link, agent, Docker), against
//! the same container reached directly from this machine: time to reach a
//! session once its container is up, round trips added, one stream's
//! throughput, 100 connections at once, and the node's heartbeats during a
//! bulk download.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use ud_schemas::TaskId;
use ud_tunnel::Target;

use crate::edge::{admin_token, enroll, join, start_platform};
use crate::stats::{line, ms, percentile};

#[derive(clap::Args)]
pub struct Args {
    /// Round trips measured each way.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// MiB downloaded through one stream.
    #[arg(long, default_value_t = 512)]
    mib: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 100)]
    connections: usize,
}

/// A WebSocket client handshake to `ud-sessiond`'s echo.
async fn ws_open<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<()> {
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("no upgrade: {}", String::from_utf8_lossy(&head));
    }
    Ok(())
}

/// One 32-byte masked frame out and its echo back.
async fn ws_round_trip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<()> {
    let mut f = vec![0x82u8, 0x80 | 32, 0, 0, 0, 0];
    f.extend_from_slice(&[7u8; 32]);
    s.write_all(&f).await?;
    let mut back = [0u8; 34];
    s.read_exact(&mut back).await?;
    Ok(())
}

async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    n: usize,
) -> Result<Vec<Duration>> {
    ws_open(s).await?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        ws_round_trip(s).await?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

/// Downloads `bytes` from `ud-sessiond`; seconds taken.
async fn download<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, bytes: usize) -> Result<f64> {
    let t = Instant::now();
    s.write_all(format!("GET /bytes/{bytes} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0usize;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < bytes {
        bail!("{got} of {bytes} bytes");
    }
    Ok(t.elapsed().as_secs_f64())
}

pub async fn run(a: Args) -> Result<()> {
    println!("UniDesk tunnel benchmark: a session through the node's link vs the container reached directly");
    let image =
        tokio::task::spawn_blocking(|| ud_testkit::session_image("unidesk/busybox:base")).await??;
    let (hub, _pg, running) = start_platform(Duration::from_secs(30)).await?;
    let store = running.state.commands.store().clone();
    let admin = admin_token(&running).await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", running.addr);
    let token = enroll(&http, &base, &admin.secret, "tunnel").await?;
    let node = token.node_id;
    let (_leaf, agent) = join(&store, hub.leaf_port(), &token, "tunnel", |cfg| {
        cfg.image = Some(image);
    })
    .await?;

    // Reachable: from the task's start event to the first page through the tunnel.
    let mut started = store.client().subscribe("ud.task.*.started").await?;
    let v: serde_json::Value = http
        .post(format!("{base}/api/v1/tasks"))
        .bearer_auth(&admin.secret)
        .json(&json!({
            "project": "bench", "code_repo_url": "https://git.example.org/c.git",
            "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
            "env_repo_url": "https://git.example.org/e.git", "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
            "dockerfile_path": "Dockerfile", "command": ["ud-sessiond", "8888"],
            "resources": {"cpus": 1, "memory_mb": 256}, "session": {"port": 8888, "idle_timeout_minutes": 0}
        }))
        .send()
        .await?
        .json()
        .await?;
    let task: TaskId = v["task_id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|_| anyhow!("no task id: {v}"))?;
    tokio::time::timeout(Duration::from_secs(120), started.next())
        .await?
        .ok_or_else(|| anyhow!("no start"))?;
    let up = Instant::now();
    let tunnels = running.state.tunnels.clone();
    loop {
        if let Ok(t) = tunnels.open(node, task, Target::Port(8888)).await {
            let mut s = t.stream;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            let mut page = Vec::new();
            s.read_to_end(&mut page).await?;
            if page.starts_with(b"HTTP/1.1 200") {
                break;
            }
        }
        if up.elapsed() > Duration::from_secs(30) {
            bail!("the session never answered");
        }
    }
    line(
        "session reachable after its container started",
        ms(up.elapsed()),
        "ms",
        None,
    );

    // Round trips on one open connection: through the tunnel, and directly.
    // The container's address, as the agent dials it.
    let docker = ud_edge_agent::docker::Executor::connect(
        std::env::var("DOCKER_HOST").ok().as_deref(),
        node,
    )
    .await?;
    use ud_edge_agent::runtime::Runtime;
    let ip = docker
        .address(&format!("ud-{task}-1"))
        .await
        .ok_or_else(|| anyhow!("no address for the container of {task}"))?
        .to_string();
    let mut direct = tokio::net::TcpStream::connect((ip.as_str(), 8888)).await?;
    direct.set_nodelay(true)?;
    let base_rt = round_trips(&mut direct, a.round_trips).await?;
    let mut through = tunnels.open(node, task, Target::Port(8888)).await?.stream;
    let rt = round_trips(&mut through, a.round_trips).await?;
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        let (t, d) = (percentile(&rt, q), percentile(&base_rt, q));
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        line(&format!("round trip {name}, direct"), us(d), "µs", None);
        line(
            &format!("round trip {name}, through the tunnel"),
            us(t),
            "µs",
            None,
        );
        line(
            &format!("round trip {name}, added by the tunnel"),
            us(t.saturating_sub(d)),
            "µs",
            None,
        );
    }

    // One stream's throughput.
    let bytes = a.mib << 20;
    let mut direct = tokio::net::TcpStream::connect((ip.as_str(), 8888)).await?;
    let d = download(&mut direct, bytes).await?;
    let mut s = tunnels.open(node, task, Target::Port(8888)).await?.stream;
    let t = download(&mut s, bytes).await?;
    let mb = |secs: f64| bytes as f64 / secs / 1e6;
    line("one stream, direct", mb(d), "MB/s", None);
    line(
        "one stream, through the tunnel",
        mb(t),
        "MB/s",
        Some((mb(d), "direct")),
    );
    // The node's heartbeats (every 1 s) during another download.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut beats = store
        .client()
        .subscribe(format!("ud.node.{node}.heartbeat"))
        .await?;
    let watcher = tokio::spawn(async move {
        let mut last: Option<Instant> = None;
        let mut gaps = Vec::new();
        let mut rx = rx;
        loop {
            tokio::select! {
                m = beats.next() => {
                    if m.is_none() { break; }
                    let now = Instant::now();
                    if let Some(l) = last { gaps.push(now - l); }
                    last = Some(now);
                }
                _ = &mut rx => break,
            }
        }
        gaps
    });
    // Long enough for several beats.
    let mut s = tunnels.open(node, task, Target::Port(8888)).await?.stream;
    let secs = download(&mut s, bytes * 8).await?;
    let mut after = store
        .client()
        .subscribe(format!("ud.node.{node}.heartbeat"))
        .await?;
    tokio::time::timeout(Duration::from_secs(10), after.next()).await?;
    let _ = tx.send(());
    let mut gaps = watcher.await?;
    gaps.sort();
    println!(
        "heartbeat gaps (every 1 s) during a {:.1} s download through the tunnel: {}",
        secs,
        gaps.iter()
            .map(|g| format!("{:.2}", g.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    line(
        "largest heartbeat gap during the download",
        ms(gaps.last().copied().unwrap_or_default()),
        "ms",
        None,
    );

    // Many connections at once, each a WebSocket echoing 20 messages.
    let t0 = Instant::now();
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..a.connections {
        let tunnels = tunnels.clone();
        all.spawn(async move {
            let mut s = tunnels.open(node, task, Target::Port(8888)).await?.stream;
            round_trips(&mut s, 20).await.map(|_| ())
        });
    }
    let mut ok = 0;
    let mut failed = Vec::new();
    while let Some(r) = all.join_next().await {
        match r? {
            Ok(()) => ok += 1,
            Err(e) => failed.push(e.to_string()),
        }
    }
    line(
        &format!(
            "{} connections at once, 20 round trips each: connected and echoed",
            a.connections
        ),
        f64::from(ok),
        "",
        None,
    );
    line("  their total time", ms(t0.elapsed()), "ms", None);
    if let Some(e) = failed.first() {
        println!("  first failure: {e}");
    }
    agent.abort();
    Ok(())
}
