//! PostgreSQL access: a pool bound to one schema, migrations, batch writers.

use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use ud_schemas::{NodeId, PipelineId, ScheduleId, TaskId, TokenId};

use crate::rows::{NodeRow, PipelineRow, ScheduleRow, TaskRow, TokenRow};
use crate::ProjectionError;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// The read-model database, bound to one schema (`public` for the live one).
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    schema: String,
}

pub(crate) fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Db {
    pub async fn connect(
        url: &str,
        schema: &str,
        max_size: usize,
    ) -> Result<Self, ProjectionError> {
        if !valid_schema(schema) {
            return Err(ProjectionError::Config(format!(
                "schema name {schema:?}: use a-z, 0-9 and '_'"
            )));
        }
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| ProjectionError::Config(format!("database URL: {e}")))?;
        cfg.options(format!("-c search_path={schema}"));
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(max_size)
            .build()
            .map_err(|e| ProjectionError::Config(e.to_string()))?;
        let db = Self {
            pool,
            schema: schema.to_owned(),
        };
        // Fail early with the real reason (wrong password, no server).
        let _probe = db.client().await?;
        Ok(db)
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Object, ProjectionError> {
        self.pool
            .get()
            .await
            .map_err(|e| ProjectionError::Pool(e.into()))
    }

    /// Creates the schema if needed and applies pending migrations. Main
    /// servers started together take turns: one applies them under a
    /// session lock of the schema while the others wait, then find nothing
    /// left to do (a crashed holder's lock ends with its connection).
    pub async fn migrate(&self) -> Result<(), ProjectionError> {
        let mut client = self.client().await?;
        let key = format!("unidesk migrations {}", self.schema);
        client
            .execute("SELECT pg_advisory_lock(hashtext($1))", &[&key])
            .await?;
        let client: &mut tokio_postgres::Client = &mut client;
        let applied = async {
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema))
                .await?;
            embedded::migrations::runner()
                .run_async(client)
                .await
                .map_err(|e| ProjectionError::Migration(e.into()))?;
            Ok::<_, ProjectionError>(())
        }
        .await;
        let unlocked = client
            .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&key])
            .await;
        applied?;
        unlocked?;
        Ok(())
    }

    /// Drops and re-creates the schema, empty and migrated.
    pub async fn reset(&self) -> Result<(), ProjectionError> {
        self.client()
            .await?
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await?;
        self.migrate().await
    }

    pub async fn checkpoint(&self, stream: &str) -> Result<u64, ProjectionError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT seq FROM projection_checkpoints WHERE stream = $1",
                &[&stream],
            )
            .await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0).unsigned_abs()))
    }
}

/// Moves the checkpoint from `from` to `to`; fails if another projector
/// moved it meanwhile, so that no event is ever applied twice.
pub(crate) async fn advance_checkpoint(
    c: &impl GenericClient,
    stream: &str,
    from: u64,
    to: u64,
) -> Result<(), ProjectionError> {
    let n = c
        .execute(
            "INSERT INTO projection_checkpoints (stream, seq, updated_at) VALUES ($1, $3, now())
             ON CONFLICT (stream) DO UPDATE SET seq = EXCLUDED.seq, updated_at = now()
             WHERE projection_checkpoints.seq = $2",
            &[&stream, &(from as i64), &(to as i64)],
        )
        .await?;
    if n == 1 {
        Ok(())
    } else {
        Err(ProjectionError::CheckpointMoved {
            stream: stream.to_owned(),
            expected: from,
        })
    }
}

/// Drops `table`'s indexes that no constraint needs, all at once, and says
/// how to create them again: rows loaded in bulk into an empty table go in
/// faster without them, and each is built once afterwards.
pub(crate) async fn defer_indexes(
    c: &impl GenericClient,
    schema: &str,
    table: &str,
) -> Result<Vec<String>, ProjectionError> {
    let rows = c
        .query(
            "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
               FROM pg_index i
              WHERE i.indrelid = to_regclass($1) AND NOT i.indisunique AND NOT i.indisexclusion
                AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
            &[&format!("{schema}.{table}")],
        )
        .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let (names, defs): (Vec<String>, Vec<String>) =
        rows.iter().map(|r| (r.get(0), r.get(1))).unzip();
    // Qualified and quoted as PostgreSQL names them (the schema is on the
    // connection's search path).
    c.batch_execute(&format!("DROP INDEX {}", names.join(", ")))
        .await?;
    Ok(defs)
}

