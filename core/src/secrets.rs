//! Project secrets (API keys, tokens): values encrypted at rest with
//! XChaCha20-Poly1305 under a key only the main server holds, kept in KV
//! bucket `ud_secrets` (key `<project>.<NAME>`, one revision: a value set
//! again leaves nothing of the one before). Events carry only a secret's
//! name and version; a task's spec only the names it gets. A node receives
//! the values of one run over its own request subject (see
//! [`crate::edge::requests`]) and passes them to the container's
//! environment; they are never written to a stream that keeps history, a
//! table, a log or a backup in the clear.

use std::path::Path;
use std::sync::Arc;

use async_nats::jetstream::kv;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;
use ud_schemas::api::SecretInfo;
use ud_schemas::events::{SecretDeleted, SecretSet};
use ud_schemas::{
    now_millis, streams, Event, EventMeta, Millis, ProjectId, SecretEvent, SecretRef,
};
use zeroize::Zeroizing;

use crate::store::{unavailable, EventStore, Expect, StoreError};

/// Largest secret value.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("secret {0} is not set")]
    NotSet(SecretRef),
    #[error("secret {secret} cannot be read: {reason}")]
    Unreadable { secret: SecretRef, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The key secrets are encrypted with: 32 random bytes, written as 64 hex
/// digits in the file `UD_SECRETS_KEY_FILE` names.
#[derive(Clone)]
pub struct SecretKey {
    cipher: XChaCha20Poly1305,
    id: String,
}

/// Never prints the key.
impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey {{ id: {} }}", self.id)
    }
}

impl SecretKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update(b"ud-secret-key-id/");
        h.update(bytes);
        Self {
            cipher: XChaCha20Poly1305::new(bytes.into()),
            id: hex::encode(&h.finalize()[..8]),
        }
    }

    /// A new random key.
    pub fn random() -> (Self, Zeroizing<String>) {
        let bytes = Zeroizing::new(rand::random::<[u8; 32]>());
        (
            Self::from_bytes(&bytes),
            Zeroizing::new(hex::encode(*bytes)),
        )
    }

    /// Reads a key file (64 hex digits, surrounding white space ignored).
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let bad = |reason: String| SecretError::Key {
            path: path.display().to_string(),
            reason,
        };
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), bytes.as_mut_slice()).map_err(|_| {
            bad("must hold 64 hex digits (make one with `unidesk admin secret-key`)".into())
        })?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Writes a new random key to `path` (readable by its owner only); an
    /// existing file is never replaced.
    pub fn create(path: &Path) -> Result<Self, SecretError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let bad = |reason: String| SecretError::Key {
            path: path.display().to_string(),
            reason,
        };
        let (key, text) = Self::random();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| bad(e.to_string()))?;
        file.write_all(format!("{}\n", text.as_str()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| bad(e.to_string()))?;
        Ok(key)
    }

    /// Names the key without revealing it (stored beside each value).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn seal(&self, aad: &str, plain: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| "encryption failed".to_owned())?;
        Ok((nonce.to_vec(), sealed))
    }

    fn open(&self, aad: &str, nonce: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if nonce.len() != 24 {
            return None;
        }
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .ok()
            .map(Zeroizing::new)
    }
}

/// What bucket `ud_secrets` holds per secret (CBOR, CDDL `stored-secret`).
#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    /// Set when the secret was deleted: no value, the version stays.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    key_id: String,
    #[serde(with = "serde_bytes")]
    nonce: Vec<u8>,
    #[serde(with = "serde_bytes")]
    ciphertext: Vec<u8>,
    updated_at: Millis,
    updated_by: String,
}

/// The associated data a value is sealed with: it cannot be moved to
/// another project, name or version.
fn aad(secret: &SecretRef, version: u32) -> String {
    format!("ud-secret/v1/{}/{}/{version}", secret.project, secret.name)
}

fn kv_key(secret: &SecretRef) -> String {
    format!("{}.{}", secret.project, secret.name)
}

fn info_of(name: &str, s: &Stored) -> SecretInfo {
    SecretInfo {
        name: name.to_owned(),
        version: s.version,
        updated_at: s.updated_at,
        updated_by: s.updated_by.clone(),
    }
}

/// Checks a secret's name (as given in a path) and makes its reference.
pub fn secret_ref(project: &ProjectId, name: &str) -> Result<SecretRef, SecretError> {
    ud_schemas::spec::secret_name(name)
        .map(|n| SecretRef {
            project: project.clone(),
            name: n.to_owned(),
        })
        .map_err(|reason| SecretError::Invalid {
            field: "name",
            reason: reason.into(),
        })
}

/// Checks a value: text of 1 to 64 KiB without NUL (it becomes an
/// environment variable).
pub fn check_value(value: &str) -> Result<(), SecretError> {
    let bad = |reason: String| SecretError::Invalid {
        field: "value",
        reason,
    };
    if value.is_empty() {
        return Err(bad("is empty".into()));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(bad(format!("is longer than {MAX_VALUE_BYTES} bytes")));
    }
    if value.contains('\0') {
        return Err(bad("contains NUL".into()));
    }
    Ok(())
}

