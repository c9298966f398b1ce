//! One open connection, the same on both sides: bytes read from the local
//! end go out as `DATA` frames while the peer has given credit; frames from
//! the peer are checked for gaps, their bytes written to the local end and
//! credited back once written. A gap, a `RESET`, or nothing heard for a
//! while ends the connection with a reason.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tracing::debug;

use crate::frame::{Control, Frame, Kind};

/// How connections behave; the defaults suit links across the internet.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Bytes a side may send before the other credits them back.
    pub window: u32,
    /// Largest `DATA` payload.
    pub chunk: usize,
    /// A `PING` goes out this often, whatever else flows.
    pub ping_every: Duration,
    /// Nothing heard from the peer for this long ends the connection.
    pub dead_after: Duration,
    /// How long an opener waits for the node to answer.
    pub open_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            window: 2 << 20,
            chunk: 64 << 10,
            ping_every: Duration::from_secs(3),
            dead_after: Duration::from_secs(12),
            open_timeout: Duration::from_secs(15),
        }
    }
}

/// Milliseconds since the epoch of the last byte either way.
pub type Activity = Arc<AtomicI64>;

pub(crate) fn touch(a: Option<&Activity>) {
    if let Some(a) = a {
        a.store(ud_schemas::now_millis(), Ordering::Relaxed);
    }
}

/// One connection's wiring.
pub(crate) struct Pump {
    pub client: async_nats::Client,
    pub out_subject: String,
    /// Sequence numbers already used by the open exchange.
    pub sent: u64,
    pub received: u64,
    pub peer_window: u32,
    pub settings: Settings,
    /// Controls to send to the peer, and where the peer's go.
    pub controls_out: Option<mpsc::Receiver<Control>>,
    pub controls_in: Option<mpsc::Sender<Control>>,
    pub activity: Option<Activity>,
}

enum Event {
    /// One direction ended cleanly.
    Half,
    Failed(String),
}

impl Pump {
    /// Runs until both directions ended (`Ok`) or the connection failed.
    pub(crate) async fn run<L>(
        self,
        inbound: BoxStream<'static, Bytes>,
        local: L,
    ) -> Result<(), String>
    where
        L: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Pump {
            client,
            out_subject,
            sent,
            received,
            peer_window,
            settings,
            controls_out,
            controls_in,
            activity,
        } = self;
        let (local_r, local_w) = tokio::io::split(local);
        let (out_tx, out_rx) = mpsc::channel::<(Kind, Bytes)>(256);
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
        let credit = Arc::new(Semaphore::new(peer_window as usize));
        let chunk = settings.chunk.clamp(1, (peer_window as usize).max(1));
        let (write_tx, write_rx) = mpsc::unbounded_channel::<Option<Bytes>>();

        let sender = tokio::spawn(send_frames(
            client,
            out_subject,
            sent,
            out_rx,
            ev_tx.clone(),
        ));
        let mut parts = tokio::task::JoinSet::new();
        parts.spawn(read_local(
            local_r,
            credit.clone(),
            chunk,
            controls_out,
            out_tx.clone(),
            ev_tx.clone(),
            activity.clone(),
        ));
        parts.spawn(write_local(
            local_w,
            write_rx,
            settings.window,
            out_tx.clone(),
            ev_tx.clone(),
            activity.clone(),
        ));
        parts.spawn(dispatch(
            inbound,
            received,
            settings.dead_after,
            credit,
            write_tx,
            controls_in,
            ev_tx.clone(),
        ));
        parts.spawn({
            let out_tx = out_tx.clone();
            async move {
                let mut tick = tokio::time::interval(settings.ping_every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if out_tx.send((Kind::Ping, Bytes::new())).await.is_err() {
                        break;
                    }
                }
            }
        });
        drop(ev_tx);
        let mut halves = 0;
        let outcome = loop {
            match ev_rx.recv().await {
                Some(Event::Half) => {
                    halves += 1;
                    if halves == 2 {
                        break Ok(());
                    }
                }
                Some(Event::Failed(reason)) => break Err(reason),
                None => break Err("the connection's parts ended".to_owned()),
            }
        };
        parts.abort_all();
        if let Err(reason) = &outcome {
            // Tell the peer (a reset it sent itself is answered harmlessly).
            let _ = out_tx
                .send((Kind::Reset, Bytes::copy_from_slice(reason.as_bytes())))
                .await;
        }
        drop(out_tx);
        while parts.join_next().await.is_some() {}
        let _ = tokio::time::timeout(Duration::from_secs(2), sender).await;
        outcome
    }
}

/// Numbers and publishes frames in the order they were handed over.
async fn send_frames(
    client: async_nats::Client,
    subject: String,
    mut seq: u64,
    mut rx: mpsc::Receiver<(Kind, Bytes)>,
    ev: mpsc::UnboundedSender<Event>,
) {
    while let Some((kind, payload)) = rx.recv().await {
        if let Err(e) = client
            .publish(subject.clone(), Frame::encode(kind, seq, &payload))
            .await
        {
            let _ = ev.send(Event::Failed(format!("cannot send on the tunnel: {e}")));
            return;
        }
        seq += 1;
        if kind == Kind::Reset {
            let _ = client.flush().await;
            return;
        }
    }
}

