//! Repository credentials held by the platform and handed to a node for one
//! fetch: request/reply on `ud.git.credentials.<node_id>` (only that node may
//! publish there), answered only to that node's own inbox, and only for a
//! repository of a task currently assigned to it. Nothing of it is written
//! into a stream, an event, a task's environment or a log.
//!
//! The credentials file (`UD_GIT_CREDENTIALS_FILE`, JSON) names them per
//! repository host (with its port, if the URL has one):
//!
//! ```json
//! { "hosts": {
//!     "git.example.org": { "username": "oauth2", "token_file": "/etc/unidesk/secrets/gitlab" },
//!     "github.com":      { "username": "git", "ssh_key_file": "/etc/unidesk/secrets/id_ed25519" },
//!     "10.0.0.5:8080":   { "username": "ci", "token": "...", "allow_http": true }
//! } }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use ud_schemas::dispatch::{GitCredentialsReply, GitCredentialsRequest};
use ud_schemas::NodeId;

use super::EdgeError;
use crate::task::Task;
use crate::validate::parse_repo_url;

/// One host's entry in the credentials file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostEntry {
    username: Option<String>,
    token: Option<String>,
    token_file: Option<String>,
    ssh_key_file: Option<String>,
    ssh_key_passphrase_file: Option<String>,
    /// Hand a token over plain `http://` too (never by default).
    #[serde(default)]
    allow_http: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    hosts: BTreeMap<String, HostEntry>,
}

/// What the platform holds for one host, loaded.
#[derive(Clone, PartialEq, Eq)]
enum Secret {
    Token {
        username: String,
        token: String,
        allow_http: bool,
    },
    Ssh {
        username: String,
        private_key: String,
        passphrase: Option<String>,
    },
}

