//! Where objects live (pure). Every project has its own prefix; a task's
//! outputs and logs live under the task's prefix inside its project:
//!
//! ```text
//! projects/<project>/files/<path>                      files people upload
//! projects/<project>/tasks/<task>/outputs/<path>       what a task produced
//! projects/<project>/tasks/<task>/logs/attempt-<n>.log a task's archived log
//! ```
//!
//! Paths are relative, `/`-separated, with no empty, `.` or `..` segment, so
//! that no path can name an object outside the prefix it is joined to.

use crate::StorageError;

/// Checks a relative object or workspace path; returns it without a trailing `/`.
pub fn check_path(path: &str) -> Result<&str, StorageError> {
    ud_schemas::spec::relative_path(path).map_err(|reason| StorageError::Path {
        path: path.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Checks a project name as used in keys (the same rule as task submission).
fn check_project(project: &str) -> Result<&str, StorageError> {
    let ok = !project.is_empty()
        && project.len() <= 64
        && project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !project.starts_with('.');
    if ok {
        Ok(project)
    } else {
        Err(StorageError::Path {
            path: project.to_owned(),
            reason: "is not a valid project name".into(),
        })
    }
}

/// The prefix of everything a project owns.
pub fn project_prefix(project: &str) -> Result<String, StorageError> {
    Ok(format!("projects/{}/", check_project(project)?))
}

/// The prefix of a project's uploaded files.
pub fn files_prefix(project: &str) -> Result<String, StorageError> {
    Ok(format!("{}files/", project_prefix(project)?))
}

/// The key of a project's file.
pub fn file_key(project: &str, path: &str) -> Result<String, StorageError> {
    Ok(format!("{}{}", files_prefix(project)?, check_path(path)?))
}

/// The prefix of a task's objects.
pub fn task_prefix(project: &str, task: &str) -> Result<String, StorageError> {
    Ok(format!("{}tasks/{task}/", project_prefix(project)?))
}

/// The key of one of a task's outputs.
pub fn output_key(project: &str, task: &str, path: &str) -> Result<String, StorageError> {
    Ok(format!(
        "{}outputs/{}",
        task_prefix(project, task)?,
        check_path(path)?
    ))
}

/// The prefix of a task's checkpoint (`task`: the task that owns it, see
/// `Checkpoint::owner`): what every attempt and rerun reads and writes.
pub fn checkpoint_prefix(project: &str, task: &str) -> Result<String, StorageError> {
    Ok(format!("{}checkpoint/", task_prefix(project, task)?))
}

/// The key of one file of a task's checkpoint (`path` relative to the
/// checkpoint folder).
pub fn checkpoint_key(project: &str, task: &str, path: &str) -> Result<String, StorageError> {
    Ok(format!(
        "{}{}",
        checkpoint_prefix(project, task)?,
        check_path(path)?
    ))
}

/// The prefix of a project's pipeline folders' contents (content-addressed:
/// `blobs/<hash>` and `packs/<hash>`).
pub fn shared_prefix(project: &str) -> Result<String, StorageError> {
    Ok(format!("{}shared/", project_prefix(project)?))
}

/// The key of one object of a project's pipeline folders: `rel` must be
/// `blobs/<hash>` or `packs/<hash>` with a 64-digit lowercase hex hash.
pub fn shared_key(project: &str, rel: &str) -> Result<String, StorageError> {
    let hash = rel
        .strip_prefix("blobs/")
        .or_else(|| rel.strip_prefix("packs/"));
    let ok = hash.is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !ok {
        return Err(StorageError::Path {
            path: rel.to_owned(),
            reason: "is not blobs/<hash> or packs/<hash>".into(),
        });
    }
    Ok(format!("{}{rel}", shared_prefix(project)?))
}

/// Where the `/shared` folder a task's run left is described.
pub fn shared_manifest_key(project: &str, task: &str) -> Result<String, StorageError> {
    Ok(format!("{}shared.json", task_prefix(project, task)?))
}

/// Where the folder a task's `/shared` starts from is written when it is
/// put together from several.
pub fn shared_start_key(project: &str, task: &str) -> Result<String, StorageError> {
    Ok(format!("{}shared-start.json", task_prefix(project, task)?))
}

/// The key of a task attempt's archived log.
pub fn log_key(project: &str, task: &str, attempt: u32) -> Result<String, StorageError> {
    Ok(format!(
        "{}logs/attempt-{attempt}.log",
        task_prefix(project, task)?
    ))
}

/// Where `unidesk backup --to-object-store` keeps its backups: one folder
/// per backup, named by its time (outside every project's keys).
pub const BACKUPS_PREFIX: &str = "backups/";

/// A key's path below `prefix`, if it is below it.
pub fn relative<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix).filter(|r| !r.is_empty())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn good_paths_pass() {
        for p in ["a", "data/train.csv", "results/", "x y/z-1_2.tar.gz"] {
            assert!(check_path(p).is_ok(), "{p}");
        }
        assert_eq!(check_path("results/").ok(), Some("results"));
    }

    #[test]
    fn escaping_paths_are_refused() {
        for p in [
            "",
            "/",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "./a",
            "a/.",
            "a\\b",
            "a\nb",
        ] {
            let e = check_path(p)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(&format!("{p:?}")), "{p}: {e}");
        }
    }

    #[test]
    fn keys_stay_in_their_project() {
        assert_eq!(
            file_key("p1", "a/b").ok().as_deref(),
            Some("projects/p1/files/a/b")
        );
        assert_eq!(
            output_key("p1", "t", "out/x").ok().as_deref(),
            Some("projects/p1/tasks/t/outputs/out/x")
        );
        assert_eq!(
            log_key("p1", "t", 2).ok().as_deref(),
            Some("projects/p1/tasks/t/logs/attempt-2.log")
        );
        assert!(file_key("../p2", "a").is_err());
        assert!(file_key("p1/../p2", "a").is_err());
    }

    proptest! {
        /// Whatever is accepted stays below the project's files prefix, with no way up.
        #[test]
        fn accepted_paths_never_escape(segs in proptest::collection::vec("[a-z.]{0,3}", 1..5)) {
            let path = segs.join("/");
            if let Ok(key) = file_key("p", &path) {
                prop_assert!(key.starts_with("projects/p/files/"));
                let rest = &key["projects/p/files/".len()..];
                prop_assert!(rest.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
            }
        }
    }
}
