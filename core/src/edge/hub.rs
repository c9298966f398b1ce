//! Keeps the hub in step with the enrolled nodes: its account file (reloaded
//! with SIGHUP), the stream `UD_EDGE_IN` nodes forward their reports to and
//! one dispatch consumer per node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use backon::{BackoffBuilder, Retryable};
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
    /// The hub's system-account user: revocation closes leaf links through it.
    pub system_user: Option<(String, String)>,
    /// Address of the hub (without credentials), for the system user.
    pub hub_addr: String,
    pub replicas: usize,
}

/// How long the reconciler waits for a further enrolment before it writes
/// the accounts and reloads the hub.
const QUIET: Duration = Duration::from_millis(200);

/// Writes the accounts file and asks the hub to reload it.
pub fn write_accounts(
    settings: &HubSettings,
    hashes: &Hashes,
    nodes: &[NodeUser],
) -> Result<(), EdgeError> {
    let system = match (&settings.system_user, &hashes.system) {
        (Some((user, _)), Some(h)) => Some(hubconf::SystemUser {
            user: user.clone(),
            password_hash: h.clone(),
        }),
        _ => None,
    };
    let text = hubconf::accounts_with_system(
        &settings.platform_user,
        &hashes.platform,
        nodes,
        system.as_ref(),
    );
    let tmp = settings.accounts_file.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &settings.accounts_file)?;
    if let Some(pid_file) = &settings.pid_file {
        let pid = std::fs::read_to_string(pid_file)?;
        let status = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(pid.trim())
            .status()?;
        if !status.success() {
            return Err(EdgeError::Hub(format!(
                "cannot signal the hub (pid {})",
                pid.trim()
            )));
        }
    }
    Ok(())
}

/// Password hashes of the hub's own users, kept stable across rewrites.
pub struct Hashes {
    pub platform: String,
    pub system: Option<String>,
}

