//! The JetStream event store: append with optimistic concurrency per
//! aggregate, and load an aggregate's events back.

use async_nats::jetstream::{
    self, context::PublishErrorKind, message::PublishMessage, stream::DirectGetErrorKind,
};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use tracing::debug;
use ud_schemas::codec::{self, CodecError, EventEnvelope, EventMeta};
use ud_schemas::headers::{EXPECTED_LAST_SUBJECT_SEQUENCE, EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT};
use ud_schemas::{streams, subjects, Event, TaskId};

use crate::task::Task;

/// What the appender expects of the aggregate's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// No check (events that do not depend on state, e.g. heartbeats).
    Any,
    /// The aggregate has no events yet.
    New,
    /// The aggregate's last event is at this stream sequence.
    LastSeq(u64),
}

/// Any error of the NATS client, kept as the source.
pub type NatsError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("concurrent change: the aggregate moved on since it was read")]
    Conflict,
    /// JetStream has no room for the write.
    #[error("the event store is out of space ({0}); nothing was recorded")]
    Full(#[source] NatsError),
    #[error("event store unavailable: {0}")]
    Unavailable(#[source] NatsError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stored event at sequence {seq} cannot be read: {source}")]
    Corrupt {
        seq: u64,
        #[source]
        source: CodecError,
    },
}

/// An event read back from a stream.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub seq: u64,
    pub subject: String,
    /// When the server stored it.
    pub stored_at: String,
    pub envelope: EventEnvelope,
}

#[derive(Clone)]
pub struct EventStore {
    client: async_nats::Client,
    js: jetstream::Context,
}

/// What the server answered, when it was a JetStream error.
fn jetstream_code(e: &(dyn std::error::Error + 'static)) -> Option<jetstream::ErrorCode> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(js) = c.downcast_ref::<jetstream::Error>() {
            return Some(js.error_code());
        }
        cause = c.source();
    }
    None
}

pub(crate) fn unavailable(e: impl Into<NatsError>) -> StoreError {
    let e = e.into();
    // JetStream refuses a write it has no room for: say so plainly.
    match jetstream_code(e.as_ref()) {
        Some(
            jetstream::ErrorCode::INSUFFICIENT_RESOURCES
            | jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED
            | jetstream::ErrorCode::MEMORY_RESOURCES_EXCEEDED
            | jetstream::ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
        ) => StoreError::Full(e),
        _ => StoreError::Unavailable(e),
    }
}

/// A refused or failed publish: a lost concurrency race is a conflict.
fn publish_error(e: jetstream::context::PublishError) -> StoreError {
    match e.kind() {
        PublishErrorKind::WrongLastSequence => StoreError::Conflict,
        _ => unavailable(e),
    }
}

