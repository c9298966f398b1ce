//! Fires schedules. Every main server runs one: it reads the schedule
//! stream from its start (schedules are few), and once it has read all
//! there was it submits each time as it comes, and records it. Two servers
//! firing the same time make one run (the submission's id is the time's)
//! and one record (the record expects the schedule's last event): the one
//! that loses waits for the winner's record before it looks again.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use tracing::{info, warn};
use ud_schemas::codec::EventMeta;
use ud_schemas::events::ScheduleSkipped;
use ud_schemas::{now_millis, streams, Event, Millis, ScheduleId};

use super::commands::ScheduleCommands;
use super::{plan, Schedule, ScheduleCommand, When};
use crate::aggregate::{Against, Aggregate, ExecuteError};
use crate::follow::{next_or_stalled, Next};
use crate::store::NatsError;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("nats: {0}")]
    Nats(#[source] NatsError),
    #[error("the schedule stream: {0}")]
    Stream(String),
}

fn nats(e: impl Into<NatsError>) -> RunnerError {
    RunnerError::Nats(e.into())
}

/// Runs the schedules, binding again after any failure.
pub async fn run(commands: ScheduleCommands) -> Result<(), RunnerError> {
    use backon::BackoffBuilder;
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times();
    let mut delays = backoff.build();
    loop {
        let mut runner = Runner {
            commands: commands.clone(),
            schedules: HashMap::new(),
            waiting: HashSet::new(),
            read: 0,
        };
        match runner.follow().await {
            Ok(()) => delays = backoff.build(),
            Err(e) => warn!(error = %e, "schedules interrupted; binding again"),
        }
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
    }
}

struct Known {
    schedule: Schedule,
    when: Option<When>,
    /// Stream sequence of its last event.
    seq: u64,
}

struct Runner {
    commands: ScheduleCommands,
    schedules: HashMap<ScheduleId, Known>,
    /// Schedules another main server recorded first: left until its
    /// record is read.
    waiting: HashSet<ScheduleId>,
    read: u64,
}

/// How long the runner sleeps at most between looks (a clock that jumps
/// is noticed within it).
const LOOK_EVERY: Duration = Duration::from_secs(30);