async fn read_local<R: AsyncRead + Send>(
    r: R,
    credit: Arc<Semaphore>,
    chunk: usize,
    mut controls: Option<mpsc::Receiver<Control>>,
    out: mpsc::Sender<(Kind, Bytes)>,
    ev: mpsc::UnboundedSender<Event>,
    activity: Option<Activity>,
) {
    let control = |c: &Control| Bytes::from(serde_json::to_vec(c).unwrap_or_default());
    let mut r = std::pin::pin!(r);
    // One buffer, reused once the frames cut from it are sent.
    let mut buf = BytesMut::new();
    loop {
        let Ok(permit) = credit.acquire_many(chunk as u32).await else {
            return;
        };
        permit.forget();
        buf.reserve(chunk);
        let mut room = (&mut buf).limit(chunk);
        let read = tokio::select! {
            biased;
            Some(c) = async { match controls.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                credit.add_permits(chunk);
                if out.send((Kind::Control, control(&c))).await.is_err() {
                    return;
                }
                continue;
            }
            read = r.read_buf(&mut room) => read,
        };
        match read {
            Ok(0) => {
                credit.add_permits(chunk);
                // Controls the local end left before it ended go first.
                if let Some(rx) = controls.as_mut() {
                    while let Ok(c) = rx.try_recv() {
                        let _ = out.send((Kind::Control, control(&c))).await;
                    }
                }
                if out.send((Kind::Data, Bytes::new())).await.is_ok() {
                    let _ = ev.send(Event::Half);
                }
                return;
            }
            Ok(n) => {
                credit.add_permits(chunk - n);
                touch(activity.as_ref());
                if out.send((Kind::Data, buf.split().freeze())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = ev.send(Event::Failed(format!("reading the local end: {e}")));
                return;
            }
        }
    }
}

async fn write_local<W: AsyncWrite + Send>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Option<Bytes>>,
    window: u32,
    out: mpsc::Sender<(Kind, Bytes)>,
    ev: mpsc::UnboundedSender<Event>,
    activity: Option<Activity>,
) {
    let mut w = std::pin::pin!(w);
    let mut consumed: u32 = 0;
    while let Some(next) = rx.recv().await {
        match next {
            Some(data) => {
                if let Err(e) = w.write_all(&data).await {
                    let _ = ev.send(Event::Failed(format!("writing the local end: {e}")));
                    return;
                }
                touch(activity.as_ref());
                consumed = consumed.saturating_add(u32::try_from(data.len()).unwrap_or(u32::MAX));
                // Credit back once a quarter window is written, or whenever
                // the queue runs dry (so the peer never waits on a remainder).
                if consumed >= window / 4 || rx.is_empty() {
                    let _ = w.flush().await;
                    let c = Bytes::copy_from_slice(&consumed.to_be_bytes());
                    consumed = 0;
                    if out.send((Kind::Credit, c)).await.is_err() {
                        return;
                    }
                }
            }
            None => {
                let _ = w.flush().await;
                let _ = w.shutdown().await;
                let _ = ev.send(Event::Half);
                return;
            }
        }
    }
}

async fn dispatch(
    mut inbound: BoxStream<'static, Bytes>,
    mut expected: u64,
    dead_after: Duration,
    credit: Arc<Semaphore>,
    write: mpsc::UnboundedSender<Option<Bytes>>,
    controls: Option<mpsc::Sender<Control>>,
    ev: mpsc::UnboundedSender<Event>,
) {
    let fail = |r: String| {
        let _ = ev.send(Event::Failed(r));
    };
    loop {
        let raw = match tokio::time::timeout(dead_after, inbound.next()).await {
            Ok(Some(raw)) => raw,
            Ok(None) => return fail("the tunnel's subscription ended".into()),
            Err(_) => {
                return fail(format!(
                    "nothing heard from the other end for {} s: the node's link is down",
                    dead_after.as_secs()
                ))
            }
        };
        let frame = match Frame::decode(raw) {
            Ok(f) => f,
            Err(e) => return fail(format!("a bad frame: {e}")),
        };
        if frame.kind == Kind::Reset {
            return fail(String::from_utf8_lossy(&frame.payload).into_owned());
        }
        if frame.seq != expected {
            return fail(format!(
                "frames were lost (expected {expected}, got {}): the connection cannot go on",
                frame.seq
            ));
        }
        expected += 1;
        match frame.kind {
            Kind::Data if frame.payload.is_empty() => {
                let _ = write.send(None);
            }
            Kind::Data => {
                let _ = write.send(Some(frame.payload));
            }
            Kind::Credit => {
                let mut n = [0u8; 4];
                if frame.payload.len() == 4 {
                    n.copy_from_slice(&frame.payload);
                }
                credit.add_permits(u32::from_be_bytes(n) as usize);
            }
            Kind::Ping => {}
            Kind::Control => match serde_json::from_slice::<Control>(&frame.payload) {
                Ok(c) => {
                    if let Some(tx) = &controls {
                        let _ = tx.send(c).await;
                    }
                }
                Err(e) => debug!(error = %e, "an unknown control, ignored"),
            },
            Kind::Open | Kind::Opened | Kind::Reset => {
                return fail(format!("an unexpected {:?} frame", frame.kind));
            }
        }
    }
}
