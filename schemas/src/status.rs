//! The states tasks and nodes are in, by the names the API, the read models,
//! the CLI and events use. One enum each, from the domain to the table.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Millis;

/// A name that is not one of an enum's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not one of {allowed}")]
pub struct UnknownName {
    pub given: String,
    pub allowed: String,
}

macro_rules! named {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownName {
                        given: other.to_owned(),
                        allowed: [$($text),+].join(", "),
                    }),
                }
            }
        }
    };
}

named! {
    /// Where a task is in its life.
    TaskStatus {
        Pending => "pending",
        Assigned => "assigned",
        Running => "running",
        /// Its node went offline; the run has a grace to be heard from again.
        Disconnected => "disconnected",
        Cancelling => "cancelling",
        Succeeded => "succeeded",
        Failed => "failed",
        TimedOut => "timed_out",
        Cancelled => "cancelled",
    }
}

impl TaskStatus {
    /// No command changes a task in this state any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }
}

named! {
    /// Whether a node takes new tasks, as its operator set it.
    SchedulingMode {
        /// Takes new tasks.
        Active => "active",
        /// Takes no new tasks; running ones go on.
        Cordoned => "cordoned",
        /// Takes no new tasks; running ones finish, then it is empty.
        Draining => "draining",
    }
}

#[allow(clippy::derivable_impls)] // the enum is made by a macro
impl Default for SchedulingMode {
    fn default() -> Self {
        Self::Active
    }
}

named! {
    /// Whether a node is heard from.
    NodeStatus {
        /// Enrolled, never heard from.
        Enrolled => "enrolled",
        Online => "online",
        Offline => "offline",
        Revoked => "revoked",
    }
}

impl NodeStatus {
    /// The one liveness rule: online unless declared offline and silent
    /// since (heartbeats after an offline decision bring a node back without
    /// another event).
    pub fn of(revoked: bool, last_seen: Option<Millis>, offline_after: Option<Millis>) -> Self {
        match (revoked, last_seen) {
            (true, _) => Self::Revoked,
            (false, None) => Self::Enrolled,
            (false, Some(seen)) if offline_after.is_some_and(|o| seen <= o) => Self::Offline,
            (false, Some(_)) => Self::Online,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_say_what_is_allowed() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>(), Ok(*s));
        }
        let e = "paused".parse::<SchedulingMode>();
        assert_eq!(
            e.map_err(|e| e.to_string()),
            Err("\"paused\" is not one of active, cordoned, draining".to_owned())
        );
        assert_eq!(
            serde_json::to_value(TaskStatus::TimedOut).ok(),
            Some(serde_json::json!("timed_out"))
        );
        assert_eq!(NodeStatus::of(false, Some(5), Some(5)), NodeStatus::Offline);
        assert_eq!(NodeStatus::of(false, Some(6), Some(5)), NodeStatus::Online);
    }
}