/// Creates indexes again from what [`defer_indexes`] said.
pub(crate) async fn create_indexes(
    c: &impl GenericClient,
    defs: &[String],
) -> Result<(), ProjectionError> {
    for def in defs {
        c.batch_execute(def).await?;
    }
    Ok(())
}

pub(crate) async fn record_error(
    c: &impl GenericClient,
    stream: &str,
    seq: u64,
    subject: &str,
    error: &str,
    payload: &[u8],
) -> Result<(), ProjectionError> {
    c.execute(
        "INSERT INTO projection_errors (stream, seq, subject, error, payload) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT DO NOTHING",
        &[
            &stream,
            &(seq as i64),
            &subject,
            // An error may quote what it could not read.
            &error.replace('\0', "\u{fffd}"),
            &payload,
        ],
    )
    .await?;
    Ok(())
}

const TASK_COLS: &str = "id, project, name, state, node_id, attempt, spec, exit_code, reason, submitted_by, \
                         submitted_at, updated_at, finished_at, version, last_seq, prepared, preparing, waiting_reason, priority, outputs, started_at, gpu_ms";

/// A column holding one of an enum's names.
fn named<T: std::str::FromStr<Err = ud_schemas::status::UnknownName>>(
    r: &tokio_postgres::Row,
    i: usize,
) -> Result<T, ProjectionError> {
    r.get::<_, &str>(i)
        .parse()
        .map_err(|e: ud_schemas::status::UnknownName| {
            ProjectionError::Row(format!("column {i}: {e}"))
        })
}

pub(crate) fn task_from_row(r: &tokio_postgres::Row) -> Result<TaskRow, ProjectionError> {
    Ok(TaskRow {
        id: TaskId(r.get(0)),
        project: r.get(1),
        name: r.get(2),
        state: named(r, 3)?,
        node_id: r.get::<_, Option<uuid::Uuid>>(4).map(NodeId),
        attempt: r.get(5),
        spec: r.get(6),
        exit_code: r.get(7),
        reason: r.get(8),
        submitted_by: r.get(9),
        submitted_at: r.get(10),
        updated_at: r.get(11),
        finished_at: r.get(12),
        version: r.get(13),
        last_seq: r.get(14),
        prepared: r.get(15),
        preparing: r.get(16),
        waiting_reason: r.get(17),
        priority: r.get(18),
        outputs: r.get(19),
        started_at: r.get(20),
        gpu_ms: r.get(21),
    })
}

