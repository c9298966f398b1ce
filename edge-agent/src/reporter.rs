//! What the node reports, published into its own stream (kept while the
//! uplink is down, then sourced by the hub): reports about itself and its
//! runs, and the runs' output.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use tracing::warn;
use ud_schemas::codec::EventMeta;
use ud_schemas::dispatch;
use ud_schemas::events::TaskPreparing;
use ud_schemas::report::{Report, RunReport};
use ud_schemas::{edge, headers, now_millis, NodeId, TaskId};

use crate::{nats, AgentError};

/// How long a log chunk or an outcome waits between tries in all; with
/// the tries themselves (an ack is waited for up to 5 s) it stays inside
/// the two minutes in which the node's stream recognises what it holds by
/// its id.
const PATIENCE: Duration = Duration::from_secs(45);

/// The id a run's log chunk is stored under. A chunk with the engine's
/// time is named by what it is (task, attempt, stream, time, text), so an
/// agent that restarts and reads it again from the engine names it alike;
/// one without (a build's output) gets a fresh id.
pub fn log_chunk_id(
    task: TaskId,
    attempt: u32,
    stream: &str,
    text: &str,
    engine_time: Option<&str>,
) -> String {
    match engine_time {
        Some(t) => {
            let mut h = blake3::Hasher::new();
            for part in [stream, t, text] {
                h.update(&(part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
            let hash = h.finalize().to_hex();
            format!("log-{task}-{attempt}-{}", &hash[..32])
        }
        None => format!("log-{task}-{attempt}-{}", uuid::Uuid::now_v7()),
    }
}

#[derive(Clone)]
pub struct Reporter {
    node: NodeId,
    local: jetstream::Context,
}

impl Reporter {
    /// Reports into `local`, the node's own JetStream (its leaf server).
    pub fn new(node: NodeId, local: jetstream::Context) -> Self {
        Self { node, local }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Publishes a report and waits until the node's stream holds it.
    pub async fn send(&self, report: Report) -> Result<(), AgentError> {
        self.publish(report, None).await
    }

    /// [`Reporter::send`], naming the attempt an outcome is about; an
    /// outcome is tried with patience, as a log chunk is.
    async fn publish(&self, report: Report, attempt: Option<u32>) -> Result<(), AgentError> {
        let meta = EventMeta::new(format!("node:{}", self.node));
        let (subject, mut headers, payload) = report.encode(&self.node, &meta)?;
        let payload = Bytes::from(payload);
        match attempt {
            Some(a) => {
                headers.insert(ud_schemas::headers::ATTEMPT, a.to_string().as_str());
                self.patiently(subject, headers, payload).await
            }
            None => self.once(subject, headers, payload).await,
        }
    }

    /// Publishes into the node's stream and waits until it holds it.
    async fn once(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<(), AgentError> {
        self.local
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        Ok(())
    }

    /// [`Reporter::once`], tried again while the leaf server does not
    /// take it (it restarts, say), [`PATIENCE`] of waits in all. The
    /// message keeps its id (`Nats-Msg-Id`) through its tries, so the
    /// node's stream keeps it once even when a try that seemed to fail was
    /// stored.
    async fn patiently(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<(), AgentError> {
        use backon::Retryable;
        (|| self.once(subject.clone(), headers.clone(), payload.clone()))
            .retry(
                backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(5))
                    .with_total_delay(Some(PATIENCE))
                    .without_max_times(),
            )
            .notify(|e, _| warn!(error = %e, subject, "not taken by the leaf server; trying again"))
            .await
    }

    /// Reports on a run.
    pub async fn run(&self, task: TaskId, report: RunReport) -> Result<(), AgentError> {
        self.send(Report::Run(task, report)).await
    }

    /// Reports a run's outcome, naming its attempt (`Ud-Attempt`): the
    /// platform refuses it when another attempt has become the task's.
    pub async fn outcome(
        &self,
        task: TaskId,
        attempt: u32,
        report: RunReport,
    ) -> Result<(), AgentError> {
        self.publish(Report::Run(task, report), Some(attempt)).await
    }

    /// Records that a preparing step began.
    pub async fn step(&self, task: TaskId, attempt: u32, name: &str) {
        let e = TaskPreparing {
            at: now_millis(),
            node_id: self.node,
            attempt,
            step: name.to_owned(),
        };
        if let Err(e) = self.run(task, RunReport::Preparing(e)).await {
            warn!(error = %e, step = name, "cannot record a preparing step");
        }
    }

    /// Publishes a chunk of a run's output, with patience.
    pub async fn log(
        &self,
        task: TaskId,
        attempt: u32,
        stream: &str,
        text: String,
        engine_time: Option<&str>,
    ) -> Result<(), AgentError> {
        let id = log_chunk_id(task, attempt, stream, &text, engine_time);
        let chunk = dispatch::LogChunk {
            at: now_millis(),
            attempt,
            stream: stream.to_owned(),
            text,
        };
        let payload = Bytes::from(dispatch::to_cbor(&chunk)?);
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, id.as_str());
        if let Some(t) = engine_time {
            h.insert(headers::LOG_TIME, t);
        }
        self.patiently(Report::Log(task).subject(&self.node), h, payload)
            .await
    }

    /// The engine's time of the last log chunk of `attempt` this node
    /// sent, read back from its own stream; `None` when it sent none.
    pub async fn log_sent_until(&self, task: TaskId, attempt: u32) -> Option<String> {
        let stream = self
            .local
            .get_stream_no_info(edge::stream(&self.node))
            .await
            .ok()?;
        let last = stream
            .get_last_raw_message_by_subject(&Report::Log(task).subject(&self.node))
            .await
            .ok()?;
        let chunk: dispatch::LogChunk = dispatch::from_cbor(&last.payload, "log-chunk").ok()?;
        if chunk.attempt != attempt {
            return None;
        }
        last.headers
            .get(headers::LOG_TIME)
            .map(|v| v.as_str().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_read_again_is_named_alike_and_others_not() {
        let task = TaskId::new();
        let t = Some("2026-01-01T00:00:00.000000001Z");
        let a = log_chunk_id(task, 1, "stdout", "line", t);
        assert_eq!(a, log_chunk_id(task, 1, "stdout", "line", t));
        assert_ne!(a, log_chunk_id(task, 2, "stdout", "line", t));
        assert_ne!(a, log_chunk_id(task, 1, "stderr", "line", t));
        assert_ne!(a, log_chunk_id(task, 1, "stdout", "line2", t));
        assert_ne!(
            a,
            log_chunk_id(
                task,
                1,
                "stdout",
                "line",
                Some("2026-01-01T00:00:00.000000002Z")
            )
        );
        // Parts are delimited: moving bytes between them changes the id.
        assert_ne!(
            log_chunk_id(task, 1, "ab", "c", t),
            log_chunk_id(task, 1, "a", "bc", t)
        );
        let b = log_chunk_id(task, 1, "build", "x", None);
        assert_ne!(b, log_chunk_id(task, 1, "build", "x", None));
    }
}
