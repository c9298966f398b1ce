//! GPUs by device, on a machine that has none: what a node detects through a
//! stand-in `nvidia-smi` fed with recorded output, what the scheduler gives
//! two tasks on a four-GPU node, and what Docker is asked for (read back
//! from a created container; this engine has no NVIDIA runtime, so nothing
//! here starts a GPU container).

use std::time::Duration;

use anyhow::{anyhow, Result};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use futures::StreamExt;
use serde_json::{json, Value};
use ud_edge_agent::docker::{container, Launch};
use ud_schemas::dispatch::{self, DispatchRun};
use ud_schemas::edge;
use ud_schemas::events::NodeRegistered;
use ud_schemas::report::Report;
use ud_schemas::spec::Gpu;
use ud_schemas::{now_millis, NodeId, NodeResources};

use crate::common::*;

fn spec_of(body: Value) -> Result<ud_schemas::TaskSpec> {
    let req: ud_core::validate::SubmitTask = serde_json::from_value(body)?;
    ud_core::validate::submit_task(&req)
        .map(|(_, s)| s)
        .map_err(|e| anyhow!("{e:?}"))
}

/// A stand-in `nvidia-smi` answering as a four-A100 server does.
fn stand_in_smi(dir: &std::path::Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gpu");
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in\n  --query-gpu=*) cat {q};;\n  -L) cat {l};;\n  *) cat {b};;\nesac\n",
        q = fixtures.join("a100-sxm4-80gb-x4.query-gpu.csv").display(),
        l = fixtures.join("a100-sxm4-80gb-x4.nvidia-smi-L.txt").display(),
        b = fixtures.join("a100-sxm4-80gb-x4.nvidia-smi-header.txt").display(),
    );
    let path = dir.join("nvidia-smi");
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path.display().to_string())
}

#[tokio::test]
async fn a_gpu_run_asks_docker_for_exactly_its_devices() -> Result<()> {
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let mut body = task_body(
        "lab",
        "nvidia-smi",
        json!({"cpus": 1, "memory_mb": 8192, "gpus": 2}),
    );
    body["shm_size_mb"] = json!(4096);
    let run = DispatchRun {
        at: 1,
        task_id: ud_schemas::TaskId::new(),
        attempt: 1,
        spec: spec_of(body)?,
        gpus: vec!["GPU-d8594bd4".into(), "MIG-ce861fb0".into()],
        fence_after_seconds: None,
        project: None,
    };
    let node = NodeId::new();
    let secrets = [("WANDB_API_KEY".to_owned(), "not-in-any-label".to_owned())];
    let launch = Launch {
        image: IMAGE,
        run: &run,
        workspace: None,
        shared: None,
        egress_network: "unidesk-egress",
        sessions_network: "unidesk-sessions",
        secrets: &secrets,
    };
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(format!("ud-gpu-readback-{}", run.task_id)),
                ..Default::default()
            }),
            container(&node, &launch, now_millis(), None),
        )
        .await?;
    let seen = docker.inspect_container(&created.id, None).await;
    let _ = docker
        .remove_container(
            &created.id,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    let seen = seen?;
    let host = seen.host_config.ok_or_else(|| anyhow!("no host config"))?;
    let requests = host.device_requests.unwrap_or_default();
    assert_eq!(requests.len(), 1);
    // The devices by id, never a count (Docker turns a count of 2 into GPUs 0 and 1).
    assert_eq!(
        requests[0].device_ids.as_deref(),
        Some(&["GPU-d8594bd4".to_owned(), "MIG-ce861fb0".to_owned()][..])
    );
    assert!(requests[0].count.is_none_or(|c| c == 0), "{requests:?}");
    assert_eq!(requests[0].driver.as_deref(), Some("nvidia"));
    assert_eq!(host.shm_size, Some(4096 * 1024 * 1024));
    assert_eq!(host.ipc_mode.as_deref(), Some("private"));
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    let ulimits: Vec<(String, i64)> = host
        .ulimits
        .unwrap_or_default()
        .into_iter()
        .map(|u| (u.name.unwrap_or_default(), u.hard.unwrap_or_default()))
        .collect();
    assert_eq!(
        ulimits,
        vec![("memlock".into(), -1), ("stack".into(), 64 * 1024 * 1024)]
    );
    let config = seen.config.ok_or_else(|| anyhow!("no config"))?;
    let env = config.env.unwrap_or_default();
    assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=GPU-d8594bd4,MIG-ce861fb0".to_owned()));
    assert!(env.contains(&"WANDB_API_KEY=not-in-any-label".to_owned()));
    let labels = config.labels.unwrap_or_default();
    assert_eq!(
        labels.get("io.unidesk.gpus").map(String::as_str),
        Some("GPU-d8594bd4,MIG-ce861fb0")
    );
    assert!(!labels.values().any(|v| v.contains("not-in-any-label")));

    // A CPU run: no device, NVIDIA_VISIBLE_DEVICES=void, shared memory half its memory.
    let cpu = DispatchRun {
        gpus: vec![],
        fence_after_seconds: None,
        project: None,
        spec: spec_of(task_body(
            "lab",
            "true",
            json!({"cpus": 1, "memory_mb": 2048}),
        ))?,
        ..run
    };
    let body = container(
        &node,
        &Launch {
            run: &cpu,
            secrets: &[],
            ..launch
        },
        now_millis(),
        None,
    );
    let host = body.host_config.ok_or_else(|| anyhow!("no host config"))?;
    assert!(host.device_requests.is_none());
    assert_eq!(host.shm_size, Some(1024 * 1024 * 1024));
    assert!(body
        .env
        .unwrap_or_default()
        .contains(&"NVIDIA_VISIBLE_DEVICES=void".to_owned()));
    Ok(())
}

