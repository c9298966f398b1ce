//! What the node reports, published into its own stream (kept while the
//! uplink is down, then sourced by the hub): reports about itself and its
//! runs, and the runs' output.

use async_nats::jetstream;
use bytes::Bytes;
use tracing::warn;
use ud_schemas::codec::EventMeta;
use ud_schemas::dispatch;
use ud_schemas::events::TaskPreparing;
use ud_schemas::report::{Report, RunReport};
use ud_schemas::{edge, headers, now_millis, NodeId, TaskId};

use crate::{nats, AgentError};

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

    /// [`Reporter::send`], naming the attempt an outcome is about.
    async fn publish(&self, report: Report, attempt: Option<u32>) -> Result<(), AgentError> {
        let meta = EventMeta::new(format!("node:{}", self.node));
        let (subject, mut headers, payload) = report.encode(&self.node, &meta)?;
        if let Some(a) = attempt {
            headers.insert(ud_schemas::headers::ATTEMPT, a.to_string().as_str());
        }
        self.local
            .publish_with_headers(subject, headers, Bytes::from(payload))
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        Ok(())
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

    /// Publishes a chunk of a run's output.
    pub async fn log(
        &self,
        task: TaskId,
        attempt: u32,
        stream: &str,
        text: String,
        engine_time: Option<&str>,
    ) -> Result<(), AgentError> {
        let chunk = dispatch::LogChunk {
            at: now_millis(),
            attempt,
            stream: stream.to_owned(),
            text,
        };
        let mut h = async_nats::HeaderMap::new();
        if let Some(t) = engine_time {
            h.insert(headers::LOG_TIME, t);
        }
        self.local
            .publish_with_headers(
                Report::Log(task).subject(&self.node),
                h,
                Bytes::from(dispatch::to_cbor(&chunk)?),
            )
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        Ok(())
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
