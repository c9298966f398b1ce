//! Presigned URLs for a node moving one task's files (`ud.storage.<node>`).
//! Only the node the task is assigned to, for the current attempt, gets
//! them; every URL names one object under the task's project (inputs), the
//! task's own prefix (outputs) or its checkpoint's (the first task's, for
//! reruns), for one method, and expires in minutes.

use tracing::info;
use ud_schemas::dispatch::{
    InputUrl, OutputFile, OutputUrl, SharedManifest, StorageReply, StorageRequest, Upload,
    SHARED_MANIFEST,
};
use ud_schemas::events::OutputObject;
use ud_schemas::spec::SharedMerge;
use ud_schemas::{NodeId, TaskId};
use ud_storage::{keys, Storage, StorageError, Stores};

use crate::task::{Task, TaskState};
use crate::EventStore;

/// Whether `node` may move files for `attempt` of `task` (pure).
pub fn may_move_files(node: &NodeId, task: Option<&Task>, attempt: u32) -> Result<(), String> {
    let Some(task) = task else {
        return Err("no such task".into());
    };
    match &task.state {
        TaskState::Assigned {
            node_id,
            attempt: a,
        }
        | TaskState::Running {
            node_id,
            attempt: a,
        }
        | TaskState::Disconnected {
            node_id,
            attempt: a,
            ..
        }
        | TaskState::Cancelling {
            node_id,
            attempt: a,
            ..
        } if node_id == node && *a == attempt => Ok(()),
        s => Err(format!(
            "attempt {attempt} of this task is not this node's (the task is {})",
            s.name()
        )),
    }
}

/// Answers one request; `Refused` names the object when one is at fault.
pub async fn answer(
    store: &EventStore,
    stores: &Stores,
    node: &NodeId,
    req: StorageRequest,
) -> StorageReply {
    let refused = |reason: String| StorageReply::Refused { reason };
    let (task_id, attempt) = req.attempt();
    let task = match store.load_task(&task_id).await {
        Ok(t) => t.map(|(t, _)| t),
        Err(e) => return refused(format!("cannot read the task: {e}")),
    };
    if let Err(reason) = may_move_files(node, task.as_ref(), attempt) {
        return refused(reason);
    }
    let Some(task) = task else {
        return refused("no such task".into());
    };
    // The task's files are in the store it names, or its project's default.
    let storage = match stores.of(task.project.as_str(), task.spec.store.as_deref()) {
        Ok(s) => s,
        Err(e) => return refused(e.to_string()),
    };
    let (project, id) = (task.project.as_str(), task.id.to_string());
    let output = |path: &str| keys::output_key(project, &id, path);
    let result = match req {
        StorageRequest::Inputs { .. } => inputs(store, stores, storage, &task).await,
        StorageRequest::Outputs { files, .. } => uploads(storage, &task, &files, output).await,
        StorageRequest::Complete { files, .. } => complete(storage, &files, output)
            .await
            .map(|files| StorageReply::Complete { files }),
        StorageRequest::CheckpointRestore { .. } => match Folder::of(&task) {
            Ok(folder) => restore(storage, &folder).await,
            Err(e) => Err(e),
        },
        StorageRequest::CheckpointSave { files, .. } => match Folder::of(&task) {
            Ok(folder) => uploads(storage, &task, &files, |p| folder.key(p)).await,
            Err(e) => Err(e),
        },
        StorageRequest::CheckpointComplete { files, present, .. } => match Folder::of(&task) {
            Ok(folder) => save(storage, &folder, &files, &present).await,
            Err(e) => Err(e),
        },
        StorageRequest::SharedRestore { .. } => shared_restore(storage, &task).await,
        StorageRequest::SharedPlan { objects, .. } => shared_plan(storage, &task, &objects).await,
        StorageRequest::SharedSave { objects, .. } => shared_save(storage, &task, &objects).await,
    };
    result.unwrap_or_else(|e| refused(e.to_string()))
}

