//! Tunnels: the bytes of one TCP connection (or of one process started in a
//! task's container) carried over core NATS through a node's leaf link,
//! never JetStream.
//!
//! The main server opens a connection with an `OPEN` frame on
//! `ud.tunnel.<node>.to.<connection>`; the node's agent dials what the task
//! declared and answers `OPENED` (or `RESET` with the reason) on
//! `ud.tunnel.<node>.from.<connection>`. Then both sides send numbered
//! frames: data within the credit the other side gave, credit back as they
//! write, an empty data frame for the end of their direction, a ping every
//! few seconds. A gap in the numbers, or silence past a bound, ends the
//! connection on both sides with the reason. Connection ids are 128 random
//! bits; each node may use only its own tunnel subjects (the hub's
//! permissions).
//!
//! * [`frame`]: the frames (pure);
//! * [`Tunnels::open`]: the opening side;
//! * [`serve`]: the node's side, with a [`Resolver`] saying what a
//!   connection reaches.

pub mod frame;
mod pump;

use std::collections::HashMap;
use std::future::Future;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info_span, Instrument};
use ud_schemas::{edge, NodeId, TaskId};

pub use frame::{Control, Open, Target};
use frame::{Frame, Kind};
pub use pump::{Activity, Settings};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("nats: {0}")]
    Nats(#[source] async_nats::Error),
    /// The node answered, but would not (or could not) connect.
    #[error("{0}")]
    Refused(String),
    #[error("the node did not answer within {0} s: is it online?")]
    NoAnswer(u64),
}

fn nats(e: impl Into<async_nats::Error>) -> TunnelError {
    TunnelError::Nats(e.into())
}

/// The local end's bytes.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// An open connection, as its opener sees it.
pub struct Tunnel {
    /// Read and write the remote end's bytes here; shutting down the write
    /// half ends this direction.
    pub stream: tokio::io::DuplexStream,
    /// Controls to send (a terminal's size).
    pub controls: mpsc::Sender<Control>,
    /// Controls the node sent (a process's exit), before the stream's end.
    pub events: mpsc::Receiver<Control>,
    /// How the connection ended: `Ok` when both directions ended, or the reason.
    pub ended: oneshot::Receiver<Result<(), String>>,
}

/// The opening side (the main server).
#[derive(Clone)]
pub struct Tunnels {
    client: async_nats::Client,
    settings: Settings,
}

impl Tunnels {
    pub fn new(client: async_nats::Client) -> Self {
        Self::with_settings(client, Settings::default())
    }

    pub fn with_settings(client: async_nats::Client, settings: Settings) -> Self {
        Self { client, settings }
    }

    /// Opens a connection to `target` of `task` on `node`.
    pub async fn open(
        &self,
        node: NodeId,
        task: TaskId,
        target: Target,
    ) -> Result<Tunnel, TunnelError> {
        let conn = frame::connection_id();
        let to = format!("{}.{conn}", edge::tunnel_to(&node));
        let from = format!("{}.{conn}", edge::tunnel_from(&node));
        let mut sub = self.client.subscribe(from).await.map_err(nats)?;
        let open = Open {
            task,
            target,
            window: self.settings.window,
        };
        let body = serde_json::to_vec(&open).map_err(|e| TunnelError::Refused(e.to_string()))?;
        self.client
            .publish(to.clone(), Frame::encode(Kind::Open, 0, &body))
            .await
            .map_err(nats)?;
        let wait = self.settings.open_timeout;
        let first = match tokio::time::timeout(wait, sub.next()).await {
            Ok(Some(m)) => Frame::decode(m.payload)
                .map_err(|e| TunnelError::Refused(format!("a bad answer: {e}")))?,
            Ok(None) => return Err(TunnelError::Refused("the subscription ended".into())),
            Err(_) => return Err(TunnelError::NoAnswer(wait.as_secs())),
        };
        let peer_window = match first.kind {
            Kind::Opened if first.seq == 0 && first.payload.len() == 4 => {
                let mut w = [0u8; 4];
                w.copy_from_slice(&first.payload);
                u32::from_be_bytes(w).clamp(MIN_WINDOW, MAX_WINDOW)
            }
            Kind::Reset => {
                return Err(TunnelError::Refused(
                    String::from_utf8_lossy(&first.payload).into_owned(),
                ))
            }
            k => return Err(TunnelError::Refused(format!("an unexpected {k:?} answer"))),
        };
        let (ours, theirs) = tokio::io::duplex(self.settings.window as usize);
        let (controls, controls_rx) = mpsc::channel(16);
        let (events_tx, events) = mpsc::channel(16);
        let (ended_tx, ended) = oneshot::channel();
        let pump = pump::Pump {
            client: self.client.clone(),
            out_subject: to,
            sent: 1,
            received: 1,
            peer_window,
            settings: self.settings,
            controls_out: Some(controls_rx),
            controls_in: Some(events_tx),
            activity: None,
        };
        let inbound = sub.map(|m| m.payload).boxed();
        tokio::spawn(
            async move {
                let outcome = pump.run(inbound, theirs).await;
                if let Err(reason) = &outcome {
                    debug!(reason = %reason, "tunnel ended");
                }
                let _ = ended_tx.send(outcome);
            }
            .instrument(info_span!("tunnel", node_id = %node, task_id = %task, connection = %conn)),
        );
        Ok(Tunnel {
            stream: ours,
            controls,
            events,
            ended,
        })
    }
}