impl EventStore {
    /// `domain` is the JetStream domain to address (`None` on the hub itself).
    pub fn new(client: async_nats::Client, domain: Option<&str>) -> Self {
        let js = match domain {
            Some(d) => jetstream::with_domain(client.clone(), d),
            None => jetstream::new(client.clone()),
        };
        Self { client, js }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Creates the platform's streams and buckets, or brings their config up to date.
    pub async fn ensure_streams(&self, replicas: usize) -> Result<(), StoreError> {
        for config in streams::all(replicas) {
            match self.js.get_stream(&config.name).await {
                Ok(_) => {
                    self.js.update_stream(&config).await.map_err(unavailable)?;
                }
                Err(_) => {
                    self.js.create_stream(config).await.map_err(unavailable)?;
                }
            }
        }
        // Buckets: (name, what it maps, history kept per key, age limit).
        let day = std::time::Duration::from_secs(24 * 3600);
        let buckets = [
            (
                streams::IDEMPOTENCY_BUCKET,
                "(project, Idempotency-Key) -> task id",
                1,
                7 * day,
            ),
            (
                streams::SECRETS_BUCKET,
                "<project>.<NAME> -> project secret, encrypted",
                1,
                std::time::Duration::ZERO,
            ),
            (
                streams::QUEUES_BUCKET,
                "queue name -> priority and limit set through the API",
                16,
                std::time::Duration::ZERO,
            ),
            (
                streams::QUOTAS_BUCKET,
                "project -> compute quota set through the API",
                16,
                std::time::Duration::ZERO,
            ),
            (
                streams::WEBHOOKS_BUCKET,
                "<project>.<name> -> project webhook",
                1,
                std::time::Duration::ZERO,
            ),
            (
                streams::NOTIFIED_BUCKET,
                "quota.<project>.<limit> -> told lately (kept an hour)",
                1,
                std::time::Duration::from_secs(3600),
            ),
        ];
        for (bucket, description, history, max_age) in buckets {
            self.js
                .create_key_value(jetstream::kv::Config {
                    bucket: bucket.into(),
                    description: description.into(),
                    history,
                    max_age,
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    fn message(
        event: &Event,
        meta: &EventMeta,
        expect: Expect,
    ) -> Result<PublishMessage, StoreError> {
        let (headers, payload) = codec::encode_message(event, meta)?;
        let mut msg = PublishMessage::build()
            .headers(headers)
            .payload(Bytes::from(payload));
        let scope = match event {
            Event::Task(id, _) => subjects::task_all(id),
            Event::Node(id, _) => subjects::node_all(id),
            Event::Auth(id, _) => subjects::token_all(id),
            Event::Secret(s, _) => subjects::secret_all(s),
            Event::Pipeline(id, _) => subjects::pipeline_all(id),
            Event::Schedule(id, _) => subjects::schedule_all(id),
            Event::Project(p, _) => subjects::project_all(p),
        };
        let seq = match expect {
            Expect::Any => return Ok(msg),
            Expect::New => 0,
            Expect::LastSeq(s) => s,
        };
        msg = msg
            .header(EXPECTED_LAST_SUBJECT_SEQUENCE, seq.to_string().as_str())
            .header(EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT, scope.as_str());
        Ok(msg)
    }

    /// Appends one event; returns its stream sequence.
    pub async fn append(
        &self,
        event: &Event,
        meta: &EventMeta,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        let msg = Self::message(event, meta, expect)?;
        let ack = self
            .js
            .send_publish(event.subject(), msg)
            .await
            .map_err(unavailable)?
            .await
            .map_err(publish_error)?;
        debug!(seq = ack.sequence, subject = %event.subject(), "appended");
        Ok(ack.sequence)
    }

    /// Appends events of one aggregate in order, each expecting the one before.
    pub async fn append_all(
        &self,
        events: &[Event],
        meta: &EventMeta,
        expect: Expect,
    ) -> Result<Option<u64>, StoreError> {
        let mut expect = expect;
        let mut last = None;
        let mut meta = meta.clone();
        for e in events {
            let seq = self.append(e, &meta, expect).await?;
            expect = Expect::LastSeq(seq);
            last = Some(seq);
            meta = meta.next();
        }
        Ok(last)
    }

    /// Appends many independent events, keeping up to `window` publishes in
    /// flight (a sliding window, so the server always has work); returns each
    /// one's sequence, in the order given.
    pub async fn append_pipelined(
        &self,
        items: Vec<(Event, EventMeta, Expect)>,
        window: usize,
    ) -> Vec<Result<u64, StoreError>> {
        let mut out: Vec<Option<Result<u64, StoreError>>> = Vec::with_capacity(items.len());
        out.resize_with(items.len(), || None);
        self.append_each(items, window, |i, r| out[i] = Some(r))
            .await;
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Unavailable("publish not sent".into()))))
            .collect()
    }

    /// [`Self::append_pipelined`] that hands each result to `done` (with the
    /// index of its event) as soon as it arrives, so that a caller can act on
    /// the first events stored while the last ones are still on their way.
    pub async fn append_each<F>(
        &self,
        items: Vec<(Event, EventMeta, Expect)>,
        window: usize,
        mut done: F,
    ) where
        F: FnMut(usize, Result<u64, StoreError>),
    {
        let mut ready = Vec::with_capacity(items.len());
        for (i, (event, meta, expect)) in items.iter().enumerate() {
            match Self::message(event, meta, *expect) {
                Ok(msg) => ready.push((i, event.subject(), msg)),
                Err(e) => done(i, Err(e)),
            }
        }
        publish_each(&self.js, futures::stream::iter(ready), window, |i, r| {
            done(i, r.map(|a| a.sequence).map_err(publish_error))
        })
        .await;
    }

    /// Every event on `filter` in `stream`, in order (direct gets; meant for
    /// one aggregate's history, not for whole streams).
    pub async fn read_subject(
        &self,
        stream: &str,
        filter: &str,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let stream = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        let mut next = 1u64;
        loop {
            let msg = match stream.direct_get_next_for_subject(filter, Some(next)).await {
                Ok(m) => m,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(unavailable(e)),
            };
            next = msg.sequence + 1;
            let envelope =
                codec::decode_message(msg.subject.as_str(), Some(&msg.headers), &msg.payload)
                    .map_err(|source| StoreError::Corrupt {
                        seq: msg.sequence,
                        source,
                    })?;
            out.push(StoredEvent {
                seq: msg.sequence,
                subject: msg.subject.to_string(),
                stored_at: msg.time.to_string(),
                envelope,
            });
        }
        Ok(out)
    }

    /// Up to `max` of a task's log chunks after log-stream sequence `after`,
    /// in order, each with its sequence (undecodable chunks are skipped).
    pub async fn log_chunks(
        &self,
        task: &TaskId,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, ud_schemas::dispatch::LogChunk)>, StoreError> {
        let stream = self
            .js
            .get_stream_no_info(ud_schemas::streams::LOGS)
            .await
            .map_err(unavailable)?;
        let subject = ud_schemas::subjects::log(task);
        let (mut out, mut next) = (Vec::new(), after.saturating_add(1));
        while out.len() < max {
            match stream
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
            {
                Ok(m) => {
                    next = m.sequence + 1;
                    if let Ok(chunk) = ud_schemas::dispatch::from_cbor(&m.payload, "log-chunk") {
                        out.push((m.sequence, chunk));
                    }
                }
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(out)
    }

    /// The project a task was submitted to and who submitted it (the
    /// actor of its `submitted` event), if there is such a task.
    pub async fn task_origin(
        &self,
        id: &TaskId,
    ) -> Result<Option<(ud_schemas::ProjectId, String)>, StoreError> {
        let submitted = self
            .read_subject(
                ud_schemas::streams::TASKS,
                &ud_schemas::subjects::task_event(id, "submitted"),
            )
            .await?;
        Ok(submitted
            .into_iter()
            .next()
            .and_then(|e| match e.envelope.event {
                ud_schemas::Event::Task(_, ud_schemas::TaskEvent::Submitted(s)) => {
                    Some((s.project, e.envelope.meta.actor))
                }
                _ => None,
            }))
    }

    /// A task folded from its stream, with the sequence of its last event.
    pub async fn load_task(&self, id: &TaskId) -> Result<Option<(Task, u64)>, StoreError> {
        crate::aggregate::Repository::<Task>::new(self.clone())
            .load(id)
            .await
    }
}

/// Publishes what `messages` yields, in order, until it ends, keeping up to
/// `window` of them awaiting their acknowledgement, and hands each result to
/// `done` (with the key it was given) as it arrives.
///
/// The client lets only so many publishes await acknowledgement on a
/// connection (async-nats: 5,000) and makes the next one wait for a free
/// slot. A pipeline that waited for a slot while holding acknowledgements it
/// does not read would never free its own, and pipelines holding each other's
/// slots would all stop: so while waiting to send, the acknowledgements that
/// arrived are taken.
pub async fn publish_each<K, S, F>(
    js: &jetstream::Context,
    mut messages: S,
    window: usize,
    mut done: F,
) where
    S: futures::Stream<Item = (K, String, PublishMessage)> + Unpin,
    F: FnMut(K, Result<jetstream::publish::PublishAck, jetstream::context::PublishError>),
{
    let mut inflight = FuturesUnordered::new();
    loop {
        while inflight.len() >= window.max(1) {
            if let Some((key, result)) = inflight.next().await {
                done(key, result);
            }
        }
        let next = tokio::select! {
            biased;
            Some((key, result)) = inflight.next(), if !inflight.is_empty() => {
                done(key, result);
                continue;
            }
            next = messages.next() => next,
        };
        let Some((key, subject, msg)) = next else {
            break;
        };
        let send = js.send_publish(subject, msg);
        tokio::pin!(send);
        let sent = loop {
            tokio::select! {
                biased;
                sent = &mut send => break sent,
                Some((key, result)) = inflight.next(), if !inflight.is_empty() => done(key, result),
            }
        };
        match sent {
            Ok(ack) => inflight.push(async move { (key, ack.await) }),
            Err(e) => done(key, Err(e)),
        }
    }
    while let Some((key, result)) = inflight.next().await {
        done(key, result);
    }
}
