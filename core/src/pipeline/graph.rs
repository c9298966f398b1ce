//! The steps of a pipeline as they run: matrix steps expanded, needs as
//! indices, values put into specs. Pure functions of the submitted steps.

use std::collections::{BTreeMap, HashMap};

use ud_schemas::spec::{PipelineStep, StepWhen};
use ud_schemas::TaskSpec;

use super::MAX_STEPS;

/// One step that runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expanded {
    pub name: String,
    pub listed: usize,
    pub values: BTreeMap<String, String>,
    pub needs: Vec<usize>,
    pub when: StepWhen,
}

/// Why steps cannot be expanded (validation names the field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpandError {
    /// `steps[listed].needs[need]` names no step.
    UnknownNeed { listed: usize, need: usize },
    /// `steps[listed].matrix` makes too many steps.
    TooMany { listed: usize, total: usize },
}

/// Every combination of a matrix's values, keys in order.
fn combinations(matrix: &BTreeMap<String, Vec<String>>) -> Vec<BTreeMap<String, String>> {
    let mut out = vec![BTreeMap::new()];
    for (key, values) in matrix {
        out = out
            .into_iter()
            .flat_map(|partial| {
                values.iter().map(move |v| {
                    let mut next = partial.clone();
                    next.insert(key.clone(), v.clone());
                    next
                })
            })
            .collect();
    }
    out
}

/// How many steps a matrix makes (saturating).
pub fn matrix_size(matrix: &BTreeMap<String, Vec<String>>) -> usize {
    matrix
        .values()
        .fold(1usize, |n, v| n.saturating_mul(v.len()))
}

/// The name of one combination of a matrix step: `train[0.1,adam]`.
pub fn expanded_name(name: &str, values: &BTreeMap<String, String>) -> String {
    if values.is_empty() {
        return name.to_owned();
    }
    let joined: Vec<&str> = values.values().map(String::as_str).collect();
    format!("{name}[{}]", joined.join(","))
}

/// The steps that run, in the order listed (a matrix step's combinations
/// next to each other).
pub fn expand(steps: &[PipelineStep]) -> Result<Vec<Expanded>, ExpandError> {
    let mut total = 0usize;
    for (listed, s) in steps.iter().enumerate() {
        total = total.saturating_add(matrix_size(&s.matrix));
        if total > MAX_STEPS {
            return Err(ExpandError::TooMany { listed, total });
        }
    }
    let mut out: Vec<Expanded> = Vec::with_capacity(total);
    // Listed name -> the indices of its expanded steps.
    let mut of: HashMap<&str, Vec<usize>> = HashMap::new();
    for (listed, s) in steps.iter().enumerate() {
        for values in combinations(&s.matrix) {
            of.entry(s.name.as_str()).or_default().push(out.len());
            out.push(Expanded {
                name: expanded_name(&s.name, &values),
                listed,
                values,
                needs: Vec::new(),
                when: s.when,
            });
        }
    }
    for e in &mut out {
        for (need, name) in steps[e.listed].needs.iter().enumerate() {
            let Some(indices) = of.get(name.as_str()) else {
                return Err(ExpandError::UnknownNeed {
                    listed: e.listed,
                    need,
                });
            };
            e.needs.extend(indices);
        }
    }
    Ok(out)
}

/// A cycle among listed steps (each a name and the names it needs), as
/// the names along it, if there is one. Needs naming no step are ignored.
pub fn cycle(steps: &[(&str, &[String])]) -> Option<Vec<String>> {
    let index: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (*name, i))
        .collect();
    // 0: not seen, 1: on the current path, 2: done.
    let mut mark = vec![0u8; steps.len()];
    let mut path = Vec::new();
    fn visit(
        i: usize,
        steps: &[(&str, &[String])],
        index: &HashMap<&str, usize>,
        mark: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        mark[i] = 1;
        path.push(i);
        for need in steps[i].1 {
            let Some(&j) = index.get(need.as_str()) else {
                continue;
            };
            match mark[j] {
                1 => {
                    let start = path.iter().position(|p| *p == j).unwrap_or(0);
                    let mut found = path[start..].to_vec();
                    found.push(j);
                    return Some(found);
                }
                0 => {
                    if let Some(c) = visit(j, steps, index, mark, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        mark[i] = 2;
        None
    }
    (0..steps.len()).find_map(|i| {
        if mark[i] != 0 {
            return None;
        }
        visit(i, steps, &index, &mut mark, &mut path)
            .map(|c| c.into_iter().map(|i| steps[i].0.to_owned()).collect())
    })
}

/// `text` with `{{matrix.KEY}}` (or `{{ matrix.KEY }}`) replaced by the values.
pub fn substitute(text: &str, values: &BTreeMap<String, String>) -> String {
    if values.is_empty() || !text.contains("{{") {
        return text.to_owned();
    }
    let mut out = text.to_owned();
    for (k, v) in values {
        out = out
            .replace(&format!("{{{{matrix.{k}}}}}"), v)
            .replace(&format!("{{{{ matrix.{k} }}}}"), v);
    }
    out
}

/// A listed step's spec for one combination of its matrix values.
pub fn expand_spec(spec: &TaskSpec, values: &BTreeMap<String, String>) -> TaskSpec {
    let mut spec = spec.clone();
    if values.is_empty() {
        return spec;
    }
    let sub = |s: &mut String| *s = substitute(s, values);
    spec.command.iter_mut().for_each(sub);
    spec.args.iter_mut().for_each(sub);
    spec.env.values_mut().for_each(sub);
    spec.outputs.iter_mut().for_each(sub);
    for input in &mut spec.inputs {
        sub(&mut input.source);
        sub(&mut input.path);
    }
    if let Some(name) = &mut spec.name {
        sub(name);
    }
    for (k, v) in values {
        spec.env
            .insert(format!("UD_MATRIX_{}", k.to_ascii_uppercase()), v.clone());
    }
    spec
}

/// `step:<name>/<path>` as (name, path).
pub fn step_source(source: &str) -> Option<(&str, &str)> {
    source.strip_prefix("step:")?.split_once('/')
}
