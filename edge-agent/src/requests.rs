//! What the agent asks the main server, request/reply through the leaf link
//! (subjects only this node may publish on; answers on its own inbox).

use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use ud_schemas::dispatch::{
    self, AssignmentCheck, AssignmentReply, GitCredentialsReply, GitCredentialsRequest,
    SecretsReply, SecretsRequest, StorageReply, StorageRequest,
};
use ud_schemas::{edge, NodeId, TaskId};

/// How long the agent waits for an answer before going on without one.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the main server, on this node's own request subjects.
#[derive(Clone)]
pub struct Requests {
    pub client: async_nats::Client,
    pub node: NodeId,
}

impl Requests {
    async fn ask<Q: Serialize, A: DeserializeOwned>(
        &self,
        subject: String,
        question: &Q,
        what: &str,
    ) -> Result<A, String> {
        let req = dispatch::to_cbor(question).map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(ANSWER_TIMEOUT, self.client.request(subject, req.into()))
            .await
            .map_err(|_| "the main server did not answer".to_owned())?
            .map_err(|e| e.to_string())?;
        dispatch::from_cbor(&reply.payload, what).map_err(|e| e.to_string())
    }

    /// The credentials of one repository of `task`, for one fetch.
    pub async fn credentials(
        &self,
        task: TaskId,
        url: &str,
    ) -> Result<GitCredentialsReply, String> {
        let q = GitCredentialsRequest {
            task_id: task,
            repo_url: url.to_owned(),
        };
        self.ask(
            edge::git_credentials_subject(&self.node),
            &q,
            "git-credentials-reply",
        )
        .await
    }

    /// Whether this node's `attempt` of `task` is still the current assignment.
    pub async fn assignment(&self, task: TaskId, attempt: u32) -> Result<AssignmentReply, String> {
        let q = AssignmentCheck {
            task_id: task,
            attempt,
        };
        self.ask(edge::assignment_subject(&self.node), &q, "assignment-reply")
            .await
    }

    /// The values of the project secrets `attempt` of `task` gets.
    pub async fn secrets(&self, task: TaskId, attempt: u32) -> Result<SecretsReply, String> {
        let q = SecretsRequest {
            task_id: task,
            attempt,
        };
        self.ask(edge::secrets_subject(&self.node), &q, "secrets-reply")
            .await
    }

    /// Presigned URLs (or the outcome) for moving one task's files.
    pub async fn storage(&self, req: &StorageRequest) -> Result<StorageReply, String> {
        self.ask(edge::storage_subject(&self.node), req, "storage-reply")
            .await
    }
}
