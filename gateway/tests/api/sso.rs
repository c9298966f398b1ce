//! Sign-in through an OpenID Connect provider: a small provider run in the
//! test (discovery, keys, authorize, token with PKCE and a client secret,
//! RS256-signed ID tokens) and the gateway's code flow against it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use openidconnect::core::{
    CoreIdToken, CoreIdTokenClaims, CoreIdTokenFields, CoreJsonWebKeySet, CoreJwsSigningAlgorithm,
    CoreProviderMetadata, CoreResponseType, CoreRsaPrivateSigningKey, CoreSubjectIdentifierType,
    CoreTokenResponse, CoreTokenType,
};
use openidconnect::{
    AccessToken, Audience, AuthUrl, EmptyAdditionalClaims, EmptyAdditionalProviderMetadata,
    EmptyExtraTokenFields, EndUserEmail, IssuerUrl, JsonWebKeyId, JsonWebKeySetUrl, Nonce,
    PrivateSigningKey, ResponseTypes, StandardClaims, SubjectIdentifier, TokenUrl,
};
use reqwest::StatusCode as Status;
use serde_json::{json, Value};
use sha2::Digest;

use crate::common::Stack;

const CLIENT: &str = "unidesk";
const SECRET: &str = "client-secret-of-the-test";

/// Who the provider says signs in, and how.
#[derive(Clone)]
struct Person {
    email: String,
    verified: bool,
    /// Sign with a key the provider does not publish (a forged token).
    forged: bool,
}

/// An authorization code given out: for whom, with what nonce and PKCE challenge.
struct Grant {
    person: Person,
    nonce: String,
    challenge: String,
}

struct Provider {
    base: String,
    key: CoreRsaPrivateSigningKey,
    other_key: CoreRsaPrivateSigningKey,
    person: Mutex<Person>,
    grants: Mutex<HashMap<String, Grant>>,
}

fn rsa_pem() -> Result<String> {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)?;
    Ok(key.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)?.to_string())
}

async fn discovery(State(p): State<Arc<Provider>>) -> Result<Json<CoreProviderMetadata>, String> {
    let url = |path: &str| format!("{}{path}", p.base);
    let metadata = CoreProviderMetadata::new(
        IssuerUrl::new(p.base.clone()).map_err(|e| e.to_string())?,
        AuthUrl::new(url("/authorize")).map_err(|e| e.to_string())?,
        JsonWebKeySetUrl::new(url("/jwks")).map_err(|e| e.to_string())?,
        vec![ResponseTypes::new(vec![CoreResponseType::Code])],
        vec![CoreSubjectIdentifierType::Public],
        vec![CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256],
        EmptyAdditionalProviderMetadata {},
    )
    .set_token_endpoint(Some(
        TokenUrl::new(url("/token")).map_err(|e| e.to_string())?,
    ));
    Ok(Json(metadata))
}

async fn jwks(State(p): State<Arc<Provider>>) -> Json<CoreJsonWebKeySet> {
    Json(CoreJsonWebKeySet::new(vec![p.key.as_verification_key()]))
}

/// Signs the person in at once (as a provider does for someone signed in
/// already) and sends the browser back with a code.
async fn authorize(
    State(p): State<Arc<Provider>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("client_id") != CLIENT
        || get("response_type") != "code"
        || get("code_challenge_method") != "S256"
    {
        return (StatusCode::BAD_REQUEST, "bad authorization request").into_response();
    }
    let code = format!("code-{}", uuid::Uuid::now_v7());
    let person = p
        .person
        .lock()
        .map(|g| g.clone())
        .unwrap_or_else(|e| e.into_inner().clone());
    if let Ok(mut grants) = p.grants.lock() {
        grants.insert(
            code.clone(),
            Grant {
                person,
                nonce: get("nonce"),
                challenge: get("code_challenge"),
            },
        );
    }
    let back = format!("{}?code={code}&state={}", get("redirect_uri"), get("state"));
    (StatusCode::FOUND, [("location", back)]).into_response()
}

