//! Rebuild by replay: project every stream from its first event into an
//! empty schema, and compare two schemas' read models.

use std::collections::{HashMap, HashSet};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use serde::Serialize;
use tracing::{info, warn};
use ud_schemas::codec::EventEnvelope;
use ud_schemas::streams;

use crate::db::{self, Db};
use crate::model::{fold_into, keys_of, Model, Nodes, Pipelines, Schedules, Tasks, Tokens};
use crate::projector::{read_batches, stream_err, ProjectorOptions, READ_AHEAD};
use crate::ProjectionError;

/// Tables that hold read models (checkpoints and errors are bookkeeping).
pub const READ_MODEL_TABLES: [&str; 7] = [
    "tasks",
    "nodes",
    "api_tokens",
    "pipelines",
    "schedules",
    "projects",
    "project_members",
];

#[derive(Debug, Serialize)]
pub struct StreamReplay {
    pub stream: String,
    pub last_seq: u64,
    /// Seconds spent reading and folding the events.
    pub read_seconds: f64,
    /// Seconds spent writing the rows after the reading (the last flush and
    /// building the indexes; flushes while reading count as reading).
    pub write_seconds: f64,
}

/// Replays every projected stream, up to its last sequence at the start,
/// into `db`'s schema, which is dropped and re-created first.
///
/// Unlike the live projector, which writes each batch's aggregates in a
/// transaction of its own, a replay folds up to [`REPLAY_FOLDS`] aggregates
/// in memory across batches and writes them at once (binary COPY for
/// tasks), so that each is written about once.
pub async fn rebuild(
    db: &Db,
    js: &jetstream::Context,
    batch_max: usize,
) -> Result<Vec<StreamReplay>, ProjectionError> {
    rebuild_bounded(db, js, batch_max, REPLAY_FOLDS).await
}

/// [`rebuild`] holding at most `folds_max` aggregates in memory.
pub async fn rebuild_bounded(
    db: &Db,
    js: &jetstream::Context,
    batch_max: usize,
    folds_max: usize,
) -> Result<Vec<StreamReplay>, ProjectionError> {
    replay_until(db, js, batch_max, folds_max, None).await
}

/// Replays each stream up to `until`'s sequence for it (none: nothing),
/// or to its last sequence without `until`.
async fn replay_until(
    db: &Db,
    js: &jetstream::Context,
    batch_max: usize,
    folds_max: usize,
    until: Option<&HashMap<String, u64>>,
) -> Result<Vec<StreamReplay>, ProjectionError> {
    db.reset().await?;
    let mut out = Vec::new();
    for name in streams::PROJECTED {
        let mut stream = js.get_stream(name).await.map_err(stream_err)?;
        let mut last = stream.info().await.map_err(stream_err)?.state.last_sequence;
        if let Some(until) = until {
            last = last.min(until.get(name).copied().unwrap_or(0));
        }
        let took = match name {
            streams::TASKS => replay::<Tasks>(db, stream, name, last, batch_max, folds_max).await?,
            streams::NODES | streams::HEARTBEATS => {
                replay::<Nodes>(db, stream, name, last, batch_max, folds_max).await?
            }
            streams::AUTH => replay::<Tokens>(db, stream, name, last, batch_max, folds_max).await?,
            streams::PIPELINES => {
                replay::<Pipelines>(db, stream, name, last, batch_max, folds_max).await?
            }
            streams::SCHEDULES => {
                replay::<Schedules>(db, stream, name, last, batch_max, folds_max).await?
            }
            other => {
                return Err(ProjectionError::Config(format!(
                    "no projection for stream {other}"
                )))
            }
        };
        info!(
            stream = name,
            last_seq = last,
            schema = db.schema(),
            read_seconds = took.read,
            write_seconds = took.write,
            "replayed"
        );
        out.push(StreamReplay {
            stream: name.to_owned(),
            last_seq: last,
            read_seconds: took.read,
            write_seconds: took.write,
        });
    }
    Ok(out)
}

/// Most aggregates a replay folds in memory before it writes them all; as
/// many more may be held meanwhile by the flush being written.
pub const REPLAY_FOLDS: usize = 200_000;

