//! The `UniDesk-Signature` header: `t=<unix seconds>,v1=<hex>`, where the
//! hex is HMAC-SHA256 under the webhook's key of `<t>.<body>`. A receiver
//! recomputes it and refuses a time too far from its own (a replay).

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const HEADER: &str = "UniDesk-Signature";

fn mac(secret: &str, t: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The header's value for `body` sent at `t` (Unix seconds).
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let tag = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(tag))
}

/// Whether `header` signs `body` under `secret` at a time within
/// `tolerance_secs` of `now` (Unix seconds).
pub fn verify(secret: &str, header: &str, body: &[u8], now: i64, tolerance_secs: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    (now - t).abs() <= tolerance_secs && mac(secret, t, body).verify_slice(&v1).is_ok()
}

/// A new webhook key: 32 random bytes, hex.
pub fn new_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_key_body_and_time() {
        let h = signature("k", 1_000, b"{\"a\":1}");
        assert!(h.starts_with("t=1000,v1="));
        assert!(verify("k", &h, b"{\"a\":1}", 1_100, 300));
        assert!(!verify("other", &h, b"{\"a\":1}", 1_100, 300));
        assert!(!verify("k", &h, b"{\"a\":2}", 1_100, 300));
        // Replayed later than the tolerance.
        assert!(!verify("k", &h, b"{\"a\":1}", 1_400, 300));
        assert!(!verify("k", "t=1000", b"{\"a\":1}", 1_000, 300));
        assert_ne!(new_secret(), new_secret());
    }
}
