//! Golden CBOR files of every event version: each decodes to its fixture,
//! each fixture encodes to bytes that decode back to it, and every file
//! validates against the CDDL that integrations read.
//! `UD_BLESS=1 cargo test -p ud-schemas --test golden` writes new files; a
//! released version's files are never rewritten.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ud_schemas::events::*;
use ud_schemas::spec::{Gpu, PipelineStep, Resources, RetryPolicy, StepWhen};
use ud_schemas::{codec, Event, NodeId, NodeResources, ProjectId, TaskId, TaskSpec, TokenId};
use uuid::Uuid;

fn task_id() -> TaskId {
    TaskId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001))
}
fn node_id() -> NodeId {
    NodeId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002))
}
fn token_id() -> TokenId {
    TokenId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0003))
}
const AT: i64 = 1_790_000_000_000;

fn project() -> ProjectId {
    ProjectId::parse("vision-lab").unwrap_or_else(|e| unreachable!("{e}"))
}

fn spec() -> TaskSpec {
    TaskSpec {
        name: Some("train resnet".into()),
        code_repo_url: "https://git.example.org/lab/code.git".into(),
        code_commit_id: "0123456789abcdef0123456789abcdef01234567".into(),
        env_repo_url: "ssh://git.example.org/lab/env.git".into(),
        env_commit_id: "89abcdef0123456789abcdef0123456789abcdef".into(),
        dockerfile_path: "envs/cuda/Dockerfile".into(),
        command: vec!["python".into(), "train.py".into()],
        args: vec!["--epochs".into(), "3".into()],
        env: BTreeMap::from([("SEED".into(), "7".into())]),
        resources: Resources {
            cpu_millis: 4000,
            memory_mb: 16384,
            gpus: 1,
            gpu_model: Some("A100".into()),
            labels: BTreeMap::from([("zone".into(), "lab2".into())]),
            preferred_labels: BTreeMap::new(),
            disk_mb: 0,
            gpu_memory_mb: 0,
            gpu_compute_capability: None,
            gpu_driver: None,
            gpu_shared: false,
            network: Default::default(),
            preferred_nodes: Vec::new(),
        },
        timeout_seconds: 3600,
        retry: RetryPolicy {
            max_attempts: 3,
            backoff_seconds: 30,
            exit_codes: vec![],
            on_timeout: false,
        },
        priority: 0,
        queue: "default".into(),
        inputs: vec![],
        outputs: vec![],
        shm_size_mb: None,
        secrets: vec![],
        checkpoint: None,
        lost_after_seconds: None,
        after: vec![],
        shared: None,
        store: None,
        ports: vec![],
        session: None,
        image: None,
    }
}

