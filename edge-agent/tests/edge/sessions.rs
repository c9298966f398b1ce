//! Interactive work through the node's link: a session served at an origin
//! of its own (the link, the cookie, HTTP, WebSockets and their Origin
//! check), a shell with a terminal in a running task, a port forwarded, an
//! idle session ending, a cut link ending a connection with its reason, and
//! one node unable to read or inject another's tunnel traffic. The session's
//! program is `ud-sessiond` (testkit/sessiond) in the base image.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use ud_edge_agent::AgentConfig;
use ud_schemas::edge;
use ud_testkit::{session_image, Relay};

use crate::common::*;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A node running tasks in the session image, joined through `hub_port`.
async fn session_node(s: &mut Stack, name: &str, hub_port: u16) -> Result<Node> {
    let image = tokio::task::spawn_blocking(|| session_image(IMAGE)).await??;
    let token = s.enroll(name).await?;
    let leaf = s.leaf(&token, hub_port).await?;
    let agent = run_agent(AgentConfig {
        image: Some(image),
        ..agent_config(&leaf, &token, name, Duration::from_millis(500))
    });
    s.node_status(token.node_id, "online", JOIN).await?;
    Ok(Node {
        id: token.node_id,
        containers: Containers(token.node_id),
        token,
        leaf,
        agent,
    })
}

/// A session on the node labelled `zone`, running; its task id and session id.
async fn start_session(s: &mut Stack, zone: &str, idle_minutes: f64) -> Result<(String, String)> {
    let mut body = task_body(
        "lab",
        "",
        json!({"cpus": 0.5, "memory_mb": 64, "labels": {"zone": zone}}),
    );
    body["command"] = json!(["ud-sessiond", "8888"]);
    body["ports"] = json!([6006]);
    body["session"] = json!({"port": 8888, "idle_timeout_minutes": idle_minutes});
    let id = s.submit_body(body).await?;
    s.task_state(&id, &["running"], Duration::from_secs(60))
        .await?;
    let task = s.get(&format!("/api/v1/tasks/{id}")).await?;
    let sid = task["spec"]["session"]["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no session id: {task}"))?
        .to_owned();
    Ok((id, sid))
}

fn addr(s: &Stack) -> SocketAddr {
    s.server.addr
}

/// A client that reaches `<sid>.s.localhost` at the API, following no redirects.
fn session_client(s: &Stack, sid: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .resolve(&format!("{sid}.s.localhost"), addr(s))
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

fn origin(s: &Stack, sid: &str) -> String {
    format!("http://{sid}.s.localhost:{}", addr(s).port())
}

/// Follows a session link: the cookie it sets.
async fn sign_in(s: &Stack, id: &str, sid: &str) -> Result<String> {
    let link = s
        .post(&format!("/api/v1/tasks/{id}/session"), json!({}))
        .await?;
    let url = link["url"].as_str().unwrap_or_default().replace(
        ".s.localhost/",
        &format!(".s.localhost:{}/", addr(s).port()),
    );
    assert!(url.starts_with(&origin(s, sid)), "{url}");
    let r = session_client(s, sid)?.get(&url).send().await?;
    assert_eq!(r.status(), 303, "{url}");
    assert_eq!(r.headers()["location"], "/");
    let set = r.headers()["set-cookie"].to_str()?.to_owned();
    assert!(set.contains("HttpOnly") && set.contains("Path=/;"), "{set}");
    assert!(
        !set.to_ascii_lowercase().contains("domain="),
        "host-only: {set}"
    );
    // A link works once it is signed for this session; a changed one does not.
    let forged = url.replace("token=", "token=1");
    let r = session_client(s, sid)?.get(&forged).send().await?;
    assert_eq!(r.status(), 401);
    Ok(set.split(';').next().unwrap_or_default().to_owned())
}

async fn ws_connect(at: SocketAddr, url: &str, headers: &[(&str, String)]) -> Result<Ws, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| e.to_string())?,
            v.parse().map_err(|_| "header".to_owned())?,
        );
    }
    let tcp = TcpStream::connect(at).await.map_err(|e| e.to_string())?;
    tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// What a WebSocket sends until it closes: bytes, and its text messages.