/// Where a task's checkpoint folder is kept.
struct Folder {
    /// The folder, relative to the workspace.
    path: String,
    /// Where its files are kept in the store.
    prefix: String,
    project: String,
    owner: String,
}

impl Folder {
    fn of(task: &Task) -> Result<Self, StorageError> {
        let Some(c) = &task.spec.checkpoint else {
            return Err(StorageError::Path {
                path: String::new(),
                reason: "the task has no checkpoint folder".into(),
            });
        };
        let (project, owner) = (task.project.to_string(), c.owner(task.id).to_string());
        Ok(Self {
            path: c.path.clone(),
            prefix: keys::checkpoint_prefix(&project, &owner)?,
            project,
            owner,
        })
    }

    /// The key of `path` (relative to the workspace), which must be in the folder.
    fn key(&self, path: &str) -> Result<String, StorageError> {
        let inside = path
            .strip_prefix(&self.path)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorageError::Path {
                path: path.to_owned(),
                reason: format!("is not in the checkpoint folder {:?}", self.path),
            })?;
        keys::checkpoint_key(&self.project, &self.owner, inside)
    }
}

/// URLs to read the last checkpoint (none yet: no files).
async fn restore(storage: &Storage, folder: &Folder) -> Result<StorageReply, StorageError> {
    let mut files = Vec::new();
    for o in storage.list(&folder.prefix).await? {
        let Some(rel) = keys::relative(&o.key, &folder.prefix) else {
            continue;
        };
        let url = storage.presign_get(&o.key, storage.ttl_for(o.size)).await?;
        files.push(InputUrl {
            path: format!("{}/{rel}", folder.path),
            object: format!("checkpoint {rel}"),
            size: o.size,
            url: url.url,
        });
    }
    Ok(StorageReply::Inputs { files })
}

/// Completes the changed files, then drops what the folder no longer holds.
async fn save(
    storage: &Storage,
    folder: &Folder,
    files: &[OutputFile],
    present: &[String],
) -> Result<StorageReply, StorageError> {
    let stored = complete(storage, files, |p| folder.key(p)).await?;
    let keep = present
        .iter()
        .map(|p| folder.key(p))
        .collect::<Result<std::collections::HashSet<String>, _>>()?;
    for o in storage.list(&folder.prefix).await? {
        if !keep.contains(&o.key) {
            storage.delete(&o.key).await?;
        }
    }
    Ok(StorageReply::Complete { files: stored })
}

/// The object key an input names in `project` (a folder's without its
/// trailing `/`): a project file, or another task's output, read where it is.
fn input_key(project: &str, source: &str) -> Result<String, StorageError> {
    use ud_schemas::spec::InputSource;
    match InputSource::parse(source) {
        Ok(InputSource::TaskOutput { task, path: "" }) => {
            let prefix = keys::task_prefix(project, &task.to_string())?;
            Ok(format!("{prefix}outputs"))
        }
        Ok(InputSource::TaskOutput { task, path }) => {
            keys::output_key(project, &task.to_string(), path)
        }
        _ => keys::file_key(project, source),
    }
}

/// The store an input is read from: another task's outputs are in that
/// task's store; project files in the reading task's.
async fn input_store<'a>(
    store: &EventStore,
    stores: &'a Stores,
    own: &'a Storage,
    task: &Task,
    source: &str,
) -> Result<&'a Storage, StorageError> {
    use ud_schemas::spec::InputSource;
    let Ok(InputSource::TaskOutput { task: other, .. }) = InputSource::parse(source) else {
        return Ok(own);
    };
    let named = match store.load_task(&other).await {
        Ok(Some((t, _))) => t.spec.store,
        Ok(None) => None,
        Err(e) => {
            return Err(StorageError::Backend(format!(
                "cannot read task {other}: {e}"
            )))
        }
    };
    if named == task.spec.store {
        return Ok(own);
    }
    stores.of(task.project.as_str(), named.as_deref())
}

