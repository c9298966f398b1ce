//! Environment images: the build context from the env repository at its
//! commit, the build through the Docker engine, and the pull of an image a
//! task names.

use std::path::Path;

use bollard::query_parameters::{BuildImageOptions, CreateImageOptions};
use futures::StreamExt;

use super::{git, io, PrepareError, Versions};

/// The build context: the env repository at `commit`, as a tar, after checking
/// that the Dockerfile is a file inside it.
pub(super) fn build_context(
    mirror: &Path,
    commit: &str,
    dir: &Path,
    dockerfile: &str,
) -> Result<Vec<u8>, PrepareError> {
    git::checkout(mirror, commit, dir)?;
    let root = dir.canonicalize().map_err(io)?;
    let file = root
        .join(dockerfile)
        .canonicalize()
        .map_err(|_| PrepareError::Dockerfile(dockerfile.to_owned()))?;
    if !file.starts_with(&root) || !file.is_file() {
        return Err(PrepareError::Dockerfile(dockerfile.to_owned()));
    }
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", &root).map_err(io)?;
    tar.into_inner().map_err(io)
}

impl Versions {
    pub(super) async fn build<F, Fut>(
        &self,
        image: &str,
        dockerfile: &str,
        tar: Vec<u8>,
        log: &F,
    ) -> Result<(), PrepareError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let options = BuildImageOptions {
            dockerfile: dockerfile.to_owned(),
            t: Some(image.to_owned()),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        let mut stream =
            self.docker
                .build_image(options, None, Some(bollard::body_full(tar.into())));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(text) = info.stream {
                        log(text).await;
                    }
                    if let Some(err) = info.error_detail.and_then(|d| d.message) {
                        return Err(PrepareError::Build(err));
                    }
                }
                Err(e) => return Err(PrepareError::Build(e.to_string())),
            }
        }
        if self.docker.inspect_image(image).await.is_err() {
            return Err(PrepareError::Build("the build produced no image".into()));
        }
        Ok(())
    }

    /// Pulls `image` (a reference with its tag or digest) from its
    /// registry; `log` receives each layer's status as it changes.
    pub(super) async fn pull<F, Fut>(&self, image: &str, log: &F) -> Result<(), PrepareError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let fail = |reason: String| PrepareError::Pull {
            image: image.to_owned(),
            reason,
        };
        let options = CreateImageOptions {
            from_image: Some(image.to_owned()),
            ..Default::default()
        };
        let mut stream = self.docker.create_image(Some(options), None, None);
        let mut last = String::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| fail(e.to_string()))?;
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(fail(err));
            }
            // One line per layer and status, not per progress tick.
            let line = match (info.id, info.status) {
                (Some(id), Some(status)) => format!("{id}: {status}"),
                (None, Some(status)) => status,
                _ => continue,
            };
            if line != last {
                log(format!("{line}\n")).await;
                last = line;
            }
        }
        if self.docker.inspect_image(image).await.is_err() {
            return Err(fail("the pull produced no image".into()));
        }
        Ok(())
    }
}
