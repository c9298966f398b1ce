//! Projectors against a real nats-server and a real PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Result};
use futures::StreamExt;
use ud_core::{EventStore, Expect};
use ud_projections::rebuild;
use ud_projections::{Db, Projector, ProjectorOptions};
use ud_schemas::codec::EventMeta;
use ud_schemas::events::*;
use ud_schemas::{
    streams, Event, NodeId, NodeResources, ScheduleEvent, ScheduleId, TaskId, TokenId,
};
use ud_testkit::{NatsServer, PgDatabase};

struct Env {
    _nats: NatsServer,
    store: EventStore,
    pg: PgDatabase,
}

async fn env() -> Result<Env> {
    let nats = NatsServer::start().await?;
    let store = EventStore::new(nats.connect().await?, None);
    store.ensure_streams(1).await?;
    Ok(Env {
        _nats: nats,
        store,
        pg: PgDatabase::create().await?,
    })
}

fn spec() -> ud_schemas::TaskSpec {
    let req = ud_core::validate::SubmitTask {
        project: "lab".into(),
        name: None,
        code_repo_url: "https://e.org/c.git".into(),
        code_commit_id: "c".repeat(40),
        env_repo_url: "https://e.org/e.git".into(),
        env_commit_id: "e".repeat(40),
        dockerfile_path: "Dockerfile".into(),
        command: vec!["run".into()],
        args: vec![],
        env: BTreeMap::new(),
        resources: Default::default(),
        timeout_seconds: None,
        retry: None,
        priority: None,
        queue: None,
        inputs: vec![],
        outputs: vec![],
        network: None,
        shm_size_mb: None,
        secrets: vec![],
        checkpoint: None,
        lost_after_seconds: None,
        after: vec![],
        store: None,
        ports: vec![],
        session: None,
        image: None,
    };
    ud_core::validate::submit_task(&req)
        .map(|(_, s)| s)
        .unwrap_or_else(|e| unreachable!("{e:?}"))
}