async fn inputs(
    store: &EventStore,
    stores: &Stores,
    own: &Storage,
    task: &Task,
) -> Result<StorageReply, StorageError> {
    let project = task.project.as_str();
    let mut files = Vec::new();
    for input in &task.spec.inputs {
        let storage = input_store(store, stores, own, task, &input.source).await?;
        let dest = keys::check_path(&input.path)?;
        if input.source.ends_with('/') {
            let prefix = format!("{}/", input_key(project, &input.source)?);
            let listed = storage.list(&prefix).await?;
            if listed.is_empty() {
                return Err(StorageError::NoSuchObject(format!(
                    "input folder {:?} of project {project} (it holds no file)",
                    input.source
                )));
            }
            for o in listed {
                let Some(rel) = keys::relative(&o.key, &prefix) else {
                    continue;
                };
                let url = storage.presign_get(&o.key, storage.ttl_for(o.size)).await?;
                files.push(InputUrl {
                    path: format!("{dest}/{rel}"),
                    object: format!("{}{rel}", input.source),
                    size: o.size,
                    url: url.url,
                });
            }
        } else {
            let key = input_key(project, &input.source)?;
            let Some(o) = storage.head(&key).await? else {
                return Err(StorageError::NoSuchObject(format!(
                    "input {:?} of project {project}",
                    input.source
                )));
            };
            let url = storage.presign_get(&key, storage.ttl_for(o.size)).await?;
            files.push(InputUrl {
                path: dest.to_owned(),
                object: input.source.clone(),
                size: o.size,
                url: url.url,
            });
        }
    }
    info!(task_id = %task.id, files = files.len(), "input urls handed out");
    Ok(StorageReply::Inputs { files })
}

/// The folders the task's `/shared` starts from, as their tasks saved them
/// (a task that saved none adds nothing), and how to put them together.
async fn saved_folders(
    storage: &Storage,
    task: &Task,
) -> Result<(Vec<(TaskId, SharedManifest)>, SharedMerge), StorageError> {
    let Some(shared) = &task.spec.shared else {
        return Err(StorageError::Refused(
            "the task has no shared folder".into(),
        ));
    };
    let project = task.project.as_str();
    let mut saved = Vec::with_capacity(shared.from.len());
    for from in &shared.from {
        let key = keys::shared_manifest_key(project, &from.to_string())?;
        if let Some(bytes) = storage.get(&key).await? {
            let manifest = serde_json::from_slice(&bytes)
                .map_err(|e| StorageError::Backend(format!("{key}: {e}")))?;
            saved.push((*from, manifest));
        }
    }
    Ok((saved, shared.merge))
}

/// The folder the run starts with, and URLs to read what it names. The
/// merged manifest is written to the store (it may be larger than a
/// message) unless it is one task's as that task saved it.
async fn shared_restore(storage: &Storage, task: &Task) -> Result<StorageReply, StorageError> {
    let (saved, policy) = saved_folders(storage, task).await?;
    let manifest = crate::pipeline::shared::merge(&saved, policy).map_err(|paths| {
        StorageError::Refused(format!(
            "the steps it needs changed these paths of /shared differently: {} \
             (merge: last takes the version of the step needed last)",
            paths.join(", ")
        ))
    })?;
    let project = task.project.as_str();
    let key = match saved.as_slice() {
        [(only, _)] => keys::shared_manifest_key(project, &only.to_string())?,
        _ => {
            let key = keys::shared_start_key(project, &task.id.to_string())?;
            let bytes =
                serde_json::to_vec(&manifest).map_err(|e| StorageError::Backend(e.to_string()))?;
            storage.put(&key, bytes, "application/json").await?;
            key
        }
    };
    let read = |key: String, name: String| async move {
        let Some(o) = storage.head(&key).await? else {
            return Err(StorageError::NoSuchObject(format!(
                "{name} of /shared ({key})"
            )));
        };
        let url = storage.presign_get(&key, storage.ttl_for(o.size)).await?;
        Ok(InputUrl {
            path: name.clone(),
            object: name,
            size: o.size,
            url: url.url,
        })
    };
    let manifest_url = read(key, SHARED_MANIFEST.to_owned()).await?;
    let named: std::collections::BTreeSet<&str> =
        manifest.files.iter().map(|f| f.object.as_str()).collect();
    let mut objects = Vec::with_capacity(named.len());
    for object in named {
        objects.push(read(keys::shared_key(project, object)?, object.to_owned()).await?);
    }
    info!(task_id = %task.id, files = manifest.files.len(), objects = objects.len(), "shared folder handed out");
    Ok(StorageReply::Shared {
        manifest: manifest_url,
        objects,
    })
}

