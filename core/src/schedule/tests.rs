use super::*;
use ud_schemas::api::SubmitTask;

fn ms(rfc3339: &str) -> Millis {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.timestamp_millis())
        .unwrap_or_default()
}

fn task() -> serde_json::Value {
    serde_json::json!({
        "project": "lab",
        "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
        "env_repo_url": "https://git.example.org/e.git",
        "env_commit_id": "89abcdef0123456789abcdef0123456789abcdef",
        "dockerfile_path": "Dockerfile",
        "command": ["python", "eval.py"],
    })
}

fn created(cron: &str, missed: Missed, at: Millis) -> ScheduleCreated {
    ScheduleCreated {
        at,
        project: ProjectId::parse("lab").unwrap_or_else(|_| unreachable!()),
        name: "nightly".into(),
        cron: cron.into(),
        timezone: "Europe/Berlin".into(),
        missed,
        task: Some(task()),
        pipeline: None,
    }
}

fn schedule(cron: &str, missed: Missed, at: Millis) -> Schedule {
    let id = ScheduleId::new();
    let e = ScheduleEvent::Created(created(cron, missed, at));
    Schedule::evolve(None, id, &e).unwrap_or_else(|| unreachable!())
}

fn when(cron: &str) -> When {
    When::parse(cron, "Europe/Berlin").unwrap_or_else(|e| panic!("{e:?}"))
}

#[test]
fn times_follow_the_zone_across_daylight_saving() {
    let w = when("0 3 * * *");
    // 03:00 in Berlin is 02:00 UTC in winter and 01:00 UTC in summer.
    assert_eq!(
        w.next_after(ms("2026-01-10T12:00:00Z")),
        Some(ms("2026-01-11T02:00:00Z"))
    );
    assert_eq!(
        w.next_after(ms("2026-07-10T12:00:00Z")),
        Some(ms("2026-07-11T01:00:00Z"))
    );
    // The night the clocks go forward (29 March 2026) still has a 03:00.
    let times = w.between(ms("2026-03-27T12:00:00Z"), ms("2026-03-31T12:00:00Z"), 10);
    assert_eq!(
        times,
        vec![
            ms("2026-03-28T02:00:00Z"),
            ms("2026-03-29T01:00:00Z"),
            ms("2026-03-30T01:00:00Z"),
            ms("2026-03-31T01:00:00Z"),
        ]
    );
}

#[test]
fn seconds_are_a_sixth_field_first_and_bad_input_names_its_field() {
    let w = When::parse("*/2 * * * * *", "UTC").unwrap_or_else(|e| panic!("{e:?}"));
    let t = ms("2026-01-01T00:00:00Z");
    assert_eq!(
        w.between(t, t + 6_000, 10),
        vec![t + 2_000, t + 4_000, t + 6_000]
    );
    let errors = When::parse("61 * * *", "Mars/Olympus")
        .err()
        .unwrap_or_default();
    let fields: Vec<&str> = errors.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["cron", "timezone"]);
    assert!(
        When::parse("0 3 * * * * 2030", "UTC").is_err(),
        "no year field"
    );
}

#[test]
fn a_skip_schedule_skips_what_passed_unseen_and_runs_what_is_just_due() {
    let made = ms("2026-01-01T00:00:00Z");
    let s = schedule("0 * * * *", Missed::Skip, made);
    let w = when("0 * * * *");
    // Back at 05:00:30 local (04:00:30 UTC): 01:00..04:00 local passed unseen, 05:00 is just due.
    let now = ms("2026-01-01T04:00:30Z");
    let p = plan(&s, &w, now);
    assert_eq!(
        p.skip,
        Some((
            ms("2026-01-01T00:00:00Z") + 3_600_000,
            ms("2026-01-01T03:00:00Z"),
            3
        ))
    );
    assert_eq!(p.fire, vec![ms("2026-01-01T04:00:00Z")]);
    let c = schedule("0 * * * *", Missed::CatchUp, made);
    let p = plan(&c, &w, now);
    assert_eq!(p.skip, None);
    assert_eq!(p.fire.len(), 4);
}

