//! Sign-in through an OpenID Connect provider (the authorization code flow
//! with PKCE): `/auth/login` sends the browser to the provider, which sends
//! it back to `/auth/callback`; the ID token is checked (signature, issuer,
//! audience, nonce, expiry), one of its claims names the UniDesk user, and
//! a token of that user is issued and handed to the web UI. The user's
//! roles are their project memberships, as for any token of theirs.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::header::LOCATION;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::AppState;

/// Where the web UI takes the issued token from (its fragment never reaches a server).
pub const UI_SIGNED_IN: &str = "/#/signed-in/";

/// How long a sign-in may take between `/auth/login` and the callback.
const LOGIN_TTL: Duration = Duration::from_secs(600);

/// The cookie that ties a callback to the browser that started the sign-in.
const COOKIE: &str = "ud_sso";

/// The claim of the ID token that names the UniDesk user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserClaim {
    /// `email` (only when the provider says it is verified).
    Email,
    /// `preferred_username`.
    PreferredUsername,
    /// `sub`, the provider's own id of the person.
    Subject,
}

impl std::str::FromStr for UserClaim {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "email" => Ok(Self::Email),
            "preferred_username" => Ok(Self::PreferredUsername),
            "sub" => Ok(Self::Subject),
            other => Err(format!("{other:?}: one of email, preferred_username, sub")),
        }
    }
}

/// The provider and how its users become UniDesk users.
#[derive(Clone, Debug)]
pub struct OidcSettings {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    /// This gateway's `/auth/callback` as the browser reaches it (registered
    /// at the provider).
    pub redirect_url: String,
    pub user_claim: UserClaim,
    /// Days the issued token works.
    pub token_days: u32,
}

/// A sign-in under way, by its `state`.
#[derive(Clone)]
struct Pending {
    nonce: String,
    verifier: String,
}

/// Sign-in through the provider, as this gateway runs it.
pub struct Oidc {
    settings: OidcSettings,
    http: openidconnect::reqwest::Client,
    /// The provider's metadata, read once (again after a failure).
    metadata: tokio::sync::Mutex<Option<CoreProviderMetadata>>,
    pending: moka::sync::Cache<String, Pending>,
}

#[derive(Debug, thiserror::Error)]
pub enum SsoError {
    #[error("the settings: {0}")]
    Settings(String),
    #[error("the identity provider: {0}")]
    Provider(String),
    #[error("the sign-in is unknown, was started in another browser, or took longer than 10 minutes: start again")]
    UnknownLogin,
    #[error("the identity provider refused: {0}")]
    Refused(String),
    #[error("{0}")]
    User(String),
}

impl From<SsoError> for ApiError {
    fn from(e: SsoError) -> Self {
        match e {
            SsoError::Settings(_) | SsoError::Provider(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "identity_provider", e.to_string())
            }
            SsoError::UnknownLogin | SsoError::Refused(_) | SsoError::User(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "sign_in_failed", e.to_string())
            }
        }
    }
}

fn provider(e: impl std::fmt::Display) -> SsoError {
    SsoError::Provider(e.to_string())
}

impl Oidc {
    pub fn new(settings: OidcSettings) -> Result<Self, SsoError> {
        IssuerUrl::new(settings.issuer.clone())
            .map_err(|e| SsoError::Settings(format!("UD_OIDC_ISSUER: {e}")))?;
        RedirectUrl::new(settings.redirect_url.clone())
            .map_err(|e| SsoError::Settings(format!("UD_OIDC_REDIRECT_URL: {e}")))?;
        let http = openidconnect::reqwest::ClientBuilder::new()
            // Following redirects would let the provider's answers send us anywhere.
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SsoError::Settings(e.to_string()))?;
        Ok(Self {
            settings,
            http,
            metadata: tokio::sync::Mutex::new(None),
            pending: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(LOGIN_TTL)
                .build(),
        })
    }

    async fn client(
        &self,
    ) -> Result<
        openidconnect::core::CoreClient<
            openidconnect::EndpointSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointNotSet,
            openidconnect::EndpointMaybeSet,
            openidconnect::EndpointMaybeSet,
        >,
        SsoError,
    > {
        let mut known = self.metadata.lock().await;
        let metadata = match known.as_ref() {
            Some(m) => m.clone(),
            None => {
                let issuer = IssuerUrl::new(self.settings.issuer.clone()).map_err(provider)?;
                let m = CoreProviderMetadata::discover_async(issuer, &self.http)
                    .await
                    .map_err(|e| SsoError::Provider(format!("discovery: {e}")))?;
                *known = Some(m.clone());
                m
            }
        };
        Ok(CoreClient::from_provider_metadata(
            metadata,
            ClientId::new(self.settings.client_id.clone()),
            Some(ClientSecret::new(self.settings.client_secret.clone())),
        )
        .set_redirect_uri(RedirectUrl::new(self.settings.redirect_url.clone()).map_err(provider)?))
    }

    /// Where to send the browser to sign in, and the sign-in's `state`.
    async fn start(&self) -> Result<(String, String), SsoError> {
        let client = self.client().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in ["email", "profile"] {
            request = request.add_scope(Scope::new(scope.into()));
        }
        let (url, state, nonce) = request.url();
        self.pending.insert(
            state.secret().clone(),
            Pending {
                nonce: nonce.secret().clone(),
                verifier: verifier.secret().clone(),
            },
        );
        Ok((url.to_string(), state.secret().clone()))
    }

    /// The UniDesk user the provider's answer names.
    async fn finish(&self, code: &str, state: &str) -> Result<String, SsoError> {
        let pending = self.pending.remove(state).ok_or(SsoError::UnknownLogin)?;
        let client = self.client().await?;
        let answer = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(provider)?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier))
            .request_async(&self.http)
            .await
            .map_err(|e| SsoError::Refused(format!("the code exchange: {e}")))?;
        let id_token = answer
            .id_token()
            .ok_or_else(|| SsoError::Refused("no ID token in the answer".into()))?;
        let nonce = Nonce::new(pending.nonce);
        let claims = match id_token.claims(&client.id_token_verifier(), &nonce) {
            Ok(c) => c.clone(),
            // The provider may have rotated its keys: read them again, once.
            Err(_) => {
                *self.metadata.lock().await = None;
                let fresh = self.client().await?;
                let verifier = fresh.id_token_verifier();
                let claims = id_token
                    .claims(&verifier, &nonce)
                    .map_err(|e| SsoError::Refused(format!("the ID token: {e}")))?
                    .clone();
                claims
            }
        };
        let named = match self.settings.user_claim {
            UserClaim::Email => {
                // Only an address the provider vouches for: one it leaves
                // unsaid may be any a person typed in.
                if claims.email_verified() != Some(true) {
                    return Err(SsoError::User(
                        "the provider does not say this e-mail address is verified (use UD_OIDC_USER_CLAIM=preferred_username or sub for such a provider)".into(),
                    ));
                }
                claims.email().map(|e| e.as_str().to_owned())
            }
            UserClaim::PreferredUsername => {
                claims.preferred_username().map(|u| u.as_str().to_owned())
            }
            UserClaim::Subject => Some(claims.subject().as_str().to_owned()),
        }
        .ok_or_else(|| {
            SsoError::User(format!(
                "the ID token has no {:?} claim",
                self.settings.user_claim
            ))
        })?;
        let user = named.to_lowercase();
        ud_schemas::spec::user_name(&user)
            .map_err(|r| SsoError::User(format!("{user:?} cannot name a user: {r}")))?;
        Ok(user)
    }
}