/// (file name, subject, event) for every event type of version 1.
fn fixtures_v1() -> Vec<(&'static str, Event)> {
    let t = task_id();
    let n = node_id();
    vec![
        (
            "task-submitted",
            Event::Task(
                t,
                TaskEvent::Submitted(TaskSubmitted {
                    at: AT,
                    project: project(),
                    spec: spec(),
                    idempotency_key: Some("k-1".into()),
                }),
            ),
        ),
        (
            "task-waiting",
            Event::Task(
                t,
                TaskEvent::Waiting(TaskWaiting {
                    at: AT,
                    reason: "waiting for room: 2 nodes could run it (busy 1, offline 1)".into(),
                    kind: None,
                }),
            ),
        ),
        (
            "task-assigned",
            Event::Task(
                t,
                TaskEvent::Assigned(TaskAssigned {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                    gpus: vec![],
                }),
            ),
        ),
        (
            "task-preparing",
            Event::Task(
                t,
                TaskEvent::Preparing(TaskPreparing {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                    step: "build_image".into(),
                }),
            ),
        ),
        (
            "task-prepared",
            Event::Task(
                t,
                TaskEvent::Prepared(TaskPrepared {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                    code_commit_id: "0123456789abcdef0123456789abcdef01234567".into(),
                    env_commit_id: "89abcdef0123456789abcdef0123456789abcdef".into(),
                    dockerfile_digest: "ab".repeat(32),
                    image_id: "sha256:".to_owned() + &"cd".repeat(32),
                    steps: vec![
                        PrepareStep {
                            name: "fetch_code".into(),
                            millis: 12,
                        },
                        PrepareStep {
                            name: "build_image".into(),
                            millis: 3400,
                        },
                    ],
                    gpus: vec![GpuInUse {
                        model: "A100".into(),
                        driver: "550.54".into(),
                        uuid: String::new(),
                    }],
                }),
            ),
        ),
        (
            "task-reprioritized",
            Event::Task(
                t,
                TaskEvent::Reprioritized(TaskReprioritized {
                    at: AT,
                    priority: 10,
                }),
            ),
        ),
        (
            "task-retrying",
            Event::Task(
                t,
                TaskEvent::Retrying(TaskRetrying {
                    at: AT,
                    attempt: 1,
                    exit_code: Some(3),
                    reason: "exited with code 3".into(),
                    not_before: AT + 30_000,
                }),
            ),
        ),
        (
            "task-lost",
            Event::Task(
                t,
                TaskEvent::Lost(TaskLost {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                    reason: "node went offline".into(),
                }),
            ),
        ),
        (
            "task-disconnected",
            Event::Task(
                t,
                TaskEvent::Disconnected(TaskDisconnected {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                    lost_at: AT + 600_000,
                }),
            ),
        ),
        (
            "task-reconnected",
            Event::Task(
                t,
                TaskEvent::Reconnected(TaskReconnected {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                    running: true,
                }),
            ),
        ),
        (
            "task-started",
            Event::Task(
                t,
                TaskEvent::Started(TaskStarted {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                }),
            ),
        ),
        (
            "task-outputs",
            Event::Task(
                t,
                TaskEvent::Outputs(TaskOutputs {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                    files: vec![OutputObject {
                        path: "results/model.bin".into(),
                        key: format!("projects/lab/tasks/{t}/outputs/results/model.bin"),
                        size: 1024,
                        sha256: "ef".repeat(32),
                    }],
                }),
            ),
        ),
        (
            "task-succeeded",
            Event::Task(
                t,
                TaskEvent::Succeeded(TaskSucceeded {
                    at: AT,
                    exit_code: 0,
                }),
            ),
        ),
        (
            "task-failed",
            Event::Task(
                t,
                TaskEvent::Failed(TaskFailed {
                    at: AT,
                    exit_code: Some(137),
                    reason: "killed".into(),
                }),
            ),
        ),
        (
            "task-timed_out",
            Event::Task(
                t,
                TaskEvent::TimedOut(TaskTimedOut {
                    at: AT,
                    timeout_seconds: 3600,
                }),
            ),
        ),
        (
            "task-cancel_requested",
            Event::Task(
                t,
                TaskEvent::CancelRequested(TaskCancelRequested {
                    at: AT,
                    reason: "user".into(),
                }),
            ),
        ),
        (
            "task-cancelled",
            Event::Task(
                t,
                TaskEvent::Cancelled(TaskCancelled {
                    at: AT,
                    reason: "user".into(),
                }),
            ),
        ),
        (
            "node-registered",
            Event::Node(
                n,
                NodeEvent::Registered(NodeRegistered {
                    at: AT,
                    name: "gpu-box-1".into(),
                    labels: BTreeMap::from([("zone".into(), "lab2".into())]),
                    resources: NodeResources {
                        cpu_millis: 32000,
                        memory_mb: 128 * 1024,
                        disk_mb: 2_000_000,
                        gpus: vec![Gpu {
                            model: "A100".into(),
                            memory_mb: 81920,
                            index: 0,
                            uuid: String::new(),
                            compute_capability: None,
                            mig_profile: None,
                            pci_bus_id: None,
                        }],
                        os: "linux".into(),
                        wsl: false,
                        docker_version: Some("28.2.2".into()),
                        agent_version: "0.1.0".into(),
                        gpu_driver: None,
                        cuda_version: None,
                        networks: vec![],
                    },
                }),
            ),
        ),
        (
            "node-enrolled",
            Event::Node(
                n,
                NodeEvent::Enrolled(NodeEnrolled {
                    at: AT,
                    name: "gpu-box-1".into(),
                    labels: BTreeMap::from([("zone".into(), "lab2".into())]),
                    secret_hash: "$2b$04$abcdefghijklmnopqrstuu5Q0m3V5Zb1rjw4qT4Ff3U3Qy7kZGkHe"
                        .into(),
                }),
            ),
        ),
        (
            "node-revoked",
            Event::Node(n, NodeEvent::Revoked(NodeRevoked { at: AT })),
        ),
        // Version 1 had no disk fields: it reads back upcast.
        (
            "node-heartbeat",
            Event::Node(
                n,
                NodeEvent::Heartbeat(NodeHeartbeat {
                    at: AT,
                    running_tasks: 2,
                    disk_free_mb: None,
                    low_disk: false,
                    gpus: None,
                }),
            ),
        ),
        (
            "node-offline",
            Event::Node(
                n,
                NodeEvent::WentOffline(NodeWentOffline {
                    at: AT,
                    last_seen: AT - 90_000,
                }),
            ),
        ),
        (
            "node-scheduling",
            Event::Node(
                n,
                NodeEvent::Scheduling(NodeScheduling {
                    at: AT,
                    mode: ud_schemas::SchedulingMode::Draining,
                    reason: "disk swap".into(),
                }),
            ),
        ),
        (
            "token-issued",
            Event::Auth(
                token_id(),
                AuthEvent::TokenIssued(TokenIssued {
                    at: AT,
                    name: "ci".into(),
                    digest: "ab".repeat(32),
                    projects: vec![project()],
                    admin: false,
                    user: None,
                    expires_at: None,
                }),
            ),
        ),
        (
            "token-revoked",
            Event::Auth(token_id(), AuthEvent::TokenRevoked(TokenRevoked { at: AT })),
        ),
        (
            "secret-set",
            Event::Secret(secret(), SecretEvent::Set(SecretSet { at: AT, version: 3 })),
        ),
        (
            "secret-deleted",
            Event::Secret(
                secret(),
                SecretEvent::Deleted(SecretDeleted { at: AT, version: 3 }),
            ),
        ),
        (
            "pipeline-submitted",
            Event::Pipeline(
                pipeline_id(),
                PipelineEvent::Submitted(PipelineSubmitted {
                    at: AT,
                    project: project(),
                    name: Some("nightly".into()),
                    steps: vec![
                        PipelineStep {
                            name: "train".into(),
                            spec: spec(),
                            needs: vec![],
                            when: StepWhen::OnSuccess,
                            matrix: BTreeMap::from([(
                                "lr".into(),
                                vec!["0.1".into(), "0.01".into()],
                            )]),
                            merge: Default::default(),
                        },
                        PipelineStep {
                            name: "report".into(),
                            spec: spec(),
                            needs: vec!["train".into()],
                            when: StepWhen::Always,
                            matrix: BTreeMap::new(),
                            merge: Default::default(),
                        },
                    ],
                    idempotency_key: None,
                }),
            ),
        ),
        (
            "pipeline-steps_started",
            Event::Pipeline(
                pipeline_id(),
                PipelineEvent::StepsStarted(PipelineStepsStarted {
                    at: AT,
                    steps: vec![
                        StepStart {
                            step: "train[0.1]".into(),
                            task: task_id(),
                            run: 1,
                        },
                        StepStart {
                            step: "train[0.01]".into(),
                            task: task_id(),
                            run: 2,
                        },
                    ],
                }),
            ),
        ),
        (
            "pipeline-step_ended",
            Event::Pipeline(
                pipeline_id(),
                PipelineEvent::StepEnded(PipelineStepEnded {
                    at: AT,
                    step: "train[0.1]".into(),
                    task: task_id(),
                    outcome: StepOutcome::TimedOut,
                }),
            ),
        ),
        (
            "pipeline-step_skipped",
            Event::Pipeline(
                pipeline_id(),
                PipelineEvent::StepSkipped(PipelineStepSkipped {
                    at: AT,
                    step: "report".into(),
                    reason: "step train[0.1] timed_out".into(),
                }),
            ),
        ),
        (
            "pipeline-cancel_requested",
            Event::Pipeline(
                pipeline_id(),
                PipelineEvent::CancelRequested(PipelineCancelRequested {
                    at: AT,
                    reason: "wrong data".into(),
                }),
            ),
        ),
        (
            "pipeline-rerun",
            Event::Pipeline(
                pipeline_id(),
                PipelineEvent::Rerun(PipelineRerun {
                    at: AT,
                    steps: vec!["train[0.1]".into(), "report".into()],
                }),
            ),
        ),
        (
            "pipeline-ended",
            Event::Pipeline(
                pipeline_id(),
                PipelineEvent::Ended(PipelineEnded {
                    at: AT,
                    outcome: PipelineOutcome::Failed,
                }),
            ),
        ),
        (
            "project-created",
            Event::Project(
                project(),
                ProjectEvent::Created(ProjectCreated {
                    at: AT,
                    description: "Vision models".into(),
                }),
            ),
        ),
        (
            "project-member_added",
            Event::Project(
                project(),
                ProjectEvent::MemberAdded(ProjectMemberAdded {
                    at: AT,
                    user: "ada@example.org".into(),
                    role: Role::Owner,
                }),
            ),
        ),
        (
            "project-role_changed",
            Event::Project(
                project(),
                ProjectEvent::RoleChanged(ProjectRoleChanged {
                    at: AT,
                    user: "ada@example.org".into(),
                    role: Role::Viewer,
                }),
            ),
        ),
        (
            "project-member_removed",
            Event::Project(
                project(),
                ProjectEvent::MemberRemoved(ProjectMemberRemoved {
                    at: AT,
                    user: "ada@example.org".into(),
                }),
            ),
        ),
        (
            "project-archived",
            Event::Project(
                project(),
                ProjectEvent::Archived(ProjectArchived { at: AT }),
            ),
        ),
        (
            "schedule-created",
            Event::Schedule(
                schedule_id(),
                ScheduleEvent::Created(ScheduleCreated {
                    at: AT,
                    project: project(),
                    name: "nightly-eval".into(),
                    cron: "0 3 * * *".into(),
                    timezone: "Europe/Berlin".into(),
                    missed: Missed::Skip,
                    task: Some(serde_json::json!({
                        "project": "vision-lab",
                        "code_repo_url": "https://git.example.org/lab/code.git",
                        "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
                        "command": ["python", "eval.py"],
                        "resources": {"cpus": 0.5, "gpus": 1},
                    })),
                    pipeline: None,
                }),
            ),
        ),
        (
            "schedule-fired",
            Event::Schedule(
                schedule_id(),
                ScheduleEvent::Fired(ScheduleFired {
                    at: AT,
                    due: AT - 20,
                    task_id: Some(task_id()),
                    pipeline_id: None,
                    error: None,
                }),
            ),
        ),
        (
            "schedule-skipped",
            Event::Schedule(
                schedule_id(),
                ScheduleEvent::Skipped(ScheduleSkipped {
                    at: AT,
                    first: AT - 3 * 86_400_000,
                    last: AT - 86_400_000,
                    count: 3,
                }),
            ),
        ),
        (
            "schedule-paused",
            Event::Schedule(
                schedule_id(),
                ScheduleEvent::Paused(SchedulePaused {
                    at: AT,
                    reason: "cluster maintenance".into(),
                }),
            ),
        ),
        (
            "schedule-resumed",
            Event::Schedule(
                schedule_id(),
                ScheduleEvent::Resumed(ScheduleResumed { at: AT }),
            ),
        ),
        (
            "schedule-deleted",
            Event::Schedule(
                schedule_id(),
                ScheduleEvent::Deleted(ScheduleDeleted { at: AT }),
            ),
        ),
    ]
}

