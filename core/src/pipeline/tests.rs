use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;
use ud_schemas::api::SubmitPipeline;
use ud_schemas::events::{PipelineOutcome, StepOutcome};
use ud_schemas::spec::{PipelineStep, StepWhen};
use ud_schemas::{PipelineEvent, PipelineId, ProjectId};

use super::*;

fn spec() -> TaskSpec {
    crate::task::tests::spec()
}

fn step(name: &str, needs: &[&str], when: StepWhen) -> PipelineStep {
    PipelineStep {
        name: name.into(),
        spec: spec(),
        needs: needs.iter().map(|n| (*n).to_owned()).collect(),
        when,
        matrix: BTreeMap::new(),
        merge: Default::default(),
    }
}

fn project() -> ProjectId {
    ProjectId::parse("lab").unwrap_or_else(|e| unreachable!("{e}"))
}

/// Decides a command and applies what it decided.
fn run(
    p: Option<Pipeline>,
    id: PipelineId,
    c: PipelineCommand,
) -> (Option<Pipeline>, Vec<PipelineEvent>) {
    let events = decide(p.as_ref(), c, 1000).unwrap_or_else(|e| panic!("refused: {e}"));
    let p = events.iter().fold(p, |p, e| evolve(p, id, e));
    (p, events)
}

fn submit(steps: Vec<PipelineStep>) -> (Pipeline, Vec<PipelineEvent>, PipelineId) {
    let id = PipelineId::new();
    let (p, events) = run(
        None,
        id,
        PipelineCommand::Submit {
            id,
            project: project(),
            name: Some("nightly".into()),
            steps,
            idempotency_key: None,
        },
    );
    (p.unwrap_or_else(|| unreachable!()), events, id)
}

fn started(events: &[PipelineEvent]) -> Vec<String> {
    events
        .iter()
        .flat_map(|e| match e {
            PipelineEvent::StepsStarted(s) => s.steps.iter().map(|s| s.step.clone()).collect(),
            _ => vec![],
        })
        .collect()
}

fn skipped(events: &[PipelineEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            PipelineEvent::StepSkipped(s) => Some(s.step.clone()),
            _ => None,
        })
        .collect()
}

fn ended(events: &[PipelineEvent]) -> Option<PipelineOutcome> {
    events.iter().find_map(|e| match e {
        PipelineEvent::Ended(e) => Some(e.outcome),
        _ => None,
    })
}

fn end(p: Pipeline, name: &str, outcome: StepOutcome) -> (Pipeline, Vec<PipelineEvent>) {
    let task = p
        .step(name)
        .and_then(|s| s.task)
        .unwrap_or_else(|| panic!("{name} has no task"));
    let id = p.id;
    let (p, events) = run(
        Some(p),
        id,
        PipelineCommand::StepEnded {
            step: name.into(),
            task,
            outcome,
        },
    );
    (p.unwrap_or_else(|| unreachable!()), events)
}

#[test]
fn steps_start_when_what_they_need_has_ended_as_they_ask() {
    let (p, events, _) = submit(vec![
        step("fetch", &[], StepWhen::OnSuccess),
        step("train", &["fetch"], StepWhen::OnSuccess),
        step("lint", &["fetch"], StepWhen::OnSuccess),
        step("report", &["train", "lint"], StepWhen::OnSuccess),
        step("alert", &["train", "lint"], StepWhen::OnFailure),
        step("cleanup", &["report", "alert"], StepWhen::Always),
    ]);
    assert_eq!(started(&events), ["fetch"]);
    let (p, events) = end(p, "fetch", StepOutcome::Succeeded);
    // Fan-out: both start from the same end.
    assert_eq!(started(&events), ["train", "lint"]);
    let (p, events) = end(p, "train", StepOutcome::Failed);
    assert!(started(&events).is_empty(), "lint still runs: {events:?}");
    let (p, events) = end(p, "lint", StepOutcome::Succeeded);
    // Fan-in: report needs success, alert a failure; cleanup waits for alert.
    assert_eq!(skipped(&events), ["report"]);
    assert_eq!(started(&events), ["alert"]);
    assert_eq!(ended(&events), None);
    let (p, events) = end(p, "alert", StepOutcome::Succeeded);
    assert_eq!(started(&events), ["cleanup"]);
    let (p, events) = end(p, "cleanup", StepOutcome::Succeeded);
    // A step failed: so did the pipeline.
    assert_eq!(ended(&events), Some(PipelineOutcome::Failed));
    assert_eq!(p.status, PipelineStatus::Ended(PipelineOutcome::Failed));
    let reason = p.step("report").and_then(|s| s.reason.clone());
    assert_eq!(reason.as_deref(), Some("step train failed"));
}

