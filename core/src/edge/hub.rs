//! Keeps the hub in step with the enrolled nodes: its account file (reloaded
//! with SIGHUP), the sources of `UD_EDGE_IN` and one dispatch consumer per node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{
    self, consumer, stream::External, stream::Source, stream::StreamConsumerSource,
};
use backon::{BackoffBuilder, Retryable};
use futures::StreamExt;
use tracing::{info, warn};
use ud_schemas::dispatch::{self, SourcingReply, SourcingStalled};
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

fn source(node: &NodeId) -> Source {
    Source {
        name: edge::stream(node),
        external: Some(External {
            api_prefix: format!("$JS.{}.API", edge::domain(node)),
            delivery_prefix: None,
        }),
        consumer: Some(StreamConsumerSource {
            name: edge::SOURCE_CONSUMER.into(),
            deliver_subject: edge::deliver_subject(node),
        }),
        ..Default::default()
    }
}

/// The streams `UD_EDGE_IN` sources as configured now.
fn configured(info: &jetstream::stream::Info) -> std::collections::HashSet<String> {
    info.config
        .sources
        .iter()
        .flatten()
        .map(|s| s.name.clone())
        .collect()
}

/// The sources `UD_EDGE_IN` is to have: the enrolled nodes that joined,
/// and those the stream sources now (another main server may have added a
/// joining node), less those held out here and `leave_out`.
fn sources_of(
    active: &BTreeMap<NodeId, String>,
    sourced: &Sourced,
    configured: &std::collections::HashSet<String>,
    leave_out: &[NodeId],
) -> Vec<Source> {
    active
        .keys()
        .filter(|id| !leave_out.contains(id) && !sourced.held_out.contains(id))
        .filter(|id| sourced.joined.contains(id) || configured.contains(&edge::stream(id)))
        .map(source)
        .collect()
}

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

/// Which enrolled nodes' streams `UD_EDGE_IN` sources: those that joined
/// (registered once, or asked for their source), less those out of it for
/// a moment while set up again.
///
/// A node's source is added when the node asks, after it made its
/// consumer, never before: nats-server's first ask of a consumer that is
/// not there yet fails, and the way it then watches the deliver subject
/// lets the consumer start delivering while it is reset, which can make
/// the hub skip the node's first reports (its registration) for good.
#[derive(Default)]
struct Sourced {
    joined: std::collections::HashSet<NodeId>,
    held_out: std::collections::HashSet<NodeId>,
}

async fn reconcile(
    js: &jetstream::Context,
    settings: &HubSettings,
    hashes: &Hashes,
    active: &BTreeMap<NodeId, String>,
    revoked: &[NodeId],
    consumers: &mut Consumers,
    sourced: &Sourced,
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
    retry_streams(js, settings, active, revoked, consumers, sourced).await
}