/// How many settled aggregates a replay gathers before it writes them: a
/// tenth of what it may hold.
fn settled_flush(folds_max: usize) -> usize {
    (folds_max / 10).max(1)
}

/// Which of `folds` may have rows already: all when the table had rows
/// before the replay, else those an earlier flush wrote.
fn stored_again<M: Model, S: std::hash::BuildHasher>(
    folds: &HashMap<M::Key, M::Fold, S>,
    flushed: &HashSet<M::Key, S>,
    stored_before: bool,
    hasher: S,
) -> HashSet<M::Key, S> {
    let mut again = HashSet::with_hasher(hasher);
    again.extend(
        folds
            .keys()
            .filter(|k| stored_before || flushed.contains(k))
            .copied(),
    );
    again
}

/// An event recorded in `projection_errors` when the replay is written.
struct Refused {
    seq: u64,
    subject: String,
    error: String,
    payload: bytes::Bytes,
}

/// Where a stream's replay spent its time, in seconds.
#[derive(Default)]
struct Took {
    read: f64,
    write: f64,
}

/// Aggregates a replay flushes to the database on a task of their own while
/// it goes on reading; until the next flush, an aggregate among them that
/// comes up again is copied from here.
struct Writing<M: Model> {
    folds: std::sync::Arc<HashMap<M::Key, M::Fold, Hasher>>,
    done: tokio_util::task::AbortOnDropHandle<Result<(), ProjectionError>>,
}

/// The replay's hash for its maps of aggregates.
type Hasher = foldhash::fast::RandomState;

impl<M: Model> Writing<M> {
    /// Starts writing `folds`; those in `again` may be stored already.
    fn start(
        db: Db,
        folds: HashMap<M::Key, M::Fold, Hasher>,
        again: HashSet<M::Key, Hasher>,
    ) -> Self {
        let folds = std::sync::Arc::new(folds);
        let writing = folds.clone();
        let done = tokio::spawn(async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await?;
            store_split::<M, Hasher>(&tx, writing.iter(), &again).await?;
            tx.commit().await?;
            Ok(())
        });
        Self {
            folds,
            done: tokio_util::task::AbortOnDropHandle::new(done),
        }
    }

    /// Waits until the flush is committed.
    async fn finish(self) -> Result<(), ProjectionError> {
        self.done.await.map_err(ProjectionError::Flush)?
    }
}

/// Writes aggregates: the ones never stored straight in, those in `again`
/// replacing their rows.
async fn store_split<'a, M: Model, S: std::hash::BuildHasher>(
    tx: &deadpool_postgres::Transaction<'_>,
    folds: impl Iterator<Item = (&'a M::Key, &'a M::Fold)>,
    again: &HashSet<M::Key, S>,
) -> Result<(), ProjectionError> {
    let (replacing, fresh): (Vec<_>, Vec<_>) = folds.partition(|(k, _)| again.contains(k));
    M::store_many(tx, fresh.into_iter().map(|(_, f)| f).collect(), true).await?;
    M::store_many(tx, replacing.into_iter().map(|(_, f)| f).collect(), false).await
}