#[test]
fn an_end_that_is_not_the_running_tasks_changes_nothing() {
    let (p, _, _) = submit(vec![step("a", &[], StepWhen::OnSuccess)]);
    let task = p
        .step("a")
        .and_then(|s| s.task)
        .unwrap_or_else(|| unreachable!());
    let other = PipelineCommand::StepEnded {
        step: "a".into(),
        task: TaskId::new(),
        outcome: StepOutcome::Succeeded,
    };
    assert_eq!(decide(Some(&p), other, 2), Ok(vec![]));
    let (p, events) = end(p, "a", StepOutcome::Succeeded);
    assert_eq!(ended(&events), Some(PipelineOutcome::Succeeded));
    let again = PipelineCommand::StepEnded {
        step: "a".into(),
        task,
        outcome: StepOutcome::Failed,
    };
    assert_eq!(decide(Some(&p), again, 3), Ok(vec![]));
}

#[test]
fn a_matrix_step_runs_once_per_combination_and_is_needed_as_a_whole() {
    let mut train = step("train", &[], StepWhen::OnSuccess);
    train.matrix = BTreeMap::from([
        ("lr".into(), vec!["0.1".into(), "0.01".into()]),
        ("opt".into(), vec!["adam".into(), "sgd".into()]),
    ]);
    train.spec.args = vec!["--lr={{matrix.lr}}".into(), "--opt={{ matrix.opt }}".into()];
    let (p, events, id) = submit(vec![train, step("pick", &["train"], StepWhen::OnSuccess)]);
    assert_eq!(
        started(&events),
        [
            "train[0.1,adam]",
            "train[0.1,sgd]",
            "train[0.01,adam]",
            "train[0.01,sgd]"
        ]
    );
    let i = p
        .steps
        .iter()
        .position(|s| s.name == "train[0.01,sgd]")
        .unwrap_or(0);
    let spec = p.task_spec(i, true);
    assert_eq!(spec.args, ["--lr=0.01", "--opt=sgd"]);
    assert_eq!(
        spec.env.get("UD_MATRIX_LR").map(String::as_str),
        Some("0.01")
    );
    assert_eq!(spec.env.get("UD_PIPELINE_ID"), Some(&id.to_string()));
    assert_eq!(spec.name.as_deref(), Some("nightly/train[0.01,sgd]"));
    // Every combination has its own task.
    let tasks: std::collections::HashSet<_> = p.steps.iter().filter_map(|s| s.task).collect();
    assert_eq!(tasks.len(), 4);
    let mut p = p;
    for name in ["train[0.1,adam]", "train[0.1,sgd]", "train[0.01,adam]"] {
        let (next, events) = end(p, name, StepOutcome::Succeeded);
        assert!(started(&events).is_empty());
        p = next;
    }
    let (_, events) = end(p, "train[0.01,sgd]", StepOutcome::Succeeded);
    assert_eq!(started(&events), ["pick"]);
}