fn schedule_id() -> ud_schemas::ScheduleId {
    ud_schemas::ScheduleId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0005))
}

fn pipeline_id() -> ud_schemas::PipelineId {
    ud_schemas::PipelineId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0004))
}

fn secret() -> ud_schemas::SecretRef {
    ud_schemas::SecretRef {
        project: project(),
        name: "WANDB_API_KEY".into(),
    }
}

/// Version 2 of the event types that have one.
fn fixtures_v2() -> Vec<(&'static str, Event)> {
    vec![(
        "node-heartbeat",
        Event::Node(
            node_id(),
            NodeEvent::Heartbeat(NodeHeartbeat {
                at: AT,
                running_tasks: 2,
                disk_free_mb: Some(51_200),
                low_disk: false,
                gpus: None,
            }),
        ),
    )]
}

/// A spec using the fields added to `task-spec` and `task-resources` after
/// their first events were stored (optional: older events lack them).
fn gpu_spec() -> TaskSpec {
    let mut s = spec();
    s.resources.gpus = 2;
    s.resources.gpu_model = Some("a100-80gb".into());
    s.resources.gpu_memory_mb = 40_960;
    s.resources.gpu_compute_capability = Some("8.0".into());
    s.resources.gpu_driver = Some("535.104".into());
    s.resources.gpu_shared = true;
    s.resources.network = ud_schemas::spec::NetworkMode::Egress;
    s.shm_size_mb = Some(8192);
    s.secrets = vec!["WANDB_API_KEY".into()];
    s.checkpoint = Some(ud_schemas::spec::Checkpoint {
        path: "checkpoints".into(),
        every_seconds: 300,
        from: Some(ud_schemas::TaskId(uuid::Uuid::from_u128(
            0x0190_0000_0000_7000_8000_0000_0000_0002,
        ))),
    });
    s
}

