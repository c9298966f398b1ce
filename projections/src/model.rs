//! The read models: how each one's events are keyed, folded into an
//! aggregate and stored as rows. The live projector and the replay share
//! them; they differ only in how many events they fold before writing.

use std::collections::HashMap;
use std::future::Future;

use deadpool_postgres::Transaction;
use ud_schemas::codec::EventEnvelope;
use ud_schemas::{Event, NodeEvent, NodeId, PipelineId, ScheduleId, TaskId, TokenId};

use crate::db;
use crate::rows::{self, NodeRow, PipelineFold, ScheduleFold, TaskRow, TokenRow};
use crate::ProjectionError;

/// Events that could not be applied, by sequence, with why.
pub(crate) type Failures = Vec<(u64, String)>;

/// One read model.
pub(crate) trait Model {
    type Key: std::hash::Hash + Eq + Ord + Copy + Send + Sync + 'static;
    /// An aggregate as folded from its events.
    type Fold: Clone + Send + Sync + 'static;
    /// The table its rows are in.
    const TABLE: &'static str;

    fn key(env: &EventEnvelope) -> Option<Self::Key>;
    fn uuid(key: Self::Key) -> uuid::Uuid;
    fn key_of(fold: &Self::Fold) -> Self::Key;
    /// `None`: the event is not for this model (or is to be skipped).
    fn apply(
        fold: Option<Self::Fold>,
        env: &EventEnvelope,
        seq: u64,
    ) -> Option<Result<Self::Fold, String>>;
    async fn load(
        tx: &Transaction<'_>,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<Self::Fold>, ProjectionError>;
    /// Writes aggregates as rows, replacing the stored ones.
    fn store(
        tx: &Transaction<'_>,
        folds: Vec<Self::Fold>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
    /// Writes many aggregates at once (a replay, on a task of its own while
    /// the reading goes on); `fresh`: none is stored yet.
    fn store_many(
        tx: &Transaction<'_>,
        folds: Vec<&Self::Fold>,
        fresh: bool,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        let _ = fresh;
        Self::store(tx, folds.into_iter().cloned().collect())
    }
    /// Whether an aggregate is unlikely to change again (a finished task): a
    /// replay writes such ones early, while it goes on reading.
    fn settled(fold: &Self::Fold) -> bool {
        let _ = fold;
        false
    }
    /// Whether [`Model::apply_each`] keeps rows of its own.
    const EACH: bool = false;
    /// Rows kept by applying each event on its own, in order, beside the
    /// folded ones (projects and their members, in the auth stream).
    async fn apply_each(
        c: &impl deadpool_postgres::GenericClient,
        decoded: &[(u64, EventEnvelope)],
    ) -> Result<(), ProjectionError> {
        let _ = (c, decoded);
        Ok(())
    }
}

/// Applies a batch in one transaction: loads the aggregates it touches,
/// folds its events into them and stores each once.
pub(crate) async fn apply<M: Model>(
    tx: &Transaction<'_>,
    decoded: &[(u64, EventEnvelope)],
) -> Result<Failures, ProjectionError> {
    let ids: Vec<uuid::Uuid> = keys_of::<M>(decoded).into_iter().map(M::uuid).collect();
    let mut folds: HashMap<M::Key, M::Fold> = M::load(tx, &ids)
        .await?
        .into_iter()
        .map(|f| (M::key_of(&f), f))
        .collect();
    let (touched, failures) = fold_into::<M, _>(&mut folds, decoded);
    let folds = touched
        .into_iter()
        .filter_map(|k| folds.remove(&k))
        .collect();
    M::store(tx, folds).await?;
    if M::EACH {
        M::apply_each(tx, decoded).await?;
    }
    Ok(failures)
}

/// Folds events into `folds`; returns the keys touched, in first-touched
/// order, and the events that could not be applied.
pub(crate) fn fold_into<M: Model, S: std::hash::BuildHasher>(
    folds: &mut HashMap<M::Key, M::Fold, S>,
    decoded: &[(u64, EventEnvelope)],
) -> (Vec<M::Key>, Failures) {
    let mut touched: Vec<M::Key> = Vec::new();
    let mut seen: std::collections::HashSet<M::Key> = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for (seq, env) in decoded {
        let Some(key) = M::key(env) else { continue };
        let before = folds.remove(&key);
        let had = before.is_some();
        match M::apply(before, env, *seq) {
            Some(Ok(fold)) => {
                if seen.insert(key) {
                    touched.push(key);
                }
                folds.insert(key, fold);
            }
            // Only an event for an aggregate with nothing folded fails;
            // nothing was taken.
            Some(Err(e)) => {
                debug_assert!(!had, "a failed apply loses its aggregate");
                failures.push((*seq, e));
            }
            None => {}
        }
    }
    (touched, failures)
}

/// The distinct aggregates of a batch, in order.
pub(crate) fn keys_of<M: Model>(decoded: &[(u64, EventEnvelope)]) -> Vec<M::Key> {
    let mut keys: Vec<M::Key> = decoded.iter().filter_map(|(_, e)| M::key(e)).collect();
    keys.sort();
    keys.dedup();
    keys
}

pub(crate) struct Tasks;

impl Model for Tasks {
    type Key = TaskId;
    type Fold = TaskRow;
    const TABLE: &'static str = "tasks";

    fn key(env: &EventEnvelope) -> Option<TaskId> {
        match &env.event {
            Event::Task(id, _) => Some(*id),
            _ => None,
        }
    }
    fn uuid(key: TaskId) -> uuid::Uuid {
        key.0
    }
    fn key_of(fold: &TaskRow) -> TaskId {
        fold.id
    }
    fn apply(
        row: Option<TaskRow>,
        env: &EventEnvelope,
        seq: u64,
    ) -> Option<Result<TaskRow, String>> {
        match &env.event {
            Event::Task(id, e) => {
                Some(rows::apply_task(row, *id, e, &env.meta.actor, seq).map_err(|e| e.to_string()))
            }
            _ => None,
        }
    }
    async fn load(
        tx: &Transaction<'_>,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<TaskRow>, ProjectionError> {
        db::load_tasks(tx, ids).await
    }
    async fn store(tx: &Transaction<'_>, mut rows: Vec<TaskRow>) -> Result<(), ProjectionError> {
        rows.iter_mut().for_each(TaskRow::scrub);
        db::upsert_tasks(tx, &rows).await
    }
    fn settled(row: &TaskRow) -> bool {
        row.state.is_terminal()
    }
    async fn store_many(
        tx: &Transaction<'_>,
        rows: Vec<&TaskRow>,
        fresh: bool,
    ) -> Result<(), ProjectionError> {
        let rows: Vec<std::borrow::Cow<'_, TaskRow>> =
            rows.into_iter().map(TaskRow::scrubbed).collect();
        db::copy_tasks(tx, &rows, fresh).await
    }
}

pub(crate) struct Nodes;

impl Model for Nodes {
    type Key = NodeId;
    type Fold = NodeRow;
    const TABLE: &'static str = "nodes";

    fn key(env: &EventEnvelope) -> Option<NodeId> {
        match &env.event {
            Event::Node(id, _) => Some(*id),
            _ => None,
        }
    }
    fn uuid(key: NodeId) -> uuid::Uuid {
        key.0
    }
    fn key_of(fold: &NodeRow) -> NodeId {
        fold.id
    }
    fn apply(
        row: Option<NodeRow>,
        env: &EventEnvelope,
        seq: u64,
    ) -> Option<Result<NodeRow, String>> {
        match &env.event {
            // A heartbeat may be projected before its node's registration
            // (another stream); the next one will land.
            Event::Node(_, NodeEvent::Heartbeat(_)) if row.is_none() => None,
            Event::Node(id, e) => {
                Some(rows::apply_node(row, *id, e, seq).map_err(|e| e.to_string()))
            }
            _ => None,
        }
    }
    async fn load(
        tx: &Transaction<'_>,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<NodeRow>, ProjectionError> {
        db::load_nodes(tx, ids).await
    }
    async fn store(tx: &Transaction<'_>, mut rows: Vec<NodeRow>) -> Result<(), ProjectionError> {
        rows.iter_mut().for_each(NodeRow::scrub);
        db::upsert_nodes(tx, &rows).await
    }
}

pub(crate) struct Tokens;

impl Model for Tokens {
    type Key = TokenId;
    type Fold = TokenRow;
    const TABLE: &'static str = "api_tokens";

    fn key(env: &EventEnvelope) -> Option<TokenId> {
        match &env.event {
            Event::Auth(id, _) => Some(*id),
            _ => None,
        }
    }
    fn uuid(key: TokenId) -> uuid::Uuid {
        key.0
    }
    fn key_of(fold: &TokenRow) -> TokenId {
        fold.id
    }
    fn apply(
        row: Option<TokenRow>,
        env: &EventEnvelope,
        _seq: u64,
    ) -> Option<Result<TokenRow, String>> {
        match &env.event {
            Event::Auth(id, e) => Some(rows::apply_token(row, *id, e).map_err(|e| e.to_string())),
            _ => None,
        }
    }
    async fn load(
        tx: &Transaction<'_>,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<TokenRow>, ProjectionError> {
        db::load_tokens(tx, ids).await
    }
    async fn store(tx: &Transaction<'_>, mut rows: Vec<TokenRow>) -> Result<(), ProjectionError> {
        rows.iter_mut().for_each(TokenRow::scrub);
        db::upsert_tokens(tx, &rows).await
    }
    const EACH: bool = true;
    async fn apply_each(
        c: &impl deadpool_postgres::GenericClient,
        decoded: &[(u64, EventEnvelope)],
    ) -> Result<(), ProjectionError> {
        let changes: Vec<_> = decoded
            .iter()
            .filter_map(|(_, env)| match &env.event {
                Event::Project(p, e) => Some(rows::project_change(p, e, &env.meta.actor)),
                _ => None,
            })
            .collect();
        db::apply_projects(c, &changes).await
    }
}

pub(crate) struct Pipelines;

impl Model for Pipelines {
    type Key = PipelineId;
    type Fold = PipelineFold;
    const TABLE: &'static str = "pipelines";

    fn key(env: &EventEnvelope) -> Option<PipelineId> {
        match &env.event {
            Event::Pipeline(id, _) => Some(*id),
            _ => None,
        }
    }
    fn uuid(key: PipelineId) -> uuid::Uuid {
        key.0
    }
    fn key_of(fold: &PipelineFold) -> PipelineId {
        fold.state.id
    }
    fn apply(
        fold: Option<PipelineFold>,
        env: &EventEnvelope,
        seq: u64,
    ) -> Option<Result<PipelineFold, String>> {
        match &env.event {
            Event::Pipeline(id, e) => Some(
                rows::apply_pipeline(fold, *id, e, &env.meta.actor, seq).map_err(|e| e.to_string()),
            ),
            _ => None,
        }
    }
    async fn load(
        tx: &Transaction<'_>,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<PipelineFold>, ProjectionError> {
        Ok(db::load_pipelines(tx, ids)
            .await?
            .iter()
            .filter_map(PipelineFold::from_row)
            .collect())
    }
    async fn store(tx: &Transaction<'_>, folds: Vec<PipelineFold>) -> Result<(), ProjectionError> {
        let rows: Vec<_> = folds.into_iter().map(PipelineFold::into_row).collect();
        db::upsert_pipelines(tx, &rows).await
    }
}

pub(crate) struct Schedules;

impl Model for Schedules {
    type Key = ScheduleId;
    type Fold = ScheduleFold;
    const TABLE: &'static str = "schedules";

    fn key(env: &EventEnvelope) -> Option<ScheduleId> {
        match &env.event {
            Event::Schedule(id, _) => Some(*id),
            _ => None,
        }
    }
    fn uuid(key: ScheduleId) -> uuid::Uuid {
        key.0
    }
    fn key_of(fold: &ScheduleFold) -> ScheduleId {
        fold.state.id
    }
    fn apply(
        fold: Option<ScheduleFold>,
        env: &EventEnvelope,
        seq: u64,
    ) -> Option<Result<ScheduleFold, String>> {
        match &env.event {
            Event::Schedule(id, e) => Some(
                rows::apply_schedule(fold, *id, e, &env.meta.actor, seq).map_err(|e| e.to_string()),
            ),
            _ => None,
        }
    }
    async fn load(
        tx: &Transaction<'_>,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<ScheduleFold>, ProjectionError> {
        Ok(db::load_schedules(tx, ids)
            .await?
            .iter()
            .filter_map(ScheduleFold::from_row)
            .collect())
    }
    async fn store(tx: &Transaction<'_>, folds: Vec<ScheduleFold>) -> Result<(), ProjectionError> {
        let rows: Vec<_> = folds.into_iter().map(ScheduleFold::into_row).collect();
        db::upsert_schedules(tx, &rows).await
    }
}
