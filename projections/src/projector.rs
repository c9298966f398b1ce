//! The projector loop: ordered consumer -> batches -> one transaction each.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};

/// How long a projector waits for an event before checking it is not missing any.
use futures::{FutureExt, StreamExt};
use tracing::{debug, info, warn};
use ud_schemas::codec::{self, EventEnvelope};
use ud_schemas::{streams, subjects};

use tokio_util::task::AbortOnDropHandle;
use ud_core::follow::Next;

use crate::db::{self, Db};
use crate::model::{apply, Nodes, Pipelines, Schedules, Tasks, Tokens};
use crate::ProjectionError;

#[derive(Clone, Debug)]
pub struct ProjectorOptions {
    /// Messages gathered for one transaction before it takes no more (the
    /// last chunk read may carry it past this, to less than twice as many).
    pub batch_max: usize,
    /// Publish `ud.sys.projected.<stream>` after each commit (live projectors).
    pub notify: bool,
    /// How long a batch waits for more messages once it has its first: one
    /// transaction for many sparse events (heartbeats) instead of one each.
    pub linger: Duration,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        Self {
            batch_max: 5000,
            notify: true,
            linger: Duration::ZERO,
        }
    }
}

impl ProjectorOptions {
    /// The live options for `stream`: heartbeats linger, everything else is
    /// projected as soon as it arrives (read-your-writes waits on it).
    pub fn live(stream: &str) -> Self {
        let linger = if stream == streams::HEARTBEATS {
            Duration::from_millis(250)
        } else if stream == streams::TASKS {
            TASKS_LINGER
        } else {
            Duration::ZERO
        };
        Self {
            linger,
            ..Self::default()
        }
    }
}

/// How long the task projector waits for more events once it has one: a few
/// milliseconds of latency buy far larger transactions under load.
const TASKS_LINGER: Duration = Duration::from_millis(5);

pub struct Projector {
    db: Db,
    js: jetstream::Context,
    stream: String,
    options: ProjectorOptions,
}

pub(crate) struct Raw {
    pub(crate) seq: u64,
    pub(crate) subject: async_nats::Subject,
    pub(crate) payload: bytes::Bytes,
}

/// Batches waiting for the writer: one, so that what is read while it
/// writes gathers into the next batch instead of queueing as small ones.
pub(crate) const READ_AHEAD: usize = 1;

/// Fetched chunks in flight between the fetching and the decoding task.
const FETCHED_AHEAD: usize = 2;

/// One transaction's worth of events, decoded.
#[derive(Default)]
pub(crate) struct Batch {
    pub(crate) raws: Vec<Raw>,
    pub(crate) decoded: Vec<(u64, EventEnvelope)>,
    /// Events that do not decode, by sequence, with why.
    pub(crate) undecodable: Vec<(u64, String)>,
}

/// Reads the consumer into batches (lingering as the options say), decodes
/// them and hands them on, until the projector stops or an error, which is
/// handed on last. Fetching goes on, on a task of its own, while a batch is
/// decoded: the consumer asks for more only while it is polled. While the
/// writer is busy, what is fetched joins the batch it takes next, until that
/// holds `batch_max`: the writer's batches grow with the load, and one
/// transaction (one commit) carries what arrived during the last one.
pub(crate) async fn read_batches(
    messages: jetstream::consumer::pull::Ordered,
    stream: jetstream::stream::Stream,
    mut read: u64,
    options: ProjectorOptions,
    out: tokio::sync::mpsc::Sender<Result<Batch, ProjectionError>>,
) {
    let batch_max = options.batch_max;
    let (fetched, next) = tokio::sync::mpsc::channel(FETCHED_AHEAD);
    let _fetch = AbortOnDropHandle::new(tokio::spawn(fetch_batches(
        messages, stream, read, options, fetched,
    )));
    gather(
        next,
        out,
        batch_max,
        |msgs, batch: &mut Batch| decode(msgs, &mut read, batch),
        |batch| batch.raws.len(),
    )
    .await;
}

/// Adds chunks from `next` to one batch while `out` has no room for it,
/// until it holds `max` (of `len`), and hands it on as soon as there is
/// room (a `max` of 0 counts as 1). An error is handed on after what was
/// gathered before it.
async fn gather<C, B: Default>(
    mut next: tokio::sync::mpsc::Receiver<Result<C, ProjectionError>>,
    out: tokio::sync::mpsc::Sender<Result<B, ProjectionError>>,
    max: usize,
    mut add: impl FnMut(C, &mut B),
    len: impl Fn(&B) -> usize,
) {
    // With nothing gathered and no room to gather, no branch below could run.
    let max = max.max(1);
    let mut gathered = B::default();
    loop {
        let ready = len(&gathered) > 0;
        let full = len(&gathered) >= max;
        tokio::select! {
            biased;
            permit = out.reserve(), if ready => match permit {
                Ok(permit) => permit.send(Ok(std::mem::take(&mut gathered))),
                Err(_) => return,
            },
            chunk = next.recv(), if !full => match chunk {
                Some(Ok(chunk)) => add(chunk, &mut gathered),
                // The fetcher ends only after handing on an error (or when
                // nobody reads).
                end => {
                    if ready && out.send(Ok(std::mem::take(&mut gathered))).await.is_err() {
                        return;
                    }
                    if let Some(Err(e)) = end {
                        let _ = out.send(Err(e)).await;
                    }
                    return;
                }
            },
        }
    }
}

