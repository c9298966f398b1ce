//! `/api/v1/projects/{project}/files` and `/uploads`: a project's files in
//! the object store. The gateway hands out presigned URLs; the bytes go
//! straight between the caller and the store, never through the gateway.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use ud_storage::{keys, Storage, StorageError};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{project_of, Caller};
use crate::body::JsonBody;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;
use ud_schemas::Role;

/// Largest file one upload may write (S3's limit for one object).
pub const MAX_FILE_BYTES: u64 = 5 << 40;

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Path { path, reason } => {
                ApiError::field("path", format!("{path:?} {reason}"))
            }
            StorageError::NoSuchObject(what) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} does not exist"),
            ),
            StorageError::Quota(m) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "quota_exceeded", m)
            }
            StorageError::Refused(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StorageError::Backend(_) | StorageError::Settings(_) => ApiError::unavailable(e),
        }
    }
}

/// The store of a project's files: its default store, else the platform's.
fn storage<'a>(state: &'a AppState, project: &str) -> Result<&'a Storage, ApiError> {
    state.stores.of(project, None).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_object_store",
            e.to_string(),
        )
    })
}

/// A URL to call as it is (with the given method), valid until `expires_at`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SignedUrl {
    pub method: String,
    pub url: String,
    /// Milliseconds since the epoch.
    pub expires_at: i64,
}

impl From<ud_storage::Presigned> for SignedUrl {
    fn from(p: ud_storage::Presigned) -> Self {
        Self {
            method: p.method,
            url: p.url,
            expires_at: p.expires_at,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct FileInfo {
    /// Relative to the project's files.
    pub path: String,
    pub size: u64,
    /// Last modified, ms since the epoch.
    pub modified: Option<i64>,
}

#[derive(Deserialize, IntoParams)]
pub struct ListParams {
    /// Only files below this folder (e.g. `data/`).
    pub prefix: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct FileList {
    pub files: Vec<FileInfo>,
    /// Bytes the whole project keeps (files, task outputs and logs).
    pub used_bytes: u64,
    pub quota_bytes: Option<u64>,
}

/// One of a project's object stores, as users see it: never its credentials.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct StoreView {
    pub name: String,
    /// Absent: AWS S3.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    /// Where tasks that name no store keep their files.
    pub default: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct StoreList {
    /// Empty: the project keeps its files in the platform's store, under
    /// its own prefix.
    pub stores: Vec<StoreView>,
}

/// A project's object stores (a task names one in `store`).
#[utoipa::path(get, path = "/api/v1/projects/{project}/stores", tag = "files", params(("project" = String, Path)),
    responses((status = 200, body = StoreList), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn stores(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Json<StoreList>, ApiError> {
    project_of(&caller, &project, Role::Viewer)?;
    let stores = state
        .stores
        .list(&project)
        .into_iter()
        .map(|s| StoreView {
            name: s.name,
            endpoint: s.endpoint,
            region: s.region,
            bucket: s.bucket,
            default: s.default,
        })
        .collect();
    Ok(Json(StoreList { stores }))
}

/// A project's files.
#[utoipa::path(get, path = "/api/v1/projects/{project}/files", tag = "files", params(("project" = String, Path), ListParams),
    responses((status = 200, body = FileList), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(p): Query<ListParams>,
) -> Result<Json<FileList>, ApiError> {
    project_of(&caller, &project, Role::Viewer)?;
    let storage = storage(&state, &project)?;
    let base = keys::files_prefix(&project)?;
    let prefix = match p.prefix.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => format!("{base}{}/", keys::check_path(p)?),
        None => base.clone(),
    };
    let files = storage
        .list(&prefix)
        .await?
        .into_iter()
        .filter_map(|o| {
            keys::relative(&o.key, &base).map(|path| FileInfo {
                path: path.to_owned(),
                size: o.size,
                modified: o.modified,
            })
        })
        .collect();
    let used_bytes = storage.usage(&keys::project_prefix(&project)?).await?;
    Ok(Json(FileList {
        files,
        used_bytes,
        quota_bytes: storage.settings().project_quota_bytes,
    }))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Download {
    pub path: String,
    pub size: u64,
    pub download: SignedUrl,
}

/// A URL to download one of a project's files.
#[utoipa::path(get, path = "/api/v1/projects/{project}/files/{path}", tag = "files", params(("project" = String, Path), ("path" = String, Path)),
    responses((status = 200, body = Download), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)), security(("bearer" = [])))]
pub async fn download(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, path)): Path<(String, String)>,
) -> Result<Json<Download>, ApiError> {
    project_of(&caller, &project, Role::Viewer)?;
    let storage = storage(&state, &project)?;
    let key = keys::file_key(&project, &path)?;
    let info = storage.head(&key).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("file {path:?} of project {project} does not exist"),
        )
    })?;
    let url = storage
        .presign_get(&key, storage.settings().url_ttl)
        .await?;
    Ok(Json(Download {
        path,
        size: info.size,
        download: url.into(),
    }))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartUpload {
    /// Where the file goes, relative to the project's files (e.g. `data/train.csv`).
    pub path: String,
    /// Exact size of the file in bytes.
    pub size_bytes: u64,
}

