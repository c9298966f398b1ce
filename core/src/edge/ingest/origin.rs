//! Who sent a message. A node forwards its reports on
//! `ud.deliver.<node_id>.…`, which its permissions on the hub allow for its
//! own id only, and `UD_EDGE_IN` stores them as `ud.edge.<node_id>.…`: the
//! node a stored subject names is the node that sent it.
//!
//! Reports stored before nodes forwarded them were sourced from each
//! node's stream, and a node could write any subject into its own stream:
//! for those the hub's `Nats-Stream-Source` header says which node sent
//! them, and it must be the one the subject names.

use async_nats::jetstream;
use ud_schemas::{edge, NodeId};

use super::Rejected;

const SOURCE: &str = "Nats-Stream-Source";
const SOURCE_NAME: &str = "Nats-Stream-Source:";

/// The node (as the hex of its id) a sourced message came from, from
/// `Nats-Stream-Source` (messages stored when the hub sourced nodes' streams).
pub fn origin(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    // The hub removes any such header a node wrote and adds its own last.
    let value = headers?.get_last(SOURCE)?.as_str();
    // Except a line the node left unterminated: nats-server then cuts that
    // line's last two bytes and appends its own header to it. What the hub
    // wrote is after the last name.
    let value = value.rsplit(SOURCE_NAME).next()?;
    let stream = value.split_whitespace().next()?.split(':').next()?;
    stream.strip_prefix("EDGE_").map(str::to_owned)
}

/// Where in its node's stream a sourced message was: the stream's name and
/// the message's sequence there, from `Nats-Stream-Source`. The same
/// message sourced or delivered again has the same position.
pub fn position(headers: Option<&async_nats::HeaderMap>) -> Option<(String, u64)> {
    let value = headers?.get_last(SOURCE)?.as_str();
    let value = value.rsplit(SOURCE_NAME).next()?;
    let mut words = value.split_whitespace();
    let stream = words.next()?.split(':').next()?;
    let seq = words.next()?.parse().ok()?;
    stream
        .starts_with("EDGE_")
        .then(|| (stream.to_owned(), seq))
}

/// The node that sent `msg`: the one its subject names, which must be the
/// one whose stream it came from when it was sourced.
pub fn sender(msg: &jetstream::Message) -> Result<NodeId, Rejected> {
    let Some((named, _)) = edge::canonical_subject(msg.subject.as_str()) else {
        return Err(Rejected::Subject(msg.subject.to_string()));
    };
    if let Some(sender) = origin(msg.headers.as_ref()) {
        if edge::hex(&named) != sender {
            return Err(Rejected::Impersonation {
                sender,
                named: named.to_string(),
            });
        }
    }
    Ok(named)
}

/// The node a report subject (`ud.edge.<node_id>.…`) names, as written:
/// which lane its reports take.
pub fn lane_key(subject: &str) -> &str {
    subject
        .strip_prefix(edge::REPORT_PREFIX)
        .and_then(|rest| rest.split('.').next())
        .unwrap_or(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(values: &[&str]) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        for v in values {
            h.append(SOURCE, *v);
        }
        h
    }

    #[test]
    fn the_origin_is_what_the_hub_wrote_last() {
        let origin = |values: &[&str]| origin(Some(&source(values)));
        assert_eq!(origin(&["EDGE_ab12 7 > >"]).as_deref(), Some("ab12"));
        assert_eq!(
            origin(&["EDGE_x 1", "EDGE_ab12 7 > >"]).as_deref(),
            Some("ab12")
        );
        // A node's unterminated line that the hub's header was appended to.
        assert_eq!(
            origin(&["EDGE_x Nats-Stream-Source: EDGE_ab12 7 > >"]).as_deref(),
            Some("ab12")
        );
        assert_eq!(origin(&["OTHER 1"]), None);
        assert_eq!(super::origin(None), None);
    }

    #[test]
    fn a_reports_lane_is_the_node_its_subject_names() {
        let node = NodeId::new();
        let subject = edge::report_subject(&node, "ud.node.x.heartbeat");
        assert_eq!(lane_key(&subject), node.to_string());
        assert_eq!(lane_key("other"), "other");
    }

    #[test]
    fn a_messages_position_is_its_node_streams_name_and_sequence() {
        let position = |values: &[&str]| position(Some(&source(values)));
        assert_eq!(
            position(&["EDGE_ab12 7 > >"]),
            Some(("EDGE_ab12".into(), 7))
        );
        assert_eq!(
            position(&["EDGE_x Nats-Stream-Source: EDGE_ab12 42 > >"]),
            Some(("EDGE_ab12".into(), 42))
        );
        assert_eq!(position(&["EDGE_ab12 seven"]), None);
        assert_eq!(position(&["OTHER 1"]), None);
    }
}