async fn fetch_batches(
    mut messages: jetstream::consumer::pull::Ordered,
    mut stream: jetstream::stream::Stream,
    mut read: u64,
    options: ProjectorOptions,
    out: tokio::sync::mpsc::Sender<Result<Vec<jetstream::Message>, ProjectionError>>,
) {
    loop {
        let batch = next_batch(&mut messages, &mut stream, read, &options).await;
        if let Some(seq) = batch
            .as_ref()
            .ok()
            .and_then(|b| b.last())
            .and_then(|m| m.info().ok())
            .map(|i| i.stream_sequence)
        {
            read = read.max(seq);
        }
        let failed = batch.is_err();
        if out.send(batch).await.is_err() || failed {
            return;
        }
    }
}

async fn next_batch(
    messages: &mut jetstream::consumer::pull::Ordered,
    stream: &mut jetstream::stream::Stream,
    read: u64,
    options: &ProjectorOptions,
) -> Result<Vec<jetstream::Message>, ProjectionError> {
    // An ordered consumer whose server died can go quiet for good: when
    // nothing comes for a while, check that nothing is being missed.
    let first = match ud_core::follow::next_or_stalled(messages, stream, read).await {
        Next::Message(m) => *m,
        Next::Closed => return Err(ProjectionError::Stream("consumer closed".into())),
        Next::Stalled { read, last } => {
            return Err(ProjectionError::Stream(
                format!("consumer stalled at {read} of {last}; binding again").into(),
            ))
        }
        Next::Failed(e) => return Err(ProjectionError::Stream(e)),
    };
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + options.linger;
    while batch.len() < options.batch_max {
        match messages.next().now_or_never() {
            Some(Some(m)) => batch.push(m.map_err(stream_err)?),
            Some(None) => break,
            None if options.linger.is_zero() => break,
            None => match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(m)) => batch.push(m.map_err(stream_err)?),
                _ => break,
            },
        }
    }
    Ok(batch)
}

/// Decodes fetched messages after `read` into `out`, moving `read` on.
fn decode(batch: Vec<jetstream::Message>, read: &mut u64, out: &mut Batch) {
    out.raws.reserve(batch.len());
    out.decoded.reserve(batch.len());
    for m in batch {
        let Some(seq) = m.info().ok().map(|i| i.stream_sequence) else {
            continue;
        };
        if seq <= *read {
            continue;
        }
        *read = seq;
        let (msg, _) = m.split();
        match codec::decode_message(msg.subject.as_str(), msg.headers.as_ref(), &msg.payload) {
            Ok(env) => out.decoded.push((seq, env)),
            Err(e) => out.undecodable.push((seq, e.to_string())),
        }
        out.raws.push(Raw {
            seq,
            subject: msg.subject,
            payload: msg.payload,
        });
    }
}

pub(crate) fn stream_err(e: impl Into<crate::SourceError>) -> ProjectionError {
    ProjectionError::Stream(e.into())
}

impl Projector {
    pub fn new(db: Db, js: jetstream::Context, stream: &str, options: ProjectorOptions) -> Self {
        Self {
            db,
            js,
            stream: stream.to_owned(),
            options,
        }
    }

