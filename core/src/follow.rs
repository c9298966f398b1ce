//! Reading a stream through an ordered consumer that notices a dead one.
//!
//! An ordered consumer whose server was restarted is recreated by the
//! client on its own backoff (up to 10 s between tries), and meanwhile it
//! is silent. A reader that hears nothing for [`STALL_CHECK`] asks the
//! stream how far it goes; when it holds more than the reader has read, the
//! reader binds again at once from where it was.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::Ordered};
use futures::StreamExt;

use crate::store::NatsError;

/// How long a reader waits in silence before it checks the stream.
pub const STALL_CHECK: Duration = Duration::from_secs(3);

/// What a reader gets next.
#[derive(Debug)]
pub enum Next {
    Message(Box<jetstream::Message>),
    /// The consumer ended.
    Closed,
    /// Nothing came for [`STALL_CHECK`] while the stream goes to `last`,
    /// beyond the reader's `read`: bind again.
    Stalled {
        read: u64,
        last: u64,
    },
    Failed(NatsError),
}

/// The next message of `messages`, a consumer on `stream` whose reader has
/// read up to stream sequence `read`.
pub async fn next_or_stalled(
    messages: &mut Ordered,
    stream: &mut jetstream::stream::Stream,
    read: u64,
) -> Next {
    loop {
        match tokio::time::timeout(STALL_CHECK, messages.next()).await {
            Ok(Some(Ok(m))) => return Next::Message(Box::new(m)),
            Ok(Some(Err(e))) => return Next::Failed(Box::new(e)),
            Ok(None) => return Next::Closed,
            Err(_) => match stream.info().await {
                Ok(info) if info.state.last_sequence > read => {
                    return Next::Stalled {
                        read,
                        last: info.state.last_sequence,
                    }
                }
                Ok(_) => {}
                Err(e) => return Next::Failed(Box::new(e)),
            },
        }
    }
}