/// Events with the optional fields added later, each in its own file
/// (`<type>+<what>.cbor`) beside the type's first one.
fn fixtures_with_later_fields() -> Vec<(&'static str, &'static str, Event)> {
    let (t, n) = (task_id(), node_id());
    vec![
        (
            "task-waiting+kind",
            "task-waiting",
            Event::Task(
                t,
                TaskEvent::Waiting(TaskWaiting {
                    at: AT,
                    reason:
                        "project vision-lab holds 2 of its quota of 2 GPUs; this task asks for 1"
                            .into(),
                    kind: Some("quota gpus".into()),
                }),
            ),
        ),
        (
            "token-issued+user-expiry",
            "token-issued",
            Event::Auth(
                token_id(),
                AuthEvent::TokenIssued(TokenIssued {
                    at: AT,
                    name: "ada-laptop".into(),
                    digest: "cd".repeat(32),
                    projects: vec![],
                    admin: false,
                    user: Some("ada@example.org".into()),
                    expires_at: Some(AT + 90 * 86_400_000),
                }),
            ),
        ),
        (
            "task-submitted+session",
            "task-submitted",
            Event::Task(
                t,
                TaskEvent::Submitted(TaskSubmitted {
                    at: AT,
                    project: project(),
                    spec: TaskSpec {
                        ports: vec![6006, 8888],
                        session: Some(ud_schemas::spec::Session {
                            id: "3f2a9c0d5b6e4f718293a4b5c6d7e8f9".into(),
                            port: 8888,
                            idle_timeout_seconds: 3600,
                        }),
                        ..spec()
                    },
                    idempotency_key: None,
                }),
            ),
        ),
        (
            "task-submitted+gpus-runtime",
            "task-submitted",
            Event::Task(
                t,
                TaskEvent::Submitted(TaskSubmitted {
                    at: AT,
                    project: project(),
                    spec: gpu_spec(),
                    idempotency_key: None,
                }),
            ),
        ),
        (
            "task-submitted+image",
            "task-submitted",
            Event::Task(
                t,
                TaskEvent::Submitted(TaskSubmitted {
                    at: AT,
                    project: project(),
                    spec: TaskSpec {
                        env_repo_url: String::new(),
                        env_commit_id: String::new(),
                        dockerfile_path: String::new(),
                        image: Some(format!("nvcr.io/nvidia/pytorch@sha256:{}", "5f".repeat(32))),
                        ..spec()
                    },
                    idempotency_key: None,
                }),
            ),
        ),
        (
            "task-assigned+gpus",
            "task-assigned",
            Event::Task(
                t,
                TaskEvent::Assigned(TaskAssigned {
                    at: AT,
                    node_id: n,
                    attempt: 1,
                    gpus: vec![
                        "GPU-d8594bd4-0fc3-8595-e355-7c98138f3b95".into(),
                        "MIG-ce861fb0-a248-58ce-a9a8-f9adbc22a66a".into(),
                    ],
                }),
            ),
        ),
        (
            "node-registered+gpus",
            "node-registered",
            Event::Node(
                n,
                NodeEvent::Registered(NodeRegistered {
                    at: AT,
                    name: "gpu-box-1".into(),
                    labels: BTreeMap::new(),
                    resources: NodeResources {
                        cpu_millis: 32000,
                        memory_mb: 128 * 1024,
                        disk_mb: 2_000_000,
                        gpus: vec![
                            Gpu {
                                model: "NVIDIA A100-SXM4-80GB".into(),
                                memory_mb: 81920,
                                index: 1,
                                uuid: "GPU-d8594bd4-0fc3-8595-e355-7c98138f3b95".into(),
                                compute_capability: Some("8.0".into()),
                                mig_profile: None,
                                pci_bus_id: Some("00000000:41:00.0".into()),
                            },
                            Gpu {
                                model: "NVIDIA A100-SXM4-80GB MIG 1g.20gb".into(),
                                memory_mb: 20480,
                                index: 0,
                                uuid: "MIG-ce861fb0-a248-58ce-a9a8-f9adbc22a66a".into(),
                                compute_capability: Some("8.0".into()),
                                mig_profile: Some("1g.20gb".into()),
                                pci_bus_id: Some("00000000:01:00.0".into()),
                            },
                        ],
                        os: "linux".into(),
                        wsl: true,
                        docker_version: Some("28.2.2".into()),
                        agent_version: "0.2.0".into(),
                        gpu_driver: Some("535.216.01".into()),
                        cuda_version: Some("12.2".into()),
                        networks: vec![
                            ud_schemas::spec::NetworkMode::None,
                            ud_schemas::spec::NetworkMode::Egress,
                        ],
                    },
                }),
            ),
        ),
        (
            "node-heartbeat+gpus",
            "node-heartbeat",
            Event::Node(
                n,
                NodeEvent::Heartbeat(NodeHeartbeat {
                    at: AT,
                    running_tasks: 1,
                    disk_free_mb: Some(51_200),
                    low_disk: false,
                    gpus: Some(vec!["GPU-d8594bd4-0fc3-8595-e355-7c98138f3b95".into()]),
                }),
            ),
        ),
    ]
}

