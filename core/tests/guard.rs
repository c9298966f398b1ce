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

/// Publishes each of [`BLOCKS`] with a two-byte payload on `subject`, as a raw client.
async fn publish_raw(server: &NatsServer, subject: &str) -> Result<()> {
    let blocks: Vec<&[u8]> = BLOCKS.iter().map(|(b, _)| *b).collect();
    publish_blocks(server, subject, &blocks).await
}

async fn publish_blocks(server: &NatsServer, subject: &str, blocks: &[&[u8]]) -> Result<()> {
    let mut ops = Vec::new();
    for block in blocks {
        ops.extend_from_slice(
            format!("HPUB {subject} {} {}\r\n", block.len(), block.len() + 2).as_bytes(),
        );
        ops.extend_from_slice(block);
        ops.extend_from_slice(b"ok\r\n");
    }
    send_raw(server, &ops).await
}

/// Sends protocol operations as a raw client, and waits until the server has taken them.
async fn send_raw(server: &NatsServer, ops: &[u8]) -> Result<()> {
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", server.port())).await?;
    let mut out = b"CONNECT {\"verbose\":false,\"headers\":true}\r\n".to_vec();
    out.extend_from_slice(ops);
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
    let local = ud_core::guard::start(&[("127.0.0.1".to_owned(), server.port())]).await?;
    Ok(async_nats::ConnectOptions::new()
        .ignore_discovered_servers()
        .connect(format!("nats://{}", local[0]))
        .await?)
}

/// Returns once the server has `sub`'s interest: `client` publishes on
/// `subject` and waits to see it (async-nats's flush does not ask the server).
async fn synced(
    client: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    subject: &str,
) -> Result<()> {
    client.publish(subject.to_owned(), "sync".into()).await?;
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .map_err(|_| anyhow!("{subject}: the subscription saw nothing"))?
        .ok_or_else(|| anyhow!("{subject}: the subscription ended"))?;
    assert_eq!(&m.payload[..], b"sync");
    Ok(())
}

/// A durable pull consumer on `stream` with explicit acks, and its messages.
async fn reader(
    stream: &stream::Stream,
) -> Result<(consumer::PullConsumer, consumer::pull::Stream)> {
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("reader".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let messages = consumer.messages().await?;
    Ok((consumer, messages))
}

async fn next(messages: &mut consumer::pull::Stream) -> Result<jetstream::Message> {
    let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .map_err(|_| anyhow!("no message in 5 s"))?
        .ok_or_else(|| anyhow!("the pull ended"))?;
    m.map_err(|e| anyhow!("pull: {e}"))
}

/// A guarded client subscribed to `filter`, once the server has the
/// interest (seen through a marker on `marker`).
async fn guarded_subscription(
    server: &NatsServer,
    filter: &str,
    marker: &str,
) -> Result<(async_nats::Client, async_nats::Subscriber)> {
    let client = guarded(server).await?;
    let mut sub = client.subscribe(filter.to_owned()).await?;
    synced(&client, &mut sub, marker).await?;
    Ok((client, sub))
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
    let (client, mut sub) = guarded_subscription(&server, "probe.core", "probe.core").await?;
    // Without the guard the same messages end the client's connection.
    let bare = server.connect().await?;
    let mut bare_sub = bare.subscribe("probe.core").await?;
    synced(&bare, &mut bare_sub, "probe.core").await?;
    // The guarded client sees the bare one's marker too.
    let marker = tokio::time::timeout(Duration::from_secs(5), sub.next()).await?;
    assert_eq!(marker.map(|m| m.payload), Some("sync".into()));

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
    // The bare client (async-nats 0.52) drops its connection at the first
    // block it cannot read and loses what was on the way, or reads a
    // forged `Nats-Stream-Source`: either way it does not read every block
    // as it was meant.
    let mut intact = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), bare_sub.next()).await {
        let forged = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Stream-Source"))
            .is_some();
        if !forged && &m.payload[..] == b"ok" {
            intact += 1;
        }
    }
    assert!(
        intact < BLOCKS.len(),
        "the bare client read all {intact} blocks: the guard would not be needed"
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
    let (consumer, mut messages) = reader(&stream).await?;
    for (_, want) in BLOCKS {
        let m = next(&mut messages).await?;
        assert_eq!(x(&m).as_deref(), Some(want));
        m.double_ack().await.map_err(|e| anyhow!("ack: {e}"))?;
    }
    let mut consumer = consumer;
    let info = consumer.info().await?;
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.ack_floor.stream_sequence, BLOCKS.len() as u64);
    Ok(())
}

