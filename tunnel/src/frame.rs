//! One tunnel message: a kind byte, a sequence number (big-endian u64,
//! counting every frame one side sends on a connection from 0) and a
//! payload. Pure: no I/O.
//!
//! | kind | payload |
//! | --- | --- |
//! | `OPEN` (0) | JSON [`Open`] |
//! | `OPENED` (1) | u32: the node's window |
//! | `DATA` (2) | bytes; empty: end of stream in this direction |
//! | `CREDIT` (3) | u32: bytes the receiver has consumed |
//! | `RESET` (4) | UTF-8 reason; the connection is over |
//! | `PING` (5) | empty; sent every few seconds so a cut link shows |
//! | `CONTROL` (6) | JSON [`Control`] |

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use ud_schemas::TaskId;

pub const HEADER: usize = 9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Open = 0,
    Opened = 1,
    Data = 2,
    Credit = 3,
    Reset = 4,
    Ping = 5,
    Control = 6,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Open,
            1 => Self::Opened,
            2 => Self::Data,
            3 => Self::Credit,
            4 => Self::Reset,
            5 => Self::Ping,
            6 => Self::Control,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub seq: u64,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a frame of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown frame kind {0}")]
    Kind(u8),
}

impl Frame {
    pub fn encode(kind: Kind, seq: u64, payload: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER + payload.len());
        b.put_u8(kind as u8);
        b.put_u64(seq);
        b.put_slice(payload);
        b.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<Self, FrameError> {
        if b.len() < HEADER {
            return Err(FrameError::Short(b.len()));
        }
        let kind = Kind::from_byte(b[0]).ok_or(FrameError::Kind(b[0]))?;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[1..HEADER]);
        let payload = b.split_off(HEADER);
        Ok(Self {
            kind,
            seq: u64::from_be_bytes(seq),
            payload,
        })
    }
}

/// What a connection reaches on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A TCP port the task declared, in its container.
    Port(u16),
    /// A process started in the task's container (`unidesk task exec`).
    Exec {
        command: Vec<String>,
        tty: bool,
        #[serde(default)]
        cols: u16,
        #[serde(default)]
        rows: u16,
    },
}

/// The first frame of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub task: TaskId,
    pub target: Target,
    /// Bytes the opener will take before it gives credit back.
    pub window: u32,
}

/// What travels beside the bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// The terminal's size changed (to the node).
    Resize { cols: u16, rows: u16 },
    /// The process ended with this code (from the node).
    Exit { code: i64 },
}

/// A connection id: 128 random bits, hex.
pub fn connection_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frames_round_trip(kind in 0u8..7, seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let k = Kind::from_byte(kind).ok_or_else(|| TestCaseError::fail("kind"))?;
            let f = Frame::decode(Frame::encode(k, seq, &payload)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(f, Frame { kind: k, seq, payload: Bytes::from(payload) });
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panic(b in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = Frame::decode(Bytes::from(b));
        }
    }

    #[test]
    fn short_and_unknown_frames_are_refused() {
        assert_eq!(
            Frame::decode(Bytes::from_static(&[2, 0, 0])),
            Err(FrameError::Short(3))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[9, 0, 0, 0, 0, 0, 0, 0, 0])),
            Err(FrameError::Kind(9))
        );
    }

    #[test]
    fn open_is_plain_json() {
        let o = Open {
            task: TaskId::new(),
            target: Target::Port(8888),
            window: 1 << 20,
        };
        let j = serde_json::to_value(&o).unwrap_or_default();
        assert_eq!(j["target"]["port"], 8888);
        let c = serde_json::to_string(&Control::Resize { cols: 80, rows: 24 }).unwrap_or_default();
        assert_eq!(c, r#"{"resize":{"cols":80,"rows":24}}"#);
    }
}