pub(crate) async fn load_tasks(
    c: &impl GenericClient,
    ids: &[uuid::Uuid],
) -> Result<Vec<TaskRow>, ProjectionError> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let rows = c
        .query(
            &format!("SELECT {TASK_COLS} FROM tasks WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    rows.iter().map(task_from_row).collect()
}

/// A stored task row replaced by a newer one.
const TASK_UPDATES: &str =
    "project = EXCLUDED.project, name = EXCLUDED.name, state = EXCLUDED.state,
    node_id = EXCLUDED.node_id, attempt = EXCLUDED.attempt, spec = EXCLUDED.spec,
    exit_code = EXCLUDED.exit_code, reason = EXCLUDED.reason,
    submitted_by = EXCLUDED.submitted_by, submitted_at = EXCLUDED.submitted_at,
    updated_at = EXCLUDED.updated_at, finished_at = EXCLUDED.finished_at,
    version = EXCLUDED.version, last_seq = EXCLUDED.last_seq, prepared = EXCLUDED.prepared,
    preparing = EXCLUDED.preparing, waiting_reason = EXCLUDED.waiting_reason,
    priority = EXCLUDED.priority, outputs = EXCLUDED.outputs,
    started_at = EXCLUDED.started_at, gpu_ms = EXCLUDED.gpu_ms";

/// Writes many task rows with binary COPY: straight into the table when
/// none of them is stored yet (`fresh`), otherwise through a temporary
/// table, replacing stored ones.
pub(crate) async fn copy_tasks(
    c: &deadpool_postgres::Transaction<'_>,
    rows: &[std::borrow::Cow<'_, TaskRow>],
    fresh: bool,
) -> Result<(), ProjectionError> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    if rows.is_empty() {
        return Ok(());
    }
    let target = if fresh {
        "tasks"
    } else {
        c.batch_execute("CREATE TEMP TABLE replay_tasks (LIKE tasks) ON COMMIT DROP")
            .await?;
        "replay_tasks"
    };
    let sink = c
        .copy_in(&format!("COPY {target} ({TASK_COLS}) FROM STDIN BINARY"))
        .await?;
    let writer = BinaryCopyInWriter::new(
        sink,
        &[
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::UUID,
            Type::INT4,
            Type::JSONB,
            Type::INT4,
            Type::TEXT,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::INT8,
            Type::INT8,
            Type::JSONB,
            Type::JSONB,
            Type::TEXT,
            Type::INT4,
            Type::JSONB,
            Type::TIMESTAMPTZ,
            Type::JSONB,
        ],
    );
    futures::pin_mut!(writer);
    for r in rows {
        writer
            .as_mut()
            .write(&[
                &r.id.0,
                &r.project,
                &r.name,
                &r.state.as_str(),
                &r.node_id.map(|n| n.0),
                &r.attempt,
                &r.spec,
                &r.exit_code,
                &r.reason,
                &r.submitted_by,
                &r.submitted_at,
                &r.updated_at,
                &r.finished_at,
                &r.version,
                &r.last_seq,
                &r.prepared,
                &r.preparing,
                &r.waiting_reason,
                &r.priority,
                &r.outputs,
                &r.started_at,
                &r.gpu_ms,
            ])
            .await?;
    }
    writer.finish().await?;
    if !fresh {
        c.execute(
            &format!(
                "INSERT INTO tasks ({TASK_COLS}) SELECT {TASK_COLS} FROM replay_tasks
                 ON CONFLICT (id) DO UPDATE SET {TASK_UPDATES}"
            ),
            &[],
        )
        .await?;
    }
    Ok(())
}

pub(crate) async fn upsert_tasks(
    c: &impl GenericClient,
    rows: &[TaskRow],
) -> Result<(), ProjectionError> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id.0).collect();
    let project: Vec<&str> = rows.iter().map(|r| r.project.as_str()).collect();
    let name: Vec<Option<&str>> = rows.iter().map(|r| r.name.as_deref()).collect();
    let state: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
    let node: Vec<Option<uuid::Uuid>> = rows.iter().map(|r| r.node_id.map(|n| n.0)).collect();
    let attempt: Vec<i32> = rows.iter().map(|r| r.attempt).collect();
    let spec: Vec<&serde_json::Value> = rows.iter().map(|r| &r.spec).collect();
    let exit: Vec<Option<i32>> = rows.iter().map(|r| r.exit_code).collect();
    let reason: Vec<Option<&str>> = rows.iter().map(|r| r.reason.as_deref()).collect();
    let by: Vec<&str> = rows.iter().map(|r| r.submitted_by.as_str()).collect();
    let sub_at: Vec<_> = rows.iter().map(|r| r.submitted_at).collect();
    let upd_at: Vec<_> = rows.iter().map(|r| r.updated_at).collect();
    let fin_at: Vec<_> = rows.iter().map(|r| r.finished_at).collect();
    let version: Vec<i64> = rows.iter().map(|r| r.version).collect();
    let last_seq: Vec<i64> = rows.iter().map(|r| r.last_seq).collect();
    let prepared: Vec<Option<&serde_json::Value>> =
        rows.iter().map(|r| r.prepared.as_ref()).collect();
    let preparing: Vec<Option<&serde_json::Value>> =
        rows.iter().map(|r| r.preparing.as_ref()).collect();
    let waiting: Vec<Option<&str>> = rows.iter().map(|r| r.waiting_reason.as_deref()).collect();
    let priority: Vec<i32> = rows.iter().map(|r| r.priority).collect();
    let outputs: Vec<Option<&serde_json::Value>> =
        rows.iter().map(|r| r.outputs.as_ref()).collect();
    let started: Vec<_> = rows.iter().map(|r| r.started_at).collect();
    let gpu_ms: Vec<Option<&serde_json::Value>> = rows.iter().map(|r| r.gpu_ms.as_ref()).collect();
    c.execute(
        &format!(
            "INSERT INTO tasks ({TASK_COLS})
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::int4[],
                                  $7::jsonb[], $8::int4[], $9::text[], $10::text[], $11::timestamptz[],
                                  $12::timestamptz[], $13::timestamptz[], $14::int8[], $15::int8[], $16::jsonb[], $17::jsonb[], $18::text[], $19::int4[], $20::jsonb[],
                                  $21::timestamptz[], $22::jsonb[])
             ON CONFLICT (id) DO UPDATE SET {TASK_UPDATES}"
        ),
        &[
            &ids, &project, &name, &state, &node, &attempt, &spec, &exit, &reason, &by, &sub_at, &upd_at, &fin_at,
            &version, &last_seq, &prepared, &preparing, &waiting, &priority, &outputs, &started,
            &gpu_ms,
        ],
    )
    .await?;
    Ok(())
}

