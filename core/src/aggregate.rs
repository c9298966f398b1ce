//! One command path for every aggregate: load it by id, decide a command
//! against it, append what was decided expecting the aggregate's last stream
//! sequence, remember the result, and try again after a lost race where the
//! caller asks for it.
//!
//! Tasks, nodes and tokens are each one [`Aggregate`]: a pure `decide` and
//! `evolve` pair and where their events live. Nothing else appends their
//! events: a new aggregate (a pipeline, a session) is one more
//! implementation of the trait.

use std::hash::Hash;
use std::time::Duration;

use ud_schemas::codec::EventMeta;
use ud_schemas::{now_millis, Event, Millis};

use crate::store::{EventStore, Expect, StoreError};

/// An aggregate: its identity, its commands and events, and the pure
/// functions that decide and apply them.
pub trait Aggregate: Clone + Send + Sync + Sized + 'static {
    type Id: Clone + Eq + Hash + std::fmt::Display + Send + Sync + 'static;
    type Command: Clone + Send + Sync;
    type Event: Clone + Send + Sync;
    type Error: std::error::Error + Clone + Send + Sync + 'static;

    /// The stream holding its events.
    const STREAM: &'static str;

    /// The subject filter of one aggregate's events: its concurrency scope.
    fn scope(id: &Self::Id) -> String;
    /// The platform event an event of this aggregate is published as.
    fn wrap(id: Self::Id, event: Self::Event) -> Event;
    /// This aggregate's event, if `event` is one.
    fn unwrap(event: Event) -> Option<(Self::Id, Self::Event)>;
    /// The events a command produces, without side effects.
    fn decide(
        state: Option<&Self>,
        command: Self::Command,
        now: Millis,
    ) -> Result<Vec<Self::Event>, Self::Error>;
    /// Applies one event (no business rules).
    fn evolve(state: Option<Self>, id: Self::Id, event: &Self::Event) -> Option<Self>;
    /// Whether what `command` decides depends on the aggregate's sequence
    /// (true for almost everything; a heartbeat does not).
    fn checked(_command: &Self::Command) -> bool {
        true
    }
    /// Whether no command can change it any more: it is not remembered.
    fn settled(&self) -> bool {
        false
    }
}

/// Folds events into a state.
pub fn fold<'a, A: Aggregate>(
    state: Option<A>,
    id: A::Id,
    events: impl IntoIterator<Item = &'a A::Event>,
) -> Option<A> {
    events
        .into_iter()
        .fold(state, |s, e| A::evolve(s, id.clone(), e))
}

/// What an executed command did.
#[derive(Clone, Debug)]
pub struct Executed<A: Aggregate> {
    /// The events appended (none when the command changed nothing).
    pub events: Vec<A::Event>,
    /// The aggregate after them.
    pub state: Option<A>,
    /// The stream sequence of the last event appended, or of the last one
    /// read when nothing was appended (0: the aggregate has no events).
    pub seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error + 'static> {
    /// The domain refused the command (its rules, not the store).
    #[error(transparent)]
    Rejected(E),
    /// The caller may not see the aggregate.
    #[error("not found")]
    Hidden,
    /// Another command changed the aggregate first.
    #[error("changed concurrently")]
    Conflict,
    #[error(transparent)]
    Store(StoreError),
}

impl<E: std::error::Error + 'static> From<StoreError> for ExecuteError<E> {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Conflict,
            other => Self::Store(other),
        }
    }
}

/// How many times a command lost to a concurrent change is decided again
/// on the aggregate read anew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retries(pub u32);

/// A command to decide against a state the caller already holds (a view
/// folded from the stream): the append's concurrency check refuses it if
/// the aggregate moved on since `seq`. Its `meta` names one event: the
/// stream drops a second event with the same id (`Nats-Msg-Id`) as a repeat.
#[derive(Clone, Debug)]
pub struct Against<A: Aggregate> {
    pub id: A::Id,
    pub state: Option<A>,
    pub seq: u64,
    pub command: A::Command,
    pub meta: EventMeta,
}

