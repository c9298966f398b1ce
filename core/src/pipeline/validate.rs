//! A submitted pipeline to the steps recorded in its event. Every rejection
//! names the field (`steps[2].needs[0]`, `steps[1].resources.cpus`).

use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value};
use ud_schemas::api::{FieldError, SubmitPipeline, SubmitTask};
use ud_schemas::spec::{InputSource, PipelineStep};
use ud_schemas::ProjectId;

use super::graph::{self, ExpandError};
use super::{MAX_LISTED_STEPS, MAX_STEPS};
use crate::validate::{limits, plain_text, rerun_request, submit_task};

/// Task fields a step may not set: the pipeline sets them.
const NOT_IN_STEPS: [(&str, &str); 4] = [
    ("project", "a step runs in the pipeline's project"),
    (
        "session",
        "a session is a task of its own, not a pipeline step",
    ),
    ("after", "a step names the steps it runs after in needs"),
    ("name", "a step's task is named after the step"),
];

/// Most values of one matrix parameter, and longest value.
const MAX_MATRIX_VALUE_BYTES: usize = 64;

fn matrix_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 32
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn matrix_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_MATRIX_VALUE_BYTES
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The step's task fields with the defaults under them (`env` merged, the
/// step's variables winning).
fn merged(defaults: &Map<String, Value>, task: &Map<String, Value>) -> Map<String, Value> {
    let mut out = defaults.clone();
    for (k, v) in task {
        match (k.as_str(), out.get_mut(k), v) {
            ("env", Some(Value::Object(base)), Value::Object(more)) => {
                base.extend(more.clone());
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

fn prefixed(prefix: &str, errors: Vec<FieldError>) -> impl Iterator<Item = FieldError> + '_ {
    errors
        .into_iter()
        .map(move |f| FieldError::new(format!("{prefix}.{}", f.field), f.reason))
}

/// Validates a pipeline into its project, name and steps.
pub fn submit_pipeline(
    req: &SubmitPipeline,
) -> Result<(ProjectId, Option<String>, Vec<PipelineStep>), Vec<FieldError>> {
    let mut errors = Vec::new();
    let project = ProjectId::parse(&req.project)
        .map_err(|e| errors.push(FieldError::new("project", e.to_string())))
        .ok();
    if let Some(name) = &req.name {
        if !plain_text(name, limits::MAX_NAME_BYTES) || name.is_empty() {
            errors.push(FieldError::new(
                "name",
                format!(
                    "must be 1-{} bytes without control characters",
                    limits::MAX_NAME_BYTES
                ),
            ));
        }
    }
    for (field, why) in NOT_IN_STEPS {
        if req.defaults.contains_key(field) {
            errors.push(FieldError::new(format!("defaults.{field}"), why));
        }
    }
    if req.steps.is_empty() {
        errors.push(FieldError::new(
            "steps",
            "a pipeline needs at least one step",
        ));
    }
    if req.steps.len() > MAX_LISTED_STEPS {
        errors.push(FieldError::new(
            "steps",
            format!("more than {MAX_LISTED_STEPS} steps"),
        ));
        return Err(errors);
    }
    let names: HashSet<&str> = req.steps.iter().map(|s| s.name.as_str()).collect();
    let mut seen = HashSet::new();
    let mut steps = Vec::with_capacity(req.steps.len());
    for (i, s) in req.steps.iter().enumerate() {
        let at = format!("steps[{i}]");
        if !ud_schemas::spec::short_name(&s.name) {
            errors.push(FieldError::new(
                format!("{at}.name"),
                format!("{:?}: use 1-63 of a-z, 0-9, '-' and '_'", s.name),
            ));
        } else if !seen.insert(s.name.as_str()) {
            errors.push(FieldError::new(
                format!("{at}.name"),
                format!("{:?} names two steps", s.name),
            ));
        }
        let mut needed = HashSet::new();
        for (j, need) in s.needs.iter().enumerate() {
            if !names.contains(need.as_str()) {
                errors.push(FieldError::new(
                    format!("{at}.needs[{j}]"),
                    format!("no step named {need:?}"),
                ));
            } else if !needed.insert(need.as_str()) {
                errors.push(FieldError::new(
                    format!("{at}.needs[{j}]"),
                    format!("{need:?} is named twice"),
                ));
            }
        }
        for (key, values) in &s.matrix {
            if !matrix_key(key) {
                errors.push(FieldError::new(
                    format!("{at}.matrix"),
                    format!("parameter {key:?}: use 1-32 of a-z, 0-9 and '_'"),
                ));
            }
            if values.is_empty() {
                errors.push(FieldError::new(
                    format!("{at}.matrix.{key}"),
                    "lists no value",
                ));
            }
            let mut distinct = HashSet::new();
            for (k, v) in values.iter().enumerate() {
                if !matrix_value(v) {
                    errors.push(FieldError::new(
                        format!("{at}.matrix.{key}[{k}]"),
                        format!("{v:?}: use 1-{MAX_MATRIX_VALUE_BYTES} of A-Z, a-z, 0-9, '.', '_' and '-'"),
                    ));
                } else if !distinct.insert(v) {
                    errors.push(FieldError::new(
                        format!("{at}.matrix.{key}[{k}]"),
                        format!("{v:?} is listed twice"),
                    ));
                }
            }
        }
        for (field, why) in NOT_IN_STEPS {
            if field != "name" && s.task.contains_key(field) {
                errors.push(FieldError::new(format!("{at}.{field}"), why));
            }
        }
        let mut fields = merged(&req.defaults, &s.task);
        for (field, _) in NOT_IN_STEPS {
            fields.remove(field);
        }
        fields.insert("project".into(), Value::String(req.project.clone()));
        let task: SubmitTask = match serde_json::from_value(Value::Object(fields)) {
            Ok(t) => t,
            Err(e) => {
                errors.push(FieldError::new(at.clone(), e.to_string()));
                continue;
            }
        };
        let spec = match submit_task(&task) {
            Ok((_, spec)) => spec,
            Err(e) => {
                // The project is reported once, for the pipeline.
                errors.extend(prefixed(&at, e).filter(|f| !f.field.ends_with(".project")));
                continue;
            }
        };
        for (k, input) in spec.inputs.iter().enumerate() {
            if let Ok(InputSource::StepOutput { step, .. }) = InputSource::parse(&input.source) {
                // A listed name, or one combination of a matrix step.
                let listed = step.split_once('[').map_or(step, |(n, _)| n);
                if !s.needs.iter().any(|n| n == listed) {
                    errors.push(FieldError::new(
                        format!("{at}.inputs[{k}].source"),
                        format!("step {listed:?} is not one this step needs"),
                    ));
                }
            }
        }
        steps.push(PipelineStep {
            name: s.name.clone(),
            spec,
            needs: s.needs.clone(),
            when: s.when.unwrap_or_default(),
            matrix: s.matrix.clone(),
            merge: s.merge.unwrap_or_default(),
        });
    }
    let graph: Vec<(&str, &[String])> = req
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.needs.as_slice()))
        .collect();
    if let Some(cycle) = graph::cycle(&graph) {
        let first = req
            .steps
            .iter()
            .position(|s| s.name == cycle[0])
            .unwrap_or(0);
        errors.push(FieldError::new(
            format!("steps[{first}].needs"),
            format!(
                "the steps need each other in a cycle: {}",
                cycle.join(" -> ")
            ),
        ));
    }
    // Steps share their folder through one store.
    if let Some(first) = steps.first() {
        for (i, s) in steps.iter().enumerate() {
            if s.spec.store != first.spec.store {
                errors.push(FieldError::new(
                    format!("steps[{i}].store"),
                    "the steps of a pipeline share their folder through one store: name it in defaults",
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    match graph::expand(&steps) {
        Err(ExpandError::TooMany { listed, total }) => Err(vec![FieldError::new(
            format!("steps[{listed}].matrix"),
            format!("the pipeline expands to more than {MAX_STEPS} steps (at least {total})"),
        )]),
        Err(ExpandError::UnknownNeed { listed, need }) => Err(vec![FieldError::new(
            format!("steps[{listed}].needs[{need}]"),
            "names no step",
        )]),
        Ok(expanded) => {
            // Each combination of a matrix step must be a valid task too.
            let Some(project) = project else {
                return Err(errors);
            };
            for e in expanded.iter().filter(|e| !e.values.is_empty()) {
                let spec = graph::expand_spec(&steps[e.listed].spec, &e.values);
                let again = rerun_request(project.as_str(), ud_schemas::TaskId::new(), &spec);
                if let Err(errs) = submit_task(&again) {
                    let at = format!("steps[{}]{}", e.listed, values_suffix(&e.values));
                    errors.extend(prefixed(&at, errs));
                }
            }
            if !errors.is_empty() {
                return Err(errors);
            }
            Ok((project, req.name.clone(), steps))
        }
    }
}

fn values_suffix(values: &BTreeMap<String, String>) -> String {
    let joined: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("[{}]", joined.join(","))
}
