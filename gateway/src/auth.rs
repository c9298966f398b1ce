//! Bearer-token authentication. Tokens are looked up by their SHA-256
//! digest; the secret itself is never stored.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::error::ApiError;
use crate::AppState;

/// Who is calling, as their token allows.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: uuid::Uuid,
    pub name: String,
    pub projects: Vec<String>,
    pub admin: bool,
}

impl Caller {
    /// Admins see every project; others only the projects their token names.
    pub fn may_see(&self, project: &str) -> bool {
        self.admin || self.projects.iter().any(|p| p == project)
    }

    pub fn actor(&self) -> String {
        format!("token:{}", self.name)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be 'Bearer <token>'"))?;
        Caller::from_secret(state, secret).await
    }
}

/// How long a token looked up stays trusted without asking PostgreSQL again.
/// A revocation through this gateway takes effect at once (the entry is
/// dropped); through another instance, within this time.
pub const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Callers by token digest, as last read from the read model.
#[derive(Clone)]
pub struct TokenCache(moka::sync::Cache<String, Caller>);

impl Default for TokenCache {
    fn default() -> Self {
        Self(
            moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(TOKEN_CACHE_TTL)
                .build(),
        )
    }
}

impl TokenCache {
    fn get(&self, digest: &str) -> Option<Caller> {
        self.0.get(digest)
    }

    fn put(&self, digest: String, caller: Caller) {
        self.0.insert(digest, caller);
    }

    /// Forgets a token at once (it was revoked).
    pub fn forget(&self, token_id: uuid::Uuid) {
        // A revocation is rare: walking the cache is fine.
        let gone: Vec<String> = self
            .0
            .iter()
            .filter(|(_, c)| c.token_id == token_id)
            .map(|(k, _)| (*k).clone())
            .collect();
        for k in gone {
            self.0.invalidate(&k);
        }
    }
}

impl Caller {
    /// The caller a token's secret names, or 401 when it is unknown or revoked.
    pub async fn from_secret(state: &AppState, secret: &str) -> Result<Self, ApiError> {
        let digest = ud_core::auth::digest(secret);
        if let Some(c) = state.tokens.get(&digest) {
            return Ok(c);
        }
        let caller = Self::look_up(state, &digest).await?;
        state.tokens.put(digest, caller.clone());
        Ok(caller)
    }

    async fn look_up(state: &AppState, digest: &str) -> Result<Self, ApiError> {
        let client = state.db.client().await?;
        let row = client
            .query_opt(
                "SELECT id, name, projects, admin FROM api_tokens WHERE digest = $1 AND revoked_at IS NULL",
                &[&digest],
            )
            .await?
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?;
        Ok(Caller {
            token_id: row.get(0),
            name: row.get(1),
            projects: row.get(2),
            admin: row.get(3),
        })
    }
}

/// A caller whose token is an admin token.
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.admin {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden",
                "an admin token is required",
            ));
        }
        Ok(Admin(caller))
    }
}
