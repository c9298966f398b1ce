//! The git cache: bare mirrors that fetch only the commit asked for (with
//! the credentials the platform hands over for one fetch), and checkouts of
//! a commit into a folder.

use std::path::Path;

use sha2::{Digest, Sha256};
use ud_schemas::dispatch::GitCredentialsReply;

use super::{io, PrepareError};

pub(super) enum FetchError {
    Missing,
    Git(String),
    Auth(&'static str),
}

pub(super) fn has_commit(path: &Path, commit: &str) -> bool {
    let Ok(oid) = git2::Oid::from_str(commit) else {
        return false;
    };
    git2::Repository::open_bare(path).is_ok_and(|r| r.find_commit(oid).is_ok())
}

/// What the server asked for and what it was given, to explain a refusal.
#[derive(Default)]
struct AuthAsked {
    /// Times the server asked: a second time means the first answer was refused.
    calls: u32,
    offered: bool,
}

impl AuthAsked {
    fn failed(&self) -> Option<&'static str> {
        match (self.calls, self.offered) {
            (0, _) => None,
            (_, false) => {
                Some("the repository needs credentials and the platform holds none for its host")
            }
            (1, true) => None,
            (_, true) => {
                Some("the repository refused the credentials the platform holds for its host")
            }
        }
    }
}

/// Callbacks that answer the server's credential challenge once with what
/// the platform handed over, and give up when it asks again (refused).
fn callbacks<'a>(
    creds: Option<&'a GitCredentialsReply>,
    state: &'a std::cell::RefCell<AuthAsked>,
) -> git2::RemoteCallbacks<'a> {
    let mut cb = git2::RemoteCallbacks::new();
    cb.credentials(move |_url, user_from_url, allowed| {
        let mut s = state.borrow_mut();
        s.calls += 1;
        if s.calls > 1 {
            return Err(git2::Error::from_str("credentials refused"));
        }
        let cred = match creds {
            Some(GitCredentialsReply::Token { username, token })
                if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) =>
            {
                git2::Cred::userpass_plaintext(username, token)
            }
            Some(GitCredentialsReply::Ssh {
                username,
                private_key,
                passphrase,
            }) if allowed.contains(git2::CredentialType::SSH_KEY) => {
                git2::Cred::ssh_key_from_memory(
                    user_from_url.unwrap_or(username),
                    None,
                    private_key,
                    passphrase.as_deref(),
                )
            }
            Some(GitCredentialsReply::Ssh { username, .. })
                if allowed.contains(git2::CredentialType::USERNAME) =>
            {
                git2::Cred::username(user_from_url.unwrap_or(username))
            }
            _ => return Err(git2::Error::from_str("no credentials")),
        };
        s.offered = cred.is_ok();
        cred
    });
    cb
}

pub(super) fn fetch_blocking(
    path: &Path,
    url: &str,
    commit: &str,
    creds: Option<&GitCredentialsReply>,
) -> Result<(), FetchError> {
    let state = std::cell::RefCell::new(AuthAsked::default());
    let git = |e: git2::Error| match state.borrow().failed() {
        Some(reason) => FetchError::Auth(reason),
        None => FetchError::Git(e.message().to_owned()),
    };
    let oid = git2::Oid::from_str(commit).map_err(|_| FetchError::Missing)?;
    let repo = if path.exists() {
        git2::Repository::open_bare(path).map_err(git)?
    } else {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| FetchError::Git(e.to_string()))?;
        }
        git2::Repository::init_bare(path).map_err(git)?
    };
    // The caller has seen that the commit is missing (`has_commit`, under the mirror's lock).
    let mut remote = repo.remote_anonymous(url).map_err(git)?;
    let options = || {
        let mut o = git2::FetchOptions::new();
        o.remote_callbacks(callbacks(creds, &state));
        o
    };
    // Only the commit asked for, where the server allows it; else the branches and tags.
    let direct = remote.fetch(&[commit], Some(&mut options()), None);
    if let (Some(reason), Err(_)) = (state.borrow().failed(), &direct) {
        return Err(FetchError::Auth(reason));
    }
    if direct.is_err() || repo.find_commit(oid).is_err() {
        *state.borrow_mut() = AuthAsked::default();
        let all = remote.fetch(
            &["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"],
            Some(&mut options()),
            None,
        );
        if let (Err(e), Err(_)) = (all, direct) {
            return Err(git(e));
        }
    }
    repo.find_commit(oid)
        .map(|_| ())
        .map_err(|_| FetchError::Missing)
}

