//! The guard against header blocks async-nats cannot read, with a real
//! nats-server: a raw publisher writes what a careless or hostile client
//! could, and a client behind the guard reads every message and stays up.

use std::time::Duration;

use anyhow::{anyhow, Result};
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use ud_testkit::NatsServer;

/// Header blocks nats-server passes on as written, and the value of `X`
/// the guarded client reads from each.
const BLOCKS: [(&[u8], &str); 5] = [
    (b"NATS/1.0\r\nX: a\rb\r\n\r\n", "a b"),
    (
        b"NATS/1.0\r\nX: c\nNats-Stream-Source: EDGE_forged\r\n\r\n",
        "c Nats-Stream-Source: EDGE_forged",
    ),
    (b"NATS/1.0\r\nno colon here\r\nX: d\r\n\r\n", "d"),
    (b"NATS/1.0\r\nX: e\xff\r\n\r\n", "e\u{fffd}"),
    (b"NATS/1.0\r\nX: f\r\n\r\n", "f"),
];

/// Publishes each block with a two-byte payload on `subject`, as a raw client.
async fn publish_raw(server: &NatsServer, subject: &str) -> Result<()> {
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await?;
    let mut out = b"CONNECT {\"verbose\":false,\"headers\":true}\r\n".to_vec();
    for (block, _) in BLOCKS {
        out.extend_from_slice(
            format!("HPUB {subject} {} {}\r\n", block.len(), block.len() + 2).as_bytes(),
        );
        out.extend_from_slice(block);
        out.extend_from_slice(b"ok\r\n");
    }
    out.extend_from_slice(b"PING\r\n");
    raw.write_all(&out).await?;
    // The server answers the PING once it has taken every publish.
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("PONG") {
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut raw, &mut buf),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "no PONG; the server said {:?}",
                String::from_utf8_lossy(&seen)
            )
        })??;
        if n == 0 {
            return Err(anyhow!("the server closed the raw connection"));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

async fn guarded(server: &NatsServer) -> Result<async_nats::Client> {
    let local = ud_core::guard::start(&[format!("127.0.0.1:{}", server.port()).parse()?]).await?;
    Ok(async_nats::ConnectOptions::new()
        .ignore_discovered_servers()
        .connect(format!("nats://{}", local[0]))
        .await?)
}

fn x(m: &async_nats::Message) -> Option<String> {
    m.headers
        .as_ref()
        .and_then(|h| h.get("X"))
        .map(|v| v.as_str().to_owned())
}

#[tokio::test]
async fn a_client_behind_the_guard_reads_every_header_block_and_stays_connected() -> Result<()> {
    let server = NatsServer::start().await?;
    let client = guarded(&server).await?;
    let mut sub = client.subscribe("probe.core").await?;
    client.flush().await?;
    // Without the guard the same messages end the client's connection.
    let bare = server.connect().await?;
    let _bare_sub = bare.subscribe("probe.core").await?;
    bare.flush().await?;

    publish_raw(&server, "probe.core").await?;
    for (_, want) in BLOCKS {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .map_err(|_| anyhow!("the guarded client got no message for {want:?}"))?
            .ok_or_else(|| anyhow!("the guarded subscription ended"))?;
        assert_eq!(x(&m).as_deref(), Some(want));
        assert_eq!(&m.payload[..], b"ok");
        // The forged line is part of a value, not a header of its own.
        assert!(m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Stream-Source"))
            .is_none());
    }
    client.flush().await?;
    // The bare client's connection reads the first block before the answer
    // to this flush, and stops there.
    let flushed = tokio::time::timeout(Duration::from_secs(5), bare.flush()).await;
    assert!(
        !matches!(flushed, Ok(Ok(()))),
        "the bare client is still up"
    );
    Ok(())
}

#[tokio::test]
async fn a_stored_message_with_an_unreadable_header_block_is_delivered_and_acknowledged(
) -> Result<()> {
    let server = NatsServer::start().await?;
    let client = guarded(&server).await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: "PROBE".into(),
            subjects: vec!["probe.stored".into()],
            ..Default::default()
        })
        .await?;
    publish_raw(&server, "probe.stored").await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("reader".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    for (_, want) in BLOCKS {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await?
            .ok_or_else(|| anyhow!("the pull ended"))??;
        assert_eq!(x(&m).as_deref(), Some(want));
        m.double_ack().await.map_err(|e| anyhow!("ack: {e}"))?;
    }
    let mut consumer = consumer;
    let info = consumer.info().await?;
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.ack_floor.stream_sequence, BLOCKS.len() as u64);
    Ok(())
}
