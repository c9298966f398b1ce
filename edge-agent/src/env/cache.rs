//! The cache's bookkeeping: when each image and mirror was last used, and
//! eviction, least recently used first, of what this agent built or fetched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::Versions;

impl Versions {
    pub(super) async fn touch(&self, key: &str) {
        self.last_used
            .lock()
            .await
            .insert(key.to_owned(), ud_schemas::now_millis());
    }

    /// Evicts this node's environment images and repository mirrors, least
    /// recently used first, until the cache fits its limit. What runs are
    /// preparing or using stays (and Docker refuses to remove an image a
    /// container uses); each removal takes the lock of what it removes.
    pub async fn evict(&self) {
        let mut items: Vec<(i64, String, u64, bool)> = Vec::new(); // (last used, key, bytes, is image)
        let used = self.last_used.lock().await.clone();
        let filters = HashMap::from([("reference".to_owned(), vec!["unidesk-env".to_owned()])]);
        let images = self
            .docker
            .list_images(Some(bollard::query_parameters::ListImagesOptions {
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .unwrap_or_default();
        for image in images {
            for tag in image
                .repo_tags
                .iter()
                .filter(|t| t.starts_with("unidesk-env:"))
                // Only what this agent built: another agent on the same
                // Docker engine keeps its own.
                .filter(|t| self.built_marker(t).exists())
            {
                items.push((
                    used.get(tag).copied().unwrap_or(0),
                    tag.clone(),
                    u64::try_from(image.size).unwrap_or(0),
                    true,
                ));
            }
        }
        // Mirrors and their sizes, read off the disk in one blocking step.
        let git = self.root.join("git");
        let mirrors = tokio::task::spawn_blocking(move || {
            std::fs::read_dir(git)
                .map(|dir| {
                    dir.flatten()
                        .map(|e| (e.path().display().to_string(), dir_size(&e.path())))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        for (path, bytes) in mirrors {
            items.push((used.get(&path).copied().unwrap_or(0), path, bytes, false));
        }
        let mut total: u64 = items.iter().map(|i| i.2).sum();
        items.sort();
        for (_, key, bytes, is_image) in items {
            if total <= self.cache_limit_bytes {
                break;
            }
            let _guard = self.lock(key.clone()).await;
            if self.is_in_use(&key) {
                continue;
            }
            let removed = if is_image {
                let gone = self
                    .docker
                    .remove_image(
                        &key,
                        None::<bollard::query_parameters::RemoveImageOptions>,
                        None,
                    )
                    .await
                    .is_ok();
                if gone {
                    let marker = self.built_marker(&key);
                    let _ = tokio::fs::remove_file(marker).await;
                }
                gone
            } else {
                tokio::fs::remove_dir_all(&key).await.is_ok()
            };
            if removed {
                tracing::info!(item = %key, bytes, "evicted from the cache");
                total = total.saturating_sub(bytes);
                self.last_used.lock().await.remove(&key);
            }
        }
    }

    /// A file that says this agent built the image `tag` (kept across restarts).
    pub(super) fn built_marker(&self, tag: &str) -> PathBuf {
        self.root.join("images").join(tag.replace(':', "_"))
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
