//! Schedules: each time submitted once whichever main servers run, times
//! that passed unseen skipped or caught up, bad input refused by field.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use ud_core::store::Expect;
use ud_schemas::codec::EventMeta;
use ud_schemas::events::{Missed, ScheduleCreated, ScheduleFired, ScheduleSkipped};
use ud_schemas::{now_millis, streams, Event, ProjectId, ScheduleEvent, ScheduleId, TaskEvent};
use ud_server::{self as server, ServerConfig};

use crate::common::{task, Stack};

async fn create(s: &Stack, body: Value) -> Result<(u16, Value)> {
    let resp = s
        .http
        .post(s.url("/api/v1/schedules"))
        .bearer_auth(&s.admin)
        .json(&body)
        .send()
        .await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

/// The schedule's events as the stream holds them.
async fn events(s: &Stack, id: ScheduleId) -> Result<Vec<ScheduleEvent>> {
    let stored = s
        .server
        .state
        .commands
        .store()
        .read_subject(streams::SCHEDULES, &ud_schemas::subjects::schedule_all(&id))
        .await?;
    Ok(stored
        .into_iter()
        .filter_map(|e| match e.envelope.event {
            Event::Schedule(_, e) => Some(e),
            _ => None,
        })
        .collect())
}

fn fired(events: &[ScheduleEvent]) -> Vec<ScheduleFired> {
    events
        .iter()
        .filter_map(|e| match e {
            ScheduleEvent::Fired(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// Re-reads the schedule's events whenever one is published, until `found`
/// takes something from them.
async fn until_events<T>(
    s: &Stack,
    id: ScheduleId,
    within: Duration,
    what: &str,
    found: impl Fn(Vec<ScheduleEvent>) -> Option<T>,
) -> Result<T> {
    let mut sub = s
        .server
        .state
        .commands
        .store()
        .client()
        .subscribe(format!("ud.schedule.{id}.>"))
        .await?;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(t) = found(events(s, id).await?) {
            return Ok(t);
        }
        if tokio::time::timeout_at(deadline, sub.next()).await.is_err() {
            bail!("no {what} within {within:?}");
        }
    }
}

/// Waits until the schedule has recorded `n` times.
async fn until_fired(
    s: &Stack,
    id: ScheduleId,
    n: usize,
    within: Duration,
) -> Result<Vec<ScheduleFired>> {
    until_events(s, id, within, &format!("{n} times recorded"), |e| {
        let f = fired(&e);
        (f.len() >= n).then_some(f)
    })
    .await
}

#[tokio::test]
async fn each_time_is_submitted_once_while_two_main_servers_run_and_one_restarts() -> Result<()> {
    let s = Stack::start().await?;
    let second = |s: &Stack| {
        let cfg = ServerConfig::local(s._nats.url(), s._pg.url.clone());
        server::start(cfg)
    };
    let other = second(&s).await?;
    let (status, body) = create(
        &s,
        json!({"name": "every-2s", "cron": "*/2 * * * * *", "timezone": "UTC", "task": task("lab")}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let id: ScheduleId = body["schedule_id"].as_str().unwrap_or_default().parse()?;
    until_fired(&s, id, 3, Duration::from_secs(30)).await?;
    // One main server dies at once and comes back while the times go on.
    other.shutdown();
    until_fired(&s, id, 5, Duration::from_secs(30)).await?;
    let again = second(&s).await?;
    let all = until_fired(&s, id, 8, Duration::from_secs(30)).await?;
    again.shutdown();

    let dues: Vec<i64> = all.iter().map(|f| f.due).collect();
    for pair in dues.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            2_000,
            "a time missed or repeated: {dues:?}"
        );
    }
    let tasks: Vec<_> = all.iter().map(|f| f.task_id).collect();
    assert!(tasks.iter().all(Option::is_some), "{all:?}");
    let mut distinct = tasks.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        tasks.len(),
        "one task for two times: {all:?}"
    );
    // Each time made one task (a second server's submission was the same one).
    let submitted = s
        .server
        .state
        .commands
        .store()
        .read_subject(streams::TASKS, "ud.task.*.submitted")
        .await?;
    let by_schedule: Vec<_> = submitted
        .iter()
        .filter(|e| e.envelope.meta.actor == format!("schedule:{id}"))
        .filter_map(|e| match &e.envelope.event {
            Event::Task(t, TaskEvent::Submitted(_)) => Some(*t),
            _ => None,
        })
        .collect();
    let recorded: Vec<_> = tasks.into_iter().flatten().collect();
    assert!(
        recorded.iter().all(|t| by_schedule.contains(t)),
        "a recorded task was never submitted"
    );
    assert!(
        by_schedule.len() <= recorded.len() + 1,
        "{} tasks submitted for {} times",
        by_schedule.len(),
        recorded.len()
    );

    // The read model says so too; paused, nothing more is submitted.
    let shown = view(&s, id).await?;
    assert_eq!(shown["state"], "active", "{shown}");
    assert!(shown["next_due"].is_string(), "{shown}");
    let paused = s
        .http
        .post(s.url(&format!("/api/v1/schedules/{id}/pause?wait=projected")))
        .bearer_auth(&s.admin)
        .json(&json!({"reason": "maintenance"}))
        .send()
        .await?;
    assert_eq!(paused.status().as_u16(), 202);
    let before = fired(&events(&s, id).await?).len();
    let shown = view(&s, id).await?;
    assert_eq!(
        (shown["state"].as_str(), shown["next_due"].is_null()),
        (Some("paused"), true),
        "{shown}"
    );
    assert!(shown["fired"].as_i64().unwrap_or_default() >= 8, "{shown}");
    // Another schedule of the same times fires three times meanwhile.
    let (status, body) = create(
        &s,
        json!({"name": "clock", "cron": "*/2 * * * * *", "timezone": "UTC", "task": task("lab")}),
    )
    .await?;
    assert_eq!(status, 201, "{body}");
    let clock: ScheduleId = body["schedule_id"].as_str().unwrap_or_default().parse()?;
    until_fired(&s, clock, 3, Duration::from_secs(30)).await?;
    assert_eq!(
        fired(&events(&s, id).await?).len(),
        before,
        "fired while paused"
    );
    Ok(())
}

async fn view(s: &Stack, id: ScheduleId) -> Result<Value> {
    Ok(s.http
        .get(s.url(&format!("/api/v1/schedules/{id}")))
        .bearer_auth(&s.admin)
        .send()
        .await?
        .json()
        .await?)
}

/// A schedule made five minutes ago while no main server ran.
async fn made_unseen(s: &Stack, missed: Missed) -> Result<(ScheduleId, i64)> {
    let id = ScheduleId::new();
    let at = now_millis() - 5 * 60_000 - 30_000;
    let body = serde_json::to_value(task("lab"))?;
    let event = Event::Schedule(
        id,
        ScheduleEvent::Created(ScheduleCreated {
            at,
            project: ProjectId::parse("lab").map_err(|e| anyhow!("{e}"))?,
            name: format!("minutely-{}", missed.as_str()),
            cron: "* * * * *".into(),
            timezone: "UTC".into(),
            missed,
            task: Some(body),
            pipeline: None,
        }),
    );
    s.server
        .state
        .commands
        .store()
        .append(&event, &EventMeta::new("test"), Expect::New)
        .await?;
    Ok((id, at))
}

#[tokio::test]
async fn times_that_passed_unseen_are_skipped_or_caught_up_as_the_schedule_says() -> Result<()> {
    let s = Stack::start().await?;
    let (skip, made) = made_unseen(&s, Missed::Skip).await?;
    let (catch_up, _) = made_unseen(&s, Missed::CatchUp).await?;
    // Every minute from the making on: five or six of them by now.
    let minutes = |until: i64| -> Vec<i64> {
        (made / 60_000 + 1..=until / 60_000)
            .map(|m| m * 60_000)
            .collect()
    };
    let caught = until_fired(&s, catch_up, 5, Duration::from_secs(30)).await?;
    let dues: Vec<i64> = caught.iter().map(|f| f.due).collect();
    let expected = minutes(now_millis());
    assert_eq!(
        dues,
        expected[..dues.len()].to_vec(),
        "caught up oldest first"
    );
    assert!(caught
        .iter()
        .all(|f| f.task_id.is_some() && f.error.is_none()));

    let skipped: ScheduleSkipped =
        until_events(&s, skip, Duration::from_secs(30), "skipped times", |e| {
            e.into_iter().find_map(|e| match e {
                ScheduleEvent::Skipped(k) => Some(k),
                _ => None,
            })
        })
        .await?;
    // What was more than a minute late when seen is skipped; the rest runs.
    let late: Vec<i64> = minutes(skipped.at)
        .into_iter()
        .filter(|m| skipped.at - m > 60_000)
        .collect();
    assert_eq!(
        (skipped.first, skipped.last, skipped.count as usize),
        (late[0], late[late.len() - 1], late.len()),
        "{skipped:?}"
    );
    let ran = fired(&events(&s, skip).await?);
    assert!(ran.iter().all(|f| f.due > skipped.last), "{ran:?}");
    Ok(())
}

#[tokio::test]
async fn bad_schedules_are_refused_by_field_and_append_nothing() -> Result<()> {
    let s = Stack::start().await?;
    let mut bad_task = task("lab");
    bad_task["code_commit_id"] = json!("nope");
    let cases = [
        (
            json!({"name": "x", "cron": "0 3 * *", "task": task("lab")}),
            "cron",
        ),
        (
            json!({"name": "x", "cron": "0 3 * * *", "timezone": "Mars/Olympus", "task": task("lab")}),
            "timezone",
        ),
        (
            json!({"name": "Nightly Eval", "cron": "0 3 * * *", "task": task("lab")}),
            "name",
        ),
        (json!({"name": "x", "cron": "0 3 * * *"}), "task"),
        (
            json!({"name": "x", "cron": "0 3 * * *", "task": bad_task}),
            "task.code_commit_id",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = create(&s, body.clone()).await?;
        assert_eq!(status, 400, "{body} -> {answer}");
        let fields: Vec<&str> = answer["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["field"].as_str())
            .collect();
        assert!(fields.contains(&field), "{body}: {answer}");
    }
    let (status, answer) = create(
        &s,
        json!({"name": "x", "cron": "0 3 * * *", "missed": "sometimes", "task": task("lab")}),
    )
    .await?;
    assert_eq!(status, 400, "{answer}");
    // A token of another project may not schedule work in this one.
    let other = s.token(&["other"]).await?;
    let resp = s
        .http
        .post(s.url("/api/v1/schedules"))
        .bearer_auth(&other)
        .json(&json!({"name": "x", "cron": "0 3 * * *", "task": task("lab")}))
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 403);
    let held = s
        .server
        .state
        .commands
        .store()
        .jetstream()
        .get_stream(streams::SCHEDULES)
        .await?
        .info()
        .await?
        .state
        .messages;
    assert_eq!(held, 0, "a refused schedule left events");
    Ok(())
}