/// Checks the client's secret and the PKCE verifier; answers the tokens.
async fn token(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT}:{SECRET}"))
    );
    let authed = headers.get("authorization").and_then(|h| h.to_str().ok()) == Some(basic.as_str());
    let grant = f.get("code").and_then(|c| p.grants.lock().ok()?.remove(c));
    let (true, Some(grant)) = (authed, grant) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    };
    let verifier = f.get("code_verifier").cloned().unwrap_or_default();
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    if challenge != grant.challenge {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    let access = AccessToken::new("access-token".into());
    let claims = CoreIdTokenClaims::new(
        IssuerUrl::new(p.base.clone()).unwrap_or_else(|_| unreachable!()),
        vec![Audience::new(CLIENT.into())],
        chrono::Utc::now() + chrono::Duration::seconds(300),
        chrono::Utc::now(),
        StandardClaims::new(SubjectIdentifier::new("person-1".into()))
            .set_email(Some(EndUserEmail::new(grant.person.email.clone())))
            .set_email_verified(Some(grant.person.verified)),
        EmptyAdditionalClaims {},
    )
    .set_nonce(Some(Nonce::new(grant.nonce)));
    let key = if grant.person.forged {
        &p.other_key
    } else {
        &p.key
    };
    let id_token = match CoreIdToken::new(
        claims,
        key,
        CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
        Some(&access),
        None,
    ) {
        Ok(t) => t,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    Json(CoreTokenResponse::new(
        access,
        CoreTokenType::Bearer,
        CoreIdTokenFields::new(Some(id_token), EmptyExtraTokenFields {}),
    ))
    .into_response()
}

async fn provider() -> Result<Arc<Provider>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let kid = || Some(JsonWebKeyId::new("key-1".into()));
    let p = Arc::new(Provider {
        base,
        key: CoreRsaPrivateSigningKey::from_pem(&rsa_pem()?, kid()).map_err(|e| anyhow!(e))?,
        other_key: CoreRsaPrivateSigningKey::from_pem(&rsa_pem()?, kid())
            .map_err(|e| anyhow!(e))?,
        person: Mutex::new(Person {
            email: "Ada@Example.org".into(),
            verified: true,
            forged: false,
        }),
        grants: Mutex::new(HashMap::new()),
    });
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            axum::routing::get(discovery),
        )
        .route("/jwks", axum::routing::get(jwks))
        .route("/authorize", axum::routing::get(authorize))
        .route("/token", axum::routing::post(token))
        .with_state(p.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(p)
}

fn location(resp: &reqwest::Response) -> Result<String> {
    resp.headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no Location in {}", resp.status()))
}

/// A browser's way through the sign-in: the gateway's callback answer.
async fn sign_in(s: &Stack, browser: &reqwest::Client) -> Result<reqwest::Response> {
    let (callback, cookie) = to_callback(s, browser).await?;
    Ok(browser
        .get(callback)
        .header("cookie", cookie)
        .send()
        .await?)
}

/// The way up to the gateway's callback: its URL, and the cookie the
/// login gave the browser.
async fn to_callback(s: &Stack, browser: &reqwest::Client) -> Result<(String, String)> {
    let to_provider = browser.get(s.url("/auth/login")).send().await?;
    assert_eq!(to_provider.status(), Status::FOUND);
    let cookie = to_provider
        .headers()
        .get("set-cookie")
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no cookie from /auth/login"))?;
    let back = browser.get(location(&to_provider)?).send().await?;
    assert_eq!(back.status(), Status::FOUND);
    // The provider sends the browser to the registered callback.
    let back = location(&back)?;
    let query = back
        .split_once('?')
        .map(|(_, q)| q.to_owned())
        .ok_or_else(|| anyhow!("no query in {back}"))?;
    assert!(
        back.starts_with("https://unidesk.lab.example.org/auth/callback?"),
        "{back}"
    );
    Ok((s.url(&format!("/auth/callback?{query}")), cookie))
}