/// Replays one stream, from its first event to `last`, into model `M`.
async fn replay<M: Model>(
    db: &Db,
    stream: jetstream::stream::Stream,
    name: &str,
    last: u64,
    batch_max: usize,
    folds_max: usize,
) -> Result<Took, ProjectionError> {
    let start = std::time::Instant::now();
    let from = db.checkpoint(name).await?;
    if last <= from {
        return Ok(Took::default());
    }
    // Another stream may have written this model's table already (nodes
    // from their events, then from their heartbeats).
    let stored_before = {
        let c = db.client().await?;
        let q = format!("SELECT EXISTS (SELECT 1 FROM {})", M::TABLE);
        c.query_one(&q, &[]).await?.get::<_, bool>(0)
    };
    // An empty table is loaded faster without its secondary indexes: they
    // are built once at the end, also when the replay fails (not when it
    // panics or is dropped: a replay's schema is then partial anyway, and
    // the next replay makes it again).
    let deferred = if stored_before {
        Vec::new()
    } else {
        db::defer_indexes(&db.client().await?, db.schema(), M::TABLE).await?
    };
    let loaded: Result<f64, ProjectionError> = async {
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from + 1,
                },
                max_expires: streams::PULL_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(stream_err)?;
        let messages = consumer.messages().await.map_err(stream_err)?;
        let (batches, mut ready) = tokio::sync::mpsc::channel(READ_AHEAD);
        let options = ProjectorOptions {
            batch_max,
            notify: false,
            ..Default::default()
        };
        let _reader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(read_batches(
            messages, stream, from, options, batches,
        )));
        let hasher = Hasher::default;
        let expected = usize::try_from(last - from).unwrap_or(usize::MAX);
        let capacity = folds_max.min(expected);
        let mut folds: HashMap<M::Key, M::Fold, _> =
            HashMap::with_capacity_and_hasher(capacity, hasher());
        // Aggregates written by an earlier flush of this replay.
        let mut flushed: HashSet<M::Key, _> = HashSet::with_hasher(hasher());
        // Settled aggregates folded since the last flush (some maybe twice).
        let mut settled: Vec<M::Key> = Vec::new();
        // The flush being written while reading goes on.
        let mut writing: Option<Writing<M>> = None;
        let mut refused: Vec<Refused> = Vec::new();
        let mut read = from;
        while read < last {
            let batch = ready
                .recv()
                .await
                .ok_or_else(|| ProjectionError::Stream("consumer closed".into()))??;
            let Some(end) = batch.raws.last().map(|r| r.seq) else {
                continue;
            };
            let decoded: Vec<(u64, EventEnvelope)> = batch
                .decoded
                .into_iter()
                .filter(|(seq, _)| *seq <= last)
                .collect();
            // Aggregates folded before but not in memory: taken from the flush
            // being written, or loaded from what earlier flushes wrote.
            let mut missing: Vec<uuid::Uuid> = Vec::new();
            for k in keys_of::<M>(&decoded) {
                if folds.contains_key(&k) || !(stored_before || flushed.contains(&k)) {
                    continue;
                }
                match writing.as_ref().and_then(|w| w.folds.get(&k)) {
                    Some(f) => {
                        folds.insert(k, f.clone());
                    }
                    None => missing.push(M::uuid(k)),
                }
            }
            if !missing.is_empty() {
                let mut c = db.client().await?;
                let tx = c.transaction().await?;
                for f in M::load(&tx, &missing).await? {
                    folds.insert(M::key_of(&f), f);
                }
                tx.commit().await?;
            }
            let (touched, failures) = fold_into::<M, _>(&mut folds, &decoded);
            settled.extend(
                touched
                    .into_iter()
                    .filter(|k| folds.get(k).is_some_and(M::settled)),
            );
            if M::EACH {
                M::apply_each(&db.client().await?, &decoded).await?;
            }
            let why = batch
                .undecodable
                .into_iter()
                .chain(failures)
                .filter(|(seq, _)| *seq <= last);
            for (seq, error) in why {
                if let Some(r) = batch.raws.iter().find(|r| r.seq == seq) {
                    warn!(stream = name, seq, error = %error, "event not applicable; recorded");
                    refused.push(Refused {
                        seq,
                        subject: r.subject.to_string(),
                        error,
                        payload: r.payload.clone(),
                    });
                }
            }
            read = end.min(last);
            // Written on a task of its own while reading goes on: every
            // aggregate when memory is full, else the settled ones once there
            // are enough of them and the last flush is done.
            let full = folds.len() >= folds_max;
            let due = settled.len() >= settled_flush(folds_max)
                && writing.as_ref().is_none_or(|w| w.done.is_finished());
            if read < last && (full || due) {
                // One flush at a time: each is committed before the next, so
                // what a later one writes of an aggregate is what stays.
                if let Some(w) = writing.take() {
                    w.finish().await?;
                }
                let out: HashMap<M::Key, M::Fold, _> = if full {
                    settled.clear();
                    std::mem::replace(
                        &mut folds,
                        HashMap::with_capacity_and_hasher(capacity, hasher()),
                    )
                } else {
                    let mut out = HashMap::with_capacity_and_hasher(settled.len(), hasher());
                    for k in settled.drain(..) {
                        if folds.get(&k).is_some_and(M::settled) {
                            if let Some(f) = folds.remove(&k) {
                                out.insert(k, f);
                            }
                        }
                    }
                    out
                };
                let again = stored_again::<M, _>(&out, &flushed, stored_before, hasher());
                flushed.extend(out.keys().copied());
                writing = Some(Writing::start(db.clone(), out, again));
            }
        }
        if let Some(w) = writing.take() {
            w.finish().await?;
        }
        let read = start.elapsed().as_secs_f64();
        let again = stored_again::<M, _>(&folds, &flushed, stored_before, hasher());
        let mut c = db.client().await?;
        let tx = c.transaction().await?;
        store_split::<M, _>(&tx, folds.iter(), &again).await?;
        for r in &refused {
            db::record_error(&tx, name, r.seq, &r.subject, &r.error, &r.payload).await?;
        }
        db::advance_checkpoint(&tx, name, from, last).await?;
        tx.commit().await?;
        Ok(read)
    }
    .await;
    let built = if deferred.is_empty() {
        Ok(())
    } else {
        async { db::create_indexes(&db.client().await?, &deferred).await }.await
    };
    let read = loaded?;
    built?;
    Ok(Took {
        read,
        write: start.elapsed().as_secs_f64() - read,
    })
}

