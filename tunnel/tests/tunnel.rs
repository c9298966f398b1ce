//! Tunnels over a real nats-server: bytes both ways, half-closes, refusals,
//! a gap, and a node that goes silent.

use std::time::Duration;

use anyhow::{bail, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ud_schemas::{edge, NodeId, TaskId};
use ud_testkit::NatsServer;
use ud_tunnel::frame::{Frame, Kind};
use ud_tunnel::{Endpoint, Open, Resolver, Settings, Target, Tunnels};

/// Dials 127.0.0.1 at the port asked for; port 1 is refused with a reason.
#[derive(Clone)]
struct Local;

impl Resolver for Local {
    async fn connect(&self, open: Open) -> Result<Endpoint, String> {
        match open.target {
            Target::Port(1) => Err("port 1 is not declared".into()),
            Target::Port(p) => {
                let s = TcpStream::connect(("127.0.0.1", p))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Endpoint {
                    io: Box::new(s),
                    controls_in: None,
                    controls_out: None,
                    activity: None,
                })
            }
            Target::Exec { .. } => Err("no exec here".into()),
        }
    }
}

/// A TCP server that echoes every connection until its peer ends it.
async fn echo_server() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(port)
}

fn small() -> Settings {
    Settings {
        window: 64 << 10,
        chunk: 16 << 10,
        ping_every: Duration::from_millis(200),
        dead_after: Duration::from_secs(1),
        open_timeout: Duration::from_secs(3),
    }
}

/// A nats-server, a node serving tunnels on it and an opener.
struct Served {
    nats: NatsServer,
    node: NodeId,
    served: tokio::task::JoinHandle<Result<(), ud_tunnel::TunnelError>>,
    tunnels: Tunnels,
}

impl Served {
    async fn start() -> Result<Self> {
        let nats = NatsServer::start().await?;
        let node = NodeId::new();
        let served = tokio::spawn(ud_tunnel::serve(
            nats.connect().await?,
            node,
            Local,
            small(),
        ));
        let tunnels = Tunnels::with_settings(nats.connect().await?, small());
        Ok(Self {
            nats,
            node,
            served,
            tunnels,
        })
    }
}

#[tokio::test]
async fn bytes_go_both_ways_within_the_window_and_end_cleanly() -> Result<()> {
    let Served {
        nats: _nats,
        node,
        served,
        tunnels,
    } = Served::start().await?;
    let port = echo_server().await?;
    // 5 MiB through a 64 KiB window: credit has to come back many times.
    let data: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 251) as u8).collect();
    let t = open_retrying(&tunnels, node, Target::Port(port)).await?;
    let (mut r, mut w) = tokio::io::split(t.stream);
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            w.write_all(&data).await?;
            w.shutdown().await?;
            anyhow::Ok(())
        })
    };
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    writer.await??;
    assert!(
        back == data,
        "echoed {} of {} bytes, or not the same",
        back.len(),
        data.len()
    );
    assert_eq!(t.ended.await?, Ok(()));
    served.abort();
    Ok(())
}

/// The node's subscription propagates asynchronously: open until it answers.
async fn open_retrying(
    tunnels: &Tunnels,
    node: NodeId,
    target: Target,
) -> Result<ud_tunnel::Tunnel> {
    for _ in 0..50 {
        match tunnels.open(node, TaskId::new(), target.clone()).await {
            Ok(t) => return Ok(t),
            Err(ud_tunnel::TunnelError::NoAnswer(_)) => continue,
            Err(e) => bail!("{e}"),
        }
    }
    bail!("no answer")
}

#[tokio::test]
async fn a_refusal_says_why_and_a_closed_port_too() -> Result<()> {
    let Served {
        nats: _nats,
        node,
        served,
        tunnels,
    } = Served::start().await?;
    // Wait for the node's side to listen.
    let port = echo_server().await?;
    drop(open_retrying(&tunnels, node, Target::Port(port)).await?);
    match tunnels.open(node, TaskId::new(), Target::Port(1)).await {
        Err(ud_tunnel::TunnelError::Refused(r)) => assert!(r.contains("not declared"), "{r}"),
        other => bail!("port 1: {:?}", other.map(|_| ())),
    }
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    match tunnels
        .open(node, TaskId::new(), Target::Port(closed))
        .await
    {
        Err(ud_tunnel::TunnelError::Refused(r)) => assert!(r.contains("refused"), "{r}"),
        other => bail!("a closed port: {:?}", other.map(|_| ())),
    }
    // Nobody serves this node: no answer, within the bound.
    let t0 = std::time::Instant::now();
    match tunnels
        .open(NodeId::new(), TaskId::new(), Target::Port(port))
        .await
    {
        Err(ud_tunnel::TunnelError::NoAnswer(_)) => {}
        other => bail!("an absent node: {:?}", other.map(|_| ())),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    served.abort();
    Ok(())
}

#[tokio::test]
async fn a_gap_in_the_frames_ends_the_connection_on_both_sides() -> Result<()> {
    let Served {
        nats,
        node,
        served,
        tunnels,
    } = Served::start().await?;
    let port = echo_server().await?;
    let t = open_retrying(&tunnels, node, Target::Port(port)).await?;
    // Someone on the link injects a frame numbered out of turn into the
    // connection's subject towards the opener.
    let raw = nats.connect().await?;
    let mut watch = raw
        .subscribe(format!("{}.*", edge::tunnel_to(&node)))
        .await?;
    let (_r, mut w) = tokio::io::split(t.stream);
    w.write_all(b"x").await?;
    let seen = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut watch))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no frame seen"))?;
    let conn = seen
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    raw.publish(
        format!("{}.{conn}", edge::tunnel_from(&node)),
        Frame::encode(Kind::Data, 1_000, b"forged"),
    )
    .await?;
    raw.flush().await?;
    let ended = tokio::time::timeout(Duration::from_secs(5), t.ended).await??;
    match ended {
        Err(r) => assert!(r.contains("frames were lost"), "{r}"),
        Ok(()) => bail!("a gap went unnoticed"),
    }
    served.abort();
    Ok(())
}

#[tokio::test]
async fn a_cut_link_ends_the_connection_within_the_bound() -> Result<()> {
    let nats = NatsServer::start().await?;
    let relay = ud_testkit::Relay::start(nats.port()).await?;
    let node = NodeId::new();
    let node_client = async_nats::connect(format!("nats://127.0.0.1:{}", relay.port())).await?;
    let served = tokio::spawn(ud_tunnel::serve(node_client, node, Local, small()));
    let tunnels = Tunnels::with_settings(nats.connect().await?, small());
    let port = echo_server().await?;
    let t = open_retrying(&tunnels, node, Target::Port(port)).await?;
    // The node's link is cut: nothing says so, its frames just stop.
    relay.cut();
    let t0 = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), t.ended).await??;
    assert!(
        matches!(&ended, Err(r) if r.contains("nothing heard")),
        "{ended:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    served.abort();
    Ok(())
}
