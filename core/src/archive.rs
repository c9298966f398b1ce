//! Full task logs to the object store when a task ends, so that the log
//! stream can keep a bounded window. One object per task,
//! `projects/<project>/tasks/<task>/logs/task.log`: every chunk's text in
//! stream order, each attempt under a header line. A durable consumer on the
//! task stream's terminal events drives it; a task whose archive cannot be
//! written is tried again later, never skipped. After each archive a core
//! NATS notice `ud.sys.log_archived.<task_id>` carries the object's key.

use std::io::Write;
use std::time::Duration;

use async_nats::jetstream::{consumer, AckKind};
use futures::StreamExt;
use tracing::{info, warn};
use ud_schemas::{streams, TaskId};
use ud_storage::{keys, Stores};

use crate::EventStore;

pub const CONSUMER: &str = "log-archiver";
pub const NOTICE_PREFIX: &str = "ud.sys.log_archived";

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("nats: {0}")]
    Nats(#[source] crate::store::NatsError),
    #[error(transparent)]
    Storage(#[from] ud_storage::StorageError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Store(#[from] crate::StoreError),
}

fn nats(e: impl Into<crate::store::NatsError>) -> ArchiveError {
    ArchiveError::Nats(e.into())
}

/// The archive's key for a task of `project`.
pub fn log_key(project: &str, task: &TaskId) -> Result<String, ud_storage::StorageError> {
    Ok(format!(
        "{}logs/task.log",
        keys::task_prefix(project, &task.to_string())?
    ))
}

/// Archives logs of tasks as they end; binds its consumer again after any
/// failure (the hub's accounts reload while nodes enrol, for instance).
pub async fn run(store: EventStore, storage: Stores) -> Result<(), ArchiveError> {
    use backon::BackoffBuilder;
    let schedule = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(13))
        .without_max_times();
    let mut delays = schedule.build();
    loop {
        match consume(&store, &storage).await {
            Ok(()) => delays = schedule.build(),
            Err(e) => warn!(error = %e, "log archiver interrupted; binding again"),
        }
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(13))).await;
    }
}

async fn consume(store: &EventStore, storage: &Stores) -> Result<(), ArchiveError> {
    let stream = store
        .jetstream()
        .get_stream(streams::TASKS)
        .await
        .map_err(nats)?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                filter_subjects: ud_schemas::subjects::task_end_filters(),
                ack_wait: Duration::from_secs(120),
                max_ack_pending: 16,
                ..Default::default()
            },
        )
        .await
        .map_err(nats)?;
    let mut messages = streams::pull(&consumer).await.map_err(nats)?;
    while let Some(m) = messages.next().await {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "archive consumer error");
                continue;
            }
        };
        let Some(task) = m
            .subject
            .split('.')
            .nth(2)
            .and_then(|t| t.parse::<TaskId>().ok())
        else {
            let _ = m.ack().await;
            continue;
        };
        match archive(store, storage, task).await {
            Ok(Some(key)) => {
                let _ = store
                    .client()
                    .publish(format!("{NOTICE_PREFIX}.{task}"), key.into())
                    .await;
                let _ = m.ack().await;
            }
            Ok(None) => {
                let _ = m.ack().await;
            }
            Err(e) => {
                warn!(task_id = %task, error = %e, "log not archived; trying again later");
                let _ = m
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(15))))
                    .await;
            }
        }
    }
    Ok(())
}

/// Writes one task's log to the store; `None` when the task is unknown.
pub async fn archive(
    store: &EventStore,
    stores: &Stores,
    task: TaskId,
) -> Result<Option<String>, ArchiveError> {
    let Some((t, _)) = store.load_task(&task).await? else {
        return Ok(None);
    };
    // The log goes where the task's files go.
    let storage = stores.of(t.project.as_str(), t.spec.store.as_deref())?;
    let key = log_key(t.project.as_str(), &task)?;
    // Spooled to a file, so that a long log is never held in memory.
    let mut file = tempfile::NamedTempFile::new()?;
    let (mut after, mut attempt, mut bytes) = (0u64, 0u32, 0u64);
    loop {
        let page = store.log_chunks(&task, after, 5000).await?;
        let Some((last, _)) = page.last() else { break };
        after = *last;
        for (_, chunk) in page {
            if chunk.attempt != attempt {
                attempt = chunk.attempt;
                writeln!(file, "=== attempt {attempt} ===")?;
            }
            file.write_all(chunk.text.as_bytes())?;
            bytes += chunk.text.len() as u64;
        }
    }
    file.flush()?;
    storage
        .put_file(&key, file.path(), "text/plain; charset=utf-8")
        .await?;
    info!(task_id = %task, bytes, "log archived");
    Ok(Some(key))
}
