//! Task inputs and outputs end to end: a real Garage, the main server, a
//! compute node with its leaf server and agent, and Docker. The node moves
//! the bytes itself, with presigned URLs for its own task only.

use std::time::Duration;

use anyhow::{bail, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use ud_schemas::dispatch::{self, OutputFile, StorageReply, StorageRequest};
use ud_schemas::edge;
use ud_testkit::{Garage, Relay};

use crate::common::*;

const MIB: usize = 1024 * 1024;

pub(crate) fn storage(g: &Garage) -> Result<ud_storage::Storage> {
    storage_at(g, &g.endpoint)
}

fn storage_at(g: &Garage, endpoint: &str) -> Result<ud_storage::Storage> {
    let mut s = ud_storage::StorageSettings::path_style(
        endpoint,
        &g.region,
        &g.bucket,
        &g.access_key_id,
        &g.secret_access_key,
    );
    s.project_quota_bytes = Some(512 * 1024 * 1024);
    Ok(ud_storage::Storage::new(s)?)
}

fn with_files(script: &str, inputs: Value, outputs: Value) -> Value {
    let mut body = task_body("lab", script, json!({"cpus": 0.5, "memory_mb": 128}));
    body["inputs"] = inputs;
    body["outputs"] = outputs;
    body["timeout_seconds"] = json!(120);
    body
}

/// The bytes behind an output's (or archive's) download link.
pub(crate) async fn download(http: &reqwest::Client, o: &Value) -> Result<bytes::Bytes> {
    let url = o["download"]["url"].as_str().unwrap_or_default().to_owned();
    Ok(http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?)
}

/// The main server with this object store (nodes offline after 30 s).
pub(crate) async fn stack(store: &ud_storage::Storage) -> Result<Stack> {
    Stack::start_full(
        Duration::from_secs(30),
        Default::default(),
        Default::default(),
        Some(store.clone()),
    )
    .await
}

async fn ended(s: &mut Stack, id: &str) -> Result<Value> {
    s.task_state(
        id,
        &["succeeded", "failed", "timed_out", "cancelled"],
        Duration::from_secs(120),
    )
    .await
}

/// Asks the main server as the agent on `leaf` would, for node `node`.
async fn ask(
    leaf: &ud_testkit::NatsServer,
    node: ud_schemas::NodeId,
    req: &StorageRequest,
) -> Result<StorageReply> {
    let client = agent_client(leaf, Some(node)).await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(edge::storage_subject(&node), dispatch::to_cbor(req)?.into()),
    )
    .await??;
    Ok(dispatch::from_cbor(&reply.payload, "storage-reply")?)
}

