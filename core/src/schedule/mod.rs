//! Schedules: a task or a pipeline submitted at the times of a cron
//! expression in a time zone (`ud.schedule.<id>.<event>`).
//!
//! Every main server runs the [`runner`]; each time is submitted under an
//! id of its own (an Idempotency-Key for a task, an id made from the
//! schedule and the time for a pipeline), so two servers firing the same
//! time make one run, and the schedule records the time once (optimistic
//! concurrency on its events). Times that passed while no main server ran
//! are skipped or run oldest first, as the schedule says.

pub mod commands;
pub mod runner;

use std::str::FromStr;

use chrono::TimeZone;
use ud_schemas::api::{CreateSchedule, FieldError};
use ud_schemas::events::{
    Missed, ScheduleCreated, ScheduleDeleted, ScheduleFired, SchedulePaused, ScheduleResumed,
    ScheduleSkipped,
};
use ud_schemas::{streams, subjects, Event, Millis, ProjectId, ScheduleEvent, ScheduleId};

use crate::aggregate::Aggregate;

/// A schedule as its events made it.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub id: ScheduleId,
    pub created: ScheduleCreated,
    /// Why it is paused, while it is.
    pub paused: Option<String>,
    pub deleted: bool,
    /// The latest time it is done with: fired, skipped, or passed while
    /// it was paused (from its making on).
    pub done_until: Millis,
    pub fired: u64,
    pub skipped: u64,
    pub last_fired: Option<ScheduleFired>,
}

impl Schedule {
    pub fn project(&self) -> &ProjectId {
        &self.created.project
    }

    /// Whether it submits anything.
    pub fn active(&self) -> bool {
        self.paused.is_none() && !self.deleted
    }
}

#[derive(Clone, Debug)]
pub enum ScheduleCommand {
    Create(Box<ScheduleCreated>),
    Fire(ScheduleFired),
    Skip(ScheduleSkipped),
    Pause { reason: String },
    Resume,
    Delete,
}

impl ScheduleCommand {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Create(_) => "create",
            Self::Fire(_) => "fire",
            Self::Skip(_) => "skip",
            Self::Pause { .. } => "pause",
            Self::Resume => "resume",
            Self::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("schedule not found")]
    NotFound,
    #[error("the schedule exists already")]
    Exists,
    #[error("the schedule was deleted")]
    Deleted,
}

impl Aggregate for Schedule {
    type Id = ScheduleId;
    type Command = ScheduleCommand;
    type Event = ScheduleEvent;
    type Error = ScheduleError;

    const STREAM: &'static str = streams::SCHEDULES;

    fn scope(id: &ScheduleId) -> String {
        subjects::schedule_all(id)
    }

    fn wrap(id: ScheduleId, event: ScheduleEvent) -> Event {
        Event::Schedule(id, event)
    }

    fn unwrap(event: Event) -> Option<(ScheduleId, ScheduleEvent)> {
        match event {
            Event::Schedule(id, e) => Some((id, e)),
            _ => None,
        }
    }

    fn decide(
        state: Option<&Self>,
        command: ScheduleCommand,
        now: Millis,
    ) -> Result<Vec<ScheduleEvent>, ScheduleError> {
        use ScheduleCommand as C;
        let Some(s) = state else {
            return match command {
                C::Create(c) => Ok(vec![ScheduleEvent::Created(ScheduleCreated {
                    at: now,
                    ..*c
                })]),
                _ => Err(ScheduleError::NotFound),
            };
        };
        Ok(match command {
            C::Create(_) => return Err(ScheduleError::Exists),
            // Deleting again changes nothing; anything else is refused.
            C::Delete if s.deleted => vec![],
            _ if s.deleted => return Err(ScheduleError::Deleted),
            // A time already done with (by another main server) is not done again.
            C::Fire(f) if f.due <= s.done_until || !s.active() => vec![],
            C::Fire(f) => vec![ScheduleEvent::Fired(ScheduleFired { at: now, ..f })],
            C::Skip(k) if k.last <= s.done_until || !s.active() => vec![],
            C::Skip(k) => vec![ScheduleEvent::Skipped(ScheduleSkipped { at: now, ..k })],
            C::Pause { .. } if s.paused.is_some() => vec![],
            C::Pause { reason } => vec![ScheduleEvent::Paused(SchedulePaused { at: now, reason })],
            C::Resume if s.paused.is_none() => vec![],
            C::Resume => vec![ScheduleEvent::Resumed(ScheduleResumed { at: now })],
            C::Delete => vec![ScheduleEvent::Deleted(ScheduleDeleted { at: now })],
        })
    }

    fn evolve(state: Option<Self>, id: ScheduleId, event: &ScheduleEvent) -> Option<Self> {
        match (state, event) {
            (None, ScheduleEvent::Created(c)) => Some(Self {
                id,
                done_until: c.at,
                created: c.clone(),
                paused: None,
                deleted: false,
                fired: 0,
                skipped: 0,
                last_fired: None,
            }),
            (None, _) => None,
            (Some(mut s), e) => {
                match e {
                    ScheduleEvent::Created(_) => {}
                    ScheduleEvent::Fired(f) => {
                        s.done_until = s.done_until.max(f.due);
                        s.fired += 1;
                        s.last_fired = Some(f.clone());
                    }
                    ScheduleEvent::Skipped(k) => {
                        s.done_until = s.done_until.max(k.last);
                        s.skipped += u64::from(k.count);
                    }
                    ScheduleEvent::Paused(p) => s.paused = Some(p.reason.clone()),
                    ScheduleEvent::Resumed(r) => {
                        // The times passed while paused are not run.
                        s.paused = None;
                        s.done_until = s.done_until.max(r.at);
                    }
                    ScheduleEvent::Deleted(_) => s.deleted = true,
                }
                Some(s)
            }
        }
    }