/// Project secrets: set, listed and deleted by users, read for one run.
#[derive(Clone)]
pub struct Secrets {
    store: EventStore,
    bucket: kv::Store,
    key: Arc<SecretKey>,
}

/// How often a set or delete that met a concurrent one tries again.
const CAS_TRIES: usize = 8;

impl Secrets {
    /// Opens bucket `ud_secrets` (made by [`EventStore::ensure_streams`]).
    pub async fn open(store: EventStore, key: SecretKey) -> Result<Self, SecretError> {
        let bucket = store
            .jetstream()
            .get_key_value(streams::SECRETS_BUCKET)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            store,
            bucket,
            key: Arc::new(key),
        })
    }

    async fn stored(&self, secret: &SecretRef) -> Result<Option<(Stored, u64)>, SecretError> {
        let entry = self
            .bucket
            .entry(kv_key(secret))
            .await
            .map_err(unavailable)?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        let stored: Stored =
            ciborium::from_reader(entry.value.as_ref()).map_err(|e| SecretError::Unreadable {
                secret: secret.clone(),
                reason: e.to_string(),
            })?;
        Ok(Some((stored, entry.revision)))
    }

    /// The secret's record while it is set (not deleted).
    async fn live(&self, secret: &SecretRef) -> Result<Option<(Stored, u64)>, SecretError> {
        Ok(self.stored(secret).await?.filter(|(s, _)| !s.deleted))
    }

    /// Writes `next` over the record at `revision` (none: a first write).
    async fn write(
        &self,
        secret: &SecretRef,
        next: &Stored,
        revision: Option<u64>,
    ) -> Result<bool, SecretError> {
        let mut bytes = Vec::new();
        ciborium::into_writer(next, &mut bytes).map_err(|e| SecretError::Unreadable {
            secret: secret.clone(),
            reason: e.to_string(),
        })?;
        let key = kv_key(secret);
        let written: Result<(), (bool, crate::store::NatsError)> = match revision {
            Some(r) => self
                .bucket
                .update(&key, bytes.into(), r)
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == kv::UpdateErrorKind::WrongLastRevision, e.into())),
            None => self
                .bucket
                .create(&key, bytes.into())
                .await
                .map(|_| ())
                .map_err(|e| (e.kind() == kv::CreateErrorKind::AlreadyExists, e.into())),
        };
        match written {
            Ok(()) => Ok(true),
            Err((true, _)) => Ok(false),
            Err((false, e)) => Err(unavailable(e).into()),
        }
    }

    async fn record(
        &self,
        secret: &SecretRef,
        event: SecretEvent,
        actor: &str,
    ) -> Result<(), SecretError> {
        use backon::Retryable;
        let event = Event::Secret(secret.clone(), event);
        let meta = EventMeta::new(actor);
        (|| self.store.append(&event, &meta, Expect::Any))
            .retry(backon::ExponentialBuilder::default().with_max_times(3))
            .when(|e| matches!(e, StoreError::Unavailable(_)))
            .await?;
        Ok(())
    }

    /// Sets a secret's value; returns what is recorded of it.
    pub async fn set(
        &self,
        project: &ProjectId,
        name: &str,
        value: &str,
        actor: &str,
    ) -> Result<SecretInfo, SecretError> {
        let secret = secret_ref(project, name)?;
        check_value(value)?;
        for _ in 0..CAS_TRIES {
            let before = self.stored(&secret).await?;
            let version = before
                .as_ref()
                .map_or(1, |(s, _)| s.version.saturating_add(1));
            let (nonce, ciphertext) = self
                .key
                .seal(&aad(&secret, version), value.as_bytes())
                .map_err(|reason| SecretError::Unreadable {
                    secret: secret.clone(),
                    reason,
                })?;
            let next = Stored {
                version,
                deleted: false,
                key_id: self.key.id().to_owned(),
                nonce,
                ciphertext,
                updated_at: now_millis(),
                updated_by: actor.to_owned(),
            };
            if self.write(&secret, &next, before.map(|(_, r)| r)).await? {
                let at = next.updated_at;
                self.record(&secret, SecretEvent::Set(SecretSet { at, version }), actor)
                    .await?;
                info!(secret = %secret, version, "secret set");
                return Ok(info_of(name, &next));
            }
        }
        Err(StoreError::Conflict.into())
    }

    /// Deletes a secret; returns the version deleted.
    pub async fn delete(
        &self,
        project: &ProjectId,
        name: &str,
        actor: &str,
    ) -> Result<SecretInfo, SecretError> {
        let secret = secret_ref(project, name)?;
        for _ in 0..CAS_TRIES {
            let Some((before, revision)) = self.live(&secret).await? else {
                return Err(SecretError::NotSet(secret));
            };
            let next = Stored {
                deleted: true,
                key_id: String::new(),
                nonce: Vec::new(),
                ciphertext: Vec::new(),
                updated_at: now_millis(),
                updated_by: actor.to_owned(),
                ..before
            };
            if self.write(&secret, &next, Some(revision)).await? {
                let (at, version) = (next.updated_at, next.version);
                self.record(
                    &secret,
                    SecretEvent::Deleted(SecretDeleted { at, version }),
                    actor,
                )
                .await?;
                info!(secret = %secret, version, "secret deleted");
                return Ok(info_of(name, &next));
            }
        }
        Err(StoreError::Conflict.into())
    }

    /// The secrets of the projects `visible` lets through (names, versions,
    /// who set them; never values), by project and name.
    pub async fn list(
        &self,
        visible: impl Fn(&ProjectId) -> bool,
    ) -> Result<Vec<(ProjectId, SecretInfo)>, SecretError> {
        use futures::TryStreamExt;
        let keys: Vec<String> = self
            .bucket
            .keys()
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        for k in keys {
            let Some((project, name)) = k.split_once('.') else {
                continue;
            };
            let Ok(project) = project.parse::<ProjectId>() else {
                continue;
            };
            if !visible(&project) {
                continue;
            }
            let secret = secret_ref(&project, name)?;
            if let Some((s, _)) = self.live(&secret).await? {
                out.push((project, info_of(name, &s)));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.name).cmp(&(&b.0, &b.1.name)));
        Ok(out)
    }

    /// The names of `names` that are not set in `project`.
    pub async fn missing(
        &self,
        project: &ProjectId,
        names: &[String],
    ) -> Result<Vec<String>, SecretError> {
        let mut out = Vec::new();
        for name in names {
            let secret = secret_ref(project, name)?;
            if self.live(&secret).await?.is_none() {
                out.push(name.clone());
            }
        }
        Ok(out)
    }

    /// The values of `names` in `project`, in that order, for one run.
    pub async fn values(
        &self,
        project: &ProjectId,
        names: &[String],
    ) -> Result<Vec<(String, Zeroizing<String>)>, SecretError> {
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let secret = secret_ref(project, name)?;
            let Some((s, _)) = self.live(&secret).await? else {
                return Err(SecretError::NotSet(secret));
            };
            let unreadable = |reason: String| SecretError::Unreadable {
                secret: secret.clone(),
                reason,
            };
            if s.key_id != self.key.id() {
                return Err(unreadable(format!(
                    "it was set with key {}, this server holds key {}",
                    s.key_id,
                    self.key.id()
                )));
            }
            let plain = self
                .key
                .open(&aad(&secret, s.version), &s.nonce, &s.ciphertext)
                .ok_or_else(|| unreadable("it does not decrypt (altered or misplaced)".into()))?;
            let text = String::from_utf8(plain.to_vec())
                .map_err(|_| unreadable("it is not text".into()))?;
            out.push((name.clone(), Zeroizing::new(text)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str) -> SecretRef {
        SecretRef {
            project: "lab".parse().unwrap_or_else(|e| unreachable!("{e}")),
            name: name.into(),
        }
    }

    #[test]
    fn a_value_opens_only_under_its_own_key_name_and_version() {
        let (key, _) = SecretKey::random();
        let (other, _) = SecretKey::random();
        let a = secret("WANDB_API_KEY");
        let (nonce, sealed) = key
            .seal(&aad(&a, 2), b"s3cr3t")
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!sealed.windows(6).any(|w| w == b"s3cr3t"));
        let opened = key.open(&aad(&a, 2), &nonce, &sealed);
        assert_eq!(opened.as_deref().map(Vec::as_slice), Some(&b"s3cr3t"[..]));
        assert!(other.open(&aad(&a, 2), &nonce, &sealed).is_none());
        assert!(key.open(&aad(&a, 3), &nonce, &sealed).is_none());
        assert!(key
            .open(&aad(&secret("HF_TOKEN"), 2), &nonce, &sealed)
            .is_none());
        assert_ne!(key.id(), other.id());
    }

    #[test]
    fn a_key_file_is_made_once_and_read_back() -> Result<(), SecretError> {
        let dir = tempfile::tempdir().map_err(|e| SecretError::Key {
            path: "tmp".into(),
            reason: e.to_string(),
        })?;
        let path = dir.path().join("secrets.key");
        let made = SecretKey::create(&path)?;
        let read = SecretKey::load(&path)?;
        assert_eq!(made.id(), read.id());
        // Never replaced.
        assert!(SecretKey::create(&path).is_err());
        std::fs::write(&path, "not hex").map_err(|e| SecretError::Key {
            path: "tmp".into(),
            reason: e.to_string(),
        })?;
        let err = SecretKey::load(&path).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        Ok(())
    }

    #[test]
    fn values_and_names_are_checked() {
        assert!(check_value("").is_err());
        assert!(check_value("a\0b").is_err());
        assert!(check_value(&"x".repeat(MAX_VALUE_BYTES + 1)).is_err());
        assert!(check_value("hf_abc").is_ok());
        let lab: ProjectId = "lab".parse().unwrap_or_else(|e| unreachable!("{e}"));
        assert!(secret_ref(&lab, "1BAD").is_err());
        assert!(secret_ref(&lab, "a.b").is_err());
        assert!(secret_ref(&lab, "HF_TOKEN").is_ok());
    }
}
