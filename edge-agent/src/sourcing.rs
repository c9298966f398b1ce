//! Keeps the hub taking this node's reports: the hub sources a node's
//! stream once the node asks (at its first start, with its consumer made);
//! when they wait in the node's
//! stream with nobody on the hub's side bound to its source consumer (or
//! nothing acknowledged for long), the agent asks the main server to set up
//! the hub's source of the stream again, instead of waiting for
//! nats-server's own retry backoff (up to two minutes: after a late join, a
//! link back from a long cut, or a source that went wrong).

use std::time::Duration;

use async_nats::jetstream;
use tracing::{debug, info};
use ud_schemas::dispatch::SourcingStalled;
use ud_schemas::{edge, NodeId};

use crate::requests::Requests;

/// How often the agent looks at its source consumer.
pub const CHECK_EVERY: Duration = Duration::from_secs(3);

/// Checks in a row with reports waiting and nobody bound before it asks.
/// (nats-server binds a late node on its own once its consumer answers:
/// within a few seconds of the link, unless a first ask was refused.)
const UNBOUND_CHECKS: u32 = 3;

/// Tries of the first ask, a second apart, while the link comes up.
const START_TRIES: u32 = 30;

/// Checks after the hub set the source up again before the agent counts
/// anew: the hub keeps the source out for a few seconds, then nats-server
/// binds it; an ask meanwhile would only start it over.
const AFTER_RESTART_CHECKS: u32 = 7;

/// Checks in a row with reports waiting and the acknowledged floor still
/// before it asks (bound, but nothing taken for 15 s).
const STUCK_CHECKS: u32 = 5;

/// What the agent has seen of its source consumer so far.
#[derive(Debug, Default)]
pub struct Watch {
    unbound: u32,
    stuck: u32,
    floor: Option<u64>,
    /// Checks left before counting again after a restart.
    quiet: u32,
}

/// One look at the source consumer.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    /// Reports not yet delivered or not yet acknowledged.
    pub waiting: u64,
    /// Someone (the hub's source) is bound to the consumer's deliver subject.
    pub bound: bool,
    /// The last stream sequence the hub acknowledged.
    pub floor: u64,
    /// The last stream sequence the consumer delivered (told apart from
    /// `floor` when a stuck source is looked into).
    pub delivered: u64,
}

impl Watch {
    /// Takes in one look; true when the agent should ask now.
    pub fn observe(&mut self, seen: Seen) -> bool {
        let moved = self.floor != Some(seen.floor);
        self.floor = Some(seen.floor);
        if self.quiet > 0 {
            self.quiet -= 1;
            return false;
        }
        if seen.waiting == 0 {
            self.unbound = 0;
            self.stuck = 0;
            return false;
        }
        self.unbound = if seen.bound { 0 } else { self.unbound + 1 };
        self.stuck = if moved { 0 } else { self.stuck + 1 };
        self.unbound >= UNBOUND_CHECKS || self.stuck >= STUCK_CHECKS
    }

    /// The hub set the source up again: counted afresh once it had time
    /// to bind.
    pub fn restarted(&mut self) {
        self.unbound = 0;
        self.stuck = 0;
        self.quiet = AFTER_RESTART_CHECKS;
    }
}

async fn look(local: &jetstream::Context, node: &NodeId) -> Option<Seen> {
    let stream = local.get_stream_no_info(edge::stream(node)).await.ok()?;
    let c = stream.consumer_info(edge::SOURCE_CONSUMER).await.ok()?;
    Some(Seen {
        waiting: c
            .num_pending
            .saturating_add(u64::try_from(c.num_ack_pending).unwrap_or(u64::MAX)),
        bound: c.push_bound,
        floor: c.ack_floor.stream_sequence,
        delivered: c.delivered.stream_sequence,
    })
}

/// Asks the hub to source this node's stream (to set its source up again,
/// or, the first time, to add it).
/// True when the hub answered.
async fn ask(requests: &Requests, node: &NodeId, seen: Seen, watch: &mut Watch) -> bool {
    let asked = SourcingStalled {
        pending: seen.waiting,
        bound: seen.bound,
    };
    match requests.sourcing(&asked).await {
        Ok(r) if r.restarted => {
            info!(node_id = %node, waiting = seen.waiting, "the hub set up its source of this node again");
            watch.restarted();
            true
        }
        Ok(r) => {
            debug!(node_id = %node, reason = ?r.reason, "the hub left its source as it is");
            true
        }
        Err(e) => {
            debug!(node_id = %node, error = %e, "cannot ask the main server about sourcing");
            false
        }
    }
}

/// Watches the source consumer for as long as the agent runs. A consumer
/// nobody is bound to at the start (a node joining) is asked for at once:
/// the hub adds a node's source only when the node has its consumer.
pub async fn keep(local: jetstream::Context, node: NodeId, requests: Requests) {
    let mut watch = Watch::default();
    // Until the hub answers (the link may not be up yet) or binds.
    for _ in 0..START_TRIES {
        let Some(seen) = look(&local, &node).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        if seen.bound {
            break;
        }
        info!(node_id = %node, waiting = seen.waiting, "asking the hub to source this node");
        if ask(&requests, &node, seen, &mut watch).await {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(seen) = look(&local, &node).await else {
            continue;
        };
        if !watch.observe(seen) {
            continue;
        }
        info!(
            node_id = %node,
            waiting = seen.waiting,
            bound = seen.bound,
            delivered = seen.delivered,
            acknowledged = seen.floor,
            "reports wait in this node's stream; asking the hub for its source"
        );
        ask(&requests, &node, seen, &mut watch).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(waiting: u64, bound: bool, floor: u64) -> Seen {
        Seen {
            waiting,
            bound,
            floor,
            delivered: floor,
        }
    }

    #[test]
    fn reports_waiting_with_nobody_bound_ask_on_the_third_look() {
        let mut w = Watch::default();
        assert!(!w.observe(seen(1, false, 0)));
        assert!(!w.observe(seen(1, false, 0)));
        assert!(w.observe(seen(1, false, 0)));
        // Asked and answered: left alone while the hub binds it, then
        // counted afresh.
        w.restarted();
        for _ in 0..AFTER_RESTART_CHECKS + UNBOUND_CHECKS - 1 {
            assert!(!w.observe(seen(1, false, 0)));
        }
        assert!(w.observe(seen(1, false, 0)));
        w.restarted();
        for _ in 0..AFTER_RESTART_CHECKS {
            assert!(!w.observe(seen(1, false, 0)));
        }
        // The hub binds and takes them: nothing to ask.
        assert!(!w.observe(seen(1, true, 0)));
        assert!(!w.observe(seen(0, true, 1)));
        assert!(!w.observe(seen(0, false, 1)));
        assert!(!w.observe(seen(0, false, 1)));
    }

    #[test]
    fn a_bound_source_that_takes_nothing_for_long_is_asked_about() {
        let mut w = Watch::default();
        // The first look only learns where the floor is.
        for _ in 0..STUCK_CHECKS {
            assert!(!w.observe(seen(5, true, 7)));
        }
        assert!(w.observe(seen(5, true, 7)));
        // One that moves, however slowly, is left alone.
        let mut w = Watch::default();
        for floor in 0..3 * u64::from(STUCK_CHECKS) {
            assert!(!w.observe(seen(5, true, floor)));
        }
    }
}