/// How people sign in here.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AuthMethods {
    /// Whether sign-in through the organisation's identity provider is on.
    pub oidc: bool,
    /// Where to send a browser to sign in that way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_url: Option<String>,
}

/// How people sign in: with a token, and through the identity provider when set.
#[utoipa::path(get, path = "/api/v1/auth", tag = "tokens",
    responses((status = 200, body = AuthMethods)))]
pub async fn methods(State(state): State<AppState>) -> Json<AuthMethods> {
    let on = state.oidc.is_some();
    Json(AuthMethods {
        oidc: on,
        login_url: on.then(|| "/auth/login".into()),
    })
}

fn redirect(to: &str) -> Response {
    (StatusCode::FOUND, [(LOCATION, to.to_owned())]).into_response()
}

/// `GET /auth/login`: to the identity provider.
pub async fn login(State(state): State<AppState>) -> Result<Response, ApiError> {
    let oidc = state
        .oidc
        .as_ref()
        .ok_or_else(|| ApiError::not_found("sign-in through an identity provider"))?;
    match oidc.start().await {
        Ok((url, login)) => {
            let secure = if oidc.settings.redirect_url.starts_with("https:") {
                "; Secure"
            } else {
                ""
            };
            let cookie = format!(
                "{COOKIE}={login}; HttpOnly; SameSite=Lax; Path=/auth; Max-Age={}{secure}",
                LOGIN_TTL.as_secs()
            );
            let mut resp = redirect(&url);
            if let Ok(v) = axum::http::HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(axum::http::header::SET_COOKIE, v);
            }
            Ok(resp)
        }
        Err(e) => {
            // Read the provider's metadata again next time.
            *oidc.metadata.lock().await = None;
            Err(e.into())
        }
    }
}

#[derive(Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /auth/callback`: the provider's answer; a token of the user it
/// names, handed to the web UI.
pub async fn callback(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<Callback>,
) -> Result<Response, ApiError> {
    let oidc = state
        .oidc
        .as_ref()
        .ok_or_else(|| ApiError::not_found("sign-in through an identity provider"))?;
    if let Some(e) = q.error {
        let why = q
            .error_description
            .map(|d| format!("{e}: {d}"))
            .unwrap_or(e);
        return Err(SsoError::Refused(why).into());
    }
    let (Some(code), Some(login)) = (q.code, q.state) else {
        return Err(ApiError::field("code", "the callback needs code and state"));
    };
    // Only the browser that started this sign-in may finish it (else a
    // link to someone else's callback would sign its follower in as them).
    let started_here = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .any(|c| {
            c.trim()
                .strip_prefix(COOKIE)
                .and_then(|r| r.strip_prefix('='))
                == Some(login.as_str())
        });
    if !started_here {
        return Err(SsoError::UnknownLogin.into());
    }
    let user = match oidc.finish(&code, &login).await {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "sign-in refused");
            return Err(e.into());
        }
    };
    let days = oidc.settings.token_days;
    let token = ud_core::commands::NewToken {
        name: format!("sso-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S")),
        user: Some(user.clone()),
        expires_at: Some(ud_schemas::now_millis() + i64::from(days) * 86_400_000),
        ..Default::default()
    };
    let issued = ud_core::commands::issue_token(state.commands.store(), &token, "sso").await?;
    state
        .projected
        .wait(
            ud_schemas::streams::AUTH,
            issued.seq,
            crate::tasks::WAIT_PROJECTED,
        )
        .await;
    info!(user = %user, "signed in through the identity provider");
    let mut resp = redirect(&format!("{UI_SIGNED_IN}{}", issued.secret));
    resp.headers_mut().insert(
        axum::http::header::SET_COOKIE,
        axum::http::HeaderValue::from_static(
            "ud_sso=; HttpOnly; SameSite=Lax; Path=/auth; Max-Age=0",
        ),
    );
    Ok(resp)
}