#[tokio::test]
async fn inputs_come_in_before_the_run_and_outputs_go_out_after_it() -> Result<()> {
    let g = Garage::start().await?;
    let store = storage(&g)?;
    let mut s = stack(&store).await?;
    let alpha = s.online_node("alpha").await?;

    // The project's input files: one file and a folder of two.
    store
        .put(
            "projects/lab/files/data/train.csv",
            b"a,b\n1,2\n".to_vec(),
            "text/csv",
        )
        .await?;
    store
        .put(
            "projects/lab/files/data/set/a.txt",
            b"alpha ".to_vec(),
            "text/plain",
        )
        .await?;
    store
        .put(
            "projects/lab/files/data/set/b.txt",
            b"beta".to_vec(),
            "text/plain",
        )
        .await?;

    // The run reads them and writes a small file, a folder and a 20 MiB file (sent in parts).
    let script =
        "wc -c < in/train.csv > out/count.txt && cat in/set/a.txt in/set/b.txt > out/joined.txt \
                  && mkdir -p out/sub && head -c 20971520 /dev/urandom > out/sub/big.bin";
    let inputs = json!([{"source": "data/train.csv", "path": "in/train.csv"}, {"source": "data/set/", "path": "in/set"}]);
    let mut archived = s
        .server
        .state
        .commands
        .store()
        .client()
        .subscribe("ud.sys.log_archived.>")
        .await?;
    let id = s
        .submit_body(with_files(
            &format!("echo working on it && mkdir -p out && {script}"),
            inputs,
            json!(["out/"]),
        ))
        .await?;
    let done = ended(&mut s, &id).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["node_id"], alpha.id.to_string());

    // The outputs, listed with links that download exactly what the run wrote.
    let outputs = done["outputs"].as_array().cloned().unwrap_or_default();
    let paths: Vec<&str> = outputs.iter().filter_map(|o| o["path"].as_str()).collect();
    assert_eq!(
        paths,
        vec!["out/count.txt", "out/joined.txt", "out/sub/big.bin"],
        "{done}"
    );
    let http = s.http.clone();
    assert_eq!(download(&http, &outputs[0]).await?.as_ref(), b"8\n");
    assert_eq!(download(&http, &outputs[1]).await?.as_ref(), b"alpha beta");
    let big = download(&http, &outputs[2]).await?;
    assert_eq!(big.len(), 20 * MIB);
    assert_eq!(outputs[2]["size"].as_u64(), Some(20 * MIB as u64));
    assert_eq!(
        outputs[2]["sha256"].as_str().unwrap_or_default(),
        hex::encode(Sha256::digest(&big))
    );
    // Stored under the task's own prefix.
    let keys: Vec<String> = store
        .list(&format!("projects/lab/tasks/{id}/outputs/"))
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");

    // The history says when inputs were fetched and records the outputs before the outcome.
    let history = s.get(&format!("/api/v1/tasks/{id}/events")).await?;
    let types: Vec<&str> = history
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["type"].as_str())
        .collect();
    let at = |t: &str| types.iter().position(|x| *x == t);
    assert!(
        at("task.outputs") < at("task.succeeded") && at("task.started") < at("task.outputs"),
        "{types:?}"
    );
    let steps: Vec<&str> = done["prepared"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert_eq!(steps, vec!["fetch_inputs", "start"]);

    // When the task ended its whole log went to the object store.
    let notice = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = futures::StreamExt::next(&mut archived).await {
            if m.subject.ends_with(&id) {
                return Some(m);
            }
        }
        None
    })
    .await?;
    let key = notice
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .unwrap_or_default();
    assert_eq!(key, format!("projects/lab/tasks/{id}/logs/task.log"));
    let view = s.get(&format!("/api/v1/tasks/{id}")).await?;
    let archive = download(&http, &json!({"download": view["log_archive"]})).await?;
    assert_eq!(
        String::from_utf8_lossy(&archive),
        "=== attempt 1 ===\nworking on it\n"
    );

    // A missing input fails the task, naming the object; nothing runs.
    let id = s
        .submit_body(with_files(
            "echo ran",
            json!([{"source": "data/nope.csv", "path": "x.csv"}]),
            json!([]),
        ))
        .await?;
    let done = ended(&mut s, &id).await?;
    assert_eq!(done["state"], "failed");
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("data/nope.csv") && reason.contains("fetching inputs"),
        "{reason}"
    );
    assert!(!logs(&s, &id).await?.contains("ran"));

    // A succeeded run that did not produce a declared output is not a success.
    let id = s
        .submit_body(with_files(
            "mkdir -p out && echo 1 > out/a.txt",
            json!([]),
            json!(["out/a.txt", "out/missing.txt"]),
        ))
        .await?;
    let done = ended(&mut s, &id).await?;
    assert_eq!(done["state"], "failed", "{done}");
    assert!(
        done["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("\"out/missing.txt\" was not produced"),
        "{done}"
    );

    // A failed run keeps its partial results.
    let id = s
        .submit_body(with_files(
            "mkdir -p out && echo partial > out/p.txt && exit 4",
            json!([]),
            json!(["out/"]),
        ))
        .await?;
    let done = ended(&mut s, &id).await?;
    assert_eq!(done["state"], "failed");
    assert_eq!(done["exit_code"], 4);
    assert_eq!(done["outputs"][0]["path"], "out/p.txt", "{done}");
    assert_eq!(
        download(&http, &done["outputs"][0]).await?.as_ref(),
        b"partial\n"
    );
    Ok(())
}