const NODE_COLS: &str = "id, name, labels, resources, status, enrolled_at, registered_at, last_seen, revoked_at, \
                         offline_after, running_tasks, last_seq, disk_free_mb, low_disk, scheduling";

pub(crate) fn node_from_row(r: &tokio_postgres::Row) -> Result<NodeRow, ProjectionError> {
    Ok(NodeRow {
        id: NodeId(r.get(0)),
        name: r.get(1),
        labels: r.get(2),
        resources: r.get(3),
        status: named(r, 4)?,
        enrolled_at: r.get(5),
        registered_at: r.get(6),
        last_seen: r.get(7),
        revoked_at: r.get(8),
        offline_after: r.get(9),
        running_tasks: r.get(10),
        last_seq: r.get(11),
        disk_free_mb: r.get(12),
        low_disk: r.get(13),
        scheduling: named(r, 14)?,
    })
}

pub(crate) async fn load_nodes(
    c: &impl GenericClient,
    ids: &[uuid::Uuid],
) -> Result<Vec<NodeRow>, ProjectionError> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let rows = c
        // Two projectors (nodes, heartbeats) write these rows: lock them, in one order.
        .query(
            &format!("SELECT {NODE_COLS} FROM nodes WHERE id = ANY($1) ORDER BY id FOR UPDATE"),
            &[&ids],
        )
        .await?;
    rows.iter().map(node_from_row).collect()
}

pub(crate) async fn upsert_nodes(
    c: &impl GenericClient,
    rows: &[NodeRow],
) -> Result<(), ProjectionError> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id.0).collect();
    let name: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let labels: Vec<&serde_json::Value> = rows.iter().map(|r| &r.labels).collect();
    let res: Vec<&serde_json::Value> = rows.iter().map(|r| &r.resources).collect();
    let status: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    let enr: Vec<_> = rows.iter().map(|r| r.enrolled_at).collect();
    let reg: Vec<_> = rows.iter().map(|r| r.registered_at).collect();
    let seen: Vec<_> = rows.iter().map(|r| r.last_seen).collect();
    let rev: Vec<_> = rows.iter().map(|r| r.revoked_at).collect();
    let off: Vec<_> = rows.iter().map(|r| r.offline_after).collect();
    let running: Vec<i32> = rows.iter().map(|r| r.running_tasks).collect();
    let seq: Vec<i64> = rows.iter().map(|r| r.last_seq).collect();
    let disk: Vec<Option<i64>> = rows.iter().map(|r| r.disk_free_mb).collect();
    let low: Vec<bool> = rows.iter().map(|r| r.low_disk).collect();
    let scheduling: Vec<&str> = rows.iter().map(|r| r.scheduling.as_str()).collect();
    c.execute(
        &format!(
            "INSERT INTO nodes ({NODE_COLS})
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[], $5::text[],
                                  $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[],
                                  $10::timestamptz[], $11::int4[], $12::int8[], $13::int8[], $14::bool[], $15::text[])
             ON CONFLICT (id) DO UPDATE SET
               name = EXCLUDED.name, labels = EXCLUDED.labels, resources = EXCLUDED.resources,
               status = EXCLUDED.status, enrolled_at = EXCLUDED.enrolled_at,
               registered_at = EXCLUDED.registered_at, revoked_at = EXCLUDED.revoked_at,
               last_seen = EXCLUDED.last_seen, offline_after = EXCLUDED.offline_after, running_tasks = EXCLUDED.running_tasks,
               last_seq = EXCLUDED.last_seq, disk_free_mb = EXCLUDED.disk_free_mb, low_disk = EXCLUDED.low_disk,
               scheduling = EXCLUDED.scheduling"
        ),
        &[&ids, &name, &labels, &res, &status, &enr, &reg, &seen, &rev, &off, &running, &seq, &disk, &low, &scheduling],
    )
    .await?;
    Ok(())
}

const TOKEN_COLS: &str =
    "id, name, digest, projects, admin, issued_at, revoked_at, user_name, expires_at";

