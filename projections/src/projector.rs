//! The projector loop: ordered consumer -> batches -> one transaction each.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};

/// How long a projector waits for an event before checking it is not missing any.
const STALL_CHECK: std::time::Duration = std::time::Duration::from_secs(3);
use futures::{FutureExt, StreamExt};
use tracing::{debug, info, warn};
use ud_schemas::codec::{self, EventEnvelope};
use ud_schemas::{streams, subjects, Event, NodeEvent};

use crate::db::{self, Db};
use crate::rows::{self, NodeRow, PipelineFold, TaskRow, TokenRow};
use crate::ProjectionError;

#[derive(Clone, Debug)]
pub struct ProjectorOptions {
    /// Most messages applied in one transaction.
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

struct Raw {
    seq: u64,
    subject: String,
    headers: Option<async_nats::HeaderMap>,
    payload: bytes::Bytes,
}

fn stream_err(e: impl Into<crate::SourceError>) -> ProjectionError {
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
        let mut stream = self.js.get_stream(&self.stream).await.map_err(stream_err)?;
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
        let mut messages = consumer.messages().await.map_err(stream_err)?;
        info!(stream = %self.stream, from = applied + 1, "projector started");
        loop {
            // An ordered consumer whose server died can go quiet for good: when
            // nothing comes for a while, check that nothing is being missed.
            let first = match tokio::time::timeout(STALL_CHECK, messages.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(ProjectionError::Stream("consumer closed".into())),
                Err(_) => {
                    let last = stream.info().await.map_err(stream_err)?.state.last_sequence;
                    if last > applied {
                        return Err(ProjectionError::Stream(
                            format!("consumer stalled at {applied} of {last}; binding again")
                                .into(),
                        ));
                    }
                    continue;
                }
            };
            let mut batch = vec![first.map_err(stream_err)?];
            let deadline = tokio::time::Instant::now() + self.options.linger;
            while batch.len() < self.options.batch_max {
                match messages.next().now_or_never() {
                    Some(Some(m)) => batch.push(m.map_err(stream_err)?),
                    Some(None) => break,
                    None if self.options.linger.is_zero() => break,
                    None => match tokio::time::timeout_at(deadline, messages.next()).await {
                        Ok(Some(m)) => batch.push(m.map_err(stream_err)?),
                        _ => break,
                    },
                }
            }
            let raws: Vec<Raw> = batch
                .into_iter()
                .filter_map(|m| {
                    let seq = m.info().ok()?.stream_sequence;
                    let (msg, _) = m.split();
                    Some(Raw {
                        seq,
                        subject: msg.subject.to_string(),
                        headers: msg.headers,
                        payload: msg.payload,
                    })
                })
                .filter(|r| r.seq > applied)
                .collect();
            let Some(last) = raws.last().map(|r| r.seq) else {
                continue;
            };
            self.apply_batch(&raws, applied, last).await?;
            applied = last;
            debug!(stream = %self.stream, seq = applied, n = raws.len(), "batch projected");
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

    async fn apply_batch(&self, raws: &[Raw], from: u64, last: u64) -> Result<(), ProjectionError> {
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let mut decoded: Vec<(u64, EventEnvelope)> = Vec::with_capacity(raws.len());
        for r in raws {
            match codec::decode_message(&r.subject, r.headers.as_ref(), &r.payload) {
                Ok(env) => decoded.push((r.seq, env)),
                Err(e) => {
                    warn!(stream = %self.stream, seq = r.seq, subject = %r.subject, error = %e, "undecodable event skipped");
                    db::record_error(
                        &tx,
                        &self.stream,
                        r.seq,
                        &r.subject,
                        &e.to_string(),
                        &r.payload,
                    )
                    .await?;
                }
            }
        }
        let failures = match self.stream.as_str() {
            streams::TASKS => apply_tasks(&tx, &decoded).await?,
            streams::NODES | streams::HEARTBEATS => apply_nodes(&tx, &decoded).await?,
            streams::AUTH => apply_tokens(&tx, &decoded).await?,
            streams::PIPELINES => apply_pipelines(&tx, &decoded).await?,
            other => {
                return Err(ProjectionError::Config(format!(
                    "no projection for stream {other}"
                )))
            }
        };
        for (seq, error) in failures {
            if let Some(r) = raws.iter().find(|r| r.seq == seq) {
                warn!(stream = %self.stream, seq, error = %error, "event not applicable; recorded");
                db::record_error(&tx, &self.stream, seq, &r.subject, &error, &r.payload).await?;
            }
        }
        db::advance_checkpoint(&tx, &self.stream, from, last).await?;
        tx.commit().await?;
        Ok(())
    }
}

type Failures = Vec<(u64, String)>;

/// Folds a batch into rows keyed by aggregate, starting from stored rows.
fn fold_batch<K: std::hash::Hash + Eq + Copy, R>(
    decoded: &[(u64, EventEnvelope)],
    mut existing: HashMap<K, R>,
    key_of: impl Fn(&EventEnvelope) -> Option<K>,
    mut apply: impl FnMut(Option<R>, &EventEnvelope, u64) -> Option<Result<R, String>>,
) -> (Vec<R>, Failures) {
    let mut touched: Vec<K> = Vec::new();
    let mut seen: std::collections::HashSet<K> = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for (seq, env) in decoded {
        let Some(key) = key_of(env) else { continue };
        let before = existing.remove(&key);
        match apply(before, env, *seq) {
            Some(Ok(row)) => {
                if seen.insert(key) {
                    touched.push(key);
                }
                existing.insert(key, row);
            }
            // Only an event for an aggregate with no row fails; nothing was removed.
            Some(Err(e)) => failures.push((*seq, e)),
            None => {}
        }
    }
    let rows = touched
        .into_iter()
        .filter_map(|k| existing.remove(&k))
        .collect();
    (rows, failures)
}

/// The distinct aggregate ids of a batch, for loading their stored rows.
fn ids_of<K: Ord + Copy>(
    decoded: &[(u64, EventEnvelope)],
    key_of: impl Fn(&EventEnvelope) -> Option<K>,
    uuid: impl Fn(K) -> uuid::Uuid,
) -> Vec<uuid::Uuid> {
    let mut keys: Vec<K> = decoded.iter().filter_map(|(_, e)| key_of(e)).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().map(uuid).collect()
}

fn task_key(env: &EventEnvelope) -> Option<ud_schemas::TaskId> {
    match &env.event {
        Event::Task(id, _) => Some(*id),
        _ => None,
    }
}

fn node_key(env: &EventEnvelope) -> Option<ud_schemas::NodeId> {
    match &env.event {
        Event::Node(id, _) => Some(*id),
        _ => None,
    }
}

fn token_key(env: &EventEnvelope) -> Option<ud_schemas::TokenId> {
    match &env.event {
        Event::Auth(id, _) => Some(*id),
        _ => None,
    }
}

async fn apply_tasks(
    tx: &deadpool_postgres::Transaction<'_>,
    decoded: &[(u64, EventEnvelope)],
) -> Result<Failures, ProjectionError> {
    let ids = ids_of(decoded, task_key, |k| k.0);
    let existing: HashMap<_, TaskRow> = db::load_tasks(tx, &ids)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let (mut rows, failures) = fold_batch(decoded, existing, task_key, |row, env, seq| match &env
        .event
    {
        Event::Task(id, e) => {
            Some(rows::apply_task(row, *id, e, &env.meta.actor, seq).map_err(|e| e.to_string()))
        }
        _ => None,
    });
    rows.iter_mut().for_each(TaskRow::scrub);
    db::upsert_tasks(tx, &rows).await?;
    Ok(failures)
}

async fn apply_nodes(
    tx: &deadpool_postgres::Transaction<'_>,
    decoded: &[(u64, EventEnvelope)],
) -> Result<Failures, ProjectionError> {
    let ids = ids_of(decoded, node_key, |k| k.0);
    let existing: HashMap<_, NodeRow> = db::load_nodes(tx, &ids)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let (mut rows, failures) = fold_batch(decoded, existing, node_key, |row, env, seq| {
        match &env.event {
            // A heartbeat may be projected before its node's registration
            // (another stream); the next one will land.
            Event::Node(_, NodeEvent::Heartbeat(_)) if row.is_none() => None,
            Event::Node(id, e) => {
                Some(rows::apply_node(row, *id, e, seq).map_err(|e| e.to_string()))
            }
            _ => None,
        }
    });
    rows.iter_mut().for_each(NodeRow::scrub);
    db::upsert_nodes(tx, &rows).await?;
    Ok(failures)
}

async fn apply_tokens(
    tx: &deadpool_postgres::Transaction<'_>,
    decoded: &[(u64, EventEnvelope)],
) -> Result<Failures, ProjectionError> {
    let ids = ids_of(decoded, token_key, |k| k.0);
    let existing: HashMap<_, TokenRow> = db::load_tokens(tx, &ids)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let (mut rows, failures) = fold_batch(decoded, existing, token_key, |row, env, _| {
        match &env.event {
            Event::Auth(id, e) => Some(rows::apply_token(row, *id, e).map_err(|e| e.to_string())),
            _ => None,
        }
    });
    rows.iter_mut().for_each(TokenRow::scrub);
    db::upsert_tokens(tx, &rows).await?;
    Ok(failures)
}

fn pipeline_key(env: &EventEnvelope) -> Option<ud_schemas::PipelineId> {
    match &env.event {
        Event::Pipeline(id, _) => Some(*id),
        _ => None,
    }
}

async fn apply_pipelines(
    tx: &deadpool_postgres::Transaction<'_>,
    decoded: &[(u64, EventEnvelope)],
) -> Result<Failures, ProjectionError> {
    let ids = ids_of(decoded, pipeline_key, |k| k.0);
    // Folded as aggregates through the batch, written as rows once.
    let existing: HashMap<_, PipelineFold> = db::load_pipelines(tx, &ids)
        .await?
        .iter()
        .filter_map(|r| Some((r.id, PipelineFold::from_row(r)?)))
        .collect();
    let (folds, failures) = fold_batch(decoded, existing, pipeline_key, |f, env, seq| {
        match &env.event {
            Event::Pipeline(id, e) => Some(
                rows::apply_pipeline(f, *id, e, &env.meta.actor, seq).map_err(|e| e.to_string()),
            ),
            _ => None,
        }
    });
    let rows: Vec<_> = folds.into_iter().map(PipelineFold::into_row).collect();
    db::upsert_pipelines(tx, &rows).await?;
    Ok(failures)
}