#[tokio::test]
async fn a_sourced_message_names_the_stream_it_came_from_whatever_its_headers_say() -> Result<()> {
    let server = NatsServer::start().await?;
    let client = guarded(&server).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "EDGE_mine".into(),
        subjects: vec!["mine.>".into()],
        ..Default::default()
    })
    .await?;
    let inbox = js
        .create_stream(stream::Config {
            name: "IN".into(),
            sources: Some(vec![stream::Source {
                name: "EDGE_mine".into(),
                ..Default::default()
            }]),
            ..Default::default()
        })
        .await?;
    // Ways a node could try to name another node's stream. nats-server
    // refuses to store the first and the last (it sees the header); the
    // two with a lone LF or CR it stores, as it does not see one there.
    let forged: [&[u8]; 5] = [
        b"NATS/1.0\r\nNats-Stream-Source: EDGE_victim 1\r\n\r\n",
        b"NATS/1.0\r\nX: lf\nNats-Stream-Source: EDGE_victim 1\r\n\r\n",
        b"NATS/1.0\r\nX: cr\rNats-Stream-Source: EDGE_victim 1\r\n\r\n",
        b"NATS/1.0\r\nNats-Stream-Source: EDGE_victim zz",
        b"NATS/1.0\r\nX: end\r\n\r\n",
    ];
    publish_blocks(&server, "mine.x", &forged).await?;
    let (_consumer, mut messages) = reader(&inbox).await?;
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("end") {
        let m = next(&mut messages)
            .await
            .map_err(|e| anyhow!("{e} after {seen:?}"))?;
        assert_eq!(
            ud_core::edge::ingest::origin(m.headers.as_ref()).as_deref(),
            Some("mine"),
            "read as {:?}",
            m.headers
        );
        let x = x(&m).unwrap_or_default();
        seen.push(x.split_whitespace().next().unwrap_or_default().to_owned());
        m.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
    }
    assert_eq!(seen, ["lf", "cr", "end"]);
    Ok(())
}

#[tokio::test]
async fn subjects_and_replies_the_client_cannot_read_are_mended() -> Result<()> {
    let server = NatsServer::start().await?;
    let (client, mut sub) = guarded_subscription(&server, "probe.>", "probe.sync").await?;
    // A reply subject that is not UTF-8, and a subject with a no-break space
    // (nats-server splits only at spaces and tabs; the client at any white space).
    let mut ops = b"PUB probe.a _INBOX.x\xff 2\r\nok\r\n".to_vec();
    ops.extend_from_slice(b"HPUB probe.b\xc2\xa0c 12 14\r\nNATS/1.0\r\n\r\nok\r\n");
    ops.extend_from_slice(b"PUB probe.d 2\r\nok\r\n");
    send_raw(&server, &ops).await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .map_err(|_| anyhow!("only {got:?}"))?
            .ok_or_else(|| anyhow!("the guarded subscription ended"))?;
        got.push((m.subject.to_string(), m.reply.map(|r| r.to_string())));
    }
    assert_eq!(
        got,
        [
            ("probe.a".to_owned(), Some("_INBOX.x\u{fffd}".to_owned())),
            ("probe.b_c".to_owned(), None),
            ("probe.d".to_owned(), None),
        ]
    );
    client.flush().await?;
    Ok(())
}
