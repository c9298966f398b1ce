//! What every listing shares: its page size, its cursor, the next page's
//! cursor, and waiting for the read model to include a write just seen.

use crate::error::ApiError;
use crate::tasks::WAIT_PROJECTED;
use crate::AppState;

/// The page size asked for: 1-500, 50 when not given.
pub fn limit(asked: Option<i64>) -> Result<i64, ApiError> {
    let limit = asked.unwrap_or(50);
    if (1..=500).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::field("limit", "must be between 1 and 500"))
    }
}

/// The `before` cursor: the id of the last item of the page before.
pub fn before(cursor: Option<&str>, what: &str) -> Result<Option<uuid::Uuid>, ApiError> {
    cursor
        .map(|b| {
            b.parse::<uuid::Uuid>()
                .map_err(|_| ApiError::field("before", format!("not a {what} id")))
        })
        .transpose()
}

/// Cuts `rows` (read with one more than `limit`) to the page; the cursor of
/// the next page when there is one.
pub fn cut<R>(rows: &mut Vec<R>, limit: i64, id: impl Fn(&R) -> String) -> Option<String> {
    let limit = usize::try_from(limit).unwrap_or(0);
    if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(id)
    } else {
        None
    }
}

/// Read-your-events: waits (bounded) until the read model of `stream`
/// includes `seq`; after the bound it answers with what it has.
pub async fn caught_up(state: &AppState, stream: &str, seq: Option<u64>) {
    if let Some(seq) = seq.filter(|s| *s > 0) {
        let _ = state.projected.wait(stream, seq, WAIT_PROJECTED).await;
    }
}