async fn drain(
    ws: &mut Ws,
    until: impl Fn(&str, &[String]) -> bool,
) -> Result<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut texts = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = tokio::time::timeout_at(end, ws.next())
            .await
            .map_err(|_| anyhow!("no end: {:?} {texts:?}", String::from_utf8_lossy(&out)))?;
        match m {
            Some(Ok(Message::Binary(b))) => out.extend_from_slice(&b),
            Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            _ => {}
        }
        if until(&String::from_utf8_lossy(&out), &texts) {
            break;
        }
    }
    Ok((String::from_utf8_lossy(&out).into_owned(), texts))
}

fn bearer(s: &Stack) -> (&'static str, String) {
    ("authorization", format!("Bearer {}", s.admin))
}

#[tokio::test]
async fn a_session_serves_http_and_websockets_at_its_own_origin_then_ends_when_idle() -> Result<()>
{
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let _node = {
        let hub = s.hub.leaf_port();
        session_node(&mut s, "gpu", hub)
    }
    .await?;
    let (id, sid) = start_session(&mut s, "gpu", 0.1).await?;
    let http = session_client(&s, &sid)?;
    let at = origin(&s, &sid);

    // Without the cookie: nothing of the session.
    let r = http.get(format!("{at}/")).send().await?;
    assert_eq!(r.status(), 401);
    let cookie = sign_in(&s, &id, &sid).await?;
    let page = http
        .get(format!("{at}/"))
        .header("cookie", &cookie)
        .send()
        .await?;
    let status = page.status();
    let text = page.text().await?;
    assert!(
        status == 200 && text.contains("session page"),
        "{status} {text}"
    );

    // The platform's credentials stay outside; the session's own cookies pass.
    let seen = http
        .get(format!("{at}/headers"))
        .header("cookie", format!("{cookie}; ud_other=x; theirs=2"))
        .bearer_auth(&s.admin)
        .send()
        .await?
        .text()
        .await?;
    assert!(seen.contains("cookie: theirs=2"), "{seen}");
    assert!(
        !seen.contains("authorization") && !seen.contains("ud_"),
        "{seen}"
    );
    assert!(seen.contains(&format!("host: {sid}.s.localhost")), "{seen}");

    // WebSockets from the session's own pages only, and with the cookie.
    let ws_url = format!("ws://{sid}.s.localhost:{}/ws", addr(&s).port());
    let mut ws = ws_connect(
        addr(&s),
        &ws_url,
        &[("cookie", cookie.clone()), ("origin", at.clone())],
    )
    .await
    .map_err(|e| anyhow!(e))?;
    ws.send(Message::Text("hello through the leaf".into()))
        .await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "hello through the leaf"),
        other => bail!("no echo: {other:?}"),
    }
    ws.close(None).await?;
    let evil = ws_connect(
        addr(&s),
        &ws_url,
        &[
            ("cookie", cookie.clone()),
            ("origin", "http://evil.example".into()),
        ],
    )
    .await;
    assert!(evil.is_err_and(|e| e.contains("403")), "a foreign Origin");
    let other_session = format!("http://{}.s.localhost:{}", "f".repeat(32), addr(&s).port());
    let evil = ws_connect(
        addr(&s),
        &ws_url,
        &[("cookie", cookie.clone()), ("origin", other_session)],
    )
    .await;
    assert!(
        evil.is_err_and(|e| e.contains("403")),
        "another session's Origin"
    );
    let anonymous = ws_connect(addr(&s), &ws_url, &[("origin", at.clone())]).await;
    assert!(anonymous.is_err_and(|e| e.contains("401")));

    // A declared port forwarded (as `unidesk task port-forward` does).
    let api_ws = format!("ws://{}/api/v1/tasks/{id}/ports/8888", addr(&s));
    let mut fwd = ws_connect(addr(&s), &api_ws, &[bearer(&s)])
        .await
        .map_err(|e| anyhow!(e))?;
    fwd.send(Message::Binary(
        b"GET /bytes/300000 HTTP/1.0\r\n\r\n".to_vec().into(),
    ))
    .await?;
    let (got, _) = drain(&mut fwd, |_, _| false).await?;
    assert!(
        got.starts_with("HTTP/1.1 200 OK") && got.ends_with(&"x".repeat(1000)),
        "{}",
        &got[..got.len().min(200)]
    );
    assert!(got.len() > 300_000);
    let undeclared = format!("ws://{}/api/v1/tasks/{id}/ports/7000", addr(&s));
    let refused = ws_connect(addr(&s), &undeclared, &[bearer(&s)]).await;
    assert!(refused.is_err_and(|e| e.contains("409")));

    // A shell with a terminal, resized, and its exit code.
    let exec = format!(
        "ws://{}/api/v1/tasks/{id}/exec?command=%5B%22sh%22%5D&tty=true&cols=80&rows=24",
        addr(&s)
    );
    let mut sh = ws_connect(addr(&s), &exec, &[bearer(&s)])
        .await
        .map_err(|e| anyhow!(e))?;
    sh.send(Message::Binary(b"tty; ud-sessiond size\n".to_vec().into()))
        .await?;
    let (out, texts) = drain(&mut sh, |o, _| o.contains("size 24 80")).await?;
    assert!(
        out.contains("/dev/pts/") && out.contains("size 24 80"),
        "{out:?} {texts:?}"
    );
    sh.send(Message::Text(r#"{"resize":{"cols":100,"rows":40}}"#.into()))
        .await?;
    let mut resized = false;
    for _ in 0..50 {
        sh.send(Message::Binary(b"ud-sessiond size\n".to_vec().into()))
            .await?;
        let (out, _) = drain(&mut sh, |o, _| {
            o.contains("size 40 100") || o.contains("size 24 80")
        })
        .await?;
        if out.contains("size 40 100") {
            resized = true;
            break;
        }
    }
    assert!(resized, "the terminal never took the new size");
    sh.send(Message::Binary(b"exit 3\n".to_vec().into()))
        .await?;
    let (_, texts) = drain(&mut sh, |_, t| !t.is_empty()).await?;
    assert_eq!(
        texts.first().map(String::as_str),
        Some(r#"{"exit":{"code":3}}"#)
    );

    // Quiet for 6 s (0.1 min): the session ends and says why.
    let done = s
        .task_state(
            &id,
            &["cancelled", "succeeded", "failed"],
            Duration::from_secs(60),
        )
        .await?;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        done["reason"]
            .as_str()
            .is_some_and(|r| r.contains("without session traffic")),
        "{done}"
    );
    // An ended session answers nothing.
    let r = http
        .get(format!("{at}/"))
        .header("cookie", &cookie)
        .send()
        .await?;
    assert_eq!(r.status(), 409);
    Ok(())
}

#[tokio::test]
async fn without_a_wildcard_host_sessions_live_under_a_path_of_the_platform() -> Result<()> {
    let mut s = Stack::start_sessions(Stack::session_settings(None)?).await?;
    let _node = {
        let hub = s.hub.leaf_port();
        session_node(&mut s, "ws", hub)
    }
    .await?;
    let (id, sid) = start_session(&mut s, "ws", 0.0).await?;
    let link = s
        .post(&format!("/api/v1/tasks/{id}/session"), json!({}))
        .await?;
    let url = link["url"].as_str().unwrap_or_default();
    assert!(
        url.starts_with(&format!("/s/{sid}/_ud/session?token=")),
        "{url}"
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let r = http.get(format!("{}{url}", s.base)).send().await?;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/s/{sid}/"));
    let set = r.headers()["set-cookie"].to_str()?.to_owned();
    assert!(set.contains(&format!("Path=/s/{sid}/;")), "{set}");
    let cookie = set.split(';').next().unwrap_or_default().to_owned();
    let seen = http
        .get(format!("{}/s/{sid}/headers", s.base))
        .header("cookie", &cookie)
        .send()
        .await?
        .text()
        .await?;
    assert!(seen.contains("host: 127.0.0.1"), "{seen}");
    let ws_url = format!("ws://{}/s/{sid}/ws", addr(&s));
    let own = ws_connect(
        addr(&s),
        &ws_url,
        &[("cookie", cookie.clone()), ("origin", s.base.clone())],
    )
    .await;
    assert!(own.is_ok(), "{:?}", own.err());
    let evil = ws_connect(
        addr(&s),
        &ws_url,
        &[("cookie", cookie), ("origin", "http://evil.example".into())],
    )
    .await;
    assert!(evil.is_err_and(|e| e.contains("403")));
    Ok(())
}

#[tokio::test]
async fn a_cut_link_ends_a_session_connection_and_says_why() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let relay = Relay::start(s.hub.leaf_port()).await?;
    let _node = session_node(&mut s, "far", relay.port()).await?;
    let (id, _) = start_session(&mut s, "far", 0.0).await?;
    let exec = format!("ws://{}/api/v1/tasks/{id}/exec", addr(&s));
    let mut sh = ws_connect(addr(&s), &exec, &[bearer(&s)])
        .await
        .map_err(|e| anyhow!(e))?;
    sh.send(Message::Binary(b"echo linked\n".to_vec().into()))
        .await?;
    drain(&mut sh, |o, _| o.contains("linked\r\n")).await?;
    relay.cut();
    let (_, texts) = drain(&mut sh, |_, t| !t.is_empty()).await?;
    let said: Value = serde_json::from_str(texts.first().map_or("null", String::as_str))?;
    assert!(
        said["error"]
            .as_str()
            .is_some_and(|e| e.contains("link is down")),
        "{texts:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_node_can_neither_read_nor_inject_another_nodes_tunnel_traffic() -> Result<()> {
    let mut s = Stack::start(Duration::from_secs(60)).await?;
    let a = s.online_node("a").await?;
    let b = {
        let hub = s.hub.leaf_port();
        session_node(&mut s, "b", hub)
    }
    .await?;
    let (id, _) = start_session(&mut s, "b", 0.0).await?;
    // Node A controls its own leaf server: it listens to every tunnel subject.
    let on_a = agent_client(&a.leaf, None).await?;
    let mut a_sees = on_a.subscribe("ud.tunnel.>").await?;
    on_a.flush().await?;
    // The hub sees B's tunnel (so the test would notice traffic at all).
    let hub = s.server.state.commands.store().client().clone();
    let mut hub_sees = hub.subscribe(format!("ud.tunnel.{}.>", b.id)).await?;
    hub.flush().await?;

    let api_ws = format!("ws://{}/api/v1/tasks/{id}/ports/8888", addr(&s));
    let mut fwd = ws_connect(addr(&s), &api_ws, &[bearer(&s)])
        .await
        .map_err(|e| anyhow!(e))?;
    let first = tokio::time::timeout(Duration::from_secs(10), hub_sees.next())
        .await?
        .ok_or_else(|| anyhow!("the hub saw no tunnel frame"))?;
    let conn = first
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    // A forges frames into B's connection, both ways.
    for subject in [
        format!("{}.{conn}", edge::tunnel_from(&b.id)),
        format!("{}.{conn}", edge::tunnel_to(&b.id)),
    ] {
        for seq in 0..4u64 {
            on_a.publish(
                subject.clone(),
                ud_tunnel::frame::Frame::encode(ud_tunnel::frame::Kind::Data, seq, b"FORGED-BY-A"),
            )
            .await?;
        }
    }
    on_a.flush().await?;
    fwd.send(Message::Binary(
        b"GET /headers HTTP/1.0\r\n\r\n".to_vec().into(),
    ))
    .await?;
    let (got, texts) = drain(&mut fwd, |_, _| false).await?;
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got} {texts:?}");
    assert!(
        !got.contains("FORGED") && texts.is_empty(),
        "{got} {texts:?}"
    );
    // Nothing of B's reached A, and nothing of A's reached the hub.
    let mut hub_frames = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), hub_sees.next()).await
    {
        hub_frames += 1;
        assert!(
            !m.payload.windows(6).any(|w| w == b"FORGED"),
            "an injected frame reached the hub"
        );
    }
    assert!(hub_frames > 2, "{hub_frames}");
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), a_sees.next()).await {
        // Its own forgeries echo back on its own server.
        if m.payload.windows(6).any(|w| w == b"FORGED") {
            continue;
        }
        assert!(
            !m.subject.as_str().contains(&b.id.to_string()),
            "node A saw {}",
            m.subject
        );
    }
    Ok(())
}