/// Closes every leaf link: nodes still enrolled reconnect within a second,
/// revoked ones are refused. (The hub keeps established links on reload.)
async fn close_leaf_links(settings: &HubSettings, keep: usize) -> Result<(), EdgeError> {
    let Some((user, password)) = &settings.system_user else {
        tracing::warn!(
            "no system user configured: a revoked node keeps its current link until it drops"
        );
        return Ok(());
    };
    let sys = async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        .connect(settings.hub_addr.as_str())
        .await
        .map_err(nats_err)?;
    let idz = sys
        .request("$SYS.REQ.SERVER.PING.IDZ", "".into())
        .await
        .map_err(nats_err)?;
    let idz: serde_json::Value =
        serde_json::from_slice(&idz.payload).map_err(|e| EdgeError::Hub(e.to_string()))?;
    let server = idz["id"]
        .as_str()
        .or_else(|| idz["data"]["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    if server.is_empty() {
        return Err(EdgeError::Hub("the hub did not say its server id".into()));
    }
    // The reload may still be under way: kick until no more links remain than enrolled nodes.
    for round in 0..20 {
        let leafz = sys
            .request(format!("$SYS.REQ.SERVER.{server}.LEAFZ"), "{}".into())
            .await
            .map_err(nats_err)?;
        let leafz: serde_json::Value =
            serde_json::from_slice(&leafz.payload).map_err(|e| EdgeError::Hub(e.to_string()))?;
        let leafs: Vec<u64> = leafz["data"]["leafs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["id"].as_u64())
            .collect();
        if round > 0 && leafs.len() <= keep {
            return Ok(());
        }
        for cid in leafs {
            let body = serde_json::json!({ "cid": cid }).to_string();
            sys.request(format!("$SYS.REQ.SERVER.{server}.KICK"), body.into())
                .await
                .map_err(nats_err)?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(EdgeError::Hub("revoked links keep coming back".into()))
}

/// Nodes whose dispatch consumer is known to exist on the hub.
type Consumers = std::collections::HashSet<NodeId>;

async fn reconcile(
    js: &jetstream::Context,
    settings: &HubSettings,
    hashes: &Hashes,
    active: &BTreeMap<NodeId, String>,
    revoked: &[NodeId],
    consumers: &mut Consumers,
) -> Result<(), EdgeError> {
    let users: Vec<NodeUser> = active
        .iter()
        .map(|(id, h)| NodeUser {
            id: *id,
            secret_hash: h.clone(),
        })
        .collect();
    write_accounts(settings, hashes, &users)?;
    if !revoked.is_empty() {
        // The hub answers system requests again shortly after a reload.
        let result = (|| close_leaf_links(settings, active.len()))
            .retry(
                backon::ConstantBuilder::default()
                    .with_delay(Duration::from_millis(100))
                    .with_max_times(50),
            )
            .notify(|e, _| tracing::debug!(error = %e, "closing leaf links failed; retrying"))
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot close the revoked nodes' links");
        }
    }
    retry_streams(js, settings, active, revoked, consumers).await
}

/// Brings `UD_EDGE_IN` and the dispatch consumers in step with the
/// enrolled nodes, retried while the hub's JetStream is briefly unavailable
/// to the account (as during a reload).
async fn retry_streams(
    js: &jetstream::Context,
    settings: &HubSettings,
    active: &BTreeMap<NodeId, String>,
    revoked: &[NodeId],
    consumers: &mut Consumers,
) -> Result<(), EdgeError> {
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(30)
        .build();
    let mut tries = 0u32;
    loop {
        tries += 1;
        match reconcile_streams(js, settings, active, revoked, consumers).await {
            Ok(()) => return Ok(()),
            Err(e) => match delays.next() {
                // Said aloud when it lasts: a reconcile held up holds joins.
                Some(delay) if tries.is_multiple_of(5) => {
                    warn!(error = %e, tries, "hub still not ready for its streams; retrying");
                    tokio::time::sleep(delay).await;
                }
                Some(delay) => {
                    tracing::debug!(error = %e, "hub not ready; retrying");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(e),
            },
        }
    }
}

async fn reconcile_streams(
    js: &jetstream::Context,
    settings: &HubSettings,
    active: &BTreeMap<NodeId, String>,
    revoked: &[NodeId],
    consumers: &mut Consumers,
) -> Result<(), EdgeError> {
    let config = streams::edge_in(settings.replicas);
    match js.get_stream(edge::EDGE_IN).await {
        // A hub from before nodes forwarded their reports sourced each
        // node's stream instead: it takes the forwarded subjects now.
        Ok(s) if !takes_forwarded(s.cached_info(), &config) => js
            .update_stream(&config)
            .await
            .map(|_| ())
            .map_err(nats_err)?,
        Ok(_) => {}
        Err(_) => js
            .create_stream(config)
            .await
            .map(|_| ())
            .map_err(nats_err)?,
    }
    let dispatch = js.get_stream(edge::DISPATCH).await.map_err(nats_err)?;
    let missing: Vec<NodeId> = active
        .keys()
        .filter(|id| !consumers.contains(id))
        .copied()
        .collect();
    for id in &missing {
        let name = edge::dispatch_consumer(id);
        dispatch
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: edge::dispatch_filter(id),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    ..Default::default()
                },
            )
            .await
            .map_err(nats_err)?;
        consumers.insert(*id);
    }
    for id in revoked {
        let _ = dispatch.delete_consumer(&edge::dispatch_consumer(id)).await;
        consumers.remove(id);
    }
    Ok(())
}

/// The platform user's password hash as the current accounts file has it:
/// kept verbatim, because a changed entry makes the hub drop the platform's
/// own connections on reload.
fn current_hash(settings: &HubSettings, user: &str, password: &str) -> Option<String> {
    let text = std::fs::read_to_string(&settings.accounts_file).ok()?;
    let marker = format!("user: {}, password: \"", serde_json::to_string(user).ok()?);
    let rest = text.split(&marker).nth(1)?;
    let hash = rest.split('"').next()?;
    bcrypt::verify(password, hash)
        .ok()?
        .then(|| hash.to_owned())
}

fn stable_hash(settings: &HubSettings, user: &str, password: &str) -> Result<String, EdgeError> {
    match current_hash(settings, user, password) {
        Some(h) => Ok(h),
        None => Ok(bcrypt::hash(password, 6)?),
    }
}

/// Whether `UD_EDGE_IN` as it stands takes what nodes forward.
fn takes_forwarded(info: &jetstream::stream::Info, wanted: &jetstream::stream::Config) -> bool {
    info.config.subjects == wanted.subjects
        && info.config.subject_transform == wanted.subject_transform
        && info.config.allow_atomic_publish == wanted.allow_atomic_publish
        && info.config.sources.as_ref().is_none_or(Vec::is_empty)
}

/// Follows enrollments and revocations and reconciles the hub after each
/// change.
pub async fn run(store: EventStore, settings: HubSettings) -> Result<(), EdgeError> {
    let hashes = Hashes {
        platform: stable_hash(
            &settings,
            &settings.platform_user,
            &settings.platform_password,
        )?,
        system: match &settings.system_user {
            Some((u, p)) => Some(stable_hash(&settings, u, p)?),
            None => None,
        },
    };
    let js = store.jetstream().clone();
    let s = js.get_stream(streams::NODES).await.map_err(nats_err)?;
    let consumer = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subjects: vec!["ud.node.*.enrolled".into(), "ud.node.*.revoked".into()],
            max_expires: streams::PULL_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.map_err(nats_err)?;
    let mut active: BTreeMap<NodeId, String> = BTreeMap::new();
    let mut revoked: Vec<NodeId> = Vec::new();
    let mut consumers = Consumers::new();
    // Whether the node events stored before this start were all read.
    let mut replayed = pending == 0;
    if pending == 0 {
        reconcile(&js, &settings, &hashes, &active, &revoked, &mut consumers).await?;
    }
    // Enrolled since the last reconcile: reconciled once no more arrive
    // for QUIET, so that enrolments one after another cost one reload of
    // the hub, not one each (a reload of many users takes the hub seconds,
    // and links are refused meanwhile).
    let mut reconcile_at: Option<tokio::time::Instant> = None;
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            next = messages.next() => {
                let Some(m) = next else { break };
                let m = m.map_err(nats_err)?;
                let (seq, more) = m
                    .info()
                    .map(|i| (i.stream_sequence, i.pending))
                    .unwrap_or((0, 0));
                let mut changed = false;
                match ud_schemas::codec::decode_message(
                    m.subject.as_str(),
                    m.headers.as_ref(),
                    &m.payload,
                ) {
                    Ok(env) => match env.event {
                        Event::Node(id, NodeEvent::Enrolled(e)) => {
                            changed = true;
                            active.insert(id, e.secret_hash);
                        }
                        Event::Node(id, NodeEvent::Revoked(_)) => {
                            changed = true;
                            active.remove(&id);
                            revoked.push(id);
                        }
                        _ => {}
                    },
                    Err(e) => warn!(seq, error = %e, "undecodable node event"),
                }
                // A stored burst is reconciled once, after the last of it is read.
                if (changed || !replayed) && (more == 0 || reconcile_at.is_some()) {
                    reconcile_at = Some(tokio::time::Instant::now() + QUIET);
                }
                if more == 0 {
                    replayed = true;
                }
            }
            () = tokio::time::sleep_until(reconcile_at.unwrap_or(far)), if reconcile_at.is_some() => {
                let reconciled = tokio::time::timeout(
                    RECONCILE_WITHIN,
                    reconcile(&js, &settings, &hashes, &active, &revoked, &mut consumers),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(EdgeError::Hub(format!(
                        "reconcile not done within {} s",
                        RECONCILE_WITHIN.as_secs()
                    )))
                });
                if let Err(e) = reconciled {
                    consumers.clear();
                    return Err(e);
                }
                revoked.clear();
                reconcile_at = None;
                info!(nodes = active.len(), "hub accounts and streams reconciled");
            }
        }
    }
    Ok(())
}

/// How long one reconcile may take before the hub starts over (the
/// supervisor runs it again from the enrolments).
const RECONCILE_WITHIN: Duration = Duration::from_secs(90);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_that_sources_nodes_is_taken_over() {
        let wanted = streams::edge_in(1);
        let mut info: jetstream::stream::Info = serde_json::from_value(serde_json::json!({
            "config": wanted,
            "created": "2026-01-01T00:00:00Z",
            "state": {
                "messages": 0, "bytes": 0, "first_seq": 0, "first_ts": "2026-01-01T00:00:00Z",
                "last_seq": 0, "last_ts": "2026-01-01T00:00:00Z", "consumer_count": 0
            }
        }))
        .expect("a stream info");
        assert!(takes_forwarded(&info, &wanted));
        let mut one_by_one = info.clone();
        one_by_one.config.allow_atomic_publish = false;
        assert!(!takes_forwarded(&one_by_one, &wanted));
        info.config.subjects = vec![];
        info.config.subject_transform = None;
        info.config.sources = Some(vec![jetstream::stream::Source {
            name: "EDGE_ab12".into(),
            ..Default::default()
        }]);
        assert!(!takes_forwarded(&info, &wanted));
    }
}
