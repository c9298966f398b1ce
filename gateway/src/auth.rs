//! Bearer-token authentication. Tokens are looked up by their SHA-256
//! digest; the secret itself is never stored.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use std::collections::BTreeMap;

use ud_schemas::Role;

use crate::error::ApiError;
use crate::AppState;

/// Who is calling, as their token allows.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token_id: uuid::Uuid,
    pub name: String,
    /// The person the token belongs to (tokens without one name their
    /// projects themselves).
    pub user: Option<String>,
    /// The caller's role in each project it may see (not for admins: they
    /// are owners everywhere).
    pub roles: BTreeMap<String, Role>,
    pub admin: bool,
    /// Archived projects, where an admin too only reads.
    pub archived: std::collections::BTreeSet<String>,
    /// When the token stops working (ms since the epoch).
    pub expires_at: Option<ud_schemas::Millis>,
}

impl Caller {
    /// The caller's role in a project: admins are owners everywhere.
    pub fn role(&self, project: &str) -> Option<Role> {
        if self.admin {
            Some(if self.archived.contains(project) {
                Role::Viewer
            } else {
                Role::Owner
            })
        } else {
            self.roles.get(project).copied()
        }
    }

    /// Whether the caller may read a project at all.
    pub fn may_see(&self, project: &str) -> bool {
        self.role(project).is_some()
    }

    /// Whether the caller's role in a project is at least `need`.
    pub fn may(&self, project: &str, need: Role) -> bool {
        self.role(project).is_some_and(|r| r >= need)
    }

    /// 403 unless the caller's role in `project` is at least `need`.
    pub fn require(&self, project: &str, need: Role) -> Result<(), ApiError> {
        match self.role(project) {
            Some(r) if r >= need => Ok(()),
            Some(r) => Err(ApiError::forbidden(format!(
                "your role in project {project} is {r}; this needs {need}"
            ))),
            None => Err(ApiError::forbidden(format!(
                "you are not a member of project {project}"
            ))),
        }
    }

    /// For a thing of `project` that `owner` made (a task, a pipeline):
    /// 404 when the caller may not see the project, 403 when its role is
    /// below `need` or, as a member, the thing is someone else's.
    pub fn require_own(
        &self,
        what: &str,
        project: &str,
        owner: &str,
        need: Role,
    ) -> Result<(), ApiError> {
        match self.role(project) {
            None => Err(ApiError::not_found(what)),
            Some(Role::Member) if need <= Role::Member && owner != self.actor() => {
                Err(ApiError::forbidden(format!(
                    "members of project {project} change only their own; {owner} made this"
                )))
            }
            Some(_) => self.require(project, need),
        }
    }

    /// Whether the caller may do what `other` may, no more and no less.
    pub fn grants_as(&self, other: &Caller) -> bool {
        (self.admin, &self.roles, &self.archived) == (other.admin, &other.roles, &other.archived)
    }

    /// The projects the caller may see; `None` for admins (every one).
    pub fn visible(&self) -> Option<Vec<String>> {
        (!self.admin).then(|| self.roles.keys().cloned().collect())
    }

    /// Who is recorded as having done what the caller does.
    pub fn actor(&self) -> String {
        match &self.user {
            Some(u) => format!("user:{u}"),
            None => format!("token:{}", self.name),
        }
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

/// Callers by token digest, as last read from the read model, and the
/// tokens whose use was recorded lately.
#[derive(Clone)]
pub struct TokenCache {
    callers: moka::sync::Cache<String, Caller>,
    used: moka::sync::Cache<uuid::Uuid, ()>,
}

/// A token's last use is written at most this often.
pub const USE_RECORDED_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            callers: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(TOKEN_CACHE_TTL)
                .build(),
            used: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(USE_RECORDED_EVERY)
                .build(),
        }
    }
}

impl TokenCache {
    fn get(&self, digest: &str) -> Option<Caller> {
        self.callers.get(digest)
    }

    fn put(&self, digest: String, caller: Caller) {
        self.callers.insert(digest, caller);
    }

    /// Forgets a token at once (it was revoked).
    pub fn forget(&self, token_id: uuid::Uuid) {
        // A revocation is rare: walking the cache is fine.
        let gone: Vec<String> = self
            .callers
            .iter()
            .filter(|(_, c)| c.token_id == token_id)
            .map(|(k, _)| (*k).clone())
            .collect();
        for k in gone {
            self.callers.invalidate(&k);
        }
    }

    /// Forgets every token (a project's members changed: roles are read again).
    pub fn forget_all(&self) {
        self.callers.invalidate_all();
    }

    /// Whether a token's use is to be recorded now.
    fn first_use_lately(&self, token_id: uuid::Uuid) -> bool {
        let fresh = !self.used.contains_key(&token_id);
        if fresh {
            self.used.insert(token_id, ());
        }
        fresh
    }
}

impl Caller {
    /// The caller a token's secret names, or 401 when it is unknown,
    /// revoked or expired.
    pub async fn from_secret(state: &AppState, secret: &str) -> Result<Self, ApiError> {
        let digest = ud_core::auth::digest(secret);
        let caller = match state.tokens.get(&digest) {
            Some(c) => c,
            None => {
                let caller = Self::look_up(state, &digest).await?;
                state.tokens.put(digest, caller.clone());
                caller
            }
        };
        if caller
            .expires_at
            .is_some_and(|at| at <= ud_schemas::now_millis())
        {
            return Err(ApiError::unauthorized("token expired"));
        }
        if state.tokens.first_use_lately(caller.token_id) {
            record_use(state, caller.token_id);
        }
        Ok(caller)
    }

