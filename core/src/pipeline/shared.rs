//! The `/shared` folder a pipeline step starts with: the folders the steps it
//! needs saved, put together. Pure.
//!
//! Every file version and deletion names its writer (the task whose run
//! made it), and every saved folder names all the tasks that led to it. So
//! at a fan-in a version is stale when another branch holds a different one
//! and that branch's history includes the stale version's writer: it was
//! changed after. What is left must agree, or the paths conflict.

use std::collections::{BTreeMap, HashSet};

use ud_schemas::dispatch::{SharedDeleted, SharedFile, SharedManifest};
use ud_schemas::spec::SharedMerge;
use ud_schemas::TaskId;

/// One path in one branch: a file version or a deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Version<'a> {
    File(&'a SharedFile),
    Deleted(&'a SharedDeleted),
}

impl Version<'_> {
    fn writer(&self) -> TaskId {
        match self {
            Self::File(f) => f.writer,
            Self::Deleted(d) => d.writer,
        }
    }

    /// The same content (who wrote it aside).
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::File(a), Self::File(b)) => a.blake3 == b.blake3 && a.mode == b.mode,
            (Self::Deleted(_), Self::Deleted(_)) => true,
            _ => false,
        }
    }
}

/// The folder that starts from `saved` (each task's saved folder, in the
/// order the steps are needed), or the paths that conflict.
pub fn merge(
    saved: &[(TaskId, SharedManifest)],
    policy: SharedMerge,
) -> Result<SharedManifest, Vec<String>> {
    if let [(task, only)] = saved {
        let mut m = only.clone();
        m.ancestors = history(saved);
        debug_assert!(m.ancestors.contains(task));
        return Ok(m);
    }
    let reach: Vec<HashSet<TaskId>> = saved
        .iter()
        .map(|(t, m)| m.ancestors.iter().copied().chain([*t]).collect())
        .collect();
    let mut paths: BTreeMap<&str, Vec<(usize, Version<'_>)>> = BTreeMap::new();
    for (i, (_, m)) in saved.iter().enumerate() {
        for f in &m.files {
            paths
                .entry(&f.path)
                .or_default()
                .push((i, Version::File(f)));
        }
        for d in &m.deleted {
            paths
                .entry(&d.path)
                .or_default()
                .push((i, Version::Deleted(d)));
        }
    }
    let mut out = SharedManifest {
        ancestors: history(saved),
        ..Default::default()
    };
    let mut conflicts = Vec::new();
    for (path, versions) in paths {
        let live: Vec<&Version<'_>> = versions
            .iter()
            .filter(|(i, v)| {
                // Stale: another branch changed it after this version's writer.
                !versions
                    .iter()
                    .any(|(j, w)| j != i && !w.same(v) && reach[*j].contains(&v.writer()))
            })
            .map(|(_, v)| v)
            .collect();
        let chosen = match live.as_slice() {
            [] => continue,
            [first, rest @ ..] if rest.iter().all(|v| v.same(first)) => *first,
            [.., last] if policy == SharedMerge::Last => *last,
            _ => {
                conflicts.push(path.to_owned());
                continue;
            }
        };
        match chosen {
            Version::File(f) => out.files.push((*f).clone()),
            Version::Deleted(d) => out.deleted.push((*d).clone()),
        }
    }
    if conflicts.is_empty() {
        Ok(out)
    } else {
        Err(conflicts)
    }
}

/// Every task that led to the folders: theirs and their histories, once each.
pub fn history(saved: &[(TaskId, SharedManifest)]) -> Vec<TaskId> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (t, m) in saved {
        for a in m.ancestors.iter().chain([t]) {
            if seen.insert(*a) {
                out.push(*a);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str, writer: TaskId) -> SharedFile {
        SharedFile {
            path: path.into(),
            mode: 0o644,
            size: content.len() as u64,
            blake3: content.into(),
            object: format!("blobs/{content}"),
            offset: 0,
            writer,
        }
    }

    fn saved(
        files: Vec<SharedFile>,
        deleted: Vec<(&str, TaskId)>,
        ancestors: Vec<TaskId>,
    ) -> SharedManifest {
        SharedManifest {
            files,
            deleted: deleted
                .into_iter()
                .map(|(p, w)| SharedDeleted {
                    path: p.into(),
                    writer: w,
                })
                .collect(),
            ancestors,
        }
    }

    fn contents(m: &SharedManifest) -> Vec<(String, String)> {
        m.files
            .iter()
            .map(|f| (f.path.clone(), f.blake3.clone()))
            .collect()
    }

    #[test]
    fn branches_keep_what_only_one_of_them_changed() {
        let (a, b1, b2, c) = (TaskId::new(), TaskId::new(), TaskId::new(), TaskId::new());
        // a wrote x, y, z. b1 then b2 (one branch) changed x and deleted z;
        // c (another branch) added w and kept the rest.
        let left = saved(
            vec![file("x", "x2", b1), file("y", "y1", a)],
            vec![("z", b2)],
            vec![a, b1],
        );
        let right = saved(
            vec![
                file("x", "x1", a),
                file("y", "y1", a),
                file("z", "z1", a),
                file("w", "w1", c),
            ],
            vec![],
            vec![a],
        );
        let merged = merge(&[(b2, left), (c, right)], SharedMerge::Strict)
            .unwrap_or_else(|p| panic!("conflict on {p:?}"));
        let mut got = contents(&merged);
        got.sort();
        let want =
            [("w", "w1"), ("x", "x2"), ("y", "y1")].map(|(p, h)| (p.to_owned(), h.to_owned()));
        assert_eq!(got, want);
        assert_eq!(merged.deleted.len(), 1);
        assert_eq!(merged.ancestors, vec![a, b1, b2, c]);
    }

    #[test]
    fn two_branches_changing_a_path_differently_conflict_unless_the_last_wins() {
        let (a, b, c) = (TaskId::new(), TaskId::new(), TaskId::new());
        let left = saved(
            vec![file("x", "xb", b), file("same", "s", b)],
            vec![],
            vec![a],
        );
        let right = saved(
            vec![file("x", "xc", c), file("same", "s", c)],
            vec![],
            vec![a],
        );
        let both = [(b, left.clone()), (c, right.clone())];
        assert_eq!(merge(&both, SharedMerge::Strict), Err(vec!["x".to_owned()]));
        let last = merge(&both, SharedMerge::Last).unwrap_or_default();
        assert_eq!(
            contents(&last),
            [("same", "s"), ("x", "xc")].map(|(p, h)| (p.to_owned(), h.to_owned()))
        );
        // A deletion against a change conflicts too.
        let deleted = saved(vec![], vec![("x", c)], vec![a]);
        assert_eq!(
            merge(&[(b, left), (c, deleted)], SharedMerge::Strict),
            Err(vec!["x".to_owned()])
        );
    }

    #[test]
    fn one_folder_is_taken_as_it_is() {
        let (a, b) = (TaskId::new(), TaskId::new());
        let only = saved(vec![file("x", "x1", a)], vec![], vec![a]);
        let m = merge(&[(b, only)], SharedMerge::Strict).unwrap_or_default();
        assert_eq!(contents(&m), [("x".to_owned(), "x1".to_owned())]);
        assert_eq!(m.ancestors, vec![a, b]);
        assert_eq!(
            merge(&[], SharedMerge::Strict),
            Ok(SharedManifest::default())
        );
    }
}