pub(crate) async fn load_tokens(
    c: &impl GenericClient,
    ids: &[uuid::Uuid],
) -> Result<Vec<TokenRow>, ProjectionError> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let rows = c
        .query(
            &format!("SELECT {TOKEN_COLS} FROM api_tokens WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TokenRow {
            id: TokenId(r.get(0)),
            name: r.get(1),
            digest: r.get(2),
            projects: r.get(3),
            admin: r.get(4),
            issued_at: r.get(5),
            revoked_at: r.get(6),
            user: r.get(7),
            expires_at: r.get(8),
        })
        .collect())
}

pub(crate) async fn upsert_tokens(
    c: &impl GenericClient,
    rows: &[TokenRow],
) -> Result<(), ProjectionError> {
    for r in rows {
        c.execute(
            &format!(
                "INSERT INTO api_tokens ({TOKEN_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, digest = EXCLUDED.digest,
                   projects = EXCLUDED.projects, admin = EXCLUDED.admin, issued_at = EXCLUDED.issued_at,
                   revoked_at = EXCLUDED.revoked_at, user_name = EXCLUDED.user_name,
                   expires_at = EXCLUDED.expires_at"
            ),
            &[
                &r.id.0,
                &r.name,
                &r.digest,
                &r.projects,
                &r.admin,
                &r.issued_at,
                &r.revoked_at,
                &r.user,
                &r.expires_at,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Applies project events, one by one in stream order.
pub(crate) async fn apply_projects(
    c: &impl GenericClient,
    changes: &[crate::rows::ProjectChange],
) -> Result<(), ProjectionError> {
    use crate::rows::ProjectChange as C;
    for change in changes {
        match change {
            C::Created {
                name,
                description,
                at,
                by,
            } => {
                c.execute(
                    "INSERT INTO projects (name, description, created_at, created_by) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description,
                       created_at = EXCLUDED.created_at, created_by = EXCLUDED.created_by",
                    &[name, description, at, by],
                )
                .await?
            }
            C::Member {
                project,
                user,
                role,
                at,
            } => {
                c.execute(
                    "INSERT INTO project_members (project, user_name, role, since) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (project, user_name) DO UPDATE SET role = EXCLUDED.role, since = EXCLUDED.since",
                    &[project, user, role, at],
                )
                .await?
            }
            C::Removed { project, user } => {
                c.execute(
                    "DELETE FROM project_members WHERE project = $1 AND user_name = $2",
                    &[project, user],
                )
                .await?
            }
            C::Archived { name, at } => {
                c.execute(
                    "UPDATE projects SET archived_at = $2 WHERE name = $1",
                    &[name, at],
                )
                .await?
            }
        };
    }
    Ok(())
}

/// Filters of a task listing (keyset paging on the time-ordered id).
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub state: Option<ud_schemas::TaskStatus>,
    pub project: Option<String>,
    pub node: Option<uuid::Uuid>,
    pub before: Option<uuid::Uuid>,
    /// `None`: every project (admin); otherwise only these.
    pub projects: Option<Vec<String>>,
    pub queue: Option<String>,
    pub limit: i64,
}

pub async fn get_task(
    c: &impl GenericClient,
    id: TaskId,
) -> Result<Option<TaskRow>, ProjectionError> {
    let row = c
        .query_opt(
            &format!("SELECT {TASK_COLS} FROM tasks WHERE id = $1"),
            &[&id.0],
        )
        .await?;
    row.as_ref().map(task_from_row).transpose()
}

/// The task of a session, by the session's id.
pub async fn get_task_by_session(
    c: &impl GenericClient,
    session: &str,
) -> Result<Option<TaskRow>, ProjectionError> {
    let row = c
        .query_opt(
            &format!(
                "SELECT {TASK_COLS} FROM tasks WHERE spec ? 'session' AND spec->'session'->>'id' = $1"
            ),
            &[&session],
        )
        .await?;
    row.as_ref().map(task_from_row).transpose()
}

pub async fn list_tasks(
    c: &impl GenericClient,
    f: &TaskFilter,
) -> Result<Vec<TaskRow>, ProjectionError> {
    let state = f.state.map(ud_schemas::TaskStatus::as_str);
    let rows = c
        .query(
            &format!(
                "SELECT {TASK_COLS} FROM tasks
                 WHERE ($1::text IS NULL OR state = $1)
                   AND ($2::text IS NULL OR project = $2)
                   AND ($3::uuid IS NULL OR node_id = $3)
                   AND ($4::uuid IS NULL OR id < $4)
                   AND ($5::text[] IS NULL OR project = ANY($5))
                   AND ($7::text IS NULL OR COALESCE(spec->>'queue', 'default') = $7)
                 ORDER BY id DESC LIMIT $6"
            ),
            &[
                &state,
                &f.project,
                &f.node,
                &f.before,
                &f.projects,
                &f.limit,
                &f.queue,
            ],
        )
        .await?;
    rows.iter().map(task_from_row).collect()
}

/// Ids and projects of the tasks that have not finished, of one project or
/// of one queue (or both), oldest first.
pub async fn unfinished_tasks(
    c: &impl GenericClient,
    project: Option<&str>,
    queue: Option<&str>,
) -> Result<Vec<(TaskId, String)>, ProjectionError> {
    let rows = c
        .query(
            "SELECT id, project FROM tasks
             WHERE state NOT IN ('succeeded', 'failed', 'timed_out', 'cancelled')
               AND ($1::text IS NULL OR project = $1)
               AND ($2::text IS NULL OR COALESCE(spec->>'queue', 'default') = $2)
             ORDER BY id",
            &[&project, &queue],
        )
        .await?;
    Ok(rows.iter().map(|r| (TaskId(r.get(0)), r.get(1))).collect())
}

pub async fn get_node(
    c: &impl GenericClient,
    id: NodeId,
) -> Result<Option<NodeRow>, ProjectionError> {
    let row = c
        .query_opt(
            &format!("SELECT {NODE_COLS} FROM nodes WHERE id = $1"),
            &[&id.0],
        )
        .await?;
    row.as_ref().map(node_from_row).transpose()
}

pub async fn list_nodes(c: &impl GenericClient) -> Result<Vec<NodeRow>, ProjectionError> {
    let rows = c
        .query(
            &format!("SELECT {NODE_COLS} FROM nodes ORDER BY name, id"),
            &[],
        )
        .await?;
    rows.iter().map(node_from_row).collect()
}

/// What the unfinished tasks placed on a node hold of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeUsage {
    pub cpu_millis: i64,
    pub memory_mb: i64,
    pub gpus: i64,
}

/// Resources held on each node by its assigned, running, disconnected and cancelling tasks.
pub async fn node_usage(
    c: &impl GenericClient,
) -> Result<std::collections::HashMap<uuid::Uuid, NodeUsage>, ProjectionError> {
    let rows = c
        .query(
            "SELECT node_id,
                    COALESCE(sum((spec->'resources'->>'cpu_millis')::bigint), 0)::bigint,
                    COALESCE(sum((spec->'resources'->>'memory_mb')::bigint), 0)::bigint,
                    COALESCE(sum((spec->'resources'->>'gpus')::bigint), 0)::bigint
             FROM tasks
             WHERE node_id IS NOT NULL AND state IN ('assigned', 'running', 'disconnected', 'cancelling')
             GROUP BY node_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let usage = NodeUsage {
                cpu_millis: r.get(1),
                memory_mb: r.get(2),
                gpus: r.get(3),
            };
            (r.get(0), usage)
        })
        .collect())
}

