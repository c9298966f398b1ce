//! The runs and cancels the hub sends this node, pulled through the leaf
//! link from the node's own consumer on `UD_DISPATCH`.

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tracing::{info, warn};
use ud_schemas::dispatch::{self, DispatchCancel, DispatchRun};
use ud_schemas::events::TaskCancelled;
use ud_schemas::report::RunReport;
use ud_schemas::{edge, now_millis, streams};

use crate::{nats, run, Agent, AgentError};

/// Handles dispatches until the consumer fails.
pub(crate) async fn pull(
    hub: &jetstream::Context,
    agent: &Agent,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(), AgentError> {
    let node = agent.cfg.node_id;
    let consumer: consumer::PullConsumer = hub
        .get_consumer_from_stream(edge::dispatch_consumer(&node), edge::DISPATCH)
        .await
        .map_err(nats)?;
    let mut messages = streams::pull(&consumer).await.map_err(nats)?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(nats)?;
        let kind = m.subject.rsplit('.').next().unwrap_or_default();
        match kind {
            "run" => match dispatch::from_cbor::<DispatchRun>(&m.payload, "dispatch-run") {
                Ok(r) => run::start(agent, r, tasks).await,
                Err(e) => warn!(subject = %m.subject, error = %e, "undecodable dispatch dropped"),
            },
            "cancel" => {
                match dispatch::from_cbor::<DispatchCancel>(&m.payload, "dispatch-cancel") {
                    Ok(c) => cancel(agent, c).await,
                    Err(e) => warn!(subject = %m.subject, error = %e, "undecodable cancel dropped"),
                }
            }
            other => warn!(kind = other, "unknown dispatch kind dropped"),
        }
        if let Err(e) = m.ack().await {
            warn!(error = %e, "dispatch ack failed");
        }
    }
    Ok(())
}

/// Stops a run this node has; confirms at once a cancel of one it has not
/// (a run refused as stale, or one that never came). A cancel of another
/// attempt than the one running leaves the run be.
async fn cancel(agent: &Agent, c: DispatchCancel) {
    let task = c.task_id;
    let stop = {
        let mut running = agent.running.lock().await;
        match (running.get(&task), c.attempt) {
            (Some((runs, _)), Some(wanted)) if *runs != wanted => {
                info!(task_id = %task, attempt = wanted, running = *runs, "a cancel of another attempt left the run be");
                return;
            }
            _ => running.remove(&task).map(|(_, stop)| stop),
        }
    };
    match stop {
        Some(stop) => {
            let _ = stop.send(c);
        }
        None => {
            let cancelled = RunReport::Cancelled(TaskCancelled {
                at: now_millis(),
                reason: c.reason,
            });
            // Naming the attempt, the platform refuses it for any other.
            let recorded = match c.attempt {
                Some(attempt) => agent.reporter.outcome(task, attempt, cancelled).await,
                None => agent.reporter.run(task, cancelled).await,
            };
            if let Err(e) = recorded {
                warn!(task_id = %task, error = %e, "cannot record a cancel");
            }
        }
    }
}