/// Credentials per repository host.
#[derive(Clone, Default)]
pub struct GitCredentials {
    hosts: BTreeMap<String, Secret>,
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCredentials")
            .field("hosts", &self.hosts.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn read_secret(base: &Path, file: &str) -> Result<String, EdgeError> {
    let path = base.join(file);
    std::fs::read_to_string(&path)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
        .map_err(|e| EdgeError::Settings {
            file: path.display().to_string(),
            reason: e.to_string(),
        })
}

impl GitCredentials {
    /// Loads the credentials file; secret files are read relative to it.
    pub fn load(path: &Path) -> Result<Self, EdgeError> {
        let text = std::fs::read_to_string(path).map_err(|e| EdgeError::Settings {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    pub fn parse(text: &str, base: &Path) -> Result<Self, EdgeError> {
        let file: File = serde_json::from_str(text).map_err(|e| EdgeError::Settings {
            file: "credentials file".into(),
            reason: e.to_string(),
        })?;
        let mut hosts = BTreeMap::new();
        for (host, e) in file.hosts {
            let bad = |why: &str| EdgeError::Settings {
                file: "credentials file".into(),
                reason: format!("host {host:?}: {why}"),
            };
            let token = match (&e.token, &e.token_file) {
                (Some(t), None) => Some(t.clone()),
                (None, Some(f)) => Some(read_secret(base, f)?),
                (None, None) => None,
                (Some(_), Some(_)) => return Err(bad("give token or token_file, not both")),
            };
            let secret = match (token, &e.ssh_key_file) {
                (Some(token), None) => Secret::Token {
                    username: e.username.clone().unwrap_or_else(|| "git".into()),
                    token,
                    allow_http: e.allow_http,
                },
                (None, Some(key)) => Secret::Ssh {
                    username: e.username.clone().unwrap_or_else(|| "git".into()),
                    private_key: read_secret(base, key)?,
                    passphrase: e
                        .ssh_key_passphrase_file
                        .as_deref()
                        .map(|f| read_secret(base, f))
                        .transpose()?,
                },
                (None, None) => return Err(bad("needs a token, a token_file or an ssh_key_file")),
                (Some(_), Some(_)) => return Err(bad("give a token or an ssh key, not both")),
            };
            hosts.insert(host.to_ascii_lowercase(), secret);
        }
        Ok(Self { hosts })
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The answer to `node` asking for `req`, given the task as stored (pure).
    pub fn answer(
        &self,
        node: &NodeId,
        task: Option<&Task>,
        req: &GitCredentialsRequest,
    ) -> GitCredentialsReply {
        let denied = |reason: &str| GitCredentialsReply::Denied {
            reason: reason.to_owned(),
        };
        let Some(task) = task else {
            return denied("no such task");
        };
        if task.state.live_node() != Some(*node) {
            return denied("the task is not assigned to this node");
        }
        if req.repo_url != task.spec.code_repo_url && req.repo_url != task.spec.env_repo_url {
            return denied("not a repository of the task");
        }
        let Some(url) = parse_repo_url(&req.repo_url) else {
            return denied("not a repository URL");
        };
        let host = url.host.to_ascii_lowercase();
        let bare = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
        let Some(secret) = self.hosts.get(&host).or_else(|| self.hosts.get(bare)) else {
            return GitCredentialsReply::None;
        };
        match (secret, url.scheme) {
            (
                Secret::Token {
                    username, token, ..
                },
                "https",
            )
            | (
                Secret::Token {
                    username,
                    token,
                    allow_http: true,
                },
                "http",
            ) => GitCredentialsReply::Token {
                username: username.clone(),
                token: token.clone(),
            },
            (Secret::Token { .. }, "http") => {
                denied("the platform hands tokens over plain http only to hosts with allow_http")
            }
            (
                Secret::Ssh {
                    username,
                    private_key,
                    passphrase,
                },
                "ssh",
            ) => GitCredentialsReply::Ssh {
                username: url.user.map_or_else(|| username.clone(), str::to_owned),
                private_key: private_key.clone(),
                passphrase: passphrase.clone(),
            },
            _ => GitCredentialsReply::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::TaskState;

    fn task(node: NodeId, code: &str) -> Task {
        let mut req = crate::validate::tests::request();
        req.code_repo_url = code.to_owned();
        let (project, spec) =
            crate::validate::submit_task(&req).unwrap_or_else(|e| panic!("{e:?}"));
        Task {
            id: ud_schemas::TaskId::new(),
            project,
            spec,
            state: TaskState::Running {
                node_id: node,
                attempt: 1,
            },
            attempts: 1,
            not_before: None,
            gpus: Vec::new(),
            last_node: None,
            version: 2,
        }
    }

    fn creds() -> GitCredentials {
        let text = r#"{"hosts": {"git.example.org": {"username": "ci", "token": "s3cret"},
                                 "127.0.0.1:9000": {"token": "local", "allow_http": true},
                                 "plain.example.org": {"token": "nope"}}}"#;
        GitCredentials::parse(text, Path::new(".")).unwrap_or_default()
    }

    fn ask(c: &GitCredentials, node: NodeId, t: Option<&Task>, url: &str) -> GitCredentialsReply {
        let req = GitCredentialsRequest {
            task_id: ud_schemas::TaskId::new(),
            repo_url: url.to_owned(),
        };
        c.answer(&node, t, &req)
    }

    #[test]
    fn only_the_assigned_node_gets_the_hosts_credentials() {
        let c = creds();
        let (a, b) = (NodeId::new(), NodeId::new());
        let url = "https://git.example.org/team/code.git";
        let t = task(a, url);
        assert_eq!(
            ask(&c, a, Some(&t), url),
            GitCredentialsReply::Token {
                username: "ci".into(),
                token: "s3cret".into()
            }
        );
        assert!(matches!(
            ask(&c, b, Some(&t), url),
            GitCredentialsReply::Denied { .. }
        ));
        assert!(matches!(
            ask(&c, a, None, url),
            GitCredentialsReply::Denied { .. }
        ));
        // Another repository on the same host is not the task's.
        assert!(matches!(
            ask(&c, a, Some(&t), "https://git.example.org/team/other.git"),
            GitCredentialsReply::Denied { .. }
        ));
        let mut done = t.clone();
        done.state = TaskState::Succeeded { exit_code: 0 };
        assert!(matches!(
            ask(&c, a, Some(&done), url),
            GitCredentialsReply::Denied { .. }
        ));
    }

    #[test]
    fn plain_http_only_where_allowed_and_unknown_hosts_get_none() {
        let c = creds();
        let a = NodeId::new();
        let local = "http://127.0.0.1:9000/code.git";
        assert_eq!(
            ask(&c, a, Some(&task(a, local)), local),
            GitCredentialsReply::Token {
                username: "git".into(),
                token: "local".into()
            }
        );
        let plain = "http://plain.example.org/code.git";
        assert!(matches!(
            ask(&c, a, Some(&task(a, plain)), plain),
            GitCredentialsReply::Denied { .. }
        ));
        let other = "https://elsewhere.org/code.git";
        assert_eq!(
            ask(&c, a, Some(&task(a, other)), other),
            GitCredentialsReply::None
        );
    }

    #[test]
    fn bad_files_are_errors_and_debug_hides_secrets() {
        assert!(GitCredentials::parse(r#"{"hosts": {"h": {}}}"#, Path::new(".")).is_err());
        assert!(GitCredentials::parse(
            r#"{"hosts": {"h": {"token": "a", "token_file": "b"}}}"#,
            Path::new(".")
        )
        .is_err());
        assert!(GitCredentials::parse(
            r#"{"hosts": {"h": {"token_file": "/nonexistent/x"}}}"#,
            Path::new(".")
        )
        .is_err());
        assert!(GitCredentials::parse("[", Path::new(".")).is_err());
        assert!(!format!("{:?}", creds()).contains("s3cret"));
        let reply = GitCredentialsReply::Token {
            username: "u".into(),
            token: "s3cret".into(),
        };
        assert!(!format!("{reply:?}").contains("s3cret"));
    }
}
