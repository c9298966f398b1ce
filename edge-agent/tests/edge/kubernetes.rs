//! A cluster joins like a node: its agent makes one Pod per attempt through
//! the Kubernetes API, follows it to its end and adopts it after a restart.
//! The API server is a stand-in (no kube-apiserver installs here) that runs
//! no kubelet: the test plays the kubelet, setting the Pods' status and
//! putting their logs.

use std::time::Duration;

use anyhow::{bail, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, WatchEvent, WatchParams};
use serde_json::json;
use ud_edge_agent::k8s::{Settings, WorkspaceClaim};
use ud_edge_agent::AgentConfig;
use ud_testkit::KubeApi;

use crate::common::*;

const NS: &str = "lab";
const TRAIN_IMAGE: &str = "registry.example.org/lab/train:1";

/// Waits for an event of the task's Pod that `want` accepts.
async fn pod_event(
    pods: &Api<Pod>,
    task: &str,
    want: impl Fn(&WatchEvent<Pod>) -> bool,
) -> Result<Pod> {
    let params = WatchParams::default()
        .labels(&format!("io.unidesk.task={task}"))
        .timeout(60);
    let mut events = pods.watch(&params, "0").await?.boxed();
    while let Some(e) = events.try_next().await? {
        if want(&e) {
            if let WatchEvent::Added(p) | WatchEvent::Modified(p) | WatchEvent::Deleted(p) = e {
                return Ok(p);
            }
        }
    }
    bail!("no such event of the Pod of task {task} within 60 s")
}

async fn made(pods: &Api<Pod>, task: &str) -> Result<(Pod, String)> {
    let p = pod_event(pods, task, |e| matches!(e, WatchEvent::Added(_))).await?;
    let name = p.metadata.name.clone().unwrap_or_default();
    Ok((p, name))
}

/// Waits until the task's Pod is deleted (at once when it is gone already).
/// The stand-in's watch does not replay deletions from before it began, so
/// each second without an event the Pod is looked for again.
async fn gone(pods: &Api<Pod>, task: &str) -> Result<()> {
    let selector = format!("io.unidesk.task={task}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let list = pods
            .list(&kube::api::ListParams::default().labels(&selector))
            .await?;
        if list.items.is_empty() {
            return Ok(());
        }
        let version = list.metadata.resource_version.unwrap_or_default();
        let params = WatchParams::default().labels(&selector).timeout(1);
        let mut events = pods.watch(&params, &version).await?.boxed();
        while let Some(e) = events.try_next().await? {
            if matches!(e, WatchEvent::Deleted(_)) {
                return Ok(());
            }
        }
    }
    bail!("the Pod of task {task} was not deleted within 60 s")
}

