//! Messages from the hub to one node on `ud.dispatch.<node_id>.<task_id>.<kind>`
//! (CBOR; CDDL rules `dispatch-run`, `dispatch-cancel`). Never large files:
//! code and data are fetched by the node itself.

use serde::{Deserialize, Serialize};

use crate::{Millis, TaskId, TaskSpec};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchRun {
    pub at: Millis,
    pub task_id: TaskId,
    pub attempt: u32,
    pub spec: TaskSpec,
    /// The GPU devices (UUIDs) the run is given; absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// How long the node may be cut off from the main server before the
    /// platform places the run elsewhere (the offline timeout plus the
    /// run's grace): the node stops the run itself once cut off that long,
    /// so that it never runs twice at once. Absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_after_seconds: Option<u64>,
    /// The task's project (a cluster may run each project's Pods in a
    /// namespace of its own); absent in runs sent before it was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchCancel {
    pub at: Millis,
    pub task_id: TaskId,
    pub reason: String,
    /// Seconds between the graceful signal and the kill.
    pub grace_seconds: u32,
    /// The attempt to stop: a node running another attempt of the task
    /// leaves it be. Absent in cancels sent before it was added (and when
    /// the platform does not know it): whatever attempt runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// One chunk of a task's output, on `ud.log.<task_id>` (and
/// `ud.edge.<node_id>.log.<task_id>` on its way from the node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub at: Millis,
    pub attempt: u32,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
}

/// A watched disk of the main server crossed its minimum free space:
/// `ud.alert.disk.low` when it fell below, `ud.alert.disk.ok` when it is
/// back above (stored in `UD_ALERTS`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAlert {
    pub at: Millis,
    /// The host the main server runs on.
    pub server: String,
    /// The watched path (`UD_DISK_WATCH`).
    pub path: String,
    pub free_bytes: u64,
    /// `UD_DISK_MIN_FREE_MB` in bytes.
    pub min_free_bytes: u64,
}

pub const DISK_LOW_SUBJECT: &str = "ud.alert.disk.low";
pub const DISK_OK_SUBJECT: &str = "ud.alert.disk.ok";

pub fn to_cbor<T: Serialize>(v: &T) -> Result<Vec<u8>, crate::CodecError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| crate::CodecError::Encode(e.to_string()))?;
    Ok(out)
}

pub fn from_cbor<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, crate::CodecError> {
    ciborium::from_reader(bytes).map_err(|e| crate::CodecError::Decode {
        event_type: what.to_owned(),
        version: 1,
        reason: e.to_string(),
    })
}

/// A node asks the main server for the credentials of one repository of a
/// task assigned to it: request/reply on `ud.git.credentials.<node_id>`,
/// answered only to the node's own inbox and never stored (CDDL rules
/// `git-credentials-request`, `git-credentials-reply`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitCredentialsRequest {
    pub task_id: TaskId,
    pub repo_url: String,
}

/// What the main server hands a node for one fetch.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GitCredentialsReply {
    /// The platform holds nothing for this host: fetch without credentials.
    None,
    /// HTTPS basic authentication with a token as the password.
    Token { username: String, token: String },
    /// An SSH private key (OpenSSH or PEM text).
    Ssh {
        username: String,
        private_key: String,
        passphrase: Option<String>,
    },
    /// The request was refused (the task is not assigned to the node, the
    /// URL is not one of the task's repositories, ...).
    Denied { reason: String },
}

/// Never prints a secret.
impl std::fmt::Debug for GitCredentialsReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Token { username, .. } => {
                write!(f, "Token {{ username: {username:?}, token: *** }}")
            }
            Self::Ssh { username, .. } => {
                write!(f, "Ssh {{ username: {username:?}, private_key: *** }}")
            }
            Self::Denied { reason } => write!(f, "Denied {{ reason: {reason:?} }}"),
        }
    }
}

/// Before it starts a run, a node asks for the values of the project secrets
/// the task names: request/reply on `ud.secrets.<node_id>` (CDDL rules
/// `secrets-request`, `secrets-reply`), answered only to that node's inbox
/// and only for its current attempt of the task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsRequest {
    pub task_id: TaskId,
    pub attempt: u32,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SecretsReply {
    /// Every secret the task names, in the order it names them.
    Values { values: Vec<SecretValue> },
    /// Refused (not this node's attempt, a secret no longer set, ...).
    Denied { reason: String },
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretValue {
    pub name: String,
    pub value: String,
}

/// Never prints a value.
impl std::fmt::Debug for SecretsReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Values { values } => {
                let names: Vec<&str> = values.iter().map(|v| v.name.as_str()).collect();
                write!(f, "Values {{ names: {names:?} }}")
            }
            Self::Denied { reason } => write!(f, "Denied {{ reason: {reason:?} }}"),
        }
    }
}

/// Before it starts a run, a node asks whether that assignment is still the
/// current one: request/reply on `ud.assignment.<node_id>` (CDDL rules
/// `assignment-check`, `assignment-reply`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentCheck {
    pub task_id: TaskId,
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignmentReply {
    /// The task is assigned to the asking node with this attempt and not being cancelled.
    pub current: bool,
    /// Why not, when it is not.
    pub reason: Option<String>,
}