    async fn look_up(state: &AppState, digest: &str) -> Result<Self, ApiError> {
        let client = state.db.client().await?;
        // A user's roles come from the projects they are a member of; a
        // token without a user owns the projects it names. In an archived
        // project everyone reads, no one writes.
        let row = client
            .query_opt(
                "SELECT t.id, t.name, t.admin, t.user_name, t.expires_at,
                   COALESCE(ARRAY(
                     SELECT m.project || '=' || CASE WHEN p.archived_at IS NULL THEN m.role ELSE 'viewer' END
                     FROM project_members m JOIN projects p ON p.name = m.project
                     WHERE t.user_name IS NOT NULL AND m.user_name = t.user_name
                     UNION ALL
                     SELECT n || '=' || CASE WHEN EXISTS (
                       SELECT 1 FROM projects a WHERE a.name = n AND a.archived_at IS NOT NULL
                     ) THEN 'viewer' ELSE 'owner' END
                     FROM unnest(t.projects) AS n WHERE t.user_name IS NULL
                   ), '{}'),
                   CASE WHEN t.admin THEN ARRAY(SELECT name FROM projects WHERE archived_at IS NOT NULL)
                        ELSE '{}'::text[] END
                 FROM api_tokens t WHERE t.digest = $1 AND t.revoked_at IS NULL",
                &[&digest],
            )
            .await?
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?;
        let roles: Vec<String> = row.get(5);
        let expires_at: Option<chrono::DateTime<chrono::Utc>> = row.get(4);
        Ok(Caller {
            token_id: row.get(0),
            name: row.get(1),
            admin: row.get(2),
            user: row.get(3),
            roles: roles
                .iter()
                .filter_map(|r| {
                    let (p, role) = r.rsplit_once('=')?;
                    Some((p.to_owned(), role.parse().ok()?))
                })
                .collect(),
            expires_at: expires_at.map(|t| t.timestamp_millis()),
            archived: row.get::<_, Vec<String>>(6).into_iter().collect(),
        })
    }
}

/// Records that a token was used, in the background: a request never
/// waits for it, and a failure only leaves the time older.
fn record_use(state: &AppState, token_id: uuid::Uuid) {
    let db = state.db.clone();
    tokio::spawn(async move {
        let result = async {
            db.client()
                .await?
                .execute(
                    "INSERT INTO token_use (token_id, last_used_at) VALUES ($1, now())
                     ON CONFLICT (token_id) DO UPDATE SET last_used_at = now()",
                    &[&token_id],
                )
                .await?;
            Ok::<_, ud_projections::ProjectionError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(token = %token_id, error = %e, "token use not recorded");
        }
    });
}

/// The project named in a path, if the caller's role there is at least
/// `need`: 404 for a project the caller may not see (the same answer as
/// for one that does not exist), 403 for a role too low.
pub fn project_of(
    caller: &Caller,
    project: &str,
    need: Role,
) -> Result<ud_schemas::ProjectId, ApiError> {
    match project.parse::<ud_schemas::ProjectId>() {
        Ok(p) if caller.may_see(project) => {
            caller.require(project, need)?;
            Ok(p)
        }
        _ => Err(ApiError::not_found("project")),
    }
}

/// 404 / 403 unless the caller may change a pipeline or schedule: members
/// change what they made, owners (and admins) anything of their projects.
/// From the read model (`column`: who made it); one not projected yet is
/// left to the command's own check of the project.
pub async fn may_change_made(
    state: &AppState,
    caller: &Caller,
    table: &str,
    column: &str,
    id: uuid::Uuid,
) -> Result<(), ApiError> {
    if caller.admin {
        return Ok(());
    }
    let client = state.db.client().await?;
    let row = client
        .query_opt(
            &format!("SELECT project, {column} FROM {table} WHERE id = $1"),
            &[&id],
        )
        .await?;
    match row {
        Some(r) => caller.require_own(
            table.trim_end_matches('s'),
            &r.get::<_, String>(0),
            &r.get::<_, String>(1),
            Role::Member,
        ),
        None => Ok(()),
    }
}

/// The check a command makes on the project of what it changes (a
/// pipeline, a schedule): passes when the caller's role there is at least
/// `need`, and remembers a project the caller could see but not change, so
/// the answer is 403 rather than "not found".
pub struct Gate<'a> {
    caller: &'a Caller,
    need: Role,
    denied: std::sync::Mutex<Option<String>>,
}

impl<'a> Gate<'a> {
    pub fn new(caller: &'a Caller, need: Role) -> Self {
        Self {
            caller,
            need,
            denied: std::sync::Mutex::new(None),
        }
    }

    pub fn check(&self, project: &ud_schemas::ProjectId) -> bool {
        let p = project.as_str();
        if self.caller.may(p, self.need) {
            return true;
        }
        if self.caller.may_see(p) {
            if let Ok(mut d) = self.denied.lock() {
                *d = Some(p.to_owned());
            }
        }
        false
    }

    /// The command's result, with a refusal by role as 403.
    pub fn result<T>(self, r: Result<T, ud_core::CommandError>) -> Result<T, ApiError> {
        let denied = self.denied.into_inner().ok().flatten();
        match (r, denied) {
            (Err(_), Some(project)) => Err(self
                .caller
                .require(&project, self.need)
                .err()
                .unwrap_or_else(|| ApiError::forbidden("not allowed"))),
            (r, _) => r.map_err(ApiError::from),
        }
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
            return Err(ApiError::forbidden("an admin token is required"));
        }
        Ok(Admin(caller))
    }
}