/// How long the runner waits after the platform failed a submission or a
/// record before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl Runner {
    async fn follow(&mut self) -> Result<(), RunnerError> {
        let js = self.commands.schedules().store().jetstream().clone();
        let mut stream = js.get_stream(streams::SCHEDULES).await.map_err(nats)?;
        let mut c = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                max_expires: streams::PULL_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(nats)?;
        let mut caught_up = c.info().await.map_err(nats)?.num_pending == 0;
        let mut messages = c.messages().await.map_err(nats)?;
        loop {
            let failed = caught_up && !self.fire_due(now_millis()).await;
            let mut wake = self.next_due().map_or(LOOK_EVERY, |due| {
                let ms = u64::try_from(due - now_millis()).unwrap_or(0);
                Duration::from_millis(ms).min(LOOK_EVERY)
            });
            if failed {
                wake = wake.max(RETRY_AFTER);
            }
            tokio::select! {
                next = next_or_stalled(&mut messages, &mut stream, self.read) => match next {
                    Next::Message(m) => {
                        let info = m.info().map_err(|e| RunnerError::Stream(e.to_string()))?;
                        let (seq, pending) = (info.stream_sequence, info.pending);
                        self.read = seq;
                        match ud_schemas::codec::decode_message(m.subject.as_str(), m.headers.as_ref(), &m.payload) {
                            Ok(env) => self.apply(env.event, seq),
                            Err(e) => warn!(seq, error = %e, "undecodable schedule event"),
                        }
                        if pending == 0 && !caught_up {
                            caught_up = true;
                            info!(schedules = self.schedules.len(), "schedules read; firing");
                        }
                    }
                    Next::Closed => return Err(RunnerError::Stream("consumer closed".into())),
                    Next::Stalled { read, last } => {
                        return Err(RunnerError::Stream(format!("stalled at {read} of {last}")))
                    }
                    Next::Failed(e) => return Err(RunnerError::Nats(e)),
                },
                () = tokio::time::sleep(wake), if caught_up => {}
            }
        }
    }

    fn apply(&mut self, event: Event, seq: u64) {
        let Some((id, e)) = Schedule::unwrap(event) else {
            return;
        };
        if self.schedules.get(&id).is_some_and(|k| k.seq >= seq) {
            return; // recorded by this runner, and applied then
        }
        self.waiting.remove(&id);
        let known = self.schedules.remove(&id);
        let (state, when) = match known {
            Some(k) => (Some(k.schedule), k.when),
            None => (None, None),
        };
        let Some(schedule) = Schedule::evolve(state, id, &e) else {
            return;
        };
        if schedule.deleted {
            return;
        }
        let when = when.or_else(|| {
            When::parse(&schedule.created.cron, &schedule.created.timezone)
                .map_err(|e| warn!(schedule_id = %id, errors = ?e, "schedule with a bad time"))
                .ok()
        });
        self.schedules.insert(
            id,
            Known {
                schedule,
                when,
                seq,
            },
        );
    }

    /// The earliest time any active schedule waits for.
    fn next_due(&self) -> Option<Millis> {
        self.schedules
            .values()
            .filter(|k| k.schedule.active() && !self.waiting.contains(&k.schedule.id))
            .filter_map(|k| k.when.as_ref()?.next_after(k.schedule.done_until))
            .min()
    }

    /// Submits and records what is due; false when the platform failed
    /// some of it (tried again later).
    async fn fire_due(&mut self, now: Millis) -> bool {
        let mut ok = true;
        let ids: Vec<ScheduleId> = self.schedules.keys().copied().collect();
        for id in ids {
            if self.waiting.contains(&id) {
                continue;
            }
            let Some(k) = self.schedules.get(&id) else {
                continue;
            };
            let Some(when) = &k.when else { continue };
            let p = plan(&k.schedule, when, now);
            if let Some((first, last, count)) = p.skip {
                info!(schedule_id = %id, count, "times passed unseen; skipped");
                let skip = ScheduleCommand::Skip(ScheduleSkipped {
                    at: 0,
                    first,
                    last,
                    count,
                });
                match self.record(id, skip).await {
                    Recorded::Yes => {}
                    Recorded::Later => continue,
                    Recorded::Failed => {
                        ok = false;
                        continue;
                    }
                }
            }
            for due in p.fire {
                let Some(k) = self.schedules.get(&id) else {
                    break;
                };
                let fired = match self.commands.submit_for(&k.schedule, due).await {
                    Ok(f) => f,
                    Err(e) => {
                        // The platform is unavailable: the time is tried again.
                        warn!(schedule_id = %id, due, error = %e, "scheduled submission failed");
                        ok = false;
                        break;
                    }
                };
                info!(schedule_id = %id, due, task_id = ?fired.task_id, pipeline_id = ?fired.pipeline_id, "schedule fired");
                match self.record(id, ScheduleCommand::Fire(fired)).await {
                    Recorded::Yes => {}
                    Recorded::Later => break,
                    Recorded::Failed => {
                        ok = false;
                        break;
                    }
                }
            }
        }
        ok
    }

    /// Records a command's events against the state read.
    async fn record(&mut self, id: ScheduleId, command: ScheduleCommand) -> Recorded {
        let Some(k) = self.schedules.get(&id) else {
            return Recorded::Later;
        };
        let against = Against {
            id,
            state: Some(k.schedule.clone()),
            seq: k.seq,
            command,
            meta: EventMeta::new(super::commands::ACTOR),
        };
        match self.commands.schedules().execute_on(against).await {
            Ok(done) => {
                if let (Some(state), Some(k)) = (done.state, self.schedules.get_mut(&id)) {
                    k.schedule = state;
                    k.seq = done.seq;
                }
                Recorded::Yes
            }
            Err(ExecuteError::Conflict) => {
                self.waiting.insert(id);
                Recorded::Later
            }
            Err(e) => {
                warn!(schedule_id = %id, error = %e, "schedule not recorded");
                Recorded::Failed
            }
        }
    }
}

enum Recorded {
    Yes,
    /// Another main server changed the schedule first: looked at again
    /// once its event is read.
    Later,
    Failed,
}
