//! `ud-sessiond [PORT]` serves (and `ud-sessiond size` prints the terminal's size), on every path prefix,
//! * `.../` an HTML page that opens a WebSocket to `.../ws` and shows the echo,
//! * `.../headers` the request's headers, one per line,
//! * `.../bytes/N` N bytes,
//! * `.../ws` a WebSocket echoing every message.
//!
//! Standard library only, so that it links statically into busybox images.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

const PAGE: &str = r#"<!doctype html><html><head><title>ud-sessiond</title></head><body>
<h1 id="title">session page</h1><p id="ws">connecting</p>
<script>
const u = new URL('ws', location.href.endsWith('/') ? location.href : location.href + '/');
u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
const s = new WebSocket(u);
s.onopen = () => s.send('ping-123');
s.onmessage = (m) => { document.getElementById('ws').textContent = 'echo: ' + m.data; };
s.onerror = () => { document.getElementById('ws').textContent = 'error'; };
</script></body></html>"#;

#[repr(C)]
struct Winsize {
    rows: u16,
    cols: u16,
    x: u16,
    y: u16,
}

extern "C" {
    fn ioctl(fd: i32, request: u64, ...) -> i32;
}

/// `ud-sessiond size`: the terminal's size as `ROWS COLS` (what `stty size`
/// prints, which busybox cannot in every image).
fn print_size() {
    let mut w = Winsize { rows: 0, cols: 0, x: 0, y: 0 };
    // TIOCGWINSZ on standard input.
    let r = unsafe { ioctl(0, 0x5413, &mut w as *mut Winsize) };
    if r != 0 {
        eprintln!("not a terminal");
        std::process::exit(1);
    }
    println!("size {} {}", w.rows, w.cols);
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("size") {
        return print_size();
    }
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(8888);
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("cannot listen on {port}: {e}");
        std::process::exit(1)
    });
    println!("listening on {port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = handle(stream);
        });
    }
}

fn handle(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let path = path.split('?').next().unwrap_or("/").to_owned();
    if path.ends_with("/ws") {
        let Some(key) = header("sec-websocket-key") else {
            return respond(&mut out, "400 Bad Request", "text/plain", b"not a websocket");
        };
        let accept = base64(&sha1(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes()));
        write!(
            out,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )?;
        return echo(&mut reader, &mut out);
    }
    if path.ends_with("/headers") {
        let body: String = headers.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        return respond(&mut out, "200 OK", "text/plain", body.as_bytes());
    }
    if let Some(n) = path.rsplit_once("/bytes/").and_then(|(_, n)| n.parse::<usize>().ok()) {
        write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n")?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            out.write_all(&chunk[..k])?;
            left -= k;
        }
        return out.flush();
    }
    respond(&mut out, "200 OK", "text/html", PAGE.as_bytes())
}

fn respond(out: &mut TcpStream, status: &str, ty: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ty}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)?;
    out.flush()
}

/// Echoes WebSocket messages (client frames are masked) until a close.
fn echo(r: &mut impl Read, w: &mut TcpStream) -> std::io::Result<()> {
    loop {
        let mut h = [0u8; 2];
        r.read_exact(&mut h)?;
        let op = h[0] & 0x0f;
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            len = u64::from_be_bytes(b);
        }
        let mut mask = [0u8; 4];
        if h[1] & 0x80 != 0 {
            r.read_exact(&mut mask)?;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        match op {
            0x8 => {
                w.write_all(&[0x88, 0])?;
                return w.flush();
            }
            0x9 => frame(w, 0xA, &data)?,
            0x1 | 0x2 => frame(w, op, &data)?,
            _ => {}
        }
    }
}

fn frame(w: &mut TcpStream, op: u8, data: &[u8]) -> std::io::Result<()> {
    let mut f = vec![0x80 | op];
    match data.len() {
        n if n < 126 => f.push(n as u8),
        n if n < 65536 => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(data);
    w.write_all(&f)?;
    w.flush()
}

fn sha1(msg: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut m = msg.to_vec();
    let bits = (msg.len() as u64) * 8;
    m.push(0x80);
    while m.len() % 64 != 56 {
        m.push(0);
    }
    m.extend_from_slice(&bits.to_be_bytes());
    for block in m.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        s.push(A[(n >> 18) as usize & 63] as char);
        s.push(A[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 { A[(n >> 6) as usize & 63] as char } else { '=' });
        s.push(if c.len() > 2 { A[n as usize & 63] as char } else { '=' });
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_accept_key_of_rfc_6455() {
        let k = super::base64(&super::sha1(b"dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11"));
        assert_eq!(k, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