/// How to send a file: one PUT, or parts (PUT each part's bytes to its URL,
/// then complete the upload).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct UploadPlan {
    pub path: String,
    pub size_bytes: u64,
    /// `single` or `multipart`.
    pub kind: String,
    /// For `single`: the PUT to send the whole file with.
    pub url: Option<SignedUrl>,
    /// For `multipart`: the upload to complete, resume or abort.
    pub upload_id: Option<String>,
    /// Bytes per part (the last part may be shorter).
    pub part_size: Option<u64>,
    /// Parts still to send: number (from 1) and the PUT for its bytes.
    pub parts: Vec<PartUrl>,
    /// Parts the store already has.
    pub done: Vec<u32>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PartUrl {
    pub number: u32,
    pub url: SignedUrl,
}

async fn check_quota(storage: &Storage, project: &str, adding: u64) -> Result<(), ApiError> {
    if adding > MAX_FILE_BYTES {
        return Err(ApiError::field("size_bytes", "larger than 5 TiB"));
    }
    let Some(quota) = storage.settings().project_quota_bytes else {
        return Ok(());
    };
    let used = storage.usage(&keys::project_prefix(project)?).await?;
    if used.saturating_add(adding) > quota {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "quota_exceeded",
            format!("a file of {adding} bytes would exceed project {project}'s quota of {quota} bytes ({used} in use)"),
        ));
    }
    Ok(())
}

async fn plan(
    storage: &Storage,
    project: &str,
    path: &str,
    size: u64,
    upload_id: Option<String>,
) -> Result<UploadPlan, ApiError> {
    let key = keys::file_key(project, path)?;
    let (path, size_bytes) = (path.to_owned(), size);
    Ok(
        match storage
            .plan_upload(&key, size, upload_id.as_deref())
            .await?
        {
            ud_storage::Plan::Single(url) => UploadPlan {
                path,
                size_bytes,
                kind: "single".into(),
                url: Some(url.into()),
                upload_id: None,
                part_size: None,
                parts: vec![],
                done: vec![],
            },
            ud_storage::Plan::Multipart {
                upload_id,
                part_size,
                parts,
                done,
            } => UploadPlan {
                path,
                size_bytes,
                kind: "multipart".into(),
                url: None,
                upload_id: Some(upload_id),
                part_size: Some(part_size),
                parts: parts
                    .into_iter()
                    .map(|(number, url)| PartUrl {
                        number,
                        url: url.into(),
                    })
                    .collect(),
                done,
            },
        },
    )
}

/// Start an upload: answers with presigned PUT URLs (one, or one per part
/// for files over 16 MiB). Files larger than the project's quota allows are refused.
#[utoipa::path(post, path = "/api/v1/projects/{project}/uploads", tag = "files", params(("project" = String, Path)), request_body = StartUpload,
    responses((status = 201, body = UploadPlan), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn start_upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
    JsonBody(req): JsonBody<StartUpload>,
) -> Result<(StatusCode, Json<UploadPlan>), ApiError> {
    project_of(&caller, &project, Role::Member)?;
    let storage = storage(&state, &project)?;
    keys::check_path(&req.path)?;
    check_quota(storage, &project, req.size_bytes).await?;
    Ok((
        StatusCode::CREATED,
        Json(plan(storage, &project, &req.path, req.size_bytes, None).await?),
    ))
}

#[derive(Deserialize, IntoParams)]
pub struct UploadParams {
    /// The file's path, as given when the upload started.
    pub path: String,
    /// The file's size, as given when the upload started.
    pub size_bytes: u64,
}