#[test]
fn a_step_reads_what_a_step_it_needs_wrote_from_that_steps_task() {
    let mut use_it = step("use", &["make"], StepWhen::OnSuccess);
    use_it.spec.inputs = vec![ud_schemas::spec::TaskInput {
        source: "step:make/model/".into(),
        path: "model/".into(),
    }];
    let (p, _, _) = submit(vec![step("make", &[], StepWhen::OnSuccess), use_it]);
    let made = p
        .step("make")
        .and_then(|s| s.task)
        .unwrap_or_else(|| unreachable!());
    let (p, _) = end(p, "make", StepOutcome::Succeeded);
    let i = p.steps.iter().position(|s| s.name == "use").unwrap_or(0);
    assert_eq!(
        p.task_spec(i, true).inputs[0].source,
        format!("task:{made}/model/")
    );
}

#[test]
fn a_cancel_skips_what_waits_and_ends_once_the_running_steps_have() {
    let (p, _, _) = submit(vec![
        step("a", &[], StepWhen::OnSuccess),
        step("b", &[], StepWhen::OnSuccess),
        step("c", &["a"], StepWhen::Always),
    ]);
    let id = p.id;
    let (p, events) = run(
        Some(p),
        id,
        PipelineCommand::Cancel {
            reason: "wrong data".into(),
        },
    );
    assert_eq!(skipped(&events), ["c"]);
    assert_eq!(ended(&events), None);
    let p = p.unwrap_or_else(|| unreachable!());
    // Asked twice: nothing more.
    let again = PipelineCommand::Cancel { reason: "x".into() };
    assert_eq!(decide(Some(&p), again, 2), Ok(vec![]));
    let (p, _) = end(p, "a", StepOutcome::Cancelled);
    let (p, events) = end(p, "b", StepOutcome::Succeeded);
    assert_eq!(ended(&events), Some(PipelineOutcome::Cancelled));
    assert_eq!(
        decide(Some(&p), PipelineCommand::Cancel { reason: "x".into() }, 3),
        Err(PipelineError::Ended("cancelled"))
    );
}

#[test]
fn a_rerun_of_one_step_runs_it_and_what_comes_after_it_again() {
    let (p, _, _) = submit(vec![
        step("a", &[], StepWhen::OnSuccess),
        step("b", &["a"], StepWhen::OnSuccess),
        step("c", &["b"], StepWhen::OnSuccess),
        step("d", &["a"], StepWhen::OnSuccess),
    ]);
    let id = p.id;
    let rerun = |step: Option<&str>| PipelineCommand::Rerun {
        step: step.map(str::to_owned),
    };
    assert_eq!(
        decide(Some(&p), rerun(None), 2),
        Err(PipelineError::StillRunning)
    );
    let (p, _) = end(p, "a", StepOutcome::Succeeded);
    let (p, _) = end(p, "d", StepOutcome::Succeeded);
    let (p, _) = end(p, "b", StepOutcome::Failed);
    assert_eq!(p.status, PipelineStatus::Ended(PipelineOutcome::Failed));
    let first_b = p.step("b").and_then(|s| s.task);
    assert_eq!(
        decide(Some(&p), rerun(Some("zz")), 2),
        Err(PipelineError::NoSuchStep("zz".into()))
    );
    let (p, events) = run(Some(p), id, rerun(Some("b")));
    assert!(matches!(&events[0], PipelineEvent::Rerun(r) if r.steps == ["b", "c"]));
    assert_eq!(started(&events), ["b"]);
    let p = p.unwrap_or_else(|| unreachable!());
    let b = p.step("b").unwrap_or_else(|| unreachable!());
    assert_eq!(b.runs, 2);
    assert_ne!(b.task, first_b);
    let (p, _) = end(p, "b", StepOutcome::Succeeded);
    let (p, events) = end(p, "c", StepOutcome::Succeeded);
    // a and d kept their success.
    assert_eq!(ended(&events), Some(PipelineOutcome::Succeeded));
    assert_eq!(p.step("a").map(|s| s.runs), Some(1));
}