/// Writes the tree of `commit` into `dest` (created fresh). Through an
/// index of its own in memory: the mirror's index file is never locked, so
/// runs check out of one mirror at once, and a checkout cut short by a
/// crash leaves no lock that would stop the next ones.
pub(super) fn checkout(mirror: &Path, commit: &str, dest: &Path) -> Result<(), PrepareError> {
    let repo = git2::Repository::open_bare(mirror).map_err(io)?;
    let oid = git2::Oid::from_str(commit).map_err(io)?;
    let tree = repo.find_commit(oid).map_err(io)?.tree().map_err(io)?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(io)?;
    }
    std::fs::create_dir_all(dest).map_err(io)?;
    let mut index = git2::Index::new().map_err(io)?;
    index.read_tree(&tree).map_err(io)?;
    let mut cb = git2::build::CheckoutBuilder::new();
    cb.target_dir(dest)
        .force()
        .recreate_missing(true)
        .update_index(false);
    repo.checkout_index(Some(&mut index), Some(&mut cb))
        .map_err(io)
}

/// Hex SHA-256 of a file's bytes at a commit (the Dockerfile the image was built from).
pub(super) fn blob_digest(mirror: &Path, commit: &str, path: &str) -> Result<String, PrepareError> {
    let repo = git2::Repository::open_bare(mirror).map_err(io)?;
    let tree = repo
        .find_commit(git2::Oid::from_str(commit).map_err(io)?)
        .map_err(io)?
        .tree()
        .map_err(io)?;
    let entry = tree
        .get_path(Path::new(path))
        .map_err(|_| PrepareError::Dockerfile(path.to_owned()))?;
    let blob = repo
        .find_blob(entry.id())
        .map_err(|_| PrepareError::Dockerfile(path.to_owned()))?;
    Ok(hex::encode(Sha256::digest(blob.content())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mirror with one commit of `files`; its id.
    fn mirror(dir: &Path, files: &[(&str, &str)]) -> String {
        let repo = git2::Repository::init_bare(dir).unwrap_or_else(|e| panic!("{e}"));
        let mut tb = repo.treebuilder(None).unwrap_or_else(|e| panic!("{e}"));
        for (name, text) in files {
            let blob = repo.blob(text.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            tb.insert(name, blob, 0o100644)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let tree = repo
            .find_tree(tb.write().unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        let sig = git2::Signature::now("t", "t@localhost").unwrap_or_else(|e| panic!("{e}"));
        repo.commit(None, &sig, &sig, "one", &tree, &[])
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string()
    }

    #[test]
    fn checkouts_of_one_mirror_go_on_at_once_and_past_a_crashed_ones_lock() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let m = dir.path().join("mirror.git");
        let commit = mirror(&m, &[("main.sh", "echo hi\n"), ("data.txt", "1 2 3\n")]);
        // What a checkout killed half-way through used to leave behind.
        std::fs::write(m.join("index.lock"), b"").unwrap_or_else(|e| panic!("{e}"));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (m, commit, dest) =
                    (m.clone(), commit.clone(), dir.path().join(format!("w{i}")));
                std::thread::spawn(move || checkout(&m, &commit, &dest).map(|()| dest))
            })
            .collect();
        for h in handles {
            let dest = h
                .join()
                .unwrap_or_else(|_| panic!("a checkout panicked"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                std::fs::read_to_string(dest.join("main.sh")).unwrap_or_default(),
                "echo hi\n"
            );
            assert_eq!(
                std::fs::read_to_string(dest.join("data.txt")).unwrap_or_default(),
                "1 2 3\n"
            );
        }
    }
}