#[test]
fn a_time_is_fired_once_and_pauses_skip_their_times() {
    let made = ms("2026-01-01T00:00:00Z");
    let s = schedule("0 * * * *", Missed::CatchUp, made);
    let due = ms("2026-01-01T01:00:00Z");
    let fire = |due| {
        ScheduleCommand::Fire(ScheduleFired {
            at: 0,
            due,
            task_id: None,
            pipeline_id: None,
            error: None,
        })
    };
    let events = Schedule::decide(Some(&s), fire(due), due + 5).unwrap_or_default();
    assert_eq!(events.len(), 1);
    let s = crate::aggregate::fold(Some(s), ScheduleId::new(), &events)
        .unwrap_or_else(|| unreachable!());
    assert_eq!((s.fired, s.done_until), (1, due));
    // Another main server firing the same time changes nothing.
    assert_eq!(Schedule::decide(Some(&s), fire(due), due + 9), Ok(vec![]));
    // Paused from 01:30 to 04:30: those hours are not run once resumed.
    let paused = Schedule::decide(
        Some(&s),
        ScheduleCommand::Pause { reason: "x".into() },
        due + 1_800_000,
    )
    .unwrap_or_default();
    let s = crate::aggregate::fold(Some(s), ScheduleId::new(), &paused)
        .unwrap_or_else(|| unreachable!());
    assert_eq!(
        plan(&s, &when("0 * * * *"), due + 4 * 3_600_000),
        Plan::default()
    );
    assert_eq!(
        Schedule::decide(Some(&s), fire(due + 3_600_000), due),
        Ok(vec![])
    );
    let resumed =
        Schedule::decide(Some(&s), ScheduleCommand::Resume, due + 12_600_000).unwrap_or_default();
    let s = crate::aggregate::fold(Some(s), ScheduleId::new(), &resumed)
        .unwrap_or_else(|| unreachable!());
    let p = plan(&s, &when("0 * * * *"), due + 12_600_000 + 10);
    assert!(p.fire.is_empty() && p.skip.is_none(), "{p:?}");
    let deleted = Schedule::decide(Some(&s), ScheduleCommand::Delete, 0).unwrap_or_default();
    let s = crate::aggregate::fold(Some(s), ScheduleId::new(), &deleted)
        .unwrap_or_else(|| unreachable!());
    assert_eq!(
        Schedule::decide(Some(&s), ScheduleCommand::Resume, 0),
        Err(ScheduleError::Deleted)
    );
    assert_eq!(
        Schedule::decide(Some(&s), ScheduleCommand::Delete, 0),
        Ok(vec![])
    );
}

#[test]
fn a_schedule_as_given_is_checked_field_by_field() {
    let good: SubmitTask = serde_json::from_value(task()).unwrap_or_else(|e| panic!("{e}"));
    let req = CreateSchedule {
        name: "nightly-eval".into(),
        cron: "0 3 * * *".into(),
        timezone: Some("Europe/Berlin".into()),
        missed: None,
        task: Some(good.clone()),
        pipeline: None,
    };
    let (project, c) = validate(&req).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(project.to_string(), "lab");
    assert_eq!(
        (c.missed, c.timezone.as_str()),
        (Missed::Skip, "Europe/Berlin")
    );
    let back: SubmitTask =
        serde_json::from_value(c.task.unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back.code_commit_id, good.code_commit_id);

    let mut bad_task = good;
    bad_task.code_commit_id = "nope".into();
    let bad = CreateSchedule {
        name: "Nightly Eval".into(),
        cron: "every night".into(),
        timezone: Some("Berlin".into()),
        task: Some(bad_task),
        ..req.clone()
    };
    let fields: Vec<String> = validate(&bad)
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|f| f.field)
        .collect();
    assert_eq!(fields, ["name", "cron", "timezone", "task.code_commit_id"]);
    let neither = CreateSchedule { task: None, ..req };
    let fields: Vec<String> = validate(&neither)
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|f| f.field)
        .collect();
    assert_eq!(fields, ["task"]);
}

#[test]
fn a_time_of_a_schedule_always_names_the_same_pipeline() {
    use super::commands::derived_id;
    let (a, b) = (ScheduleId::new(), ScheduleId::new());
    let due = ms("2026-03-29T01:00:00Z");
    let id = derived_id(due, a.0.as_bytes());
    assert_eq!(id, derived_id(due, a.0.as_bytes()));
    assert_ne!(id, derived_id(due + 1_000, a.0.as_bytes()));
    assert_ne!(id, derived_id(due, b.0.as_bytes()));
    assert_eq!(id.get_version_num(), 7);
    let (secs, _) = id.get_timestamp().map(|t| t.to_unix()).unwrap_or_default();
    assert_eq!(i64::try_from(secs).unwrap_or_default(), due / 1_000);
}
