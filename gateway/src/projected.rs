//! Read-your-writes: how far each projector has got, learnt from the
//! `ud.sys.projected.<stream>` notices that projectors publish after commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use ud_projections::{Db, ProjectionError};
use ud_schemas::{streams, subjects};

#[derive(Clone)]
pub struct Projected {
    streams: Arc<HashMap<String, watch::Sender<u64>>>,
}

impl Projected {
    /// Subscribes to the notices, then reads the stored checkpoints.
    pub async fn start(client: &async_nats::Client, db: &Db) -> Result<Self, ProjectionError> {
        let mut sub = client
            .subscribe(format!("{}.>", subjects::PROJECTED_PREFIX))
            .await
            .map_err(|e| ProjectionError::Stream(e.into()))?;
        let mut map = HashMap::new();
        for s in streams::PROJECTED {
            let (tx, _) = watch::channel(db.checkpoint(s).await?);
            map.insert(s.to_owned(), tx);
        }
        let this = Self {
            streams: Arc::new(map),
        };
        let updater = this.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let stream = msg.subject.as_str().rsplit('.').next().unwrap_or_default();
                let seq = std::str::from_utf8(&msg.payload)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                if let (Some(tx), Some(seq)) = (updater.streams.get(stream), seq) {
                    tx.send_if_modified(|cur| {
                        let newer = seq > *cur;
                        if newer {
                            *cur = seq;
                        }
                        newer
                    });
                }
            }
        });
        Ok(this)
    }

    /// Waits until `stream` is projected up to `seq`; false on timeout.
    pub async fn wait(&self, stream: &str, seq: u64, timeout: Duration) -> bool {
        let Some(tx) = self.streams.get(stream) else {
            return false;
        };
        let mut rx = tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|cur| *cur >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}