/// What a connection reaches on the node.
pub struct Endpoint {
    pub io: Box<dyn Io>,
    /// Where the opener's controls go (a terminal's size).
    pub controls_in: Option<mpsc::Sender<Control>>,
    /// Controls for the opener (a process's exit), sent before the end of
    /// the stream.
    pub controls_out: Option<mpsc::Receiver<Control>>,
    /// Marked with the time of every byte either way (idle sessions end).
    pub activity: Option<Activity>,
}

/// The node's answer to an `OPEN`: the endpoint, or why not.
pub trait Resolver: Clone + Send + Sync + 'static {
    fn connect(&self, open: Open) -> impl Future<Output = Result<Endpoint, String>> + Send;
}

/// The window a side may give, whatever it asks: the data a peer may have
/// in flight stays bounded.
pub const MIN_WINDOW: u32 = 1024;
pub const MAX_WINDOW: u32 = 16 << 20;

/// Most connections one node serves at once.
pub const MAX_CONNECTIONS: usize = 512;

/// The node's side: answers every `OPEN` sent to `node` until the
/// subscription ends (the process stops).
pub async fn serve<R: Resolver>(
    client: async_nats::Client,
    node: NodeId,
    resolver: R,
    settings: Settings,
) -> Result<(), TunnelError> {
    let prefix = edge::tunnel_to(&node);
    let from = edge::tunnel_from(&node);
    let mut sub = client
        .subscribe(format!("{prefix}.*"))
        .await
        .map_err(nats)?;
    let mut conns: HashMap<String, mpsc::UnboundedSender<Bytes>> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m {
                Some(m) => m,
                None => return Ok(()),
            },
            Some(conn) = done_rx.recv() => {
                conns.remove(&conn);
                continue;
            }
        };
        let Some(conn) = msg.subject.as_str().rsplit('.').next().map(str::to_owned) else {
            continue;
        };
        if let Some(tx) = conns.get(&conn) {
            if tx.send(msg.payload).is_err() {
                conns.remove(&conn);
            }
            continue;
        }
        let reply = format!("{from}.{conn}");
        let frame = match Frame::decode(msg.payload) {
            Ok(f) => f,
            Err(_) => continue,
        };
        match frame.kind {
            Kind::Open => {}
            // Leftovers of a connection that ended: nothing to answer.
            Kind::Reset | Kind::Credit | Kind::Ping => continue,
            _ => {
                let _ = client
                    .publish(reply, Frame::encode(Kind::Reset, 0, b"no such connection"))
                    .await;
                continue;
            }
        }
        if conns.len() >= MAX_CONNECTIONS {
            let why = format!("the node has {MAX_CONNECTIONS} tunnel connections open already");
            let _ = client
                .publish(reply, Frame::encode(Kind::Reset, 0, why.as_bytes()))
                .await;
            continue;
        }
        let open = match serde_json::from_slice::<Open>(&frame.payload) {
            Ok(o) if frame.seq == 0 && o.window >= MIN_WINDOW => o,
            _ => {
                let _ = client
                    .publish(reply, Frame::encode(Kind::Reset, 0, b"a bad open frame"))
                    .await;
                continue;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        conns.insert(conn.clone(), tx);
        let span = info_span!("tunnel", node_id = %node, task_id = %open.task, connection = %conn);
        tokio::spawn(
            answer(
                client.clone(),
                reply,
                open,
                resolver.clone(),
                settings,
                rx,
                done_tx.clone(),
                conn,
            )
            .instrument(span),
        );
    }
}

#[allow(clippy::too_many_arguments)]
async fn answer<R: Resolver>(
    client: async_nats::Client,
    reply: String,
    open: Open,
    resolver: R,
    settings: Settings,
    inbound: mpsc::UnboundedReceiver<Bytes>,
    done: mpsc::UnboundedSender<String>,
    conn: String,
) {
    let peer_window = open.window.min(MAX_WINDOW);
    match resolver.connect(open).await {
        Err(reason) => {
            debug!(reason = %reason, "tunnel refused");
            let _ = client
                .publish(reply, Frame::encode(Kind::Reset, 0, reason.as_bytes()))
                .await;
        }
        Ok(end) => {
            let opened = Frame::encode(Kind::Opened, 0, &settings.window.to_be_bytes());
            if client.publish(reply.clone(), opened).await.is_ok() {
                pump::touch(end.activity.as_ref());
                let pump = pump::Pump {
                    client,
                    out_subject: reply,
                    sent: 1,
                    received: 1,
                    peer_window,
                    settings,
                    controls_out: end.controls_out,
                    controls_in: end.controls_in,
                    activity: end.activity,
                };
                let inbound = tokio_stream(inbound);
                if let Err(reason) = pump.run(inbound, end.io).await {
                    debug!(reason = %reason, "tunnel connection ended");
                }
            }
        }
    }
    let _ = done.send(conn);
}

fn tokio_stream(
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) -> futures::stream::BoxStream<'static, Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
