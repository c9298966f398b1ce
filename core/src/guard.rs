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
use tracing::{debug, warn};

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
    if !lines.next().is_some_and(|first| status_ok(first, stored)) {
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

fn status_ok(first: &str, stored: bool) -> bool {
    status(first, stored).is_some()
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

/// Copies the complete protocol operations at the start of `input` to
/// `out`, rewriting unreadable header blocks, and returns how many bytes it
/// took; an incomplete operation at the end waits for more.
pub fn filter(input: &[u8], out: &mut Vec<u8>) -> usize {
    let mut pos = 0;
    while let Some(eol) = line_end(&input[pos..]) {
        let rest = &input[pos..];
        let line = &rest[..eol];
        let op = line
            .iter()
            .position(|b| b.is_ascii_whitespace())
            .map_or(line, |i| &line[..i]);
        let args: Vec<&[u8]> = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|a| !a.is_empty())
            .collect();
        let number =
            |a: Option<&&[u8]>| -> Option<usize> { std::str::from_utf8(a?).ok()?.parse().ok() };
        let frame = if op.eq_ignore_ascii_case(b"HMSG") && args.len() >= 5 {
            match (number(args.get(args.len() - 2)), number(args.last())) {
                (Some(hdr), Some(total)) if hdr <= total => Some((Some(hdr), total)),
                _ => None,
            }
        } else if op.eq_ignore_ascii_case(b"MSG") && args.len() >= 4 {
            number(args.last()).map(|total| (None, total))
        } else {
            None
        };
        let Some((hdr, total)) = frame else {
            // Any other operation is one line.
            out.extend_from_slice(&rest[..eol + 2]);
            pos += eol + 2;
            continue;
        };
        let len = eol + 2 + total + 2;
        if rest.len() < len {
            break;
        }
        let body = &rest[eol + 2..eol + 2 + total];
        let rewritten = hdr.and_then(|hdr| {
            // args: HMSG subject sid [reply] hdr total
            let stored = args.len() == 6 && args[3].starts_with(STORED_REPLY);
            sanitize(&body[..hdr], stored).map(|block| (hdr, block))
        });
        match rewritten {
            None => out.extend_from_slice(&rest[..len]),
            Some((hdr, block)) => {
                let subject = String::from_utf8_lossy(args[1]);
                warn!(%subject, "a message's headers were unreadable; rewritten");
                for a in &args[..args.len() - 2] {
                    out.extend_from_slice(a);
                    out.push(b' ');
                }
                let payload = &body[hdr..];
                out.extend_from_slice(
                    format!("{} {}\r\n", block.len(), block.len() + payload.len()).as_bytes(),
                );
                out.extend_from_slice(&block);
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
            }
        }
        pos += len;
    }
    pos
}

/// Relays one client connection to `upstream` until either side closes.
async fn relay(client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
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
        loop {
            if from_server.read_buf(&mut buf).await? == 0 {
                return to_client.shutdown().await;
            }
            out.clear();
            let used = filter(&buf, &mut out);
            buf.advance(used);
            to_client.write_all(&out).await?;
        }
    };
    // When one direction ends the other has nothing left to do.
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Starts a guard for each of `upstreams` (host, port) and returns the local
/// addresses to connect to instead, in the same order. The guards live as
/// long as the runtime.
pub async fn start(upstreams: &[SocketAddr]) -> std::io::Result<Vec<SocketAddr>> {
    let mut local = Vec::new();
    for &upstream in upstreams {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        local.push(listener.local_addr()?);
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((client, _)) => {
                        tokio::spawn(async move {
                            if let Err(e) = relay(client, upstream).await {
                                debug!(error = %e, %upstream, "guarded connection ended");
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

    proptest! {
        /// Whatever the bytes, the result reads cleanly, and reading it
        /// again changes nothing.
        #[test]
        fn sanitized_blocks_are_readable(
            lines in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![
                    Just(b'\r'), Just(b'\n'), Just(b':'), Just(b' '), Just(0xffu8),
                    b'a'..=b'e', Just(b'1'),
                ], 0..12),
                0..6),
            stored in any::<bool>(),
        ) {
            let mut block = b"NATS/1.0".to_vec();
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