/// Brings `UD_EDGE_IN`'s sources and the dispatch consumers in step with the
/// enrolled nodes, retried while the hub's JetStream is briefly unavailable
/// to the account (as during a reload).
async fn retry_streams(
    js: &jetstream::Context,
    settings: &HubSettings,
    active: &BTreeMap<NodeId, String>,
    revoked: &[NodeId],
    consumers: &mut Consumers,
    sourced: &Sourced,
) -> Result<(), EdgeError> {
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(30)
        .build();
    let mut tries = 0u32;
    loop {
        tries += 1;
        match reconcile_streams(js, settings, active, revoked, consumers, sourced).await {
            Ok(()) => return Ok(()),
            Err(e) => match delays.next() {
                // Said aloud when it lasts: a reconcile held up holds joins.
                Some(delay) if tries.is_multiple_of(5) => {
                    warn!(error = %e, tries, "hub still not ready for its sources; retrying");
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
    sourced: &Sourced,
) -> Result<(), EdgeError> {
    let existing = js.get_stream(edge::EDGE_IN).await;
    let configured = existing
        .as_ref()
        .map(|s| configured(s.cached_info()))
        .unwrap_or_default();
    let sources = sources_of(active, sourced, &configured, &[]);
    let config = streams::edge_in(settings.replicas, sources);
    match existing {
        Ok(_) => js
            .update_stream(&config)
            .await
            .map(|_| ())
            .map_err(nats_err)?,
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

/// Follows enrollments and revocations and reconciles the hub after each
/// change; sets up again the sources nodes say have stalled.
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
            filter_subjects: vec![
                "ud.node.*.enrolled".into(),
                "ud.node.*.revoked".into(),
                "ud.node.*.registered".into(),
            ],
            max_expires: streams::PULL_EXPIRES,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let mut stalls = store
        .client()
        .queue_subscribe(
            format!("{}.*", edge::SOURCING_PREFIX),
            SOURCING_QUEUE.into(),
        )
        .await
        .map_err(nats_err)?;
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.map_err(nats_err)?;
    let mut active: BTreeMap<NodeId, String> = BTreeMap::new();
    let mut revoked: Vec<NodeId> = Vec::new();
    let mut consumers = Consumers::new();
    let mut stalled = Stalled::default();
    let mut sourced = Sourced::default();
    // Whether the node events stored before this start were all read.
    let mut replayed = pending == 0;
    if pending == 0 {
        reconcile(
            &js,
            &settings,
            &hashes,
            &active,
            &revoked,
            &mut consumers,
            &sourced,
        )
        .await?;
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
                // Enrolments and revocations change the hub; a registration
                // only says a node joined.
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
                            sourced.joined.remove(&id);
                        }
                        // Its reports came through its source: it stays.
                        Event::Node(id, NodeEvent::Registered(_)) => {
                            sourced.joined.insert(id);
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
                    reconcile(&js, &settings, &hashes, &active, &revoked, &mut consumers, &sourced),
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
                stalled.all_set_up(active.keys().copied());
                info!(nodes = active.len(), "hub accounts and sources reconciled");
            }
            Some(m) = stalls.next() => stalled.ask(m),
            () = tokio::time::sleep_until(stalled.put_back_at.unwrap_or(far)), if stalled.put_back_at.is_some() => {
                let held = std::mem::take(&mut sourced.held_out);
                stalled.put_back_at = None;
                retry_streams(&js, &settings, &active, &[], &mut consumers, &sourced).await?;
                info!(nodes = held.len(), "sources of stalled nodes put back");
                stalled.pace();
            }
            // Asks wait until the enrolments and registrations stored before
            // this start are read: the sources are judged on all of them.
            () = tokio::time::sleep_until(stalled.due.unwrap_or(far)), if stalled.due.is_some() && stalled.put_back_at.is_none() && replayed => {
                let answers = restart_sources(
                    &js,
                    &settings,
                    &active,
                    reconcile_at.is_some(),
                    &mut stalled,
                    &mut consumers,
                    &mut sourced,
                )
                .await;
                for (reply, answer) in answers {
                    match dispatch::to_cbor(&answer) {
                        Ok(bytes) => {
                            if let Err(e) = store.client().publish(reply, bytes.into()).await {
                                warn!(error = %e, "sourcing reply not sent");
                            }
                        }
                        Err(e) => warn!(error = %e, "sourcing reply not encoded"),
                    }
                }
            }
        }
    }
    Ok(())
}

/// How long one reconcile may take before the hub starts over (the
/// supervisor runs it again from the enrolments): the nodes' asks wait
/// meanwhile.
const RECONCILE_WITHIN: Duration = Duration::from_secs(90);

/// The queue group that answers nodes whose sourcing stalled: one main
/// server sets each source up again.
const SOURCING_QUEUE: &str = "unidesk-hub-sourcing";

/// How often the hub sets up one node's source again at most: its time
/// out of the stream ([`HOLD_OUT`]) and nats-server's time to bind it, with
/// room.
pub const RESTART_EVERY: Duration = Duration::from_secs(20);

/// How long the hub gathers stalled nodes before it sets their sources up
/// again together: after a hub restart every node may ask at once, and two
/// stream updates serve them all.
const GATHER: Duration = Duration::from_millis(500);

/// A source the hub has heard from this recently is working.
const HEARD: Duration = Duration::from_secs(5);

/// How long a source set up again stays out of `UD_EDGE_IN` before it is
/// put back. nats-server waits up to 5 s for a node's answer to a reset of
/// its consumer and then looks the source up by name: a source removed and
/// put back sooner could take that late answer as its own and bind the
/// deliver subject twice, the first binding never undone.
const HOLD_OUT: Duration = Duration::from_secs(6);

/// The least time between two batches of sources set up again, and the
/// most nodes in one: with hundreds of nodes joining at once every node may
/// ask while the hub is still busy setting up its sources, and each batch
/// updates the stream of all of them twice; unpaced, the updates kept the
/// hub too busy to bind the sources they were for.
const BATCH_GAP: Duration = Duration::from_secs(5);
const BATCH_MOST: usize = 64;

/// The nodes that said their sourcing stalled, waiting for the next batch.
#[derive(Default)]
struct Stalled {
    /// Each asking node, where its answer goes, and whether it said the
    /// hub's side is bound to its consumer.
    asking: Vec<(NodeId, async_nats::Subject, bool)>,
    due: Option<tokio::time::Instant>,
    restarted: std::collections::HashMap<NodeId, tokio::time::Instant>,
    /// When the last batch was set up again.
    last_batch: Option<tokio::time::Instant>,
    /// When the batch whose sources are out of the stream goes back in
    /// (see [`HOLD_OUT`]).
    put_back_at: Option<tokio::time::Instant>,
}

impl Stalled {
    fn ask(&mut self, m: async_nats::Message) {
        let Some((node, reply)) = super::requests::requester(&m) else {
            return;
        };
        let bound = match dispatch::from_cbor::<SourcingStalled>(&m.payload, "sourcing-stalled") {
            Ok(s) => {
                info!(node_id = %node, pending = s.pending, bound = s.bound, "node says its sourcing stalled");
                s.bound
            }
            Err(e) => {
                warn!(node_id = %node, error = %e, "undecodable sourcing request");
                return;
            }
        };
        self.asking.push((node, reply, bound));
        if self.due.is_none() {
            self.pace();
        }
    }

    /// When the asks waiting are taken next: after gathering more for a
    /// moment, and never sooner than [`BATCH_GAP`] after the last batch.
    fn pace(&mut self) {
        let soonest = tokio::time::Instant::now() + GATHER;
        self.due = (!self.asking.is_empty()).then(|| {
            self.last_batch
                .map_or(soonest, |t| (t + BATCH_GAP).max(soonest))
        });
    }

    /// Every enrolled node's source was just set up (a reconcile): asks
    /// within [`RESTART_EVERY`] are answered that it was.
    fn all_set_up(&mut self, nodes: impl Iterator<Item = NodeId>) {
        let now = tokio::time::Instant::now();
        for n in nodes {
            self.restarted.insert(n, now);
        }
    }
}

fn refused(reason: impl Into<String>) -> SourcingReply {
    SourcingReply {
        restarted: false,
        reason: Some(reason.into()),
    }
}

/// Which of the asking nodes get their source set up again, and the answer
/// for each of the others.
fn choose(
    asking: &[(NodeId, async_nats::Subject, bool)],
    active: &BTreeMap<NodeId, String>,
    heard: &std::collections::HashMap<String, Duration>,
    restarted: &std::collections::HashMap<NodeId, tokio::time::Instant>,
    now: tokio::time::Instant,
) -> (Vec<NodeId>, Vec<(async_nats::Subject, SourcingReply)>) {
    let mut chosen = Vec::new();
    let mut answers = Vec::new();
    for (node, reply, bound) in asking {
        let recently = restarted
            .get(node)
            .is_some_and(|t| now.saturating_duration_since(*t) < RESTART_EVERY);
        let answer = if !active.contains_key(node) {
            Some(refused("not an enrolled node the hub knows yet"))
        } else if recently || chosen.contains(node) {
            Some(refused(format!(
                "set up again less than {} s ago",
                RESTART_EVERY.as_secs()
            )))
        } else if !bound && heard.get(&edge::stream(node)).is_some_and(|d| *d < HEARD) {
            // A node that sees the hub bound but taking nothing is set up
            // again, heard or not.
            Some(refused("the hub hears this node"))
        } else {
            None
        };
        match answer {
            Some(a) => answers.push((reply.clone(), a)),
            None => chosen.push(*node),
        }
    }
    (chosen, answers)
}

/// Sets up again the sources of the stalled nodes: removed from
/// `UD_EDGE_IN` now and put back [`HOLD_OUT`] later (by the hub's loop), so
/// nats-server asks each node's consumer again at once instead of at its
/// retry backoff (up to two minutes). The node's consumer keeps its
/// position; the hub resumes from what it stored.
#[allow(clippy::too_many_arguments)]
async fn restart_sources(
    js: &jetstream::Context,
    settings: &HubSettings,
    active: &BTreeMap<NodeId, String>,
    reconciling: bool,
    stalled: &mut Stalled,
    consumers: &mut Consumers,
    sourced: &mut Sourced,
) -> Vec<(async_nats::Subject, SourcingReply)> {
    let asking = std::mem::take(&mut stalled.asking);
    // Nodes asking for the first time: their source is added, all at once.
    let (joining, mut asking): (Vec<_>, Vec<_>) = asking
        .into_iter()
        .partition(|(n, _, _)| active.contains_key(n) && !sourced.joined.contains(n));
    let mut joined_answers = Vec::new();
    if !joining.is_empty() {
        // Every stream update makes the hub look up where each new source
        // stands in `UD_EDGE_IN`: joins go in batches as far apart as
        // set-ups, not one update per ask.
        stalled.last_batch = Some(tokio::time::Instant::now());
        sourced.joined.extend(joining.iter().map(|j| j.0));
        let reply = match retry_streams(js, settings, active, &[], consumers, sourced).await {
            Ok(()) => {
                info!(nodes = joining.len(), "sources of joining nodes added");
                SourcingReply {
                    restarted: true,
                    reason: None,
                }
            }
            Err(e) => {
                for (node, _, _) in &joining {
                    sourced.joined.remove(node);
                }
                warn!(error = %e, "cannot add the joining nodes' sources");
                refused(format!("the hub's stream could not be updated: {e}"))
            }
        };
        let now = tokio::time::Instant::now();
        for (node, r, _) in &joining {
            if reply.restarted {
                stalled.restarted.insert(*node, now);
            }
            joined_answers.push((r.clone(), reply.clone()));
        }
    }
    // The rest wait for the next batch.
    if asking.len() > BATCH_MOST {
        stalled.asking = asking.split_off(BATCH_MOST);
    }
    // Enrolments read but not yet reconciled wait for their reconcile (a
    // node that asked to join is linked already: its enrolment is in).
    let empty = BTreeMap::new();
    let active = if reconciling { &empty } else { active };
    let info = match js.get_stream(edge::EDGE_IN).await {
        Ok(mut s) => s.info().await.ok().cloned(),
        Err(_) => None,
    };
    let heard: std::collections::HashMap<String, Duration> = info
        .iter()
        .flat_map(|i| &i.sources)
        .filter_map(|si| si.active.map(|a| (si.name.clone(), a)))
        .collect();
    let configured = info.as_ref().map(configured).unwrap_or_default();
    let now = tokio::time::Instant::now();
    let (chosen, mut answers) = choose(&asking, active, &heard, &stalled.restarted, now);
    answers.extend(joined_answers);
    if !chosen.is_empty() {
        stalled.last_batch = Some(now);
    }
    stalled.pace();
    if chosen.is_empty() {
        return answers;
    }
    let kept = sources_of(active, sourced, &configured, &chosen);
    let outcome = match js
        .update_stream(&streams::edge_in(settings.replicas, kept))
        .await
    {
        Ok(_) => {
            sourced.held_out.extend(chosen.iter().copied());
            stalled.put_back_at = Some(now + HOLD_OUT);
            Ok(())
        }
        Err(e) => {
            // Whatever the update did, the sources must not stay out.
            let _ = retry_streams(js, settings, active, &[], consumers, sourced).await;
            Err(nats_err(e))
        }
    };
    stalled
        .restarted
        .retain(|_, t| now.saturating_duration_since(*t) < RESTART_EVERY);
    let reply = match &outcome {
        Ok(()) => {
            info!(
                nodes = chosen.len(),
                "sources of stalled nodes set up again"
            );
            SourcingReply {
                restarted: true,
                reason: None,
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot set up the stalled nodes' sources again");
            refused(format!("the hub's stream could not be updated: {e}"))
        }
    };
    for (node, r, _) in &asking {
        if chosen.contains(node) {
            stalled.restarted.insert(*node, now);
            answers.push((r.clone(), reply.clone()));
        }
    }
    answers
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn reply(n: u8) -> async_nats::Subject {
        format!("_INBOX.r{n}").into()
    }

    #[test]
    fn only_enrolled_unheard_nodes_not_restarted_lately_are_set_up_again() {
        let (a, b, c, d, e) = (
            NodeId::new(),
            NodeId::new(),
            NodeId::new(),
            NodeId::new(),
            NodeId::new(),
        );
        let active: BTreeMap<NodeId, String> =
            [a, b, c, d].iter().map(|n| (*n, "h".to_owned())).collect();
        let now = tokio::time::Instant::now();
        let heard = HashMap::from([
            (edge::stream(&b), Duration::from_secs(1)),
            (edge::stream(&a), Duration::from_secs(60)),
        ]);
        let restarted = HashMap::from([
            (c, now - Duration::from_secs(2)),
            (d, now - RESTART_EVERY - Duration::from_secs(1)),
        ]);
        let asking = vec![
            (a, reply(1), false),
            (b, reply(2), false),
            (c, reply(3), false),
            (d, reply(4), false),
            (e, reply(5), false),
            (a, reply(6), false),
        ];
        let (chosen, answers) = choose(&asking, &active, &heard, &restarted, now);
        // Long unheard and a restart long ago: set up again, once each.
        assert_eq!(chosen, vec![a, d]);
        // Heard, but bound and taking nothing as the node sees it: set up again.
        let (chosen, _) = choose(&[(b, reply(7), true)], &active, &heard, &restarted, now);
        assert_eq!(chosen, vec![b]);
        let reasons: HashMap<String, String> = answers
            .into_iter()
            .map(|(r, a)| {
                assert!(!a.restarted);
                (r.to_string(), a.reason.unwrap_or_default())
            })
            .collect();
        assert_eq!(reasons.len(), 4);
        assert!(reasons["_INBOX.r2"].contains("hears"));
        assert!(reasons["_INBOX.r3"].contains("less than 20 s ago"));
        assert!(reasons["_INBOX.r5"].contains("not an enrolled node"));
        assert!(reasons["_INBOX.r6"].contains("less than 20 s ago"));
    }
}