/// Resume a multipart upload: which parts the store has, and fresh URLs for the others.
#[utoipa::path(get, path = "/api/v1/projects/{project}/uploads/{upload_id}", tag = "files",
    params(("project" = String, Path), ("upload_id" = String, Path), UploadParams),
    responses((status = 200, body = UploadPlan), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)), security(("bearer" = [])))]
pub async fn resume_upload(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, upload_id)): Path<(String, String)>,
    Query(p): Query<UploadParams>,
) -> Result<Json<UploadPlan>, ApiError> {
    project_of(&caller, &project, Role::Member)?;
    let storage = storage(&state, &project)?;
    Ok(Json(
        plan(storage, &project, &p.path, p.size_bytes, Some(upload_id)).await?,
    ))
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteUpload {
    pub path: String,
    /// The file's size: the upload completes only when the parts add up to it.
    pub size_bytes: u64,
}

/// Complete a multipart upload once every part is sent.
#[utoipa::path(post, path = "/api/v1/projects/{project}/uploads/{upload_id}/complete", tag = "files",
    params(("project" = String, Path), ("upload_id" = String, Path)), request_body = CompleteUpload,
    responses((status = 200, body = FileInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn complete_upload(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, upload_id)): Path<(String, String)>,
    JsonBody(req): JsonBody<CompleteUpload>,
) -> Result<Json<FileInfo>, ApiError> {
    project_of(&caller, &project, Role::Member)?;
    let storage = storage(&state, &project)?;
    let key = keys::file_key(&project, &req.path)?;
    // Nothing half-written is completed: the parts must add up to the file.
    let stored: u64 = storage
        .parts(&key, &upload_id)
        .await?
        .iter()
        .map(|p| p.size)
        .sum();
    if stored != req.size_bytes {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "incomplete_upload",
            format!("upload {upload_id} of {:?} holds {stored} of {} bytes; send the missing parts (GET the upload to see them)", req.path, req.size_bytes),
        ));
    }
    let size = storage.complete_multipart(&key, &upload_id).await?;
    let modified = storage.head(&key).await?.and_then(|o| o.modified);
    Ok(Json(FileInfo {
        path: req.path,
        size,
        modified,
    }))
}

/// Abort a multipart upload and drop the parts sent so far.
#[utoipa::path(delete, path = "/api/v1/projects/{project}/uploads/{upload_id}", tag = "files",
    params(("project" = String, Path), ("upload_id" = String, Path), UploadParams),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)), security(("bearer" = [])))]
pub async fn abort_upload(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, upload_id)): Path<(String, String)>,
    Query(p): Query<UploadParams>,
) -> Result<StatusCode, ApiError> {
    project_of(&caller, &project, Role::Member)?;
    let storage = storage(&state, &project)?;
    storage
        .abort_multipart(&keys::file_key(&project, &p.path)?, &upload_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A task output with a link to download it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct OutputView {
    /// Relative to the task's workspace.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of its bytes.
    pub sha256: String,
    /// Absent when the platform has no object store configured now.
    pub download: Option<SignedUrl>,
}

/// The outputs a task's projected row lists, each with a fresh download link.
pub async fn outputs(
    storage: Option<&Storage>,
    outputs: Option<&serde_json::Value>,
) -> Vec<OutputView> {
    let Some(record) = outputs
        .and_then(|v| serde_json::from_value::<ud_schemas::events::TaskOutputs>(v.clone()).ok())
    else {
        return vec![];
    };
    let mut out = Vec::with_capacity(record.files.len());
    for f in record.files {
        let download = match storage {
            Some(s) => s
                .presign_get(&f.key, s.settings().url_ttl)
                .await
                .ok()
                .map(SignedUrl::from),
            None => None,
        };
        out.push(OutputView {
            path: f.path,
            size: f.size,
            sha256: f.sha256,
            download,
        });
    }
    out
}

/// A download link for a task's archived log, if it is archived.
pub async fn log_archive(
    storage: Option<&Storage>,
    project: &str,
    task: &ud_schemas::TaskId,
) -> Option<SignedUrl> {
    let storage = storage?;
    let key = ud_core::archive::log_key(project, task).ok()?;
    storage.head(&key).await.ok()??;
    storage
        .presign_get(&key, storage.settings().url_ttl)
        .await
        .ok()
        .map(SignedUrl::from)
}