#[test]
fn advance_repairs_a_decision_only_partly_appended() {
    let (p, events, id) = submit(vec![step("a", &[], StepWhen::OnSuccess)]);
    // Only the submission made it to the stream.
    let only_submitted = evolve(None, id, &events[0]).unwrap_or_else(|| unreachable!());
    let again = decide(Some(&only_submitted), PipelineCommand::Advance, 5).unwrap_or_default();
    assert_eq!(started(&again), ["a"]);
    assert_eq!(decide(Some(&p), PipelineCommand::Advance, 5), Ok(vec![]));
}

fn request(steps: serde_json::Value) -> SubmitPipeline {
    serde_json::from_value(json!({
        "project": "lab",
        "defaults": {
            "code_repo_url": "https://git.example.org/code.git",
            "code_commit_id": "0123456789abcdef0123456789abcdef01234567",
            "env_repo_url": "https://git.example.org/env.git",
            "env_commit_id": "0123456789abcdef0123456789abcdef01234567",
            "dockerfile_path": "Dockerfile",
            "command": ["true"],
            "env": {"A": "1", "B": "1"},
        },
        "steps": steps,
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn fields(
    r: Result<(ProjectId, Option<String>, Vec<PipelineStep>), Vec<ud_schemas::api::FieldError>>,
) -> Vec<String> {
    match r {
        Ok(_) => vec![],
        Err(e) => e
            .into_iter()
            .map(|f| format!("{}: {}", f.field, f.reason))
            .collect(),
    }
}

#[test]
fn a_valid_pipeline_merges_its_defaults_under_each_step() {
    let (project, _, steps) = validate::submit_pipeline(&request(json!([
        {"name": "a", "env": {"B": "2"}},
        {"name": "b", "needs": ["a"], "when": "always", "command": ["echo", "hi"],
         "inputs": [{"source": "step:a/out/", "path": "in/"}]},
    ])))
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(project.as_str(), "lab");
    assert_eq!(steps[0].spec.env.get("A").map(String::as_str), Some("1"));
    assert_eq!(steps[0].spec.env.get("B").map(String::as_str), Some("2"));
    assert_eq!(steps[1].spec.command, ["echo", "hi"]);
    assert_eq!(steps[1].when, StepWhen::Always);
}

#[test]
fn bad_pipelines_are_refused_with_the_field_named() {
    let cases = [
        (
            json!([{"name": "a", "needs": ["b"]}, {"name": "b", "needs": ["a"]}]),
            "steps[0].needs: the steps need each other in a cycle: a -> b -> a",
        ),
        (
            json!([{"name": "a", "needs": ["a"]}]),
            "steps[0].needs: the steps need each other in a cycle: a -> a",
        ),
        // Found even next to a step that is invalid otherwise.
        (
            json!([{"name": "a", "needs": ["b"], "resources": {"cpus": -1}}, {"name": "b", "needs": ["a"]}]),
            "steps[0].needs: the steps need each other",
        ),
        (
            json!([{"name": "a", "needs": ["nope"]}]),
            "steps[0].needs[0]: no step named \"nope\"",
        ),
        (
            json!([{"name": "a"}, {"name": "a"}]),
            "steps[1].name: \"a\" names two steps",
        ),
        (json!([{"name": "A b"}]), "steps[0].name"),
        (
            json!([{"name": "a", "resources": {"cpus": -1}}]),
            "steps[0].resources.cpus",
        ),
        (json!([{"name": "a", "after": []}]), "steps[0].after"),
        (
            json!([{"name": "a", "colour": "red"}]),
            "steps[0]: unknown field `colour`",
        ),
        (
            json!([{"name": "a"}, {"name": "b", "inputs": [{"source": "step:a/x", "path": "x"}]}]),
            "steps[1].inputs[0].source: step \"a\" is not one this step needs",
        ),
        (
            json!([{"name": "a", "matrix": {"x": (0..50).map(|i| i.to_string()).collect::<Vec<_>>(), "y": (0..50).map(|i| i.to_string()).collect::<Vec<_>>()}}]),
            "steps[0].matrix: the pipeline expands to more than 2000 steps",
        ),
        (
            json!([{"name": "a", "matrix": {"x": ["a/b"]}}]),
            "steps[0].matrix.x[0]",
        ),
        (
            json!([{"name": "a", "matrix": {"x": []}}]),
            "steps[0].matrix.x: lists no value",
        ),
        (json!([]), "steps: a pipeline needs at least one step"),
        // One combination makes an invalid task.
        (
            json!([{"name": "a", "matrix": {"dir": ["ok", ".."]}, "outputs": ["{{matrix.dir}}"]}]),
            "steps[0][dir=..].outputs[0]",
        ),
    ];
    for (steps, expected) in cases {
        let got = fields(validate::submit_pipeline(&request(steps.clone())));
        assert!(
            got.iter().any(|f| f.starts_with(expected)),
            "{steps}: expected {expected:?}, got {got:?}"
        );
    }
}

/// A random graph: each step needs some of the steps before it.
fn graphs() -> impl Strategy<Value = (Vec<PipelineStep>, Vec<u8>)> {
    (1usize..12).prop_flat_map(|n| {
        let needs = proptest::collection::vec(proptest::collection::vec(any::<usize>(), 0..3), n);
        let whens = proptest::collection::vec(0u8..3, n);
        let outcomes = proptest::collection::vec(0u8..4, n * 3);
        (needs, whens, outcomes).prop_map(move |(needs, whens, outcomes)| {
            let steps = (0..n)
                .map(|i| {
                    let mut names: Vec<String> = if i == 0 {
                        vec![]
                    } else {
                        needs[i].iter().map(|k| format!("s{}", k % i)).collect()
                    };
                    names.sort();
                    names.dedup();
                    let when = [StepWhen::OnSuccess, StepWhen::OnFailure, StepWhen::Always]
                        [whens[i] as usize];
                    PipelineStep {
                        name: format!("s{i}"),
                        spec: spec(),
                        needs: names,
                        when,
                        matrix: BTreeMap::new(),
                        merge: Default::default(),
                    }
                })
                .collect();
            (steps, outcomes)
        })
    })
}

proptest! {
    /// However steps end, each starts only after what it needs has ended,
    /// at most once, and the pipeline ends with nothing left waiting.
    #[test]
    fn every_pipeline_ends_and_steps_start_only_after_their_needs(
        (steps, outcomes) in graphs(), cancel_at in proptest::option::of(0usize..10)
    ) {
        let (mut p, mut events, id) = submit(steps);
        let mut k = 0;
        let mut rounds = 0;
        loop {
            for e in &events {
                if let PipelineEvent::StepsStarted(started) = e {
                    for s in &started.steps {
                        let step = p.step(&s.step).unwrap_or_else(|| unreachable!());
                        prop_assert_eq!(step.runs, 1);
                        for n in &step.needs {
                            prop_assert!(p.steps[*n].state.ended());
                        }
                    }
                }
            }
            if ended(&events).is_some() {
                break;
            }
            if cancel_at == Some(rounds) {
                let (next, more) = run(Some(p), id, PipelineCommand::Cancel { reason: "stop".into() });
                p = next.unwrap_or_else(|| unreachable!());
                events = more;
                rounds += 1;
                continue;
            }
            let Some(running) = p.steps.iter().find(|s| s.state == StepState::Running).map(|s| s.name.clone()) else {
                prop_assert!(false, "nothing runs and the pipeline has not ended: {:?}", p.steps);
                break;
            };
            let outcome = [StepOutcome::Succeeded, StepOutcome::Failed, StepOutcome::TimedOut, StepOutcome::Cancelled][outcomes[k % outcomes.len()] as usize];
            k += 1;
            rounds += 1;
            let (next, more) = end(p, &running, outcome);
            p = next;
            events = more;
        }
        prop_assert!(p.steps.iter().all(|s| s.state.ended()));
        prop_assert!(matches!(p.status, PipelineStatus::Ended(_)));
    }
}