#[tokio::test]
async fn a_node_whose_docker_cannot_give_gpus_offers_none() -> Result<()> {
    let s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("gpu-box").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let dir = tempfile::tempdir()?;
    let mut registered = s
        .server
        .state
        .commands
        .store()
        .client()
        .subscribe(format!("ud.node.{}.registered", token.node_id))
        .await?;
    let agent = run_agent(ud_edge_agent::AgentConfig {
        nvidia_smi: stand_in_smi(dir.path())?,
        ..agent_config(&leaf, &token, "gpu-box", Duration::from_millis(500))
    });
    let m = tokio::time::timeout(Duration::from_secs(30), registered.next())
        .await?
        .ok_or_else(|| anyhow!("no registration"))?;
    let e = ud_schemas::codec::decode_message(m.subject.as_str(), m.headers.as_ref(), &m.payload)?;
    let ud_schemas::Event::Node(_, ud_schemas::NodeEvent::Registered(r)) = e.event else {
        return Err(anyhow!("not a registration: {e:?}"));
    };
    // Four GPUs found, none offered: this engine has no NVIDIA runtime.
    assert!(r.resources.gpus.is_empty(), "{:?}", r.resources.gpus);
    agent.abort();
    Ok(())
}

/// A node registered with four GPUs by UUID, answering no dispatch: what
/// the scheduler gives tasks there is read from the dispatches.
async fn four_gpu_node(s: &Stack, name: &str) -> Result<(NodeId, NatsServerGuard)> {
    let token = s.enroll(name).await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let node = token.node_id;
    let client = agent_client(&leaf, Some(node)).await?;
    let local = async_nats::jetstream::with_domain(client.clone(), edge::domain(&node));
    ud_edge_agent::ensure_local(&local, &node)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    // As the agent does: forwards the node's reports to the hub.
    let forward = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        ud_edge_agent::forward::keep(local.clone(), client.clone(), node),
    ));
    let reporter = ud_edge_agent::Reporter::new(node, local);
    let gpus = (0..4)
        .map(|i| Gpu {
            model: "NVIDIA A100-SXM4-80GB".into(),
            memory_mb: 81920,
            index: i,
            uuid: format!("GPU-{i}-{node}"),
            compute_capability: Some("8.0".into()),
            mig_profile: None,
            pci_bus_id: None,
        })
        .collect();
    reporter
        .send(Report::Registered(NodeRegistered {
            at: now_millis(),
            name: name.into(),
            labels: Default::default(),
            resources: NodeResources {
                cpu_millis: 64_000,
                memory_mb: 512 * 1024,
                gpus,
                gpu_driver: Some("535.216.01".into()),
                ..Default::default()
            },
        }))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok((node, NatsServerGuard(leaf, client, forward)))
}

/// Keeps a simulated node's leaf, connection and forwarder alive while it
/// lives.
struct NatsServerGuard(
    #[allow(dead_code)] ud_testkit::NatsServer,
    #[allow(dead_code)] async_nats::Client,
    #[allow(dead_code)] tokio_util::task::AbortOnDropHandle<()>,
);

#[tokio::test]
async fn two_one_gpu_tasks_on_a_four_gpu_node_get_different_devices() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let (node, _keep) = four_gpu_node(&s, "a100-box").await?;
    s.node_status(node, "online", JOIN).await?;
    let mut runs = s
        .server
        .state
        .commands
        .store()
        .client()
        .subscribe(format!("ud.dispatch.{node}.*.run"))
        .await?;
    let one_gpu = json!({"cpus": 1, "memory_mb": 1024, "gpus": 1, "gpu_model": "A100"});
    let first = s
        .submit_body(task_body("lab", "true", one_gpu.clone()))
        .await?;
    let second = s.submit_body(task_body("lab", "true", one_gpu)).await?;
    let mut given = std::collections::HashMap::new();
    while given.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(30), runs.next())
            .await?
            .ok_or_else(|| anyhow!("no dispatch"))?;
        let run: DispatchRun = dispatch::from_cbor(&m.payload, "dispatch-run")?;
        given.insert(run.task_id.to_string(), run.gpus);
    }
    let (a, b) = (&given[&first], &given[&second]);
    assert_eq!((a.len(), b.len()), (1, 1));
    assert_ne!(a, b, "both tasks were given {a:?}");
    // The read model and the history say the same devices.
    let shown = s.get(&format!("/api/v1/tasks/{first}/events")).await?;
    let assigned: Vec<Value> = shown
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "task.assigned")
        .map(|e| e["data"]["gpus"].clone())
        .collect();
    assert_eq!(assigned, vec![json!(a)]);
    // A model no node has, asked by family, can never be placed.
    let h100 = s
        .submit_body(task_body(
            "lab",
            "true",
            json!({"gpus": 1, "gpu_model": "H100"}),
        ))
        .await?;
    let done = s
        .task_state(&h100, &["failed"], Duration::from_secs(30))
        .await?;
    assert!(
        done["reason"].as_str().is_some_and(|r| r.contains("GPUs")),
        "{done}"
    );
    Ok(())
}
