//! Object stores per project: a project may have several (each its own
//! endpoint, bucket, region and credentials, which the main server holds and
//! never shows), one of them its default; a project with none uses the
//! platform's store, under its own prefix. Objects keep the same keys
//! (`projects/<project>/...`) in whichever store holds them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Storage, StorageError, StorageSettings};

/// One store of a project, as the stores file gives it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `None`: AWS S3 itself.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The address presigned URLs name, when nodes reach the store elsewhere.
    #[serde(default)]
    pub public_endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default = "yes")]
    pub path_style: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn yes() -> bool {
    true
}

/// A project's stores in the stores file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectStoresConfig {
    /// The store used where a task names none (default: the only one).
    #[serde(default)]
    pub default: Option<String>,
    pub stores: BTreeMap<String, StoreConfig>,
}

/// The stores file (`UD_STORES_FILE`, JSON): project -> its stores.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoresConfig {
    #[serde(default)]
    pub projects: BTreeMap<String, ProjectStoresConfig>,
}

/// What users see of a store: never its credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreInfo {
    pub name: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub default: bool,
}

#[derive(Clone)]
struct ProjectStores {
    default: String,
    stores: BTreeMap<String, (Storage, StoreInfo)>,
}

/// Every store the platform holds: its own, and the projects' (cheap to clone).
#[derive(Clone, Default)]
pub struct Stores {
    platform: Option<Storage>,
    projects: Arc<BTreeMap<String, ProjectStores>>,
}

fn named(name: &str) -> Result<(), StorageError> {
    if ud_schemas::spec::short_name(name) {
        Ok(())
    } else {
        Err(StorageError::Settings(format!(
            "store name {name:?}: use 1-63 of a-z, 0-9, '-' and '_'"
        )))
    }
}

impl Stores {
    /// Only the platform's store (or none).
    pub fn platform_only(platform: Option<Storage>) -> Self {
        Self {
            platform,
            projects: Arc::default(),
        }
    }

    /// The platform's store and the projects' from `config`; stores use
    /// the platform's URL lifetime.
    pub fn new(
        platform: Option<Storage>,
        config: StoresConfig,
        url_ttl: Duration,
    ) -> Result<Self, StorageError> {
        let mut projects = BTreeMap::new();
        for (project, p) in config.projects {
            crate::keys::project_prefix(&project)?;
            let default = match (&p.default, p.stores.len()) {
                (Some(d), _) => d.clone(),
                (None, 1) => p.stores.keys().next().cloned().unwrap_or_default(),
                (None, _) => {
                    return Err(StorageError::Settings(format!(
                        "project {project}: several stores and no default"
                    )))
                }
            };
            if !p.stores.contains_key(&default) {
                return Err(StorageError::Settings(format!(
                    "project {project}: its default store {default:?} is not one of its stores"
                )));
            }
            let mut stores = BTreeMap::new();
            for (name, s) in p.stores {
                named(&name)?;
                let info = StoreInfo {
                    name: name.clone(),
                    endpoint: s.endpoint.clone(),
                    region: s.region.clone(),
                    bucket: s.bucket.clone(),
                    default: name == default,
                };
                let settings = StorageSettings {
                    endpoint: s.endpoint,
                    public_endpoint: s.public_endpoint,
                    region: s.region,
                    bucket: s.bucket,
                    access_key_id: s.access_key_id,
                    secret_access_key: s.secret_access_key,
                    path_style: s.path_style,
                    url_ttl,
                    project_quota_bytes: None,
                };
                stores.insert(name, (Storage::new(settings)?, info));
            }
            projects.insert(project, ProjectStores { default, stores });
        }
        Ok(Self {
            platform,
            projects: Arc::new(projects),
        })
    }

    /// The platform's own store (backups; projects without stores).
    pub fn platform(&self) -> Option<&Storage> {
        self.platform.as_ref()
    }

    /// Whether any store is there at all.
    pub fn any(&self) -> bool {
        self.platform.is_some() || !self.projects.is_empty()
    }

    /// The store `project` keeps objects in where `name` says (`None`: its
    /// default, else the platform's); a name it has no store of is an error.
    pub fn of(&self, project: &str, name: Option<&str>) -> Result<&Storage, StorageError> {
        match (self.projects.get(project), name) {
            (Some(p), None) => Ok(&p.stores[&p.default].0),
            (Some(p), Some(n)) => p.stores.get(n).map(|(s, _)| s).ok_or_else(|| {
                StorageError::Settings(format!("project {project} has no store {n:?}"))
            }),
            (None, Some(n)) => Err(StorageError::Settings(format!(
                "project {project} has no store {n:?} (it uses the platform's)"
            ))),
            (None, None) => self.platform.as_ref().ok_or_else(|| {
                StorageError::Settings(
                    "this platform has no object store configured (UD_S3_* settings)".into(),
                )
            }),
        }
    }

    /// Whether `project` has a store named `name`.
    pub fn has(&self, project: &str, name: &str) -> bool {
        self.projects
            .get(project)
            .is_some_and(|p| p.stores.contains_key(name))
    }

    /// A project's stores as users may see them (none: it uses the platform's).
    pub fn list(&self, project: &str) -> Vec<StoreInfo> {
        self.projects
            .get(project)
            .map(|p| p.stores.values().map(|(_, i)| i.clone()).collect())
            .unwrap_or_default()
    }
}