/// An audit of live read models: what a replay of the same events made of
/// them, table by table.
#[derive(Debug, Serialize)]
pub struct Audit {
    pub streams: Vec<StreamReplay>,
    pub differences: Vec<TableDiff>,
}

impl Audit {
    pub fn equal(&self) -> bool {
        self.differences
            .iter()
            .all(|d| d.only_in_left == 0 && d.only_in_right == 0)
    }
}

/// Replays the streams into `db`'s schema and compares the result with the
/// read models in schema `live`, as they were at one moment: their tables
/// and checkpoints are copied in one snapshot first (into `<schema>_live`,
/// dropped after), and each stream is replayed up to the checkpoint the
/// copy holds, so a live system that goes on projecting (heartbeats keep
/// coming) is compared at a point where both saw the same events.
pub async fn audit(
    db: &Db,
    js: &jetstream::Context,
    batch_max: usize,
    live: &str,
) -> Result<Audit, ProjectionError> {
    let copy = format!("{}_live", db.schema());
    if !crate::db::valid_schema(live) || !crate::db::valid_schema(&copy) || copy == live {
        return Err(ProjectionError::Config(format!(
            "cannot audit schema {live:?} from {:?}",
            db.schema()
        )));
    }
    let until: HashMap<String, u64> = {
        let mut c = db.client().await?;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await?;
        tx.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {copy} CASCADE; CREATE SCHEMA {copy}"
        ))
        .await?;
        for table in READ_MODEL_TABLES {
            tx.batch_execute(&format!(
                "CREATE TABLE {copy}.{table} AS TABLE {live}.{table}"
            ))
            .await?;
        }
        let rows = tx
            .query(
                &format!("SELECT stream, seq FROM {live}.projection_checkpoints"),
                &[],
            )
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
            .collect()
    };
    let streams = replay_until(db, js, batch_max, REPLAY_FOLDS, Some(&until)).await?;
    let differences = compare(db, db.schema(), &copy).await?;
    db.client()
        .await?
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {copy} CASCADE"))
        .await?;
    Ok(Audit {
        streams,
        differences,
    })
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TableDiff {
    pub table: String,
    pub only_in_left: i64,
    pub only_in_right: i64,
}

/// Rows that differ between the same table in two schemas of one database.
pub async fn compare(db: &Db, left: &str, right: &str) -> Result<Vec<TableDiff>, ProjectionError> {
    let client = db.client().await?;
    let mut out = Vec::new();
    for table in READ_MODEL_TABLES {
        let q = |a: &str, b: &str| {
            format!("SELECT count(*) FROM (SELECT * FROM {a}.{table} EXCEPT ALL SELECT * FROM {b}.{table}) d")
        };
        let l: i64 = client.query_one(&q(left, right), &[]).await?.get(0);
        let r: i64 = client.query_one(&q(right, left), &[]).await?.get(0);
        out.push(TableDiff {
            table: table.to_owned(),
            only_in_left: l,
            only_in_right: r,
        });
    }
    Ok(out)
}