/// Writes a realistic mix: `tasks` tasks through various lifecycles, a few
/// nodes with heartbeats and an offline, and tokens. Returns events written.
async fn write_history(store: &EventStore, tasks: usize) -> Result<usize> {
    let nodes: Vec<NodeId> = (0..3).map(|_| NodeId::new()).collect();
    let mut items = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        items.push(Event::Node(
            *n,
            NodeEvent::Registered(NodeRegistered {
                at: 1000 + i as i64,
                name: format!("node-{i}"),
                labels: BTreeMap::from([("zone".into(), "a".into())]),
                resources: NodeResources {
                    cpu_millis: 8000,
                    memory_mb: 32000,
                    ..Default::default()
                },
            }),
        ));
        items.push(Event::Node(
            *n,
            NodeEvent::Heartbeat(NodeHeartbeat {
                at: 2000,
                running_tasks: 1,
                disk_free_mb: Some(1000),
                low_disk: false,
                gpus: None,
            }),
        ));
    }
    items.push(Event::Node(
        nodes[0],
        NodeEvent::WentOffline(NodeWentOffline {
            at: 99_000,
            last_seen: 2000,
        }),
    ));
    let token = TokenId::new();
    items.push(Event::Auth(
        token,
        AuthEvent::TokenIssued(TokenIssued {
            at: 1,
            name: "t".into(),
            digest: "d1".into(),
            projects: vec!["lab".parse()?],
            admin: false,
            user: None,
            expires_at: None,
        }),
    ));
    items.push(Event::Auth(
        token,
        AuthEvent::TokenRevoked(TokenRevoked { at: 2 }),
    ));
    // A project: created with its owner, two members added, one promoted,
    // one removed, then archived.
    let lab: ud_schemas::ProjectId = "lab".parse()?;
    let p = |e| Event::Project(lab.clone(), e);
    items.push(p(ProjectEvent::Created(ProjectCreated {
        at: 3,
        description: "vision".into(),
    })));
    for (at, user, role) in [
        (4, "ada", Role::Owner),
        (5, "bob", Role::Viewer),
        (6, "cy", Role::Member),
    ] {
        items.push(p(ProjectEvent::MemberAdded(ProjectMemberAdded {
            at,
            user: user.into(),
            role,
        })));
    }
    items.push(p(ProjectEvent::RoleChanged(ProjectRoleChanged {
        at: 7,
        user: "bob".into(),
        role: Role::Member,
    })));
    items.push(p(ProjectEvent::MemberRemoved(ProjectMemberRemoved {
        at: 8,
        user: "cy".into(),
    })));
    items.push(p(ProjectEvent::Archived(ProjectArchived { at: 9 })));
    // Schedules: one fired, skipped, paused and resumed; one deleted.
    for (k, deleted) in [(0_i64, false), (1, true)] {
        let id = ScheduleId::new();
        items.push(Event::Schedule(
            id,
            ScheduleEvent::Created(ScheduleCreated {
                at: 3_000 + k,
                project: "lab".parse()?,
                name: format!("nightly-{k}"),
                cron: "0 3 * * *".into(),
                timezone: "Europe/Berlin".into(),
                missed: Missed::Skip,
                task: Some(serde_json::json!({"project": "lab", "command": ["true"]})),
                pipeline: None,
            }),
        ));
        items.push(Event::Schedule(
            id,
            ScheduleEvent::Fired(ScheduleFired {
                at: 90_000,
                due: 86_400_000,
                task_id: Some(TaskId::new()),
                pipeline_id: None,
                error: None,
            }),
        ));
        items.push(Event::Schedule(
            id,
            ScheduleEvent::Skipped(ScheduleSkipped {
                at: 400_000_000,
                first: 172_800_000,
                last: 259_200_000,
                count: 2,
            }),
        ));
        items.push(Event::Schedule(
            id,
            if deleted {
                ScheduleEvent::Deleted(ScheduleDeleted { at: 400_000_001 })
            } else {
                ScheduleEvent::Paused(SchedulePaused {
                    at: 400_000_001,
                    reason: "maintenance".into(),
                })
            },
        ));
    }
    // Finished tasks that hear of something late (a replay writes finished
    // tasks early and must take them up again).
    let mut late = Vec::new();
    for i in 0..tasks {
        let id = TaskId::new();
        if i % 5 == 2 && i % 3 == 0 {
            late.push(id);
        }
        let node_id = nodes[i % 3];
        let at = 10_000 + i as i64;
        items.push(Event::Task(
            id,
            TaskEvent::Submitted(TaskSubmitted {
                at,
                project: if i % 2 == 0 {
                    "lab".parse()?
                } else {
                    "other".parse()?
                },
                spec: spec(),
                idempotency_key: None,
            }),
        ));
        if i % 5 == 0 {
            items.push(Event::Task(
                id,
                TaskEvent::Cancelled(TaskCancelled {
                    at: at + 1,
                    reason: "user".into(),
                }),
            ));
            continue;
        }
        items.push(Event::Task(
            id,
            TaskEvent::Assigned(TaskAssigned {
                at: at + 1,
                node_id,
                attempt: 1,
                gpus: vec![],
            }),
        ));
        if i % 5 == 1 {
            continue;
        }
        items.push(Event::Task(
            id,
            TaskEvent::Started(TaskStarted {
                at: at + 2,
                node_id,
                attempt: 1,
            }),
        ));
        items.push(Event::Task(
            id,
            match i % 5 {
                2 => TaskEvent::Succeeded(TaskSucceeded {
                    at: at + 3,
                    exit_code: 0,
                }),
                3 => TaskEvent::Failed(TaskFailed {
                    at: at + 3,
                    exit_code: Some(2),
                    reason: "exit 2".into(),
                }),
                _ => TaskEvent::CancelRequested(TaskCancelRequested {
                    at: at + 3,
                    reason: "stop".into(),
                }),
            },
        ));
    }
    for (k, id) in late.into_iter().enumerate() {
        items.push(Event::Task(
            id,
            TaskEvent::Reprioritized(TaskReprioritized {
                at: 900_000 + k as i64,
                priority: 5,
            }),
        ));
    }
    let n = items.len();
    for chunk in items.chunks(1000) {
        let batch = chunk
            .iter()
            .map(|e| (e.clone(), EventMeta::new("test"), Expect::Any))
            .collect();
        for r in store.append_pipelined(batch, 256).await {
            r?;
        }
    }
    Ok(n)
}

async fn last_seqs(store: &EventStore) -> Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::new();
    for s in streams::PROJECTED {
        out.push((
            s,
            store
                .jetstream()
                .get_stream(s)
                .await?
                .info()
                .await?
                .state
                .last_sequence,
        ));
    }
    Ok(out)
}

async fn project_all(db: &Db, store: &EventStore, batch_max: usize) -> Result<()> {
    for (s, last) in last_seqs(store).await? {
        Projector::new(
            db.clone(),
            store.jetstream().clone(),
            s,
            ProjectorOptions {
                batch_max,
                notify: true,
                ..Default::default()
            },
        )
        .run(Some(last))
        .await?;
    }
    Ok(())
}

