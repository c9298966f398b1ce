"""A Python client of UniDesk: the REST API (`Client`) and the platform's
events, decoded into classes generated from the CDDL (`decode`,
`subscribe`)."""

from . import events
from .client import FINAL, ApiError, Client
from .stream import Event, decode, rule_of, subscribe

__all__ = ["ApiError", "Client", "Event", "FINAL", "decode", "events", "rule_of", "subscribe"]