/// Every stored version: (version, file name, CDDL rule, value it reads as).
fn cases() -> Vec<(u16, &'static str, String, Event)> {
    let newer: Vec<&str> = fixtures_v2().iter().map(|(n, _)| *n).collect();
    let mut out: Vec<(u16, &'static str, String, Event)> = fixtures_v1()
        .into_iter()
        .map(|(name, e)| {
            let rule = if newer.contains(&name) {
                format!("{name}-v1")
            } else {
                name.to_owned()
            };
            (1, name, rule, e)
        })
        .collect();
    out.extend(
        fixtures_v2()
            .into_iter()
            .map(|(name, e)| (2, name, name.to_owned(), e)),
    );
    out.extend(
        fixtures_with_later_fields()
            .into_iter()
            .map(|(file, rule, e)| (codec::current_version(&e), file, rule.to_owned(), e)),
    );
    out
}

fn golden_dir(version: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("v{version}"))
}

fn validate_against_cddl(rule: &str, bytes: &[u8]) -> Result<(), String> {
    // The first rule of a CDDL document is the one validated.
    let doc = format!("root = {rule}\n{}", ud_schemas::CDDL);
    cddl::validate_cbor_from_slice(&doc, bytes, None).map_err(|e| e.to_string())
}

#[test]
fn golden_files_decode_validate_and_round_trip() -> anyhow::Result<()> {
    let bless = std::env::var_os("UD_BLESS").is_some();
    for (version, name, rule, event) in cases() {
        let current = codec::current_version(&event) == version;
        let dir = golden_dir(version);
        let path = dir.join(format!("{name}.cbor"));
        // Only the current version of a type is ever written; old files are kept as they are.
        if bless && current && !path.exists() {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(&path, codec::encode_event(&event)?)?;
        }
        let golden =
            std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Stored bytes of every version read back as the current value.
        let decoded = codec::decode_event(&event.subject(), version, &golden)?;
        assert_eq!(
            decoded, event,
            "{name} v{version}: golden file decodes to something else"
        );
        validate_against_cddl(&rule, &golden)
            .map_err(|e| anyhow::anyhow!("{name} v{version} (golden): {e}"))?;
        if current {
            // The current encoder's bytes decode back to the same value.
            let fresh = codec::encode_event(&event)?;
            assert_eq!(
                codec::decode_event(&event.subject(), version, &fresh)?,
                event,
                "{name}: encode/decode"
            );
            validate_against_cddl(&rule, &fresh)
                .map_err(|e| anyhow::anyhow!("{name} (fresh): {e}"))?;
        }
    }
    Ok(())
}

