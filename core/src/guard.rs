//! A guard between the main server and nats-server for the connection that
//! reads what others wrote: nodes' reports and requests, and commands from
//! integrations.
//!
//! async-nats reads a message's header block strictly. A carriage return
//! inside a value panics the task that runs the connection, and a line it
//! cannot read (no colon, a name with a space, bytes that are not UTF-8, a
//! status that is not a number) drops the connection. nats-server passes
//! header bytes on as the publisher wrote them, so one node could stop the
//! main server's connection, and a stored message would do it again at every
//! redelivery. A lone line feed is worse: the client takes it as the end of a
//! line where nats-server does not, so a node could slip in a second
//! `Nats-Stream-Source` header that the hub never saw.
//!
//! The guard relays the connection on the loopback interface and rewrites a
//! header block the client would misread into one it reads as nats-server
//! does; a well-formed block passes unchanged. What the client sends passes
//! unchanged.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// The status line every header block starts with.
const VERSION: &str = "NATS/1.0";
/// Reply subjects of messages a consumer delivers from a stream: those are
/// stored messages, which never carry a status.
const STORED_REPLY: &[u8] = b"$JS.ACK.";

/// Whether the client reads `block` as nats-server meant it: UTF-8, lines
/// ending in CR LF with no other CR or LF, a version line (with a numeric
/// status only where one may be), and `name: value` lines with names of
/// visible ASCII (a line starting with white space continues a value).
fn readable(block: &[u8], stored: bool) -> bool {
    let Ok(text) = std::str::from_utf8(block) else {
        return false;
    };
    for (i, &c) in block.iter().enumerate() {
        let lone = match c {
            b'\r' => block.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || block[i - 1] != b'\r',
            _ => false,
        };
        if lone {
            return false;
        }
    }
    let mut lines = text.split("\r\n");
    if lines
        .next()
        .and_then(|first| status(first, stored))
        .is_none()
    {
        return false;
    }
    let mut in_header = false;
    for line in lines {
        if line.is_empty() {
            in_header = false;
        } else if line.starts_with(char::is_whitespace) {
            if !in_header {
                return false;
            }
        } else {
            match line.split_once(':') {
                Some((name, _)) if name_ok(name) => in_header = true,
                _ => return false,
            }
        }
    }
    true
}

fn name_ok(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// The version line, and the status it may carry (`None` if it is unusable).
fn status(first: &str, stored: bool) -> Option<&str> {
    let rest = first.strip_prefix(VERSION)?.trim();
    if rest.is_empty() {
        return Some("");
    }
    if stored {
        return None;
    }
    let code = rest.split_once(' ').map_or(rest, |(c, _)| c.trim());
    code.parse::<async_nats::StatusCode>().ok().map(|_| rest)
}

/// `block` as the client will read it as nats-server meant it, or `None`
/// when it already reads so. Each lone CR or LF becomes a space, bytes that
/// are not UTF-8 become U+FFFD, a status is kept only where one may be, and
/// lines that are not `name: value` are left out.
pub fn sanitize(block: &[u8], stored: bool) -> Option<Vec<u8>> {
    if readable(block, stored) {
        return None;
    }
    let text = String::from_utf8_lossy(block);
    let lines: Vec<String> = text
        .split("\r\n")
        .map(|l| l.replace(['\r', '\n'], " "))
        .collect();
    let mut out = String::with_capacity(block.len());
    let first = lines.first().map(String::as_str).unwrap_or_default();
    out.push_str(VERSION);
    match status(first, stored) {
        Some(s) if !s.is_empty() => {
            out.push(' ');
            out.push_str(s);
        }
        _ => {}
    }
    out.push_str("\r\n");
    let mut in_header = false;
    for line in lines.iter().skip(1) {
        if line.is_empty() {
            in_header = false;
        } else if line.starts_with(char::is_whitespace) {
            if in_header {
                // A continuation: part of the value above.
                out.truncate(out.len() - 2);
                out.push_str(line);
                out.push_str("\r\n");
            }
        } else if let Some((name, value)) = line.split_once(':') {
            in_header = name_ok(name);
            if in_header {
                out.push_str(name);
                out.push_str(": ");
                out.push_str(value.trim());
                out.push_str("\r\n");
            }
        } else {
            in_header = false;
        }
    }
    out.push_str("\r\n");
    Some(out.into_bytes())
}

/// The position of the first CR LF in `b`.
fn line_end(b: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = b[from..].iter().position(|&c| c == b'\n') {
        let at = from + i;
        if at > 0 && b[at - 1] == b'\r' {
            return Some(at - 1);
        }
        from = at + 1;
    }
    None
}

/// Most arguments a message line has: `HMSG subject sid reply hdr total`.
const MAX_ARGS: usize = 6;

/// The arguments of a protocol line, split as nats-server splits them (on
/// spaces and tabs), or `None` if there are more than a message line has.
fn split_args(line: &[u8]) -> Option<([&[u8]; MAX_ARGS], usize)> {
    let mut args: [&[u8]; MAX_ARGS] = [&[]; MAX_ARGS];
    let mut n = 0;
    for a in line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|a| !a.is_empty())
    {
        *args.get_mut(n)? = a;
        n += 1;
    }
    Some((args, n))
}