#[tokio::test]
async fn a_node_gets_urls_only_for_its_own_running_task_and_prefix() -> Result<()> {
    let g = Garage::start().await?;
    let store = storage(&g)?;
    let mut s = stack(&store).await?;
    let a = s.online_node("alpha").await?;
    let b = s.online_node("beta").await?;
    store
        .put(
            "projects/lab/files/secret.txt",
            b"secret".to_vec(),
            "text/plain",
        )
        .await?;

    let long = s
        .submit_body(with_files(
            "sleep 300",
            json!([{"source": "secret.txt", "path": "secret.txt"}]),
            json!(["out/"]),
        ))
        .await?;
    let running = s
        .task_state(&long, &["running"], Duration::from_secs(60))
        .await?;
    let runner: ud_schemas::NodeId = running["node_id"].as_str().unwrap_or_default().parse()?;
    let (other, other_leaf, runner_leaf) = if runner == a.id {
        (b.id, &b.leaf, &a.leaf)
    } else {
        (a.id, &a.leaf, &b.leaf)
    };
    let task_id: ud_schemas::TaskId = long.parse()?;

    // The other node may not read this task's inputs nor write its outputs.
    for req in [
        StorageRequest::Inputs {
            task_id,
            attempt: 1,
        },
        StorageRequest::Outputs {
            task_id,
            attempt: 1,
            files: vec![OutputFile {
                path: "out/x".into(),
                size: 1,
                sha256: String::new(),
                upload_id: None,
            }],
        },
    ] {
        match ask(other_leaf, other, &req).await? {
            StorageReply::Refused { reason } => {
                assert!(reason.contains("not this node's"), "{reason}")
            }
            r => bail!("another node got {r:?}"),
        }
    }
    // Nor may it ask in the runner's name: nothing answers.
    let forged = tokio::time::timeout(
        Duration::from_secs(2),
        ask(
            other_leaf,
            runner,
            &StorageRequest::Inputs {
                task_id,
                attempt: 1,
            },
        ),
    )
    .await;
    assert!(
        !matches!(forged, Ok(Ok(_))),
        "a request in another node's name was answered"
    );

    // The runner gets a URL for its own inputs, and none outside the task's prefix.
    match ask(
        runner_leaf,
        runner,
        &StorageRequest::Inputs {
            task_id,
            attempt: 1,
        },
    )
    .await?
    {
        StorageReply::Inputs { files } => assert_eq!(files.len(), 1),
        r => bail!("{r:?}"),
    }
    let escape = OutputFile {
        path: "../../files/secret.txt".into(),
        size: 1,
        sha256: String::new(),
        upload_id: None,
    };
    match ask(
        runner_leaf,
        runner,
        &StorageRequest::Outputs {
            task_id,
            attempt: 1,
            files: vec![escape],
        },
    )
    .await?
    {
        StorageReply::Refused { reason } => assert!(reason.contains("'..'"), "{reason}"),
        r => bail!("an escaping path got {r:?}"),
    }
    // A stale attempt gets nothing.
    assert!(matches!(
        ask(
            runner_leaf,
            runner,
            &StorageRequest::Inputs {
                task_id,
                attempt: 2
            }
        )
        .await?,
        StorageReply::Refused { .. }
    ));

    s.post(
        &format!("/api/v1/tasks/{long}/cancel"),
        json!({"reason": "done"}),
    )
    .await?;
    s.task_state(&long, &["cancelled"], Duration::from_secs(60))
        .await?;
    // Once the task is over, not even its node gets URLs.
    assert!(matches!(
        ask(
            runner_leaf,
            runner,
            &StorageRequest::Inputs {
                task_id,
                attempt: 1
            }
        )
        .await?,
        StorageReply::Refused { .. }
    ));
    Ok(())
}

