//! Property test: any task event survives encode -> decode.

use proptest::prelude::*;
use ud_schemas::events::*;
use ud_schemas::{codec, Event, NodeId, TaskId};
use uuid::Uuid;

proptest! {
    #[test]
    fn task_events_round_trip(kind in 0u8..5, at in any::<i64>(), code in any::<i32>(), reason in ".{0,40}", attempt in any::<u32>(), n in any::<u128>()) {
        let node_id = NodeId(Uuid::from_u128(n));
        let e = match kind {
            0 => TaskEvent::Assigned(TaskAssigned { at, node_id, attempt, gpus: (0..(attempt % 3)).map(|i| format!("GPU-{i}")).collect() }),
            1 => TaskEvent::Started(TaskStarted { at, node_id, attempt }),
            2 => TaskEvent::Succeeded(TaskSucceeded { at, exit_code: code }),
            3 => TaskEvent::Failed(TaskFailed { at, exit_code: Some(code), reason }),
            _ => TaskEvent::Cancelled(TaskCancelled { at, reason }),
        };
        let event = Event::Task(TaskId::new(), e);
        let bytes = codec::encode_event(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = codec::decode_event(&event.subject(), 1, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, event);
    }
}