/// How many tasks were in each state at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimelinePoint {
    pub at: chrono::DateTime<chrono::Utc>,
    /// Submitted and not finished yet (pending, assigned or running).
    pub unfinished: i64,
    /// Finished since the window began, by how they ended.
    pub succeeded: i64,
    pub failed: i64,
    pub timed_out: i64,
    pub cancelled: i64,
}

/// Tasks per state at `points` evenly spaced moments over the last
/// `window_seconds` (the last point is now), of the given projects (`None`:
/// all): unfinished ones, and those that finished within the window by state.
pub async fn task_timeline(
    c: &impl GenericClient,
    window_seconds: i64,
    points: i64,
    projects: Option<&[String]>,
) -> Result<Vec<TimelinePoint>, ProjectionError> {
    let step = (window_seconds as f64) / ((points.max(2) - 1) as f64);
    let rows = c
        .query(
            "WITH now AS (SELECT now() AS t),
             b AS (SELECT (SELECT t FROM now) - make_interval(secs => $1::float8 - i * $2::float8) AS t
                   FROM generate_series(0, $3::bigint - 1) AS i),
             k AS (SELECT state, submitted_at, finished_at FROM tasks
                   WHERE (finished_at IS NULL OR finished_at >= (SELECT t FROM now) - make_interval(secs => $1::float8))
                     AND ($4::text[] IS NULL OR project = ANY($4)))
             SELECT b.t,
               count(k.state) FILTER (WHERE k.submitted_at <= b.t AND (k.finished_at IS NULL OR k.finished_at > b.t)),
               count(k.state) FILTER (WHERE k.finished_at <= b.t AND k.state = 'succeeded'),
               count(k.state) FILTER (WHERE k.finished_at <= b.t AND k.state = 'failed'),
               count(k.state) FILTER (WHERE k.finished_at <= b.t AND k.state = 'timed_out'),
               count(k.state) FILTER (WHERE k.finished_at <= b.t AND k.state = 'cancelled')
             FROM b LEFT JOIN k ON k.submitted_at <= b.t
             GROUP BY b.t ORDER BY b.t",
            &[
                &(window_seconds as f64),
                &step,
                &points.max(2),
                &projects.map(<[String]>::to_vec),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TimelinePoint {
            at: r.get(0),
            unfinished: r.get(1),
            succeeded: r.get(2),
            failed: r.get(3),
            timed_out: r.get(4),
            cancelled: r.get(5),
        })
        .collect())
}

