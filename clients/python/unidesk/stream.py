"""Events from the platform's streams, decoded into the classes of
`unidesk.events`. Reading from NATS needs the `nats-py` package
(`pip install unidesk[events]`); decoding does not."""

import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, Optional

import cbor2

from .events import RULES


@dataclass
class Event:
    """One stored event: its subject, type (`task.failed`), schema version,
    id, actor and payload (`data`, an instance of the rule's class, or the
    raw CBOR map for a rule or version this package does not know)."""

    subject: str
    type: str
    version: int
    data: Any
    id: Optional[uuid.UUID] = None
    actor: Optional[str] = None
    correlation_id: Optional[uuid.UUID] = None
    causation_id: Optional[uuid.UUID] = None
    seq: Optional[int] = None
    known: bool = True


def rule_of(subject: str) -> Optional[str]:
    """The CDDL rule a subject's payload follows (docs/contract.md)."""
    parts = subject.split(".")
    if len(parts) < 2 or parts[0] != "ud":
        return None
    kind = parts[1]
    if kind in ("task", "node", "pipeline", "schedule") and len(parts) == 4:
        return f"{kind}-{parts[3]}"
    if kind == "auth" and len(parts) >= 4 and parts[2] in ("token", "secret", "project"):
        return f"{parts[2]}-{parts[-1]}"
    if kind == "log" and len(parts) == 3:
        return "log-chunk"
    if kind == "alert" and len(parts) == 4 and parts[2] == "disk":
        return "disk-alert"
    if kind == "dispatch" and len(parts) == 5:
        return f"dispatch-{parts[4]}"
    return None


def _uuid(value: Optional[str]) -> Optional[uuid.UUID]:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


def decode(subject: str, headers: Optional[Mapping[str, str]], payload: bytes,
           seq: Optional[int] = None) -> Event:
    """Decodes one message of a `ud.` subject. The `Ud-Schema-Version`
    header picks the rule's version (`node-heartbeat-v1` for version 1 of
    `node-heartbeat`); an unknown rule or version leaves `data` the raw map
    with `known` false, so a newer platform does not break a reader."""
    headers = headers or {}
    rule = rule_of(subject)
    try:
        version = int(headers.get("Ud-Schema-Version") or 1)
    except ValueError:
        version = 0  # no version this package knows: the raw map

    raw = cbor2.loads(payload)
    event_type = headers.get("Ud-Event-Type") or (rule.replace("-", ".", 1) if rule else subject)
    cls = None
    if rule:
        cls = RULES.get(f"{rule}-v{version}") or (RULES.get(rule) if _current(rule, version) else None)
    data, known = (cls.from_cbor(raw), True) if cls and isinstance(raw, dict) else (raw, False)
    return Event(subject=subject, type=event_type, version=version, data=data,
                 id=_uuid(headers.get("Nats-Msg-Id")), actor=headers.get("Ud-Actor"),
                 correlation_id=_uuid(headers.get("Ud-Correlation-Id")),
                 causation_id=_uuid(headers.get("Ud-Causation-Id")), seq=seq, known=known)


def _current(rule: str, version: int) -> bool:
    """Whether `version` is the one the plain rule describes: the newest,
    one above its highest `-vN` rule (1 when it has none)."""
    older = [int(r.rsplit("-v", 1)[1]) for r in RULES if r.startswith(rule + "-v")]
    return version == (max(older) + 1 if older else 1)


async def subscribe(nc: Any, subject: str = "ud.task.>", from_start: bool = False,
                    domain: Optional[str] = "hub") -> AsyncIterator[Event]:
    """Follows the stream holding `subject` (a wildcard such as
    `ud.task.*.failed`) through an ordered JetStream consumer on the
    connection `nc` (a `nats.aio.client.Client`): events stored from now
    on, or every stored one with `from_start`. Yields `Event`s with their
    stream sequence."""
    from nats.js.api import DeliverPolicy  # the optional dependency

    js = nc.jetstream(domain=domain)
    policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=policy)
    try:
        async for msg in sub.messages:
            seq = msg.metadata.sequence.stream if msg.metadata else None
            yield decode(msg.subject, msg.headers, msg.data, seq)
    finally:
        await sub.unsubscribe()