/// The key of an object of a saved folder, or of the manifest written with them.
fn shared_object_key(project: &str, task: &Task, name: &str) -> Result<String, StorageError> {
    if name == SHARED_MANIFEST {
        let saved = keys::shared_manifest_key(project, &task.id.to_string())?;
        Ok(format!("{saved}.new"))
    } else {
        keys::shared_key(project, name)
    }
}

/// URLs to write the objects of a saved folder that the store lacks (and
/// its manifest, always).
async fn shared_plan(
    storage: &Storage,
    task: &Task,
    objects: &[OutputFile],
) -> Result<StorageReply, StorageError> {
    let project = task.project.as_str();
    let mut missing = Vec::new();
    for o in objects {
        let key = shared_object_key(project, task, &o.path)?;
        // Content-addressed: an object already there holds the same bytes.
        let stored = match (&o.upload_id, o.path == SHARED_MANIFEST) {
            (None, false) => storage.head(&key).await?,
            _ => None,
        };
        if stored.is_none_or(|s| s.size != o.size) {
            missing.push(o.clone());
        }
    }
    uploads(storage, task, &missing, |p| {
        shared_object_key(project, task, p)
    })
    .await
}

/// Completes the objects' uploads and keeps the folder the run left, as
/// its manifest says, once every object it names is there.
async fn shared_save(
    storage: &Storage,
    task: &Task,
    objects: &[OutputFile],
) -> Result<StorageReply, StorageError> {
    let project = task.project.as_str();
    complete(storage, objects, |p| shared_object_key(project, task, p)).await?;
    let written = shared_object_key(project, task, SHARED_MANIFEST)?;
    let bytes = storage.get(&written).await?.ok_or_else(|| {
        StorageError::NoSuchObject(format!("the manifest of /shared ({written})"))
    })?;
    let mut manifest: SharedManifest = serde_json::from_slice(&bytes)
        .map_err(|e| StorageError::Refused(format!("the manifest of /shared: {e}")))?;
    let uploaded: std::collections::HashSet<&str> =
        objects.iter().map(|o| o.path.as_str()).collect();
    let named: std::collections::BTreeSet<&str> =
        manifest.files.iter().map(|f| f.object.as_str()).collect();
    for object in named.into_iter().filter(|o| !uploaded.contains(o)) {
        let key = keys::shared_key(project, object)?;
        if storage.head(&key).await?.is_none() {
            return Err(StorageError::NoSuchObject(format!(
                "{object} of /shared ({key})"
            )));
        }
    }
    for path in manifest
        .files
        .iter()
        .map(|f| &f.path)
        .chain(manifest.deleted.iter().map(|d| &d.path))
    {
        keys::check_path(path)?;
    }
    let (saved, _) = saved_folders(storage, task).await?;
    manifest.ancestors = crate::pipeline::shared::history(&saved);
    let key = keys::shared_manifest_key(project, &task.id.to_string())?;
    let bytes = serde_json::to_vec(&manifest).map_err(|e| StorageError::Backend(e.to_string()))?;
    storage.put(&key, bytes, "application/json").await?;
    storage.delete(&written).await?;
    info!(task_id = %task.id, files = manifest.files.len(), uploaded = objects.len(), "shared folder saved");
    Ok(StorageReply::Complete { files: vec![] })
}