/// Loads and changes the aggregates of one kind through the event store.
/// Clones share the store connection and the cache.
#[derive(Clone)]
pub struct Repository<A: Aggregate> {
    store: EventStore,
    /// Aggregates as this process last wrote or read them, with their last
    /// sequence: a command tries the remembered state first (no reads), and
    /// the append's concurrency check refuses it when the aggregate moved
    /// on; then it is read from the stream and decided again. So the cache
    /// saves reads and never decides anything on its own.
    recent: Option<moka::sync::Cache<A::Id, (A, u64)>>,
}

impl<A: Aggregate> Repository<A> {
    /// A repository that reads every aggregate from the stream.
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            recent: None,
        }
    }

    /// A repository remembering up to `capacity` aggregates, each for at
    /// most `ttl` when given (for states that may change elsewhere in ways
    /// an unchecked command would not notice).
    pub fn cached(store: EventStore, capacity: u64, ttl: Option<Duration>) -> Self {
        let mut builder = moka::sync::Cache::builder().max_capacity(capacity);
        if let Some(ttl) = ttl {
            builder = builder.time_to_live(ttl);
        }
        Self {
            store,
            recent: Some(builder.build()),
        }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// The aggregate as its stream has it, with the sequence of its last event.
    pub async fn load(&self, id: &A::Id) -> Result<Option<(A, u64)>, StoreError> {
        let events = self.store.read_subject(A::STREAM, &A::scope(id)).await?;
        let mut state = None;
        let mut last = 0;
        for stored in events {
            if let Some((_, e)) = A::unwrap(stored.envelope.event) {
                state = A::evolve(state, id.clone(), &e);
                last = stored.seq;
            }
        }
        Ok(state.map(|s| (s, last)))
    }

    /// The aggregate as last remembered, or else as its stream has it now.
    pub async fn current(&self, id: &A::Id) -> Result<Option<(A, u64)>, StoreError> {
        if let Some(known) = self.remembered(id) {
            return Ok(Some(known));
        }
        let loaded = self.load(id).await?;
        if let Some((state, seq)) = &loaded {
            self.remember(id.clone(), &Some(state.clone()), *seq);
        }
        Ok(loaded)
    }

    fn remembered(&self, id: &A::Id) -> Option<(A, u64)> {
        self.recent.as_ref()?.get(id)
    }

    fn remember(&self, id: A::Id, state: &Option<A>, seq: u64) {
        let Some(recent) = &self.recent else { return };
        match state {
            Some(s) if !s.settled() => recent.insert(id, (s.clone(), seq)),
            _ => recent.invalidate(&id),
        }
    }

    fn forget(&self, id: &A::Id) {
        if let Some(recent) = &self.recent {
            recent.invalidate(id);
        }
    }

    /// Creates an aggregate that has no events yet, without reading: the
    /// append expects none, so a second creation with the same id is a
    /// [`ExecuteError::Conflict`].
    pub async fn create(
        &self,
        id: A::Id,
        command: A::Command,
        meta: &EventMeta,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        self.decide_and_append(id, None, 0, command, meta).await
    }

    /// Executes a command on the aggregate as it is now: the remembered
    /// state first, then the stream's. A command that lost a race is decided
    /// again on the aggregate read anew, up to `retries` times (with the same
    /// `meta`: the first append may have been stored). `visible`
    /// says whether the caller may see the aggregate (otherwise
    /// [`ExecuteError::Hidden`]).
    pub async fn execute(
        &self,
        id: A::Id,
        command: A::Command,
        meta: &EventMeta,
        retries: Retries,
        visible: impl Fn(&A) -> bool,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        let mut cached = self.remembered(&id);
        let mut lost = 0;
        loop {
            let from_cache = cached.is_some();
            let (state, seq) = match cached.take() {
                Some((s, seq)) => (Some(s), seq),
                None => match self.load(&id).await? {
                    Some((s, seq)) => (Some(s), seq),
                    None => (None, 0),
                },
            };
            if state.as_ref().is_some_and(|s| !visible(s)) {
                return Err(ExecuteError::Hidden);
            }
            match self
                .decide_and_append(id.clone(), state, seq, command.clone(), meta)
                .await
            {
                // What the remembered state refused is decided again on the stream's.
                Err(ExecuteError::Rejected(_) | ExecuteError::Conflict) if from_cache => {
                    self.forget(&id)
                }
                Err(ExecuteError::Conflict) if lost < retries.0 => lost += 1,
                other => return other,
            }
        }
    }

    /// Executes a command against a state the caller holds, once.
    pub async fn execute_on(
        &self,
        against: Against<A>,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        let Against {
            id,
            state,
            seq,
            command,
            meta,
        } = against;
        self.decide_and_append(id, state, seq, command, &meta).await
    }

    /// Executes many commands against states the caller holds, keeping up
    /// to `window` appends in flight, and hands each result to `done` (with
    /// the index of its command) as it arrives. A command that lost a race
    /// is decided again on the aggregate read anew, up to `retries` times.
    pub async fn execute_each<F>(
        &self,
        items: Vec<Against<A>>,
        window: usize,
        retries: Retries,
        mut done: F,
    ) where
        F: FnMut(usize, Result<Executed<A>, ExecuteError<A::Error>>),
    {
        let now = now_millis();
        // Decided here; single events are appended together, pipelined.
        let mut decided = Vec::with_capacity(items.len());
        let mut appends = Vec::with_capacity(items.len());
        let mut one_by_one = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let checked = A::checked(&item.command);
            match A::decide(item.state.as_ref(), item.command.clone(), now) {
                Err(e) => done(i, Err(ExecuteError::Rejected(e))),
                Ok(events) if events.is_empty() => done(
                    i,
                    Ok(Executed {
                        events,
                        state: item.state,
                        seq: item.seq,
                    }),
                ),
                Ok(mut events) if events.len() == 1 => {
                    let expect = expectation(checked, item.state.is_some(), item.seq);
                    let event = events.remove(0);
                    appends.push((
                        A::wrap(item.id.clone(), event.clone()),
                        item.meta.clone(),
                        expect,
                    ));
                    decided.push(Some((i, item, event, checked)));
                }
                Ok(_) => one_by_one.push((i, item)),
            }
        }
        let mut conflicts = Vec::new();
        self.store
            .append_each(appends, window, |k, result| {
                let Some((i, item, event, checked)) = decided.get_mut(k).and_then(Option::take)
                else {
                    return;
                };
                match result {
                    Ok(seq) => {
                        let state = A::evolve(item.state, item.id.clone(), &event);
                        if checked {
                            self.remember(item.id.clone(), &state, seq);
                        }
                        done(
                            i,
                            Ok(Executed {
                                events: vec![event],
                                state,
                                seq,
                            }),
                        );
                    }
                    Err(StoreError::Conflict) => {
                        self.forget(&item.id);
                        if retries.0 > 0 {
                            conflicts.push((i, item));
                        } else {
                            done(i, Err(ExecuteError::Conflict));
                        }
                    }
                    Err(e) => done(i, Err(ExecuteError::Store(e))),
                }
            })
            .await;
        for (i, item) in one_by_one {
            let result = self.execute_on(item).await;
            done(i, result);
        }
        for (i, item) in conflicts {
            let retried = Retries(retries.0 - 1);
            let result = self
                .execute(item.id, item.command, &item.meta, retried, |_| true)
                .await;
            done(i, result);
        }
    }

    async fn decide_and_append(
        &self,
        id: A::Id,
        state: Option<A>,
        seq: u64,
        command: A::Command,
        meta: &EventMeta,
    ) -> Result<Executed<A>, ExecuteError<A::Error>> {
        let checked = A::checked(&command);
        let events =
            A::decide(state.as_ref(), command, now_millis()).map_err(ExecuteError::Rejected)?;
        if events.is_empty() {
            return Ok(Executed { events, state, seq });
        }
        let wrapped: Vec<Event> = events
            .iter()
            .map(|e| A::wrap(id.clone(), e.clone()))
            .collect();
        let expect = expectation(checked, state.is_some(), seq);
        let last = self.store.append_all(&wrapped, meta, expect).await;
        let last = match last {
            Ok(last) => last,
            Err(e) => {
                self.forget(&id);
                return Err(e.into());
            }
        };
        let state = fold(state, id.clone(), &events);
        let seq = last.unwrap_or(seq);
        if checked {
            self.remember(id, &state, seq);
        }
        Ok(Executed { events, state, seq })
    }
}

fn expectation(checked: bool, exists: bool, seq: u64) -> Expect {
    match (checked, exists) {
        (false, _) => Expect::Any,
        (true, false) => Expect::New,
        (true, true) => Expect::LastSeq(seq),
    }
}