/// A node asks for what it needs to move one task's files: request/reply on
/// `ud.storage.<node_id>`, answered only for a task assigned to that node,
/// with presigned URLs that name one object and one method and expire in
/// minutes (CDDL rules `storage-request`, `storage-reply`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StorageRequest {
    /// URLs to read the task's inputs.
    Inputs { task_id: TaskId, attempt: u32 },
    /// URLs to write these outputs. A file with an `upload_id` resumes that upload.
    Outputs {
        task_id: TaskId,
        attempt: u32,
        files: Vec<OutputFile>,
    },
    /// The outputs are written: complete their uploads and check their sizes.
    Complete {
        task_id: TaskId,
        attempt: u32,
        files: Vec<OutputFile>,
    },
    /// URLs to read the task's last checkpoint (answered with `inputs`,
    /// paths relative to the workspace; none when there is no checkpoint yet).
    CheckpointRestore { task_id: TaskId, attempt: u32 },
    /// URLs to write these changed checkpoint files (answered with `outputs`).
    CheckpointSave {
        task_id: TaskId,
        attempt: u32,
        files: Vec<OutputFile>,
    },
    /// The changed files are written: complete their uploads, and drop from
    /// the checkpoint every file not in `present` (paths relative to the
    /// workspace; answered with `complete`).
    CheckpointComplete {
        task_id: TaskId,
        attempt: u32,
        files: Vec<OutputFile>,
        present: Vec<String>,
    },
    /// The folder a pipeline step's run starts with at `/shared` (answered
    /// with `shared`).
    SharedRestore { task_id: TaskId, attempt: u32 },
    /// URLs to write those of these objects the store lacks (answered with
    /// `outputs`, listing only those): `blobs/<hash>` and `packs/<hash>`,
    /// and `manifest`, the run's folder as a JSON [`SharedManifest`] (always
    /// written: it may be far larger than a message).
    SharedPlan {
        task_id: TaskId,
        attempt: u32,
        objects: Vec<OutputFile>,
    },
    /// The objects are written: complete their uploads and keep the
    /// manifest written with them (answered with `complete`, no files).
    SharedSave {
        task_id: TaskId,
        attempt: u32,
        objects: Vec<OutputFile>,
    },
}

/// The object name a saved folder's manifest is written as.
pub const SHARED_MANIFEST: &str = "manifest";

/// A saved `/shared` folder: each file's content is in an object of the
/// project's store (a blob of its own, or a range of a pack of small
/// files), named by BLAKE3 hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedManifest {
    pub files: Vec<SharedFile>,
    /// Paths deleted since (and by whom), so a fan-in knows a deletion
    /// from a file that never was.
    #[serde(default)]
    pub deleted: Vec<SharedDeleted>,
    /// Every task whose folder led to this one (filled by the main server).
    #[serde(default)]
    pub ancestors: Vec<TaskId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFile {
    /// Relative to the folder.
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    pub size: u64,
    /// Hex BLAKE3 of the file's bytes.
    pub blake3: String,
    /// `blobs/<hash>` or `packs/<hash>`, below the project's shared prefix.
    pub object: String,
    /// Where the file starts in `object` (0 for a blob).
    pub offset: u64,
    /// The task whose run wrote this version.
    pub writer: TaskId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDeleted {
    pub path: String,
    pub writer: TaskId,
}

impl StorageRequest {
    /// The task and attempt the request is for.
    pub fn attempt(&self) -> (TaskId, u32) {
        match self {
            Self::Inputs { task_id, attempt }
            | Self::Outputs {
                task_id, attempt, ..
            }
            | Self::Complete {
                task_id, attempt, ..
            }
            | Self::CheckpointRestore { task_id, attempt }
            | Self::CheckpointSave {
                task_id, attempt, ..
            }
            | Self::CheckpointComplete {
                task_id, attempt, ..
            }
            | Self::SharedRestore { task_id, attempt }
            | Self::SharedPlan {
                task_id, attempt, ..
            }
            | Self::SharedSave {
                task_id, attempt, ..
            } => (*task_id, *attempt),
        }
    }
}

/// An output file as the node found it in the workspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Relative to the workspace.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    /// The multipart upload it is written with, once there is one.
    pub upload_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StorageReply {
    Inputs {
        files: Vec<InputUrl>,
    },
    Outputs {
        files: Vec<OutputUrl>,
    },
    Complete {
        files: Vec<crate::events::OutputObject>,
    },
    /// The folder to start with (a JSON [`SharedManifest`] to read at
    /// `manifest`), and URLs to read the objects it names.
    Shared {
        manifest: InputUrl,
        objects: Vec<InputUrl>,
    },
    /// Refused or impossible; `reason` names the object.
    Refused {
        reason: String,
    },
}

/// One input object to copy to `path` in the workspace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputUrl {
    /// Relative to the workspace.
    pub path: String,
    /// The project file it is, for messages.
    pub object: String,
    pub size: u64,
    pub url: String,
}

/// Where to write one output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputUrl {
    pub path: String,
    pub upload: Upload,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Upload {
    /// One PUT of the whole file.
    Single { url: String },
    /// PUT part `i + 1` (bytes `i * part_size ..`) to `part_urls[i]`; parts
    /// in `done` are already stored.
    Multipart {
        upload_id: String,
        part_size: u64,
        part_urls: Vec<String>,
        done: Vec<u32>,
    },
}