/// URLs to write `files` (outputs or checkpoint files) at `key_of` their paths.
async fn uploads(
    storage: &Storage,
    task: &Task,
    files: &[OutputFile],
    key_of: impl Fn(&str) -> Result<String, StorageError>,
) -> Result<StorageReply, StorageError> {
    let project = task.project.as_str();
    if let Some(quota) = storage.settings().project_quota_bytes {
        let used = storage.usage(&keys::project_prefix(project)?).await?;
        // Sizes come from the node: added without wrapping round.
        let adding = files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size));
        if used.saturating_add(adding) > quota {
            return Err(StorageError::Quota(format!(
                "files of {adding} bytes would exceed project {project}'s quota of {quota} bytes ({used} in use)"
            )));
        }
    }
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let key = key_of(&f.path)?;
        let upload = match storage
            .plan_upload(&key, f.size, f.upload_id.as_deref())
            .await?
        {
            ud_storage::Plan::Single(url) => Upload::Single { url: url.url },
            ud_storage::Plan::Multipart {
                upload_id,
                part_size,
                parts,
                done,
            } => {
                // One URL per part number; parts already stored get none.
                let mut part_urls = vec![String::new(); parts.len() + done.len()];
                for (n, url) in parts {
                    if let Some(slot) = part_urls.get_mut(n as usize - 1) {
                        *slot = url.url;
                    }
                }
                Upload::Multipart {
                    upload_id,
                    part_size,
                    part_urls,
                    done,
                }
            }
        };
        out.push(OutputUrl {
            path: f.path.clone(),
            upload,
        });
    }
    info!(task_id = %task.id, files = out.len(), "upload urls handed out");
    Ok(StorageReply::Outputs { files: out })
}

/// Completes the uploads of `files` at `key_of` their paths and checks their sizes.
async fn complete(
    storage: &Storage,
    files: &[OutputFile],
    key_of: impl Fn(&str) -> Result<String, StorageError>,
) -> Result<Vec<OutputObject>, StorageError> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let key = key_of(&f.path)?;
        if let Some(upload_id) = &f.upload_id {
            storage.complete_multipart(&key, upload_id).await?;
        }
        let stored = storage
            .head(&key)
            .await?
            .ok_or_else(|| StorageError::NoSuchObject(format!("{:?} ({key})", f.path)))?;
        if stored.size != f.size {
            return Err(StorageError::Backend(format!(
                "{:?} holds {} bytes, the node wrote {}",
                f.path, stored.size, f.size
            )));
        }
        out.push(OutputObject {
            path: f.path.clone(),
            key,
            size: f.size,
            sha256: f.sha256.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskState;

    #[test]
    fn only_the_assigned_node_moves_files() {
        let (a, b) = (NodeId::new(), NodeId::new());
        let (project, spec) = crate::validate::submit_task(&crate::validate::tests::request())
            .unwrap_or_else(|e| unreachable!("{e:?}"));
        let task = |state| Task {
            id: ud_schemas::TaskId::new(),
            project: project.clone(),
            spec: spec.clone(),
            state,
            attempts: 1,
            not_before: None,
            gpus: Vec::new(),
            last_node: None,
            version: 2,
        };
        assert!(may_move_files(
            &a,
            Some(&task(TaskState::Running {
                node_id: a,
                attempt: 1
            })),
            1
        )
        .is_ok());
        assert!(may_move_files(
            &a,
            Some(&task(TaskState::Cancelling {
                node_id: a,
                attempt: 1,
                reason: "x".into()
            })),
            1
        )
        .is_ok());
        assert!(may_move_files(
            &b,
            Some(&task(TaskState::Running {
                node_id: a,
                attempt: 1
            })),
            1
        )
        .is_err());
        assert!(may_move_files(
            &a,
            Some(&task(TaskState::Running {
                node_id: a,
                attempt: 2
            })),
            1
        )
        .is_err());
        assert!(may_move_files(&a, Some(&task(TaskState::Succeeded { exit_code: 0 })), 1).is_err());
        assert!(may_move_files(&a, None, 1).is_err());
    }
}