/// Whether async-nats reads the arguments as nats-server wrote them: text,
/// and no argument it would split further (it splits an `HMSG` line at any
/// white space, a `MSG` line at spaces).
fn args_readable(args: &[&[u8]]) -> bool {
    args.iter().all(|a| match std::str::from_utf8(a) {
        Ok(t) => !t.contains(char::is_whitespace),
        Err(_) => false,
    })
}

/// An argument as the client can read it: bytes that are not UTF-8 become
/// U+FFFD and white space becomes `_`.
fn mend_arg(a: &[u8]) -> String {
    String::from_utf8_lossy(a)
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
}

/// One frame's rewritten form, if it needs one: its line's arguments and
/// its header block.
fn rewrite(args: &[&[u8]], body: &[u8], hdr: Option<usize>) -> Option<Vec<u8>> {
    let line_ok = args_readable(args);
    // A stored message is delivered with an acknowledgement subject
    // (args: subject sid reply hdr total).
    let stored = hdr.is_some() && args.len() == 5 && args[2].starts_with(STORED_REPLY);
    let block = hdr.and_then(|h| sanitize(&body[..h], stored));
    if line_ok && block.is_none() {
        return None;
    }
    let (head, payload) = match hdr {
        Some(h) => (block.as_deref().unwrap_or(&body[..h]), &body[h..]),
        None => (&body[..0], body),
    };
    let sizes = if hdr.is_some() { 2 } else { 1 };
    let mut out = Vec::with_capacity(body.len() + 64);
    for a in &args[..args.len() - sizes] {
        out.extend_from_slice(mend_arg(a).as_bytes());
        out.push(b' ');
    }
    let total = head.len() + payload.len();
    let sizes = match hdr {
        Some(_) => format!("{} {total}\r\n", head.len()),
        None => format!("{total}\r\n"),
    };
    out.extend_from_slice(sizes.as_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// Takes the complete protocol operations at the start of `input` and
/// returns how many bytes they are. If any needed rewriting, `out` holds
/// what to send for those bytes; if none did, `out` stays empty and the
/// bytes go on as they are. An incomplete operation at the end waits.
pub fn filter(input: &[u8], out: &mut Vec<u8>) -> usize {
    let (mut pos, mut sent) = (0, 0);
    while let Some(eol) = line_end(&input[pos..]) {
        let rest = &input[pos..];
        let number = |a: &[u8]| std::str::from_utf8(a).ok()?.parse::<usize>().ok();
        let (all, n) = split_args(&rest[..eol]).unwrap_or(([&[]; MAX_ARGS], 0));
        let frame = match all[0] {
            b"HMSG" if n == 5 || n == 6 => match (number(all[n - 2]), number(all[n - 1])) {
                (Some(h), Some(total)) if h <= total => Some((Some(h), total)),
                _ => None,
            },
            b"MSG" if n == 4 || n == 5 => number(all[n - 1]).map(|total| (None, total)),
            _ => None,
        };
        let Some((hdr, total)) = frame else {
            // Any other operation is one line.
            pos += eol + 2;
            continue;
        };
        let args = &all[1..n];
        let len = eol + 2 + total + 2;
        if rest.len() < len {
            break;
        }
        if let Some(frame) = rewrite(args, &rest[eol + 2..eol + 2 + total], hdr) {
            note_rewrite(args);
            out.extend_from_slice(&input[sent..pos]);
            out.extend_from_slice(if hdr.is_some() { b"HMSG " } else { b"MSG " });
            out.extend_from_slice(&frame);
            sent = pos + len;
        }
        pos += len;
    }
    if sent > 0 {
        out.extend_from_slice(&input[sent..pos]);
    }
    pos
}

/// Says that a message was rewritten, at most once a second (a stored
/// message comes back at every redelivery).
fn note_rewrite(args: &[&[u8]]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let more = SINCE.fetch_add(1, Ordering::Relaxed);
    if LAST.swap(now, Ordering::Relaxed) != now {
        SINCE.store(0, Ordering::Relaxed);
        let subject = args.first().map(|a| mend_arg(a)).unwrap_or_default();
        warn!(%subject, also = more, "a message the client could not read was rewritten");
    }
}

/// Relays one client connection to `upstream` (host, port; resolved anew
/// each time, every address tried) until either side closes.
async fn relay(client: TcpStream, upstream: &(String, u16)) -> std::io::Result<()> {
    let server = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((upstream.0.as_str(), upstream.1)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting timed out"))??;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = async {
        tokio::io::copy(&mut from_client, &mut to_server).await?;
        to_server.shutdown().await
    };
    let down = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut first = true;
        loop {
            if from_server.read_buf(&mut buf).await? == 0 {
                return to_client.shutdown().await;
            }
            if std::mem::take(&mut first) && tls_required(&buf) {
                return Err(std::io::Error::other(
                    "the server requires TLS, which the guard cannot read: name it with tls://",
                ));
            }
            out.clear();
            let used = filter(&buf, &mut out);
            if out.is_empty() {
                to_client.write_all(&buf[..used]).await?;
            } else {
                to_client.write_all(&out).await?;
            }
            buf.advance(used);
            if buf.capacity() > 1 << 20 && buf.is_empty() {
                buf = BytesMut::with_capacity(64 * 1024);
            }
            if out.capacity() > 1 << 20 {
                out = Vec::with_capacity(64 * 1024);
            }
        }
    };
    // When one direction ends the other has nothing left to do.
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Whether the server's greeting asks for TLS.
fn tls_required(greeting: &[u8]) -> bool {
    let line = line_end(greeting).map_or(greeting, |e| &greeting[..e]);
    line.starts_with(b"INFO ")
        && String::from_utf8_lossy(line)
            .replace(' ', "")
            .contains("\"tls_required\":true")
}

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts a guard for each of `upstreams` (host, port) and returns the local
/// addresses to connect to instead, in the same order. The guards live as
/// long as the runtime.
pub async fn start(upstreams: &[(String, u16)]) -> std::io::Result<Vec<SocketAddr>> {
    let mut local = Vec::new();
    for upstream in upstreams {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        local.push(listener.local_addr()?);
        let upstream = std::sync::Arc::new(upstream.clone());
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((client, _)) => {
                        let upstream = upstream.clone();
                        tokio::spawn(async move {
                            if let Err(e) = relay(client, &upstream).await {
                                warn!(error = %e, host = %upstream.0, port = upstream.1, "guarded connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "guard cannot accept; trying again");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &[u8] = b"NATS/1.0\r\nUd-Event-Type: task.started\r\nNats-Msg-Id: 1\r\n\r\n";

    #[test]
    fn well_formed_blocks_pass_unchanged() {
        assert_eq!(sanitize(GOOD, true), None);
        assert_eq!(
            sanitize(b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", false),
            None
        );
        assert_eq!(sanitize(b"NATS/1.0\r\nA: b\r\n  more\r\n\r\n", false), None);
    }

    #[test]
    fn a_lone_line_feed_cannot_start_a_header_of_its_own() {
        let forged = b"NATS/1.0\r\nX: a\nNats-Stream-Source: EDGE_other\r\nNats-Stream-Source: EDGE_mine\r\n\r\n";
        let block = sanitize(forged, true).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&block),
            "NATS/1.0\r\nX: a Nats-Stream-Source: EDGE_other\r\nNats-Stream-Source: EDGE_mine\r\n\r\n"
        );
    }

    #[test]
    fn unreadable_parts_are_mended_or_left_out() {
        let cases: [(&[u8], bool, &str); 5] = [
            (
                b"NATS/1.0\r\nX: a\rb\r\n\r\n",
                true,
                "NATS/1.0\r\nX: a b\r\n\r\n",
            ),
            (
                b"NATS/1.0\r\nno colon\r\nY: 1\r\n\r\n",
                true,
                "NATS/1.0\r\nY: 1\r\n\r\n",
            ),
            (b"NATS/1.0\r\nbad name: 1\r\n\r\n", true, "NATS/1.0\r\n\r\n"),
            (
                b"NATS/1.0\r\nX: \xff\r\n\r\n",
                true,
                "NATS/1.0\r\nX: \u{fffd}\r\n\r\n",
            ),
            // A stored message with a status would look like a server notice.
            (
                b"NATS/1.0 409 Consumer Deleted\r\n\r\n",
                true,
                "NATS/1.0\r\n\r\n",
            ),
        ];
        for (block, stored, want) in cases {
            let got = sanitize(block, stored).unwrap_or_default();
            assert_eq!(String::from_utf8_lossy(&got), want, "{block:?}");
        }
        let got = sanitize(b"HTTP/1.1\r\n\r\n", false).unwrap_or_default();
        assert_eq!(got, b"NATS/1.0\r\n\r\n");
    }

    #[test]
    fn filter_rewrites_only_unreadable_frames_and_waits_for_whole_ones() {
        let bad = b"NATS/1.0\r\nX: a\rb\r\n\r\n";
        let mut input = Vec::new();
        input.extend_from_slice(b"PING\r\nMSG a 1 3\r\nabc\r\n");
        input.extend_from_slice(
            format!("HMSG b 2 $JS.ACK.x {} {}\r\n", bad.len(), bad.len() + 2).as_bytes(),
        );
        input.extend_from_slice(bad);
        input.extend_from_slice(b"hi\r\n");
        input.extend_from_slice(b"HMSG c 3 10 12\r\nNATS/1.0\r\n");
        let mut out = Vec::new();
        let used = filter(&input, &mut out);
        let fixed = b"NATS/1.0\r\nX: a b\r\n\r\n";
        let mut want = Vec::new();
        want.extend_from_slice(b"PING\r\nMSG a 1 3\r\nabc\r\n");
        want.extend_from_slice(
            format!("HMSG b 2 $JS.ACK.x {} {}\r\n", fixed.len(), fixed.len() + 2).as_bytes(),
        );
        want.extend_from_slice(fixed);
        want.extend_from_slice(b"hi\r\n");
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&want)
        );
        // The last frame is incomplete: it stays for the next read.
        assert_eq!(&input[used..], b"HMSG c 3 10 12\r\nNATS/1.0\r\n");
    }

    #[test]
    fn readable_frames_are_taken_without_a_copy() {
        let block = "NATS/1.0\r\nX: 1\r\nY: 22\r\n\r\n";
        let input = format!(
            "PING\r\nMSG a 1 _INBOX.x 3\r\nabc\r\nHMSG b 2 {} {}\r\n{block}hi\r\n",
            block.len(),
            block.len() + 2
        );
        let mut out = Vec::new();
        assert_eq!(filter(input.as_bytes(), &mut out), input.len());
        assert!(out.is_empty());
    }

    proptest! {
        /// Whatever the bytes, the result reads cleanly, and reading it
        /// again changes nothing.
        #[test]
        fn sanitized_blocks_are_readable(
            lines in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![
                    Just(b'\r'), Just(b'\n'), Just(b':'), Just(b' '), Just(b'\t'), Just(0xffu8),
                    // the two bytes of U+00A0, a no-break space
                    Just(0xc2u8), Just(0xa0u8),
                    b'a'..=b'e', Just(b'1'),
                ], 0..12),
                0..6),
            first in prop_oneof![
                Just(&b"NATS/1.0"[..]), Just(&b"NATS/1.0 503"[..]),
                Just(&b"NATS/1.0 100 Idle Heartbeat"[..]), Just(&b"NATS/1.0 x"[..]), Just(&b""[..]),
            ],
            stored in any::<bool>(),
        ) {
            let mut block = first.to_vec();
            for l in &lines {
                block.extend_from_slice(b"\r\n");
                block.extend_from_slice(l);
            }
            block.extend_from_slice(b"\r\n\r\n");
            let out = sanitize(&block, stored).unwrap_or(block);
            prop_assert!(readable(&out, stored), "{:?}", String::from_utf8_lossy(&out));
            prop_assert_eq!(sanitize(&out, stored), None);
        }
    }
}