/// The live read models equal a clean replay, with aggregates written
/// once at the end and written in many small flushes (each one loaded back
/// for its later events), and so do the recorded errors.
async fn assert_equal_to_replay(env: &Env, live: &Db) -> Result<()> {
    // Memory for everything; full at every few events; finished tasks
    // written every 100 while memory never fills.
    for (schema, batch_max, folds_max) in [
        ("replay", 5000, 200_000),
        ("replay_small", 7, 5),
        ("replay_settled", 50, 1000),
    ] {
        let replay = Db::connect(&env.pg.url, schema, 4).await?;
        rebuild::rebuild_bounded(&replay, env.store.jetstream(), batch_max, folds_max).await?;
        let diffs = rebuild::compare(&replay, live.schema(), schema).await?;
        for d in &diffs {
            assert_eq!(
                (d.only_in_left, d.only_in_right),
                (0, 0),
                "{} differs from a replay into {schema}",
                d.table
            );
        }
        let errors = |s: &str| {
            format!("SELECT stream, seq, error FROM {s}.projection_errors ORDER BY stream, seq")
        };
        let c = live.client().await?;
        let want: Vec<(String, i64, String)> = c
            .query(&errors(live.schema()), &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let got: Vec<(String, i64, String)> = c
            .query(&errors(schema), &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(got, want, "errors recorded by a replay into {schema}");
        // The replay builds the indexes it put off once its rows are in.
        let indexes = |s: &str| {
            format!(
                "SELECT tablename, indexname, replace(indexdef, ' {s}.', ' ') FROM pg_indexes
                  WHERE schemaname = '{s}' ORDER BY tablename, indexname"
            )
        };
        let index_rows = |rows: Vec<tokio_postgres::Row>| -> Vec<(String, String, String)> {
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        };
        let want = index_rows(c.query(&indexes(live.schema()), &[]).await?);
        let got = index_rows(c.query(&indexes(schema), &[]).await?);
        assert!(want.iter().any(|i| i.1 == "tasks_state_id"), "{want:?}");
        assert_eq!(got, want, "indexes after a replay into {schema}");
    }
    Ok(())
}

/// Main servers started at the same time on an empty database: each one
/// migrates it, none fails on what another has just created.
#[tokio::test]
async fn servers_migrating_at_once_all_succeed() -> Result<()> {
    let pg = PgDatabase::create().await?;
    let mut dbs = Vec::new();
    for _ in 0..4 {
        dbs.push(Db::connect(&pg.url, "public", 2).await?);
    }
    let results = futures::future::join_all(dbs.iter().map(|db| db.migrate())).await;
    for r in results {
        r?;
    }
    let c = dbs[0].client().await?;
    let applied: i64 = c
        .query_one("SELECT count(*) FROM refinery_schema_history", &[])
        .await?
        .get(0);
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert_eq!(applied as usize, files, "every migration applied once");
    Ok(())
}

#[tokio::test]
async fn projection_matches_history_and_replay() -> Result<()> {
    let env = env().await?;
    write_history(&env.store, 200).await?;
    let db = Db::connect(&env.pg.url, "public", 4).await?;
    db.migrate().await?;
    project_all(&db, &env.store, 64).await?;
    let c = db.client().await?;
    let count = |state: &'static str| {
        let c = &c;
        async move {
            c.query_one("SELECT count(*) FROM tasks WHERE state = $1", &[&state])
                .await
                .map(|r| r.get::<_, i64>(0))
        }
    };
    assert_eq!(count("cancelled").await?, 40);
    assert_eq!(count("assigned").await?, 40);
    assert_eq!(count("succeeded").await?, 40);
    assert_eq!(count("failed").await?, 40);
    assert_eq!(count("cancelling").await?, 40);
    let row = c
        .query_one(
            "SELECT exit_code, reason, version FROM tasks WHERE state = 'failed' LIMIT 1",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, Option<i32>>(0), Some(2));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("exit 2"));
    assert_eq!(row.get::<_, i64>(2), 4);
    let offline: i64 = c
        .query_one("SELECT count(*) FROM nodes WHERE status = 'offline'", &[])
        .await?
        .get(0);
    assert_eq!(offline, 1);
    let revoked: i64 = c
        .query_one(
            "SELECT count(*) FROM api_tokens WHERE revoked_at IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(revoked, 1);
    let members: Vec<(String, String)> = c
        .query(
            "SELECT m.user_name, m.role FROM project_members m JOIN projects p ON p.name = m.project
             WHERE p.name = 'lab' AND p.archived_at IS NOT NULL ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        members,
        [
            ("ada".into(), "owner".into()),
            ("bob".into(), "member".into())
        ]
    );
    let schedules: Vec<(String, i64, i64, Option<String>)> = c
        .query(
            "SELECT state, fired, skipped, paused_reason FROM schedules ORDER BY name",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        schedules,
        [
            ("paused".into(), 1, 2, Some("maintenance".into())),
            ("deleted".into(), 1, 2, None)
        ]
    );
    assert_equal_to_replay(&env, &db).await
}

#[tokio::test]
async fn killed_mid_batch_and_restarted_equals_clean_replay() -> Result<()> {
    let env = env().await?;
    write_history(&env.store, 3000).await?;
    let tasks_last = env
        .store
        .jetstream()
        .get_stream(streams::TASKS)
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    let db = Db::connect(&env.pg.url, "public", 4).await?;
    db.migrate().await?;
    let mut notices = env
        .store
        .client()
        .subscribe(ud_schemas::subjects::projected(streams::TASKS))
        .await?;
    let mut kills = 0;
    // Kill the projector right after a commit (the next batch is then in flight), several times.
    for _ in 0..4 {
        let projector = Projector::new(
            db.clone(),
            env.store.jetstream().clone(),
            streams::TASKS,
            ProjectorOptions {
                batch_max: 300,
                notify: true,
                ..Default::default()
            },
        );
        let handle = tokio::spawn(async move { projector.run(Some(tasks_last)).await });
        let notice = tokio::time::timeout(Duration::from_secs(30), notices.next())
            .await?
            .ok_or_else(|| anyhow!("no notice"))?;
        handle.abort();
        let _ = handle.await;
        let committed: u64 = std::str::from_utf8(&notice.payload)?.parse()?;
        if committed < tasks_last {
            kills += 1;
        }
        // Whatever the kill interrupted was rolled back: the checkpoint is a committed batch end.
        let cp = db.checkpoint(streams::TASKS).await?;
        assert!(cp >= committed && cp <= tasks_last);
    }
    assert!(
        kills >= 1,
        "the projector was never interrupted before the end"
    );
    project_all(&db, &env.store, 300).await?;
    assert_eq!(db.checkpoint(streams::TASKS).await?, tasks_last);
    assert_equal_to_replay(&env, &db).await
}

#[tokio::test]
async fn competing_projectors_never_apply_an_event_twice() -> Result<()> {
    let env = env().await?;
    write_history(&env.store, 1000).await?;
    let last = env
        .store
        .jetstream()
        .get_stream(streams::TASKS)
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    let db = Db::connect(&env.pg.url, "public", 8).await?;
    db.migrate().await?;
    // Two instances over the same range, without the advisory lock: every
    // batch one of them applies is redelivered to the other.
    let run = |batch_max| {
        let p = Projector::new(
            db.clone(),
            env.store.jetstream().clone(),
            streams::TASKS,
            ProjectorOptions {
                batch_max,
                notify: false,
                ..Default::default()
            },
        );
        async move {
            loop {
                match p.run(Some(last)).await {
                    Ok(seq) => return Ok::<u64, anyhow::Error>(seq),
                    Err(ud_projections::ProjectionError::CheckpointMoved { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    let (a, b) = tokio::join!(run(97), run(131));
    assert_eq!(a?, last);
    assert_eq!(b?, last);
    project_all(&db, &env.store, 500).await?;
    assert_equal_to_replay(&env, &db).await
}

#[tokio::test]
async fn undecodable_messages_are_recorded_and_projection_goes_on() -> Result<()> {
    let env = env().await?;
    let js = env.store.jetstream();
    let bad_id = TaskId::new();
    js.publish(format!("ud.task.{bad_id}.submitted"), "not cbor".into())
        .await?
        .await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Ud-Schema-Version", "7");
    js.publish_with_headers(
        format!("ud.task.{}.submitted", TaskId::new()),
        headers,
        "x".into(),
    )
    .await?
    .await?;
    js.publish(format!("ud.task.{}.exploded", TaskId::new()), "x".into())
        .await?
        .await?;
    // An event for a task that was never submitted.
    let orphan = Event::Task(
        TaskId::new(),
        TaskEvent::Succeeded(TaskSucceeded {
            at: 1,
            exit_code: 0,
        }),
    );
    env.store
        .append(&orphan, &EventMeta::new("test"), Expect::Any)
        .await?;
    let n = write_history(&env.store, 20).await?;
    assert!(n > 0);
    let db = Db::connect(&env.pg.url, "public", 4).await?;
    db.migrate().await?;
    project_all(&db, &env.store, 1000).await?;
    let c = db.client().await?;
    let errors = c
        .query(
            "SELECT seq, error FROM projection_errors WHERE stream = 'UD_TASKS' ORDER BY seq",
            &[],
        )
        .await?;
    let seqs: Vec<i64> = errors.iter().map(|r| r.get(0)).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let reasons: Vec<String> = errors.iter().map(|r| r.get(1)).collect();
    assert!(reasons[1].contains("version 7"), "{reasons:?}");
    assert!(reasons[3].contains("unknown aggregate"), "{reasons:?}");
    let tasks: i64 = c.query_one("SELECT count(*) FROM tasks", &[]).await?.get(0);
    assert_eq!(tasks, 20);
    assert_equal_to_replay(&env, &db).await
}

#[tokio::test]
async fn nul_characters_from_events_do_not_stop_the_projection() -> Result<()> {
    let env = env().await?;
    // What validation refuses can still come from a node, or from history.
    let (node, task) = (NodeId::new(), TaskId::new());
    let mut spec = spec();
    spec.name = Some("a\0b".into());
    spec.env.insert("X".into(), "\0".into());
    let events = [
        Event::Node(
            node,
            NodeEvent::Registered(NodeRegistered {
                at: 1,
                name: "gpu\0box".into(),
                labels: BTreeMap::from([("zone\0".into(), "a\0".into())]),
                resources: NodeResources::default(),
            }),
        ),
        Event::Task(
            task,
            TaskEvent::Submitted(TaskSubmitted {
                at: 2,
                project: "lab".parse()?,
                spec,
                idempotency_key: None,
            }),
        ),
        Event::Task(
            task,
            TaskEvent::Failed(TaskFailed {
                at: 3,
                exit_code: None,
                reason: "bad\0reason".into(),
            }),
        ),
    ];
    for e in &events {
        env.store
            .append(e, &EventMeta::new("test"), Expect::Any)
            .await?;
    }
    // Work after them is projected too.
    let n = write_history(&env.store, 5).await?;
    assert!(n > 0);
    let db = Db::connect(&env.pg.url, "public", 4).await?;
    db.migrate().await?;
    project_all(&db, &env.store, 1000).await?;
    let c = db.client().await?;
    let row = c
        .query_one(
            "SELECT name, reason, spec->'env'->>'X', state FROM tasks WHERE id = $1",
            &[&task.0],
        )
        .await?;
    let (name, reason, x, state): (String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(name, "a\u{fffd}b");
    assert_eq!(reason, "bad\u{fffd}reason");
    assert_eq!(x, "\u{fffd}");
    assert_eq!(state, "failed");
    let row = c
        .query_one(
            "SELECT name, labels::text FROM nodes WHERE id = $1",
            &[&node.0],
        )
        .await?;
    let (name, labels): (String, String) = (row.get(0), row.get(1));
    assert_eq!(name, "gpu\u{fffd}box");
    assert!(labels.contains("zone\u{fffd}"), "{labels}");
    let tasks: i64 = c.query_one("SELECT count(*) FROM tasks", &[]).await?.get(0);
    assert_eq!(tasks, 6);
    // A replay (rows copied in bulk, some flushed while reading) mends them alike.
    assert_equal_to_replay(&env, &db).await
}

/// An audit compares the live tables with a replay of the events they had
/// projected at one moment: events appended but not projected yet (a live
/// system goes on) are not differences, while a replay of everything does
/// differ from them.
#[tokio::test]
async fn an_audit_compares_at_what_the_live_side_had_projected() -> Result<()> {
    let env = env().await?;
    write_history(&env.store, 30).await?;
    let db = Db::connect(&env.pg.url, "public", 4).await?;
    db.migrate().await?;
    project_all(&db, &env.store, 1000).await?;
    // A node registers after the live side last projected.
    let late = Event::Node(
        NodeId::new(),
        NodeEvent::Registered(NodeRegistered {
            at: 5000,
            name: "late".into(),
            labels: BTreeMap::new(),
            resources: NodeResources::default(),
        }),
    );
    env.store
        .append(&late, &EventMeta::new("test"), Expect::Any)
        .await?;
    let replay = Db::connect(&env.pg.url, "audit", 4).await?;
    let audit = rebuild::audit(&replay, env.store.jetstream(), 5000, "public").await?;
    assert!(audit.equal(), "{:?}", audit.differences);
    rebuild::rebuild(&replay, env.store.jetstream(), 5000).await?;
    let diffs = rebuild::compare(&replay, "audit", "public").await?;
    assert!(diffs.iter().any(|d| d.only_in_left > 0), "{diffs:?}");
    // The copy of the live tables is gone.
    let c = db.client().await?;
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'audit_live'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(left, 0);
    Ok(())
}