#[tokio::test]
async fn a_person_signs_in_through_the_identity_provider_and_gets_their_roles() -> Result<()> {
    let p = provider().await?;
    let (nats, pg) = (
        ud_testkit::NatsServer::start().await?,
        ud_testkit::PgDatabase::create().await?,
    );
    let cfg = ud_server::ServerConfig {
        oidc: Some(ud_gateway::sso::OidcSettings {
            issuer: p.base.clone(),
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
            redirect_url: "https://unidesk.lab.example.org/auth/callback".into(),
            user_claim: ud_gateway::sso::UserClaim::Email,
            token_days: 7,
        }),
        ..ud_server::ServerConfig::local(nats.url(), pg.url.clone())
    };
    let s = Stack::start_config(nats, pg, cfg).await?;
    let methods: Value = s
        .http
        .get(s.url("/api/v1/auth"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(methods, json!({"oidc": true, "login_url": "/auth/login"}));
    let resp = s
        .http
        .post(s.url("/api/v1/projects"))
        .bearer_auth(&s.admin)
        .json(&json!({"name": "lab", "owner": "ada@example.org"}))
        .send()
        .await?;
    assert_eq!(resp.status(), Status::CREATED);

    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let (first, cookie) = to_callback(&s, &browser).await?;
    let done = browser.get(&first).header("cookie", &cookie).send().await?;
    assert_eq!(done.status(), Status::FOUND, "{}", done.text().await?);
    let to_ui = location(&done)?;
    let token = to_ui
        .strip_prefix(ud_gateway::sso::UI_SIGNED_IN)
        .ok_or_else(|| anyhow!("{to_ui}"))?
        .to_owned();
    // The token is Ada's (her address in lower case): she owns lab.
    let projects: Value = s
        .http
        .get(s.url("/api/v1/projects"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(projects[0]["name"], "lab", "{projects}");
    assert_eq!(projects[0]["your_role"], "owner", "{projects}");
    let tokens: Value = s
        .http
        .get(s.url("/api/v1/tokens"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(tokens[0]["user"], "ada@example.org", "{tokens}");
    assert!(
        tokens[0]["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with("sso-"),
        "{tokens}"
    );
    let expires: chrono::DateTime<chrono::Utc> = tokens[0]["expires_at"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    let days = (expires - chrono::Utc::now()).num_minutes() as f64 / 1440.0;
    assert!((6.99..=7.0).contains(&days), "{days}");

    // A callback in a browser that did not start the sign-in is refused
    // (a link to it must not sign anyone in), and so is one seen before.
    let (callback, _) = to_callback(&s, &browser).await?;
    let elsewhere = browser.get(&callback).send().await?;
    assert_eq!(elsewhere.status(), Status::UNAUTHORIZED);
    assert!(elsewhere.text().await?.contains("another browser"));
    let replay = browser.get(&first).header("cookie", &cookie).send().await?;
    assert_eq!(replay.status(), Status::UNAUTHORIZED);
    assert!(replay.text().await?.contains("start again"));

    // An address the provider has not verified names no one.
    if let Ok(mut person) = p.person.lock() {
        person.verified = false;
    }
    let refused = sign_in(&s, &browser).await?;
    assert_eq!(refused.status(), Status::UNAUTHORIZED);
    assert!(refused.text().await?.contains("is verified"));
    // A token signed with a key the provider does not publish is refused.
    if let Ok(mut person) = p.person.lock() {
        person.verified = true;
        person.forged = true;
    }
    let refused = sign_in(&s, &browser).await?;
    assert_eq!(refused.status(), Status::UNAUTHORIZED);
    let why = refused.text().await?;
    assert!(
        why.contains("the ID token: Signature verification failed"),
        "{why}"
    );

    // Without a provider there is no such sign-in.
    let plain = Stack::start().await?;
    let methods: Value = plain
        .http
        .get(plain.url("/api/v1/auth"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(methods, json!({"oidc": false}));
    let resp = browser.get(plain.url("/auth/login")).send().await?;
    assert_eq!(resp.status(), Status::NOT_FOUND);
    Ok(())
}