    fn settled(&self) -> bool {
        self.deleted
    }
}

/// A cron expression read in a time zone.
#[derive(Clone, Debug)]
pub struct When {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl When {
    /// Five fields (minute hour day-of-month month day-of-week), or six
    /// with seconds first; `@daily` and the like; an IANA time zone.
    pub fn parse(cron: &str, timezone: &str) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build();
        let parsed = match parser.parse(cron) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(FieldError::new(
                    "cron",
                    format!("not a cron expression of 5 or 6 fields: {e}"),
                ));
                None
            }
        };
        let tz = match chrono_tz::Tz::from_str(timezone) {
            Ok(tz) => Some(tz),
            Err(_) => {
                errors.push(FieldError::new(
                    "timezone",
                    "not an IANA time zone (e.g. UTC, Europe/Berlin)",
                ));
                None
            }
        };
        match (parsed, tz) {
            (Some(cron), Some(tz)) => Ok(Self { cron, tz }),
            _ => Err(errors),
        }
    }

    /// The first time strictly after `after` (ms since the epoch); `None`
    /// when the expression has no more.
    pub fn next_after(&self, after: Millis) -> Option<Millis> {
        let start = self.tz.timestamp_millis_opt(after).single()?;
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        Some(next.timestamp_millis())
    }

    /// The times in (`after`, `until`], at most `max` of them.
    pub fn between(&self, after: Millis, until: Millis, max: usize) -> Vec<Millis> {
        let mut out = Vec::new();
        let mut at = after;
        while out.len() < max {
            match self.next_after(at) {
                Some(t) if t <= until => {
                    out.push(t);
                    at = t;
                }
                _ => break,
            }
        }
        out
    }
}

/// A time more than this late when seen is one that passed while no main
/// server ran: a `skip` schedule skips it.
pub const LATE: Millis = 60_000;

/// Most times planned at once (a long outage of a schedule every second
/// is worked through in rounds).
pub const MOST_AT_ONCE: usize = 1_000;

/// What to do about a schedule now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Times to record as skipped: first, last and how many.
    pub skip: Option<(Millis, Millis, u32)>,
    /// Times to submit, oldest first.
    pub fire: Vec<Millis>,
}

/// What `s` asks for at `now`.
pub fn plan(s: &Schedule, when: &When, now: Millis) -> Plan {
    if !s.active() {
        return Plan::default();
    }
    let due = when.between(s.done_until, now, MOST_AT_ONCE);
    match s.created.missed {
        Missed::CatchUp => Plan {
            skip: None,
            fire: due,
        },
        Missed::Skip => {
            let (late, on_time): (Vec<Millis>, Vec<Millis>) =
                due.into_iter().partition(|t| now - t > LATE);
            let skip = match (late.first(), late.last()) {
                (Some(&first), Some(&last)) => {
                    Some((first, last, u32::try_from(late.len()).unwrap_or(u32::MAX)))
                }
                _ => None,
            };
            Plan {
                skip,
                fire: on_time,
            }
        }
    }
}

/// Checks a schedule as given: the fields of its task or pipeline are
/// named under `task.` or `pipeline.`.
pub fn validate(req: &CreateSchedule) -> Result<(ProjectId, ScheduleCreated), Vec<FieldError>> {
    let mut errors = Vec::new();
    let name_ok = !req.name.is_empty()
        && req.name.len() <= 63
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        errors.push(FieldError::new(
            "name",
            "must be 1-63 of a-z, 0-9, \"-\" and \"_\"",
        ));
    }
    let timezone = req.timezone.clone().unwrap_or_else(|| "UTC".into());
    if let Err(mut e) = When::parse(&req.cron, &timezone) {
        errors.append(&mut e);
    }
    let prefixed = |errors: &mut Vec<FieldError>, prefix: &str, found: Vec<FieldError>| {
        errors.extend(
            found
                .into_iter()
                .map(|f| FieldError::new(format!("{prefix}.{}", f.field), f.reason)),
        );
    };
    let mut project = None;
    let (mut task, mut pipeline) = (None, None);
    match (&req.task, &req.pipeline) {
        (Some(t), None) => match crate::validate::submit_task(t) {
            Ok((p, spec)) => {
                if spec.session.is_some() {
                    errors.push(FieldError::new(
                        "task.session",
                        "a schedule submits batch work, not interactive sessions",
                    ));
                }
                project = Some(p);
                task = serde_json::to_value(t).ok();
            }
            Err(e) => prefixed(&mut errors, "task", e),
        },
        (None, Some(p)) => match crate::pipeline::validate::submit_pipeline(p) {
            Ok((proj, _, _)) => {
                project = Some(proj);
                pipeline = serde_json::to_value(p).ok();
            }
            Err(e) => prefixed(&mut errors, "pipeline", e),
        },
        _ => errors.push(FieldError::new(
            "task",
            "give exactly one of task and pipeline",
        )),
    }
    match project {
        Some(project) if errors.is_empty() => Ok((
            project.clone(),
            ScheduleCreated {
                at: 0,
                project,
                name: req.name.clone(),
                cron: req.cron.clone(),
                timezone,
                missed: req.missed.unwrap_or(Missed::Skip),
                task,
                pipeline,
            },
        )),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests;
