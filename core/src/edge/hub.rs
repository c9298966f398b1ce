//! Keeps the hub in step with the enrolled nodes: its account file (reloaded
//! with SIGHUP), the sources of `UD_EDGE_IN` and one dispatch consumer per node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream::External, stream::Source, stream::StreamConsumerSource};
use futures::StreamExt;
use tracing::{info, warn};
use ud_schemas::{edge, streams, Event, NodeEvent, NodeId};

use super::hubconf::{self, NodeUser};
use super::{nats_err, EdgeError};
use crate::store::EventStore;

#[derive(Clone, Debug)]
pub struct HubSettings {
    /// The accounts file the hub's configuration includes.
    pub accounts_file: PathBuf,
    /// Where the hub's PID is written (`pid_file` in its configuration), for reloads.
    pub pid_file: Option<PathBuf>,
    pub platform_user: String,
    pub platform_password: String,
    pub replicas: usize,
}

fn source(node: &NodeId) -> Source {
    Source {
        name: edge::stream(node),
        external: Some(External { api_prefix: format!("$JS.{}.API", edge::domain(node)), delivery_prefix: None }),
        consumer: Some(StreamConsumerSource { name: edge::SOURCE_CONSUMER.into(), deliver_subject: edge::deliver_subject(node) }),
        ..Default::default()
    }
}

/// Writes the accounts file and asks the hub to reload it.
pub fn write_accounts(settings: &HubSettings, platform_hash: &str, nodes: &[NodeUser]) -> Result<(), EdgeError> {
    let text = hubconf::accounts(&settings.platform_user, platform_hash, nodes);
    let tmp = settings.accounts_file.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &settings.accounts_file)?;
    if let Some(pid_file) = &settings.pid_file {
        let pid = std::fs::read_to_string(pid_file)?;
        let status = std::process::Command::new("kill").arg("-HUP").arg(pid.trim()).status()?;
        if !status.success() {
            return Err(EdgeError::Invalid(format!("cannot signal the hub (pid {})", pid.trim())));
        }
    }
    Ok(())
}

async fn reconcile(js: &jetstream::Context, settings: &HubSettings, platform_hash: &str, active: &BTreeMap<NodeId, String>, revoked: &[NodeId]) -> Result<(), EdgeError> {
    let users: Vec<NodeUser> = active.iter().map(|(id, h)| NodeUser { id: *id, secret_hash: h.clone() }).collect();
    write_accounts(settings, platform_hash, &users)?;
    let sources: Vec<Source> = active.keys().map(source).collect();
    let config = streams::edge_in(settings.replicas, sources);
    match js.get_stream(edge::EDGE_IN).await {
        Ok(_) => js.update_stream(&config).await.map(|_| ()).map_err(nats_err)?,
        Err(_) => js.create_stream(config).await.map(|_| ()).map_err(nats_err)?,
    }
    let dispatch = js.get_stream(edge::DISPATCH).await.map_err(nats_err)?;
    for id in active.keys() {
        let name = edge::dispatch_consumer(id);
        dispatch
            .get_or_create_consumer(&name, consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: edge::dispatch_filter(id),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
    }
    for id in revoked {
        let _ = dispatch.delete_consumer(&edge::dispatch_consumer(id)).await;
    }
    Ok(())
}

/// Follows enrollments and revocations and reconciles the hub after each change.
pub async fn run(store: EventStore, settings: HubSettings) -> Result<(), EdgeError> {
    let platform_hash = bcrypt::hash(&settings.platform_password, 6).map_err(|e| EdgeError::Invalid(e.to_string()))?;
    let js = store.jetstream().clone();
    let mut s = js.get_stream(streams::NODES).await.map_err(nats_err)?;
    let caught_up_at = s.info().await.map_err(nats_err)?.state.last_sequence;
    let consumer = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subjects: vec!["ud.node.*.enrolled".into(), "ud.node.*.revoked".into()],
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.map_err(nats_err)?;
    let mut active: BTreeMap<NodeId, String> = BTreeMap::new();
    let mut revoked: Vec<NodeId> = Vec::new();
    if pending == 0 {
        reconcile(&js, &settings, &platform_hash, &active, &revoked).await?;
    }
    while let Some(m) = messages.next().await {
        let m = m.map_err(nats_err)?;
        pending = pending.saturating_sub(1);
        let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
        match ud_schemas::codec::decode_message(m.subject.as_str(), m.headers.as_ref(), &m.payload) {
            Ok(env) => match env.event {
                Event::Node(id, NodeEvent::Enrolled(e)) => {
                    active.insert(id, e.secret_hash);
                }
                Event::Node(id, NodeEvent::Revoked(_)) => {
                    active.remove(&id);
                    revoked.push(id);
                }
                _ => {}
            },
            Err(e) => warn!(seq, error = %e, "undecodable node event"),
        }
        if pending == 0 || seq >= caught_up_at {
            reconcile(&js, &settings, &platform_hash, &active, &revoked).await?;
            revoked.clear();
            info!(nodes = active.len(), "hub accounts and sources reconciled");
        }
    }
    Ok(())
}