/// What the kubelet would say of the task container.
async fn set_state(
    pods: &Api<Pod>,
    name: &str,
    phase: &str,
    state: serde_json::Value,
) -> Result<()> {
    let status = json!({"status": {"phase": phase, "podIP": "10.42.0.7", "containerStatuses": [{
        "name": "task", "image": TRAIN_IMAGE, "imageID": "", "ready": phase == "Running",
        "restartCount": 0, "state": state
    }]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

async fn running(pods: &Api<Pod>, name: &str) -> Result<()> {
    set_state(
        pods,
        name,
        "Running",
        json!({"running": {"startedAt": "2026-12-06T10:00:00Z"}}),
    )
    .await
}

async fn ended(pods: &Api<Pod>, name: &str, code: i32) -> Result<()> {
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    let state = json!({"terminated": {"exitCode": code, "finishedAt": chrono_now()}});
    set_state(pods, name, phase, state).await
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::test]
async fn a_cluster_runs_tasks_as_pods_and_adopts_them_after_a_restart() -> Result<()> {
    let api = KubeApi::start().await?;
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("cluster").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let cfg = AgentConfig {
        image: Some(TRAIN_IMAGE.into()),
        kubernetes: Some(Settings {
            url: Some(api.url.clone()),
            // Project `lab` has a namespace of its own; a restarted agent
            // finds its Pods there too.
            namespace: "unidesk".into(),
            project_namespaces: [("lab".to_owned(), NS.to_owned())].into(),
            cpu_millis: 16_000,
            memory_mb: 65_536,
            gpus: 4,
            gpu_model: "NVIDIA A100".into(),
            gpu_memory_mb: 40_960,
            ..Settings::default()
        }),
        ..agent_config(&leaf, &token, "cluster", Duration::from_millis(500))
    };
    let agent = run_agent(cfg.clone());
    // It offers the quota, not the machine the agent runs on.
    let node = s.node_status(token.node_id, "online", JOIN).await?;
    assert_eq!(node["resources"]["cpu_millis"], 16_000, "{node}");
    assert_eq!(node["resources"]["memory_mb"], 65_536, "{node}");
    assert_eq!(
        node["resources"]["gpus"].as_array().map(Vec::len),
        Some(4),
        "{node}"
    );
    assert_eq!(node["resources"]["os"], "kubernetes", "{node}");
    let pods: Api<Pod> = Api::namespaced(
        kube::Client::try_from(kube::Config::new(api.url.parse()?))?,
        NS,
    );

    // A GPU task: a Pod asking for its GPUs, in the owner's image, with the
    // code checked out at its commit; its log and exit come back.
    let train = s
        .submit_body(task_body(
            "lab",
            "python train.py",
            json!({"cpus": 2, "memory_mb": 4096, "gpus": 2}),
        ))
        .await?;
    let (pod, name) = made(&pods, &train).await?;
    let spec = pod.spec.clone().unwrap_or_default();
    let task = &spec.containers[0];
    assert_eq!(task.image.as_deref(), Some(TRAIN_IMAGE));
    let limits = task
        .resources
        .clone()
        .unwrap_or_default()
        .limits
        .unwrap_or_default();
    assert_eq!(limits["nvidia.com/gpu"].0, "2");
    assert_eq!(limits["cpu"].0, "2000m");
    let init = spec.init_containers.clone().unwrap_or_default();
    let env = init[0].env.clone().unwrap_or_default();
    assert!(env
        .iter()
        .any(|e| e.value.as_deref() == Some("0123456789abcdef0123456789abcdef01234567")));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    running(&pods, &name).await?;
    api.log(
        NS,
        &name,
        "2026-12-06T10:00:01.000000000Z epoch 1 loss 0.42\n",
    )
    .await?;
    ended(&pods, &name, 0).await?;
    let done = s
        .task_state(&train, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(logs(&s, &train).await?.contains("epoch 1 loss 0.42"));
    gone(&pods, &train).await?;

    // A task that names its own image runs in it, not in the owner's.
    let mut body = task_body("lab", "nvidia-smi", json!({"cpus": 1, "memory_mb": 64}));
    for f in ["env_repo_url", "env_commit_id", "dockerfile_path"] {
        body.as_object_mut().map(|o| o.remove(f));
    }
    body["image"] = json!("nvcr.io/nvidia/pytorch:24.05-py3");
    let named = s.submit_body(body).await?;
    let (pod, name) = made(&pods, &named).await?;
    let spec = pod.spec.clone().unwrap_or_default();
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("nvcr.io/nvidia/pytorch:24.05-py3")
    );
    running(&pods, &name).await?;
    ended(&pods, &name, 0).await?;
    let done = s
        .task_state(&named, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        done["prepared"]["image_id"], "nvcr.io/nvidia/pytorch:24.05-py3",
        "{done}"
    );
    gone(&pods, &named).await?;

    // A cancel deletes the Pod.
    let long = s.submit("sleep 600", 600).await?;
    let (_, name) = made(&pods, &long).await?;
    running(&pods, &name).await?;
    s.post(
        &format!("/api/v1/tasks/{long}/cancel"),
        json!({"reason": "not needed"}),
    )
    .await?;
    gone(&pods, &long).await?;
    s.task_state(&long, &["cancelled"], Duration::from_secs(30))
        .await?;

    // A restarted agent adopts its Pod and reports how it ended.
    let adopted = s.submit("python eval.py", 600).await?;
    let (_, name) = made(&pods, &adopted).await?;
    running(&pods, &name).await?;
    agent.abort();
    let _ = agent.await;
    let agent = run_agent(cfg);
    ended(&pods, &name, 3).await?;
    let done = s
        .task_state(&adopted, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["exit_code"], 3, "{done}");

    // What Pods cannot do yet is refused with the reason, not lost.
    let mut body = task_body("lab", "true", json!({"cpus": 1, "memory_mb": 64}));
    body["outputs"] = json!(["out/"]);
    let files = s.submit_body(body).await?;
    let done = s
        .task_state(&files, &["failed"], Duration::from_secs(60))
        .await?;
    assert!(
        done["reason"]
            .as_str()
            .is_some_and(|r| r.contains("files") && r.contains("UD_K8S_WORKSPACE_CLAIM")),
        "{done}"
    );
    agent.abort();
    Ok(())
}

/// With a workspace claim (here the agent's work directory stands for it),
/// a run's inputs are in its workspace on the claim before its Pod starts,
/// and what the run leaves there is uploaded after it ends.
#[tokio::test]
async fn a_cluster_moves_files_through_its_workspace_claim() -> Result<()> {
    let api = KubeApi::start().await?;
    let g = ud_testkit::Garage::start().await?;
    let store = crate::files::storage(&g)?;
    let mut s = crate::files::stack(&store).await?;
    let token = s.enroll("cluster").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let work = tempfile::tempdir()?;
    let agent = run_agent(AgentConfig {
        image: Some(TRAIN_IMAGE.into()),
        work_dir: work.path().to_owned(),
        kubernetes: Some(Settings {
            url: Some(api.url.clone()),
            namespace: NS.into(),
            cpu_millis: 16_000,
            memory_mb: 65_536,
            workspace_claim: Some(WorkspaceClaim {
                name: "unidesk-work".into(),
                mounted_at: work.path().to_owned(),
            }),
            ..Settings::default()
        }),
        ..agent_config(&leaf, &token, "cluster", Duration::from_millis(500))
    });
    s.node_status(token.node_id, "online", JOIN).await?;
    store
        .put(
            "projects/lab/files/data/train.csv",
            b"a,b\n1,2\n".to_vec(),
            "text/csv",
        )
        .await?;
    let mut body = task_body(
        "lab",
        "wc -l < train.csv > out/lines.txt",
        json!({"cpus": 1, "memory_mb": 64}),
    );
    body["inputs"] = json!([{"source": "data/train.csv", "path": "train.csv"}]);
    body["outputs"] = json!(["out/"]);
    let id = s.submit_body(body).await?;
    let pods: Api<Pod> = Api::namespaced(
        kube::Client::try_from(kube::Config::new(api.url.parse()?))?,
        NS,
    );
    let (pod, name) = made(&pods, &id).await?;
    let spec = pod.spec.unwrap_or_default();
    let claim = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone());
    assert_eq!(claim.as_deref(), Some("unidesk-work"));
    let mount = spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/workspace")
        .cloned()
        .unwrap_or_default();
    assert_eq!(mount.name, "files");
    let dir = work.path().join(mount.sub_path.unwrap_or_default());
    // The inputs are in place before the Pod runs.
    assert_eq!(std::fs::read(dir.join("train.csv"))?, b"a,b\n1,2\n");
    // The kubelet's part: the run writes its output on the claim and ends.
    running(&pods, &name).await?;
    std::fs::create_dir_all(dir.join("out"))?;
    std::fs::write(dir.join("out/lines.txt"), b"2\n")?;
    ended(&pods, &name, 0).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(60))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let outputs = done["outputs"].as_array().cloned().unwrap_or_default();
    let paths: Vec<&str> = outputs.iter().filter_map(|o| o["path"].as_str()).collect();
    assert_eq!(paths, vec!["out/lines.txt"], "{done}");
    let http = s.http.clone();
    assert_eq!(
        crate::files::download(&http, &outputs[0]).await?.as_ref(),
        b"2\n"
    );
    gone(&pods, &id).await?;
    agent.abort();
    Ok(())
}

/// On a real cluster, where `UD_K8S_TEST_KUBECONFIG` names one (its
/// kubelets run the Pods; the namespace `UD_K8S_TEST_NAMESPACE`, default
/// `unidesk-test`, must exist and the nodes must reach GitHub and Docker
/// Hub): a task checks out public code at its commit and runs. Without the
/// setting it returns at once, saying so.
#[tokio::test]
async fn a_real_cluster_runs_a_task_from_its_pinned_code() -> Result<()> {
    let Some(kubeconfig) = std::env::var_os("UD_K8S_TEST_KUBECONFIG") else {
        eprintln!("UD_K8S_TEST_KUBECONFIG is not set: no real cluster to run on");
        return Ok(());
    };
    let namespace =
        std::env::var("UD_K8S_TEST_NAMESPACE").unwrap_or_else(|_| "unidesk-test".into());
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let token = s.enroll("real-cluster").await?;
    let leaf = s.leaf(&token, s.hub.leaf_port()).await?;
    let agent = run_agent(AgentConfig {
        image: Some("busybox:1.36".into()),
        kubernetes: Some(Settings {
            kubeconfig: Some(kubeconfig.into()),
            namespace,
            cpu_millis: 1000,
            memory_mb: 512,
            ..Settings::default()
        }),
        ..agent_config(&leaf, &token, "real-cluster", Duration::from_millis(500))
    });
    s.node_status(token.node_id, "online", JOIN).await?;
    let mut body = task_body(
        "lab",
        "ls /workspace && echo hello from the cluster",
        json!({"cpus": 0.5, "memory_mb": 64}),
    );
    body["code_repo_url"] = json!("https://github.com/octocat/Hello-World.git");
    body["code_commit_id"] = json!("7fd1a60b01f91b314f59955a4e4d4e80d8edf11d");
    let id = s.submit_body(body).await?;
    let done = s
        .task_state(&id, &["succeeded", "failed"], Duration::from_secs(300))
        .await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let log = logs(&s, &id).await?;
    assert!(
        log.contains("README") && log.contains("hello from the cluster"),
        "{log}"
    );
    agent.abort();
    Ok(())
}