#[test]
fn messages_outside_the_event_streams_match_their_cddl() -> anyhow::Result<()> {
    use ud_schemas::dispatch::*;
    let run = DispatchRun {
        at: AT,
        task_id: task_id(),
        attempt: 1,
        spec: gpu_spec(),
        gpus: vec!["GPU-513536b6-7d19-9063-b049-1e69664bb298".into()],
        fence_after_seconds: Some(690),
        project: Some("vision-lab".into()),
    };
    let cancel = DispatchCancel {
        at: AT,
        task_id: task_id(),
        reason: "user".into(),
        grace_seconds: 10,
        attempt: None,
    };
    let stale = DispatchCancel {
        reason: "stale assignment".into(),
        attempt: Some(1),
        ..cancel.clone()
    };
    let chunk = LogChunk {
        at: AT,
        attempt: 1,
        stream: "build".into(),
        text: "Step 1/2".into(),
    };
    let shared = ud_schemas::dispatch::SharedManifest {
        files: vec![ud_schemas::dispatch::SharedFile {
            path: "data/train.csv".into(),
            mode: 0o644,
            size: 4096,
            blake3: "cd".repeat(32),
            object: format!("packs/{}", "ab".repeat(32)),
            offset: 8192,
            writer: task_id(),
        }],
        deleted: vec![ud_schemas::dispatch::SharedDeleted {
            path: "tmp/old".into(),
            writer: task_id(),
        }],
        ancestors: vec![task_id()],
    };
    // A saved folder's manifest is JSON, kept in the object store.
    let doc = format!("root = shared-manifest\n{}", ud_schemas::CDDL);
    cddl::validate_json_from_str(&doc, &serde_json::to_string(&shared)?, None)
        .map_err(|e| anyhow::anyhow!("shared-manifest: {e}"))?;
    let file = OutputFile {
        path: "results/m.bin".into(),
        size: 10,
        sha256: "ab".repeat(32),
        upload_id: None,
    };
    let request = GitCredentialsRequest {
        task_id: task_id(),
        repo_url: "https://git.example.org/c.git".into(),
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dispatch-run", to_cbor(&run)?),
        ("dispatch-cancel", to_cbor(&cancel)?),
        ("dispatch-cancel", to_cbor(&stale)?),
        ("log-chunk", to_cbor(&chunk)?),
        (
            "disk-alert",
            to_cbor(&DiskAlert {
                at: AT,
                server: "main".into(),
                path: "/var/lib/unidesk".into(),
                free_bytes: 1 << 30,
                min_free_bytes: 2 << 30,
            })?,
        ),
        ("git-credentials-request", to_cbor(&request)?),
        (
            "git-credentials-reply",
            to_cbor(&GitCredentialsReply::None)?,
        ),
        (
            "git-credentials-reply",
            to_cbor(&GitCredentialsReply::Token {
                username: "ci".into(),
                token: "t".into(),
            })?,
        ),
        (
            "git-credentials-reply",
            to_cbor(&GitCredentialsReply::Ssh {
                username: "git".into(),
                private_key: "k".into(),
                passphrase: None,
            })?,
        ),
        (
            "git-credentials-reply",
            to_cbor(&GitCredentialsReply::Denied {
                reason: "no".into(),
            })?,
        ),
        (
            "assignment-check",
            to_cbor(&AssignmentCheck {
                task_id: task_id(),
                attempt: 2,
            })?,
        ),
        (
            "assignment-reply",
            to_cbor(&AssignmentReply {
                current: false,
                reason: Some("reassigned".into()),
            })?,
        ),
        (
            "assignment-reply",
            to_cbor(&AssignmentReply {
                current: true,
                reason: None,
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::Inputs {
                task_id: task_id(),
                attempt: 1,
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::Outputs {
                task_id: task_id(),
                attempt: 1,
                files: vec![file.clone()],
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::Complete {
                task_id: task_id(),
                attempt: 1,
                files: vec![OutputFile {
                    upload_id: Some("u1".into()),
                    ..file.clone()
                }],
            })?,
        ),
        (
            "storage-reply",
            to_cbor(&StorageReply::Inputs {
                files: vec![InputUrl {
                    path: "data/x".into(),
                    object: "x".into(),
                    size: 3,
                    url: "http://s3/x".into(),
                }],
            })?,
        ),
        (
            "storage-reply",
            to_cbor(&StorageReply::Outputs {
                files: vec![
                    OutputUrl {
                        path: "a".into(),
                        upload: Upload::Single {
                            url: "http://s3/a".into(),
                        },
                    },
                    OutputUrl {
                        path: "b".into(),
                        upload: Upload::Multipart {
                            upload_id: "u".into(),
                            part_size: 16 << 20,
                            part_urls: vec!["http://s3/b?p=1".into()],
                            done: vec![2],
                        },
                    },
                ],
            })?,
        ),
        (
            "storage-reply",
            to_cbor(&StorageReply::Complete {
                files: vec![ud_schemas::events::OutputObject {
                    path: "a".into(),
                    key: "k".into(),
                    size: 1,
                    sha256: "00".repeat(32),
                }],
            })?,
        ),
        (
            "storage-reply",
            to_cbor(&StorageReply::Refused {
                reason: "input x: no such object".into(),
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::CheckpointRestore {
                task_id: task_id(),
                attempt: 2,
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::CheckpointSave {
                task_id: task_id(),
                attempt: 2,
                files: vec![file.clone()],
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::CheckpointComplete {
                task_id: task_id(),
                attempt: 2,
                files: vec![file.clone()],
                present: vec!["ckpt/step-100.pt".into()],
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::SharedRestore {
                task_id: task_id(),
                attempt: 1,
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::SharedPlan {
                task_id: task_id(),
                attempt: 1,
                objects: vec![OutputFile {
                    path: format!("packs/{}", "ab".repeat(32)),
                    size: 4096,
                    sha256: String::new(),
                    upload_id: None,
                }],
            })?,
        ),
        (
            "storage-request",
            to_cbor(&StorageRequest::SharedSave {
                task_id: task_id(),
                attempt: 1,
                objects: vec![],
            })?,
        ),
        (
            "storage-reply",
            to_cbor(&StorageReply::Shared {
                manifest: InputUrl {
                    path: "manifest".into(),
                    object: "manifest".into(),
                    size: 2048,
                    url: "https://s3.example.org/m?X-Amz-Signature=1".into(),
                },
                objects: vec![InputUrl {
                    path: format!("packs/{}", "ab".repeat(32)),
                    object: format!("packs/{}", "ab".repeat(32)),
                    size: 4096,
                    url: "https://s3.example.org/p?X-Amz-Signature=1".into(),
                }],
            })?,
        ),
        (
            "secrets-request",
            to_cbor(&SecretsRequest {
                task_id: task_id(),
                attempt: 1,
            })?,
        ),
        (
            "secrets-reply",
            to_cbor(&SecretsReply::Values {
                values: vec![SecretValue {
                    name: "WANDB_API_KEY".into(),
                    value: "v".into(),
                }],
            })?,
        ),
        (
            "secrets-reply",
            to_cbor(&SecretsReply::Denied {
                reason: "no".into(),
            })?,
        ),
    ];
    for (rule, bytes) in cases {
        validate_against_cddl(rule, &bytes).map_err(|e| anyhow::anyhow!("{rule}: {e}"))?;
    }
    assert!(validate_against_cddl("git-credentials-reply", &to_cbor(&request)?).is_err());
    Ok(())
}

#[test]
fn cddl_rejects_wrong_shapes() {
    // A payload of another type must not validate: the check can fail.
    let wrong = codec::encode_event(&Event::Task(
        task_id(),
        TaskEvent::Succeeded(TaskSucceeded {
            at: AT,
            exit_code: 0,
        }),
    ))
    .unwrap_or_default();
    assert!(validate_against_cddl("task-failed", &wrong).is_err());
    assert!(validate_against_cddl("task-submitted", &wrong).is_err());
}

#[test]
fn every_event_type_has_a_golden_file() {
    let names: Vec<String> = fixtures_v1()
        .iter()
        .map(|(_, e)| e.event_type().replace('.', "-"))
        .collect();
    for (name, _) in fixtures_v1() {
        assert!(
            names.iter().any(|n| n == name),
            "{name} is not named after its event type"
        );
        assert!(
            ud_schemas::CDDL.contains(&format!("\n{name} = ")),
            "{name} has no CDDL rule"
        );
    }
}

#[test]
fn unknown_versions_and_types_are_errors() {
    let bytes = codec::encode_event(&fixtures_v1()[0].1).unwrap_or_default();
    let subject = fixtures_v1()[0].1.subject();
    assert!(matches!(
        codec::decode_event(&subject, 99, &bytes),
        Err(codec::CodecError::UnknownVersion { version: 99, .. })
    ));
    let other = subject.replace("submitted", "exploded");
    assert!(matches!(
        codec::decode_event(&other, 1, &bytes),
        Err(codec::CodecError::UnknownType { .. })
    ));
    assert!(codec::decode_event(&subject, 1, b"\xff\x00garbage").is_err());
}
