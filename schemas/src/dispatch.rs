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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchCancel {
    pub at: Millis,
    pub task_id: TaskId,
    pub reason: String,
    /// Seconds between the graceful signal and the kill.
    pub grace_seconds: u32,
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

pub fn to_cbor<T: Serialize>(v: &T) -> Result<Vec<u8>, crate::CodecError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| crate::CodecError::Encode(e.to_string()))?;
    Ok(out)
}

pub fn from_cbor<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, crate::CodecError> {
    ciborium::from_reader(bytes).map_err(|e| crate::CodecError::Decode { event_type: what.to_owned(), version: 1, reason: e.to_string() })
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
    Ssh { username: String, private_key: String, passphrase: Option<String> },
    /// The request was refused (the task is not assigned to the node, the
    /// URL is not one of the task's repositories, ...).
    Denied { reason: String },
}

/// Never prints a secret.
impl std::fmt::Debug for GitCredentialsReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Token { username, .. } => write!(f, "Token {{ username: {username:?}, token: *** }}"),
            Self::Ssh { username, .. } => write!(f, "Ssh {{ username: {username:?}, private_key: *** }}"),
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