async fn within(what: &str, f: impl std::future::Future<Output = ()>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .map_err(|_| anyhow::anyhow!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_resume_after_the_link_to_the_store_drops() -> Result<()> {
    // Everything reaches the store through a relay that can be cut.
    let g = Garage::start().await?;
    let port = g.port;
    let relay = Relay::start(port).await?;
    let store = storage_at(&g, &format!("http://127.0.0.1:{}", relay.port()))?;
    let mut s = stack(&store).await?;
    let _alpha = s.online_node("alpha").await?; // dropping it would stop its leaf server
    let mut input = vec![0u8; 48 * MIB];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut input);
    store
        .put(
            "projects/lab/files/big-in.bin",
            input.clone(),
            "application/octet-stream",
        )
        .await?;

    let base = relay.bytes();
    let script = "sha256sum in.bin | cut -d' ' -f1 > out/in.sha && head -c 100663296 /dev/urandom > out/big.bin";
    let id = s
        .submit_body(with_files(
            &format!("mkdir -p out && {script}"),
            json!([{"source": "big-in.bin", "path": "in.bin"}]),
            json!(["out/"]),
        ))
        .await?;
    // Cut while the input comes in; back once the node has tried again twice.
    within("the input to flow", relay.relayed(base + 16 * MIB as u64)).await?;
    relay.cut();
    within(
        "the node to try the input again",
        relay.refused(relay.refusals() + 2),
    )
    .await?;
    relay.restore();
    // Cut again while the outputs go out (the input is at most 48 MiB of it).
    within("the outputs to flow", relay.relayed(base + 90 * MIB as u64)).await?;
    relay.cut();
    within(
        "the node to try the outputs again",
        relay.refused(relay.refusals() + 2),
    )
    .await?;
    relay.restore();

    let done = ended(&mut s, &id).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let http = s.http.clone();
    let outputs = done["outputs"].as_array().cloned().unwrap_or_default();
    assert_eq!(outputs.len(), 2, "{done}");
    // The input arrived whole: the run saw exactly its bytes.
    let seen = download(&http, &outputs[1]).await?;
    assert_eq!(
        String::from_utf8_lossy(&seen).trim(),
        hex::encode(Sha256::digest(&input))
    );
    // The output left whole: what the store has is what the node hashed.
    let big = download(&http, &outputs[0]).await?;
    assert_eq!(big.len(), 96 * MIB);
    assert_eq!(
        outputs[0]["sha256"].as_str().unwrap_or_default(),
        hex::encode(Sha256::digest(&big))
    );
    Ok(())
}

#[tokio::test]
async fn an_adopted_run_still_stores_its_outputs() -> Result<()> {
    let g = Garage::start().await?;
    let store = storage(&g)?;
    let mut s = stack(&store).await?;
    let node = s.online_node("golf").await?;
    let id = s
        .submit_body(with_files(
            "sleep 3 && mkdir -p out && echo adopted > out/result.txt",
            json!([]),
            json!(["out/result.txt"]),
        ))
        .await?;
    s.task_state(&id, &["running"], Duration::from_secs(60))
        .await?;
    // The agent dies mid-run; the one started in its place adopts the run.
    node.agent.abort();
    let _ = node.agent.await;
    let agent = spawn_agent(&node.leaf, &node.token, "golf", Duration::from_millis(500));
    let done = ended(&mut s, &id).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    let outputs = done["outputs"].as_array().cloned().unwrap_or_default();
    assert_eq!(outputs.len(), 1, "{done}");
    assert_eq!(download(&s.http, &outputs[0]).await?.as_ref(), b"adopted\n");
    agent.abort();
    Ok(())
}

/// The number after `resumed at ` in a task's log.
async fn resumed_at(s: &Stack, id: &str) -> Result<u32> {
    let log = logs(s, id).await?;
    let n = log
        .split("resumed at ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok());
    n.ok_or_else(|| anyhow::anyhow!("no resume line in {log:?}"))
}

#[tokio::test]
async fn a_run_lost_with_its_node_resumes_from_its_checkpoint_elsewhere() -> Result<()> {
    let g = Garage::start().await?;
    let store = storage(&g)?;
    let mut s = Stack::start_full(
        Duration::from_secs(3),
        Default::default(),
        Default::default(),
        Some(store.clone()),
    )
    .await?;
    let a = s.online_node("omicron").await?;
    // What the node asks the main server for its files, as the main server sees it.
    let mut asked = s
        .server
        .state
        .commands
        .store()
        .client()
        .subscribe(edge::storage_subject(&a.id))
        .await?;
    // Counts to 25, a step a second, keeping the count in its checkpoint folder.
    let script = "n=$(cat ckpt/n 2>/dev/null || echo 0); echo \"resumed at $n\"; \
                  while [ $n -lt 25 ]; do n=$((n+1)); echo $n > ckpt/n; sleep 1; done; echo \"ended at $n\"";
    let mut body = task_body("lab", script, json!({"cpus": 0.5, "memory_mb": 64}));
    body["timeout_seconds"] = json!(300);
    body["checkpoint"] = json!({"path": "ckpt", "every_seconds": 10});
    let id = s.submit_body(body).await?;
    let running = s
        .task_state(&id, &["running"], Duration::from_secs(60))
        .await?;
    assert_eq!(running["node_id"], a.id.to_string());
    assert_eq!(resumed_at(&s, &id).await?, 0);

    // The first periodic upload is completed, and its file is in the store...
    let saved = async {
        while let Some(m) = asked.next().await {
            if let Ok(StorageRequest::CheckpointComplete { present, .. }) =
                dispatch::from_cbor::<StorageRequest>(&m.payload, "storage-request")
            {
                if present.iter().any(|p| p == "ckpt/n") {
                    return true;
                }
            }
        }
        false
    };
    assert!(tokio::time::timeout(Duration::from_secs(60), saved).await?);
    let key = ud_storage::keys::checkpoint_key("lab", &id, "n")?;
    assert!(
        store.head(&key).await?.is_some(),
        "{key} is not in the store"
    );
    // ...then the node is gone for good: its agent and its container.
    a.agent.abort();
    let docker = bollard::Docker::connect_with_local_defaults()?;
    for c in labelled_containers(ud_edge_agent::docker::LABEL_TASK, &id, true).await? {
        docker
            .remove_container(
                c.id.as_deref().unwrap_or_default(),
                Some(bollard::query_parameters::RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await?;
    }
    let b = s.online_node("pi").await?;
    let done = ended(&mut s, &id).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["node_id"], b.id.to_string());
    assert_eq!(done["attempt"], 2);
    // The second attempt went on from what the first had saved.
    let from = resumed_at_last(&s, &id).await?;
    assert!((1..25).contains(&from), "attempt 2 resumed at {from}");

    // A rerun starts from where the task ended.
    let rerun = s
        .post(&format!("/api/v1/tasks/{id}/rerun"), json!({}))
        .await?;
    let again = rerun["task_id"].as_str().unwrap_or_default().to_owned();
    let done = ended(&mut s, &again).await?;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(resumed_at(&s, &again).await?, 25);
    b.agent.abort();
    Ok(())
}

/// The number after the last `resumed at ` in a task's log.
async fn resumed_at_last(s: &Stack, id: &str) -> Result<u32> {
    let log = logs(s, id).await?;
    log.rsplit("resumed at ")
        .next()
        .filter(|_| log.contains("resumed at "))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no resume line in {log:?}"))
}

#[tokio::test]
async fn each_project_keeps_its_files_in_its_own_bucket_with_its_own_key() -> Result<()> {
    let g = Garage::start().await?;
    let platform = storage(&g)?;
    // Two projects, each with a bucket and a key allowed on it alone; one
    // of them with a second store.
    let (bucket_a, id_a, secret_a) = g.bucket_with_key("lab-a-files").await?;
    let (bucket_b, id_b, secret_b) = g.bucket_with_key("lab-b-files").await?;
    let (bucket_arch, id_arch, secret_arch) = g.bucket_with_key("lab-a-archive").await?;
    let store = |bucket: &str, id: &str, secret: &str| {
        json!({"endpoint": g.endpoint, "region": g.region, "bucket": bucket,
               "access_key_id": id, "secret_access_key": secret})
    };
    let stores: ud_storage::StoresConfig = serde_json::from_value(json!({"projects": {
        "lab-a": {"default": "main", "stores": {
            "main": store(&bucket_a, &id_a, &secret_a),
            "archive": store(&bucket_arch, &id_arch, &secret_arch)}},
        "lab-b": {"stores": {"main": store(&bucket_b, &id_b, &secret_b)}},
    }}))?;
    let mut s = Stack::start_stores(
        Duration::from_secs(30),
        Default::default(),
        Default::default(),
        Some(platform.clone()),
        stores,
    )
    .await?;
    let _node = s.online_node("tau").await?;
    // What users see of the stores: never a credential.
    let listed = s.get("/api/v1/projects/lab-a/stores").await?;
    let text = listed.to_string();
    assert!(
        text.contains("lab-a-archive") && !text.contains(&secret_a) && !text.contains(&id_a),
        "{listed}"
    );
    assert_eq!(
        s.get("/api/v1/projects/lab-b/stores").await?["stores"][0]["default"],
        true
    );

    // A task of each project writes an output; lab-a's second one to its archive store.
    let submit = |project: &str, text: &str, store: Option<&str>| {
        let mut body = task_body(
            project,
            &format!("mkdir -p out && echo {text} > out/r.txt"),
            json!({"cpus": 0.5, "memory_mb": 64}),
        );
        body["outputs"] = json!(["out/"]);
        if let Some(name) = store {
            body["store"] = json!(name);
        }
        body
    };
    let a = s.submit_body(submit("lab-a", "from-a", None)).await?;
    let b = s.submit_body(submit("lab-b", "from-b", None)).await?;
    let arch = s
        .submit_body(submit("lab-a", "archived", Some("archive")))
        .await?;
    for id in [&a, &b, &arch] {
        let done = ended(&mut s, id).await?;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    // Each object is in its project's bucket, none in the platform's.
    let in_bucket = |bucket: &str, id: &str, secret: &str| -> Result<ud_storage::Storage> {
        Ok(ud_storage::Storage::new(
            ud_storage::StorageSettings::path_style(&g.endpoint, &g.region, bucket, id, secret),
        )?)
    };
    let (sa, sb, sarch) = (
        in_bucket(&bucket_a, &id_a, &secret_a)?,
        in_bucket(&bucket_b, &id_b, &secret_b)?,
        in_bucket(&bucket_arch, &id_arch, &secret_arch)?,
    );
    let key =
        |project: &str, task: &str| format!("projects/{project}/tasks/{task}/outputs/out/r.txt");
    assert!(sa.head(&key("lab-a", &a)).await?.is_some());
    assert!(sb.head(&key("lab-b", &b)).await?.is_some());
    assert!(sarch.head(&key("lab-a", &arch)).await?.is_some());
    assert!(sa.head(&key("lab-a", &arch)).await?.is_none());
    assert!(platform.list("projects/").await?.is_empty());
    // The download links name the project's bucket and read back its bytes.
    let task = s.get(&format!("/api/v1/tasks/{a}")).await?;
    let url = task["outputs"][0]["download"]["url"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(url.contains(&bucket_a) && !url.contains(&bucket_b), "{url}");
    assert_eq!(
        download(&s.http, &task["outputs"][0]).await?.as_ref(),
        b"from-a\n"
    );
    // One project's key reaches nothing of the other's bucket.
    let crossed = in_bucket(&bucket_b, &id_a, &secret_a)?;
    assert!(crossed.head(&key("lab-b", &b)).await.is_err());
    assert!(crossed.list("projects/").await.is_err());
    // A store the project does not have is refused at submission.
    let resp = s
        .http
        .post(format!("{}/api/v1/tasks", s.base))
        .bearer_auth(&s.admin)
        .json(&submit("lab-b", "x", Some("archive")))
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await?;
    assert_eq!(body["fields"][0]["field"], "store", "{body}");
    Ok(())
}