/// Tasks by state (only states some task is in), of the given projects
/// (`None`: all), in state order.
pub async fn tasks_by_state(
    c: &impl GenericClient,
    projects: Option<&[String]>,
) -> Result<Vec<(String, i64)>, ProjectionError> {
    let rows = c
        .query(
            "SELECT state, count(*) FROM tasks
             WHERE ($1::text[] IS NULL OR project = ANY($1))
             GROUP BY state ORDER BY state",
            &[&projects.map(<[String]>::to_vec)],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

const PIPELINE_COLS: &str = "id, project, name, status, cancelling, definition, steps, \
     submitted_by, submitted_at, updated_at, finished_at, version, last_seq";

fn pipeline_from_row(r: &tokio_postgres::Row) -> PipelineRow {
    PipelineRow {
        id: PipelineId(r.get(0)),
        project: r.get(1),
        name: r.get(2),
        status: r.get(3),
        cancelling: r.get(4),
        definition: r.get(5),
        steps: r.get(6),
        submitted_by: r.get(7),
        submitted_at: r.get(8),
        updated_at: r.get(9),
        finished_at: r.get(10),
        version: r.get(11),
        last_seq: r.get(12),
    }
}

pub(crate) async fn load_pipelines(
    c: &impl GenericClient,
    ids: &[uuid::Uuid],
) -> Result<Vec<PipelineRow>, ProjectionError> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let rows = c
        .query(
            &format!("SELECT {PIPELINE_COLS} FROM pipelines WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(pipeline_from_row).collect())
}

pub(crate) async fn upsert_pipelines(
    c: &impl GenericClient,
    rows: &[PipelineRow],
) -> Result<(), ProjectionError> {
    for r in rows {
        c.execute(
            &format!(
                "INSERT INTO pipelines ({PIPELINE_COLS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                 ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status,
                   cancelling = EXCLUDED.cancelling, steps = EXCLUDED.steps,
                   updated_at = EXCLUDED.updated_at, finished_at = EXCLUDED.finished_at,
                   version = EXCLUDED.version, last_seq = EXCLUDED.last_seq"
            ),
            &[
                &r.id.0,
                &r.project,
                &r.name,
                &r.status,
                &r.cancelling,
                &r.definition,
                &r.steps,
                &r.submitted_by,
                &r.submitted_at,
                &r.updated_at,
                &r.finished_at,
                &r.version,
                &r.last_seq,
            ],
        )
        .await?;
    }
    Ok(())
}

pub async fn get_pipeline(
    c: &impl GenericClient,
    id: PipelineId,
) -> Result<Option<PipelineRow>, ProjectionError> {
    let row = c
        .query_opt(
            &format!("SELECT {PIPELINE_COLS} FROM pipelines WHERE id = $1"),
            &[&id.0],
        )
        .await?;
    Ok(row.as_ref().map(pipeline_from_row))
}

/// Filters of a pipeline listing (keyset paging on the time-ordered id).
#[derive(Clone, Debug, Default)]
pub struct PipelineFilter {
    pub status: Option<String>,
    pub project: Option<String>,
    /// Only these projects (`None`: every project).
    pub projects: Option<Vec<String>>,
    pub before: Option<uuid::Uuid>,
    pub limit: i64,
}

pub async fn list_pipelines(
    c: &impl GenericClient,
    f: &PipelineFilter,
) -> Result<Vec<PipelineRow>, ProjectionError> {
    let rows = c
        .query(
            &format!(
                "SELECT {PIPELINE_COLS} FROM pipelines
                 WHERE ($1::text IS NULL OR status = $1)
                   AND ($2::text IS NULL OR project = $2)
                   AND ($3::text[] IS NULL OR project = ANY($3))
                   AND ($4::uuid IS NULL OR id < $4)
                 ORDER BY id DESC LIMIT $5"
            ),
            &[&f.status, &f.project, &f.projects, &f.before, &f.limit],
        )
        .await?;
    Ok(rows.iter().map(pipeline_from_row).collect())
}

const SCHEDULE_COLS: &str = "id, project, name, cron, timezone, missed, body, state, \
     paused_reason, done_until, fired, skipped, last_due, last_task_id, last_pipeline_id, \
     last_error, created_by, created_at, updated_at, version, last_seq";

fn schedule_from_row(r: &tokio_postgres::Row) -> ScheduleRow {
    ScheduleRow {
        id: ScheduleId(r.get(0)),
        project: r.get(1),
        name: r.get(2),
        cron: r.get(3),
        timezone: r.get(4),
        missed: r.get(5),
        body: r.get(6),
        state: r.get(7),
        paused_reason: r.get(8),
        done_until: r.get(9),
        fired: r.get(10),
        skipped: r.get(11),
        last_due: r.get(12),
        last_task_id: r.get(13),
        last_pipeline_id: r.get(14),
        last_error: r.get(15),
        created_by: r.get(16),
        created_at: r.get(17),
        updated_at: r.get(18),
        version: r.get(19),
        last_seq: r.get(20),
    }
}

pub(crate) async fn load_schedules(
    c: &impl GenericClient,
    ids: &[uuid::Uuid],
) -> Result<Vec<ScheduleRow>, ProjectionError> {
    if ids.is_empty() {
        return Ok(vec![]);
    }
    let rows = c
        .query(
            &format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(schedule_from_row).collect())
}

pub(crate) async fn upsert_schedules(
    c: &impl GenericClient,
    rows: &[ScheduleRow],
) -> Result<(), ProjectionError> {
    for r in rows {
        c.execute(
            &format!(
                "INSERT INTO schedules ({SCHEDULE_COLS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                         $16, $17, $18, $19, $20, $21)
                 ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state,
                   paused_reason = EXCLUDED.paused_reason, done_until = EXCLUDED.done_until,
                   fired = EXCLUDED.fired, skipped = EXCLUDED.skipped,
                   last_due = EXCLUDED.last_due, last_task_id = EXCLUDED.last_task_id,
                   last_pipeline_id = EXCLUDED.last_pipeline_id, last_error = EXCLUDED.last_error,
                   updated_at = EXCLUDED.updated_at, version = EXCLUDED.version,
                   last_seq = EXCLUDED.last_seq"
            ),
            &[
                &r.id.0,
                &r.project,
                &r.name,
                &r.cron,
                &r.timezone,
                &r.missed,
                &r.body,
                &r.state,
                &r.paused_reason,
                &r.done_until,
                &r.fired,
                &r.skipped,
                &r.last_due,
                &r.last_task_id,
                &r.last_pipeline_id,
                &r.last_error,
                &r.created_by,
                &r.created_at,
                &r.updated_at,
                &r.version,
                &r.last_seq,
            ],
        )
        .await?;
    }
    Ok(())
}

pub async fn get_schedule(
    c: &impl GenericClient,
    id: ScheduleId,
) -> Result<Option<ScheduleRow>, ProjectionError> {
    let row = c
        .query_opt(
            &format!("SELECT {SCHEDULE_COLS} FROM schedules WHERE id = $1"),
            &[&id.0],
        )
        .await?;
    Ok(row.as_ref().map(schedule_from_row))
}

/// Schedules of these projects (`None`: every project), newest first;
/// deleted ones only with `deleted`.
pub async fn list_schedules(
    c: &impl GenericClient,
    project: Option<&str>,
    projects: Option<&[String]>,
    deleted: bool,
) -> Result<Vec<ScheduleRow>, ProjectionError> {
    let rows = c
        .query(
            &format!(
                "SELECT {SCHEDULE_COLS} FROM schedules
                 WHERE ($1::text IS NULL OR project = $1)
                   AND ($2::text[] IS NULL OR project = ANY($2))
                   AND ($3 OR state <> 'deleted')
                 ORDER BY id DESC LIMIT 1000"
            ),
            &[&project, &projects, &deleted],
        )
        .await?;
    Ok(rows.iter().map(schedule_from_row).collect())
}
