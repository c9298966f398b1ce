//! Pipelines end to end: steps run on a real node in order, read what the
//! steps they need wrote (from those steps' own outputs in a real Garage),
//! fan out by a matrix, fan in, skip or run as `when` asks; a pipeline is
//! cancelled and run again; bad pipelines are refused with nothing appended.

use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};
use ud_testkit::Garage;

use crate::common::*;
use crate::files::storage;

/// The fields every step of these pipelines shares (a step that runs
/// something else says so).
fn defaults() -> Value {
    let mut d = task_body("lab", "true", json!({"cpus": 0.5, "memory_mb": 64}));
    if let Some(o) = d.as_object_mut() {
        o.remove("project");
    }
    d
}

fn sh(script: &str) -> Value {
    json!(["sh", "-c", script])
}

fn step<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

fn ended(p: &Value) -> bool {
    p["status"].as_str().is_some_and(|s| s != "running")
}

const END: Duration = Duration::from_secs(180);

/// The task id of a pipeline's step.
fn task_of(p: &Value, name: &str) -> String {
    step(p, name)["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Submits a pipeline; its id.
async fn submit(s: &Stack, pipeline: Value) -> Result<String> {
    let accepted = s.post("/api/v1/pipelines", pipeline).await?;
    Ok(accepted["pipeline_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// Submits a pipeline and waits for its end; its id and how it ended.
async fn run(s: &mut Stack, pipeline: Value) -> Result<(String, Value)> {
    let id = submit(s, pipeline).await?;
    let done = s
        .pipeline_until(&id, "the pipeline's end", END, ended)
        .await?;
    Ok((id, done))
}

#[tokio::test]
async fn steps_run_in_order_and_read_what_earlier_steps_wrote() -> Result<()> {
    let g = Garage::start().await?;
    let store = storage(&g)?;
    let mut s = crate::files::stack(&store).await?;
    let _node = s.online_node("pi").await?;
    let pipeline = json!({
        "project": "lab",
        "name": "nightly",
        "defaults": defaults(),
        "steps": [
            {"name": "make", "command": sh("mkdir -p out && echo model-v1 > out/model.txt"),
             "outputs": ["out/"]},
            {"name": "train", "needs": ["make"], "matrix": {"lr": ["a", "b"]},
             "inputs": [{"source": "step:make/out/", "path": "in/"}],
             "command": sh("cat in/model.txt; echo lr={{matrix.lr}} $UD_MATRIX_LR step=$UD_PIPELINE_STEP")},
            {"name": "fail", "needs": ["make"], "command": sh("exit 4")},
            {"name": "report", "needs": ["train", "fail"], "command": sh("echo report")},
            {"name": "alert", "needs": ["fail"], "when": "on_failure", "command": sh("echo alert")},
        ],
    });
    let (id, done) = run(&mut s, pipeline).await?;
    assert_eq!(done["status"], "failed", "{done}");
    let states: Vec<(String, String)> = done["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| {
            (
                st["name"].as_str().unwrap_or_default().to_owned(),
                st["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("make", "succeeded"),
        ("train[a]", "succeeded"),
        ("train[b]", "succeeded"),
        ("fail", "failed"),
        ("report", "skipped"),
        ("alert", "succeeded"),
    ];
    assert_eq!(
        states,
        expected.map(|(a, b)| (a.to_owned(), b.to_owned())),
        "{done}"
    );
    assert!(step(&done, "report")["reason"]
        .as_str()
        .is_some_and(|r| r.contains("fail")));
    // Each matrix step read the first step's output, with its own value.
    let made = task_of(&done, "make");
    let train_a = task_of(&done, "train[a]");
    let log = logs(&s, &train_a).await?;
    assert!(log.contains("model-v1"), "{log}");
    assert!(log.contains("lr=a a step=train[a]"), "{log}");
    let task = s.get(&format!("/api/v1/tasks/{train_a}")).await?;
    assert_eq!(
        task["spec"]["inputs"][0]["source"],
        format!("task:{made}/out/"),
        "{task}"
    );
    assert_eq!(task["spec"]["name"], "nightly/train[a]");
    // Read where it was written: no copy among the project's files.
    let copies = store.list("projects/lab/files/").await?;
    assert!(copies.is_empty(), "{copies:?}");
    // The `train` step started only after `make` had ended (stream order).
    let made_end = s.seq_of(&made, "task.succeeded").await?;
    let train_submitted = s.seq_of(&train_a, "task.submitted").await?;
    assert!(made_end > 0 && train_submitted > made_end);

    // Running `train` again reruns it and what comes after it, from the
    // same input; the other steps keep how they ended.
    let rerun = s
        .post(
            &format!("/api/v1/pipelines/{id}/rerun"),
            json!({"step": "train"}),
        )
        .await?;
    assert_eq!(rerun["changed"], true);
    let again = s
        .pipeline_until(&id, "the rerun's end", END, |p| {
            ended(p) && step(p, "train[a]")["runs"] == 2
        })
        .await?;
    assert_eq!(again["status"], "failed", "{again}");
    assert_eq!(step(&again, "make")["runs"], 1);
    assert_eq!(
        step(&again, "make")["task_id"].as_str(),
        Some(made.as_str())
    );
    let second = task_of(&again, "train[a]");
    assert_ne!(second, train_a);
    assert!(logs(&s, &second).await?.contains("model-v1"));
    assert_eq!(step(&again, "report")["state"], "skipped");
    // Listed, with a summary of its steps.
    let page = s.get("/api/v1/pipelines?project=lab").await?;
    assert_eq!(page["items"][0]["id"], id.as_str(), "{page}");
    Ok(())
}

#[tokio::test]
async fn a_cancelled_pipeline_stops_its_runs_and_bad_ones_are_refused() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(30)).await?;
    let _node = s.online_node("rho").await?;
    // Refused, naming the field, and nothing appended.
    for (steps, field) in [
        (
            json!([{"name": "a", "needs": ["b"]}, {"name": "b", "needs": ["a"]}]),
            "steps[0].needs",
        ),
        (
            json!([{"name": "a", "needs": ["nope"]}]),
            "steps[0].needs[0]",
        ),
        (
            json!([{"name": "a", "resources": {"cpus": 0}}]),
            "steps[0].resources.cpus",
        ),
        (
            json!([{"name": "a", "matrix": {"x": (0..2001).map(|i| i.to_string()).collect::<Vec<_>>()}}]),
            "steps[0].matrix",
        ),
    ] {
        let resp = s
            .http
            .post(format!("{}/api/v1/pipelines", s.base))
            .bearer_auth(&s.admin)
            .json(&json!({"project": "lab", "defaults": defaults(), "steps": steps}))
            .send()
            .await?;
        assert_eq!(resp.status(), 400);
        let body: Value = resp.json().await?;
        let fields: Vec<&str> = body["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["field"].as_str())
            .collect();
        assert!(fields.contains(&field), "{field}: {body}");
    }
    let mut stream = s
        .server
        .state
        .commands
        .store()
        .jetstream()
        .get_stream(ud_schemas::streams::PIPELINES)
        .await?;
    assert_eq!(stream.info().await?.state.messages, 0);

    let id = submit(
        &s,
        json!({"project": "lab", "defaults": defaults(), "steps": [
            {"name": "long", "command": sh("echo started; sleep 120")},
            {"name": "next", "needs": ["long"], "when": "always", "command": sh("echo next")},
        ]}),
    )
    .await?;
    let running = s
        .pipeline_until(&id, "the first step's task", END, |p| {
            step(p, "long")["task_id"].is_string()
        })
        .await?;
    let long = task_of(&running, "long");
    s.task_state(&long, &["running"], END).await?;
    s.post(
        &format!("/api/v1/pipelines/{id}/cancel"),
        json!({"reason": "wrong data"}),
    )
    .await?;
    let done = s
        .pipeline_until(&id, "the pipeline's end", END, ended)
        .await?;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(step(&done, "long")["state"], "cancelled", "{done}");
    assert_eq!(step(&done, "next")["state"], "skipped", "{done}");
    // Its run was stopped (the task read model may lag the pipeline's).
    let task = s
        .task_state(&long, &["cancelled", "succeeded", "failed"], END)
        .await?;
    assert_eq!(task["state"], "cancelled", "{task}");
    // Ended: a second cancel is refused; a rerun of one unknown step too.
    let resp = s
        .http
        .post(format!("{}/api/v1/pipelines/{id}/cancel", s.base))
        .bearer_auth(&s.admin)
        .send()
        .await?;
    assert_eq!(resp.status(), 409);
    let resp = s
        .http
        .post(format!("{}/api/v1/pipelines/{id}/rerun", s.base))
        .bearer_auth(&s.admin)
        .json(&json!({"step": "nope"}))
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    Ok(())
}

/// The objects kept for a project's `/shared` folders.
async fn shared_objects(store: &ud_storage::Storage) -> Result<Vec<String>> {
    Ok(store
        .list("projects/lab/shared/")
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect())
}

#[tokio::test]
async fn steps_share_a_folder_that_branches_change_and_a_fan_in_joins() -> Result<()> {
    let g = Garage::start().await?;
    let store = storage(&g)?;
    let mut s = crate::files::stack(&store).await?;
    let _node = s.online_node("sigma").await?;
    let pipeline = json!({
        "project": "lab",
        "defaults": defaults(),
        "steps": [
            {"name": "make", "command": sh(
                "mkdir -p /shared/data && for i in $(seq 1 200); do echo file $i > /shared/data/$i.txt; done \
                 && head -c 3145728 /dev/urandom > /shared/big.bin && md5sum /shared/big.bin | cut -c1-32 > /shared/big.md5")},
            {"name": "left", "needs": ["make"], "command": sh(
                "echo left was here > /shared/data/1.txt && echo from left > /shared/left.txt")},
            {"name": "right", "needs": ["make"], "command": sh(
                "rm /shared/data/2.txt && echo from right > /shared/right.txt")},
            {"name": "join", "needs": ["left", "right"], "command": sh(
                "cat /shared/data/1.txt; test ! -e /shared/data/2.txt && echo two-gone; \
                 cat /shared/left.txt /shared/right.txt; \
                 md5sum /shared/big.bin | cut -c1-32 | cmp - /shared/big.md5 && echo big-intact; \
                 ls /shared/data | wc -l")},
        ],
    });
    let (_, done) = run(&mut s, pipeline).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let join = task_of(&done, "join");
    let log = logs(&s, &join).await?;
    for line in [
        "left was here",
        "two-gone",
        "from left",
        "from right",
        "big-intact",
        "199",
    ] {
        assert!(log.contains(line), "{line:?} not in {log}");
    }
    // Content-addressed: make stored a pack of its small files and a blob;
    // left and right a pack each of what they changed; join, which changed
    // nothing, no object at all.
    let objects = shared_objects(&store).await?;
    let packs = objects.iter().filter(|k| k.contains("/packs/")).count();
    let blobs = objects.iter().filter(|k| k.contains("/blobs/")).count();
    assert_eq!((packs, blobs), (3, 1), "{objects:?}");
    let prepared = s.get(&format!("/api/v1/tasks/{join}")).await?;
    let steps: Vec<&str> = prepared["prepared"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|st| st["name"].as_str())
        .collect();
    assert!(steps.contains(&"fetch_shared"), "{prepared}");

    // Two branches writing one path differently: the fan-in fails naming
    // it, unless it asks for the last one's version.
    let clash = |merge: &str| {
        json!({
            "project": "lab",
            "defaults": defaults(),
            "steps": [
                {"name": "a", "command": sh("echo base > /shared/x.txt")},
                {"name": "b", "needs": ["a"], "command": sh("echo from b > /shared/x.txt")},
                {"name": "c", "needs": ["a"], "command": sh("echo from c > /shared/x.txt")},
                {"name": "d", "needs": ["b", "c"], "merge": merge, "command": sh("cat /shared/x.txt")},
            ],
        })
    };
    let (_, done) = run(&mut s, clash("strict")).await?;
    assert_eq!(done["status"], "failed", "{done}");
    let d = task_of(&done, "d");
    let task = s.task_state(&d, &["failed"], END).await?;
    let reason = task["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("x.txt") && reason.contains("merge: last"),
        "{task}"
    );
    let (_, done) = run(&mut s, clash("last")).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let d = task_of(&done, "d");
    assert!(logs(&s, &d).await?.contains("from c"));
    Ok(())
}

#[tokio::test]
async fn a_step_goes_where_its_folder_is_and_another_node_fetches_it() -> Result<()> {
    let g = Garage::start().await?;
    let store = storage(&g)?;
    let mut s = crate::files::stack(&store).await?;
    let alpha = s.online_node("alpha").await?;
    let beta = s.online_node("beta").await?;
    let on = |zone: &str| json!({"cpus": 0.5, "memory_mb": 64, "labels": {"zone": zone}});
    let pipeline = json!({
        "project": "lab",
        "defaults": defaults(),
        "steps": [
            {"name": "first", "resources": on("alpha"), "command": sh("echo made on alpha > /shared/note.txt")},
            // Free to go anywhere: it goes where the folder already is.
            {"name": "second", "needs": ["first"], "command": sh("cat /shared/note.txt && echo second >> /shared/note.txt")},
            // Held elsewhere: that node fetches the folder.
            {"name": "third", "needs": ["second"], "resources": on("beta"), "command": sh("cat /shared/note.txt")},
        ],
    });
    let (_, done) = run(&mut s, pipeline).await?;
    assert_eq!(done["status"], "succeeded", "{done}");
    let node_of = |name: &str| {
        let task = step(&done, name)["task_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let s = &s;
        async move { Ok::<_, anyhow::Error>((s.get(&format!("/api/v1/tasks/{task}")).await?, task)) }
    };
    let (second, _) = node_of("second").await?;
    assert_eq!(second["node_id"], alpha.id.to_string(), "{second}");
    assert_eq!(
        second["spec"]["resources"]["preferred_nodes"],
        json!([alpha.id.to_string()])
    );
    let (third, task) = node_of("third").await?;
    assert_eq!(third["node_id"], beta.id.to_string(), "{third}");
    let log = logs(&s, &task).await?;
    assert!(log.contains("made on alpha\nsecond"), "{log}");
    Ok(())
}
