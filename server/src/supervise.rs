//! Every service of the main server by name, started, watched and stopped
//! in one place. A service that ends when nobody asked it to (it returned,
//! failed or panicked) is started again after a backoff; one that keeps
//! ending stops the process with a clear reason, so that no main server runs
//! on with a dead scheduler behind a healthy `/readyz`. What each service is
//! doing is in [`ServiceStates`], which `/readyz` and `/metrics` read.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use ud_gateway::health::{ServiceState, ServiceStates};

/// What a service's run returned: `Err` carries why it stopped.
pub type ServiceResult = Result<(), String>;

/// How a service is kept running.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// First wait before a restart; it doubles (with jitter) up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// More unexpected ends than this within `window` stop the process.
    pub max_restarts: usize,
    pub window: Duration,
    /// How long a stop waits for the service to end on its own before aborting it.
    pub patience: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            max_restarts: 5,
            window: Duration::from_secs(600),
            patience: Duration::ZERO,
        }
    }
}

impl Policy {
    /// A service that is never restarted: its end stops the process.
    pub fn fatal() -> Self {
        Self {
            max_restarts: 0,
            ..Self::default()
        }
    }
}

/// A service that stopped the process, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("service {service} stopped: {reason}")]
pub struct Fatal {
    pub service: String,
    pub reason: String,
}

/// The supervisor of one process's services.
pub struct Supervisor {
    stop: CancellationToken,
    tracker: TaskTracker,
    states: ServiceStates,
    /// The running attempt of each service, to crash it on purpose in tests.
    current: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
    fatal_tx: mpsc::UnboundedSender<Fatal>,
    fatal_rx: mpsc::UnboundedReceiver<Fatal>,
}

impl Default for Supervisor {
    fn default() -> Self {
        let (fatal_tx, fatal_rx) = mpsc::unbounded_channel();
        Self {
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            states: ServiceStates::default(),
            current: Arc::default(),
            fatal_tx,
            fatal_rx,
        }
    }
}

impl Supervisor {
    pub fn states(&self) -> ServiceStates {
        self.states.clone()
    }

    /// Starts `name`, made anew by `make` at each (re)start. `make` is given
    /// a token that is cancelled when the process stops: a service that
    /// can hand over gracefully watches it (it has `policy.patience` to end).
    pub fn spawn<F, Fut>(&self, name: &str, policy: Policy, make: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ServiceResult> + Send + 'static,
    {
        let name = name.to_owned();
        let (stop, states, current, fatal) = (
            self.stop.clone(),
            self.states.clone(),
            self.current.clone(),
            self.fatal_tx.clone(),
        );
        self.tracker.spawn(async move {
            let mut ends: VecDeque<Instant> = VecDeque::new();
            let mut delays = backoff(&policy);
            loop {
                states.set(&name, ServiceState::Running);
                let began = Instant::now();
                let mut run = tokio::spawn(make(stop.child_token()));
                if let Ok(mut c) = current.lock() {
                    c.insert(name.clone(), run.abort_handle());
                }
                let ended = tokio::select! {
                    ended = &mut run => ended,
                    () = stop.cancelled() => {
                        if tokio::time::timeout(policy.patience, &mut run).await.is_err() {
                            run.abort();
                        }
                        states.remove(&name);
                        return;
                    }
                };
                if stop.is_cancelled() {
                    states.remove(&name);
                    return;
                }
                let reason = match ended {
                    Ok(Ok(())) => "it ended".to_owned(),
                    Ok(Err(e)) => e,
                    Err(e) if e.is_panic() => "it panicked".to_owned(),
                    Err(_) => "it was aborted".to_owned(),
                };
                // A service that ran long since its last end starts over with short waits.
                if began.elapsed() > policy.window {
                    delays = backoff(&policy);
                }
                let now = Instant::now();
                ends.push_back(now);
                while ends
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > policy.window)
                {
                    ends.pop_front();
                }
                if ends.len() > policy.max_restarts {
                    error!(service = %name, %reason, "service stopped unexpectedly too often; stopping the process");
                    states.set(&name, ServiceState::Failed { reason: reason.clone() });
                    let _ = fatal.send(Fatal {
                        service: name.clone(),
                        reason,
                    });
                    return;
                }
                let delay = delays.next().unwrap_or(policy.max_delay);
                error!(service = %name, %reason, restart_in_ms = delay.as_millis() as u64, "service stopped unexpectedly; restarting it");
                states.set(&name, ServiceState::Restarting { reason });
                tokio::select! {
                    () = tokio::time::sleep(delay) => info!(service = %name, "service restarting"),
                    () = stop.cancelled() => {
                        states.remove(&name);
                        return;
                    }
                }
            }
        });
    }

    /// Aborts the running attempt of `name` as a crash would (tests and drills).
    pub fn crash(&self, name: &str) -> bool {
        let handle = self.current.lock().ok().and_then(|c| c.get(name).cloned());
        match handle {
            Some(h) => {
                warn!(service = %name, "crashing the service on purpose");
                h.abort();
                true
            }
            None => false,
        }
    }

    /// Waits until a service stops the process.
    pub async fn failed(&mut self) -> Fatal {
        match self.fatal_rx.recv().await {
            Some(f) => f,
            // Every sender lives in `self`: never reached.
            None => futures::future::pending().await,
        }
    }

    /// Stops every service (each has its patience to end on its own) and
    /// waits for them.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Stops every service at once, as a crash of the process would.
    pub fn abort(&self) {
        if let Ok(c) = self.current.lock() {
            for h in c.values() {
                h.abort();
            }
        }
        self.stop.cancel();
    }
}

fn backoff(policy: &Policy) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(policy.first_delay)
        .with_max_delay(policy.max_delay)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn quick(max_restarts: usize) -> Policy {
        Policy {
            first_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            max_restarts,
            window: Duration::from_secs(60),
            patience: Duration::from_millis(100),
        }
    }

    #[tokio::test]
    async fn a_crashed_service_comes_back_and_one_that_keeps_failing_stops_the_process() {
        let mut s = Supervisor::default();
        let starts = Arc::new(AtomicUsize::new(0));
        let (count, states) = (starts.clone(), s.states());
        s.spawn("steady", quick(3), move |stop| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                stop.cancelled().await;
                Ok(())
            }
        });
        while states.get("steady") != Some(ServiceState::Running) {
            tokio::task::yield_now().await;
        }
        assert!(s.crash("steady"));
        while starts.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.spawn("broken", quick(2), |_| async {
            Err("no database".to_owned())
        });
        let fatal = s.failed().await;
        assert_eq!(
            fatal,
            Fatal {
                service: "broken".into(),
                reason: "no database".into()
            }
        );
        assert_eq!(
            states.get("broken"),
            Some(ServiceState::Failed {
                reason: "no database".into()
            })
        );
        assert_eq!(states.get("steady"), Some(ServiceState::Running));
        s.stop().await;
        assert_eq!(states.get("steady"), None);
    }
}