    /// Projects until the stream's sequence `until` is applied (`None`: forever).
    /// Returns the last applied sequence.
    pub async fn run(&self, until: Option<u64>) -> Result<u64, ProjectionError> {
        let mut applied = self.db.checkpoint(&self.stream).await?;
        if until.is_some_and(|u| applied >= u) {
            return Ok(applied);
        }
        let stream = self.js.get_stream(&self.stream).await.map_err(stream_err)?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: applied + 1,
                },
                max_expires: ud_schemas::streams::PULL_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(stream_err)?;
        let messages = consumer.messages().await.map_err(stream_err)?;
        info!(stream = %self.stream, from = applied + 1, "projector started");
        // Reading and decoding the next batches goes on, on a task of its
        // own, while this one writes the last: the two overlap instead of
        // taking turns.
        let (batches, mut ready) = tokio::sync::mpsc::channel(READ_AHEAD);
        let reader = AbortOnDropHandle::new(tokio::spawn(read_batches(
            messages,
            stream,
            applied,
            self.options.clone(),
            batches,
        )));
        loop {
            let batch = match ready.recv().await {
                Some(batch) => batch?,
                None => {
                    drop(reader);
                    return Err(ProjectionError::Stream("consumer closed".into()));
                }
            };
            let Some(last) = batch.raws.last().map(|r| r.seq) else {
                continue;
            };
            self.apply_batch(batch, applied, last).await?;
            applied = last;
            debug!(stream = %self.stream, seq = applied, "batch projected");
            if self.options.notify {
                let _ = self
                    .js
                    .client()
                    .publish(
                        subjects::projected(&self.stream),
                        applied.to_string().into(),
                    )
                    .await;
            }
            if until.is_some_and(|u| applied >= u) {
                return Ok(applied);
            }
        }
    }

    /// Runs forever, restarting after failures with a capped backoff. Of
    /// several instances, one projects each stream while the others wait on
    /// a PostgreSQL advisory lock.
    pub async fn run_forever(&self) {
        use backon::BackoffBuilder;
        let schedule = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .without_max_times();
        let mut delays = schedule.build();
        loop {
            match self.run_locked().await {
                Ok(_) => delays = schedule.build(),
                Err(e) => {
                    warn!(stream = %self.stream, error = %e, "projector failed; restarting");
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
                }
            }
        }
    }

    async fn run_locked(&self) -> Result<u64, ProjectionError> {
        // A connection of its own, out of the pool: if this projector stops
        // before it unlocks (a crash, an abort), the connection closes and the
        // lock goes with it, instead of staying held by a pooled connection
        // that the projector started in its place would wait on forever.
        let lock = deadpool_postgres::Object::take(self.db.client().await?);
        let key = format!("ud-projector:{}:{}", self.db.schema(), self.stream);
        lock.execute("SELECT pg_advisory_lock(hashtext($1))", &[&key])
            .await?;
        let result = self.run(None).await;
        let _ = lock
            .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key])
            .await;
        result
    }

    async fn apply_batch(&self, batch: Batch, from: u64, last: u64) -> Result<(), ProjectionError> {
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let raws = &batch.raws;
        let decoded = batch.decoded;
        let failures = match self.stream.as_str() {
            streams::TASKS => apply::<Tasks>(&tx, &decoded).await?,
            streams::NODES | streams::HEARTBEATS => apply::<Nodes>(&tx, &decoded).await?,
            streams::AUTH => apply::<Tokens>(&tx, &decoded).await?,
            streams::PIPELINES => apply::<Pipelines>(&tx, &decoded).await?,
            streams::SCHEDULES => apply::<Schedules>(&tx, &decoded).await?,
            other => {
                return Err(ProjectionError::Config(format!(
                    "no projection for stream {other}"
                )))
            }
        };
        for (seq, error) in batch.undecodable.into_iter().chain(failures) {
            if let Some(r) = raws.iter().find(|r| r.seq == seq) {
                warn!(stream = %self.stream, seq, subject = %r.subject, error = %error, "event not applied; recorded");
                db::record_error(&tx, &self.stream, seq, &r.subject, &error, &r.payload).await?;
            }
        }
        db::advance_checkpoint(&tx, &self.stream, from, last).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    async fn gathered(
        chunks: Vec<Result<Vec<u32>, ProjectionError>>,
        max: usize,
    ) -> Vec<Result<Vec<u32>, ProjectionError>> {
        let (tx, next) = mpsc::channel(chunks.len().max(1));
        for c in chunks {
            tx.send(c).await.ok();
        }
        drop(tx);
        let (out, mut batches) = mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(gather(
            next,
            out,
            max,
            |c, b: &mut Vec<u32>| b.extend(c),
            Vec::len,
        ));
        let mut got = Vec::new();
        while let Some(b) = batches.recv().await {
            got.push(b);
        }
        task.await.unwrap();
        got
    }

    #[tokio::test]
    async fn chunks_read_while_the_writer_is_busy_make_one_batch() {
        let chunks = (0..10u32).map(|i| Ok(vec![2 * i, 2 * i + 1])).collect();
        let got: Vec<Vec<u32>> = gathered(chunks, 1000)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // The first chunk goes at once; the other nine gather while it waits
        // (one thread: the gatherer runs until it has to wait).
        assert_eq!(got, vec![vec![0, 1], (2..20).collect::<Vec<_>>()]);
    }

    #[tokio::test]
    async fn a_batch_stops_gathering_at_its_most() {
        let chunks = (0..10u32).map(|i| Ok(vec![i; 3])).collect();
        let got: Vec<usize> = gathered(chunks, 5)
            .await
            .into_iter()
            .map(|b| b.unwrap().len())
            .collect();
        assert_eq!(got.iter().sum::<usize>(), 30);
        assert!(got.iter().all(|n| *n < 5 + 3), "{got:?}");
        assert!(got.len() < 10, "{got:?}");
        // A most of 0 takes one chunk at a time rather than none.
        let chunks = (0..4u32).map(|i| Ok(vec![i])).collect();
        let got: Vec<Vec<u32>> = gathered(chunks, 0)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    #[tokio::test]
    async fn an_error_comes_after_what_was_gathered_before_it() {
        let chunks = vec![
            Ok(vec![1]),
            Ok(vec![2]),
            Ok(vec![3]),
            Err(ProjectionError::Stream("consumer closed".into())),
            Ok(vec![4]),
        ];
        let got = gathered(chunks, 100).await;
        let (ok, err): (Vec<_>, Vec<_>) = got.into_iter().partition(Result::is_ok);
        let events: Vec<u32> = ok.into_iter().flat_map(Result::unwrap).collect();
        assert_eq!(events, vec![1, 2, 3]);
        assert_eq!(err.len(), 1);
    }
}
