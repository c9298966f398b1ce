"""Typed payloads of UniDesk's events, generated from
schemas/cddl/unidesk.cddl by clients/python/generate.py: do not edit.

Each class reads the CBOR map of one rule (`from_cbor`) and writes it back
(`to_cbor`); ids are `uuid.UUID`, times milliseconds since the epoch."""

# fmt: off
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class MissingField(ValueError):
    """A payload lacks a field its rule requires."""


def _need(m: Dict[str, Any], key: str, cls: str) -> Any:
    if key not in m:
        raise MissingField(f"{cls}: no field {key!r}")
    return m.pop(key)


def _opt(v: Any, decode: Any) -> Any:
    return None if v is None else decode(v)


@dataclass
class TaskResources:
    """CDDL `task-resources`."""

    cpu_millis: int
    memory_mb: int
    gpus: int
    gpu_model: Optional[str]
    labels: Dict[str, str]
    preferred_labels: Optional[Dict[str, str]] = None
    disk_mb: Optional[int] = None
    gpu_memory_mb: Optional[int] = None
    gpu_compute_capability: Optional[str] = None
    gpu_driver: Optional[str] = None
    gpu_shared: Optional[bool] = None
    network: Optional[str] = None
    preferred_nodes: Optional[List[uuid.UUID]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskResources":
        m = dict(m)
        return cls(
            cpu_millis=_need(m, "cpu_millis", "TaskResources"),
            memory_mb=_need(m, "memory_mb", "TaskResources"),
            gpus=_need(m, "gpus", "TaskResources"),
            gpu_model=_need(m, "gpu_model", "TaskResources"),
            labels=dict(_need(m, "labels", "TaskResources")),
            preferred_labels=_opt(m.pop("preferred_labels", None), lambda v: dict(v)),
            disk_mb=m.pop("disk_mb", None),
            gpu_memory_mb=m.pop("gpu_memory_mb", None),
            gpu_compute_capability=m.pop("gpu_compute_capability", None),
            gpu_driver=m.pop("gpu_driver", None),
            gpu_shared=m.pop("gpu_shared", None),
            network=m.pop("network", None),
            preferred_nodes=_opt(m.pop("preferred_nodes", None), lambda v: [uuid.UUID(bytes=bytes(x)) for x in v]),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["cpu_millis"] = self.cpu_millis
        m["memory_mb"] = self.memory_mb
        m["gpus"] = self.gpus
        m["gpu_model"] = self.gpu_model
        m["labels"] = dict(self.labels)
        if self.preferred_labels is not None:
            m["preferred_labels"] = dict(self.preferred_labels)
        if self.disk_mb is not None:
            m["disk_mb"] = self.disk_mb
        if self.gpu_memory_mb is not None:
            m["gpu_memory_mb"] = self.gpu_memory_mb
        if self.gpu_compute_capability is not None:
            m["gpu_compute_capability"] = self.gpu_compute_capability
        if self.gpu_driver is not None:
            m["gpu_driver"] = self.gpu_driver
        if self.gpu_shared is not None:
            m["gpu_shared"] = self.gpu_shared
        if self.network is not None:
            m["network"] = self.network
        if self.preferred_nodes is not None:
            m["preferred_nodes"] = [x.bytes for x in self.preferred_nodes]
        m.update(self.extra)
        return m


@dataclass
class RetryPolicy:
    """CDDL `retry-policy`."""

    max_attempts: int
    backoff_seconds: int
    exit_codes: Optional[List[int]] = None
    on_timeout: Optional[bool] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "RetryPolicy":
        m = dict(m)
        return cls(
            max_attempts=_need(m, "max_attempts", "RetryPolicy"),
            backoff_seconds=_need(m, "backoff_seconds", "RetryPolicy"),
            exit_codes=_opt(m.pop("exit_codes", None), lambda v: list(v)),
            on_timeout=m.pop("on_timeout", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["max_attempts"] = self.max_attempts
        m["backoff_seconds"] = self.backoff_seconds
        if self.exit_codes is not None:
            m["exit_codes"] = list(self.exit_codes)
        if self.on_timeout is not None:
            m["on_timeout"] = self.on_timeout
        m.update(self.extra)
        return m


@dataclass
class TaskInput:
    """CDDL `task-input`."""

    source: str
    path: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskInput":
        m = dict(m)
        return cls(
            source=_need(m, "source", "TaskInput"),
            path=_need(m, "path", "TaskInput"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["source"] = self.source
        m["path"] = self.path
        m.update(self.extra)
        return m


@dataclass
class Checkpoint:
    """CDDL `checkpoint`."""

    path: str
    every_seconds: int
    from_: Optional[uuid.UUID] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "Checkpoint":
        m = dict(m)
        return cls(
            path=_need(m, "path", "Checkpoint"),
            every_seconds=_need(m, "every_seconds", "Checkpoint"),
            from_=_opt(m.pop("from", None), lambda v: uuid.UUID(bytes=bytes(v))),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["path"] = self.path
        m["every_seconds"] = self.every_seconds
        if self.from_ is not None:
            m["from"] = self.from_.bytes
        m.update(self.extra)
        return m


@dataclass
class After:
    """CDDL `after`."""

    task: uuid.UUID
    when: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "After":
        m = dict(m)
        return cls(
            task=uuid.UUID(bytes=bytes(_need(m, "task", "After"))),
            when=m.pop("when", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["task"] = self.task.bytes
        if self.when is not None:
            m["when"] = self.when
        m.update(self.extra)
        return m


@dataclass
class SharedFolder:
    """CDDL `shared-folder`."""

    from_: Optional[List[uuid.UUID]] = None
    merge: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "SharedFolder":
        m = dict(m)
        return cls(
            from_=_opt(m.pop("from", None), lambda v: [uuid.UUID(bytes=bytes(x)) for x in v]),
            merge=m.pop("merge", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        if self.from_ is not None:
            m["from"] = [x.bytes for x in self.from_]
        if self.merge is not None:
            m["merge"] = self.merge
        m.update(self.extra)
        return m


@dataclass
class Session:
    """CDDL `session`."""

    id: str
    port: int
    idle_timeout_seconds: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "Session":
        m = dict(m)
        return cls(
            id=_need(m, "id", "Session"),
            port=_need(m, "port", "Session"),
            idle_timeout_seconds=_need(m, "idle_timeout_seconds", "Session"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["id"] = self.id
        m["port"] = self.port
        m["idle_timeout_seconds"] = self.idle_timeout_seconds
        m.update(self.extra)
        return m


@dataclass
class TaskSpec:
    """CDDL `task-spec`."""

    name: Optional[str]
    code_repo_url: str
    code_commit_id: str
    env_repo_url: str
    env_commit_id: str
    dockerfile_path: str
    command: List[str]
    args: List[str]
    env: Dict[str, str]
    resources: TaskResources
    timeout_seconds: int
    retry: RetryPolicy
    priority: Optional[int] = None
    queue: Optional[str] = None
    inputs: Optional[List[TaskInput]] = None
    outputs: Optional[List[str]] = None
    shm_size_mb: Optional[int] = None
    secrets: Optional[List[str]] = None
    checkpoint: Optional[Checkpoint] = None
    lost_after_seconds: Optional[int] = None
    after: Optional[List[After]] = None
    shared: Optional[SharedFolder] = None
    store: Optional[str] = None
    ports: Optional[List[int]] = None
    session: Optional[Session] = None
    image: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskSpec":
        m = dict(m)
        return cls(
            name=_need(m, "name", "TaskSpec"),
            code_repo_url=_need(m, "code_repo_url", "TaskSpec"),
            code_commit_id=_need(m, "code_commit_id", "TaskSpec"),
            env_repo_url=_need(m, "env_repo_url", "TaskSpec"),
            env_commit_id=_need(m, "env_commit_id", "TaskSpec"),
            dockerfile_path=_need(m, "dockerfile_path", "TaskSpec"),
            command=list(_need(m, "command", "TaskSpec")),
            args=list(_need(m, "args", "TaskSpec")),
            env=dict(_need(m, "env", "TaskSpec")),
            resources=TaskResources.from_cbor(_need(m, "resources", "TaskSpec")),
            timeout_seconds=_need(m, "timeout_seconds", "TaskSpec"),
            retry=RetryPolicy.from_cbor(_need(m, "retry", "TaskSpec")),
            priority=m.pop("priority", None),
            queue=m.pop("queue", None),
            inputs=_opt(m.pop("inputs", None), lambda v: [TaskInput.from_cbor(x) for x in v]),
            outputs=_opt(m.pop("outputs", None), lambda v: list(v)),
            shm_size_mb=m.pop("shm_size_mb", None),
            secrets=_opt(m.pop("secrets", None), lambda v: list(v)),
            checkpoint=_opt(m.pop("checkpoint", None), lambda v: Checkpoint.from_cbor(v)),
            lost_after_seconds=m.pop("lost_after_seconds", None),
            after=_opt(m.pop("after", None), lambda v: [After.from_cbor(x) for x in v]),
            shared=_opt(m.pop("shared", None), lambda v: SharedFolder.from_cbor(v)),
            store=m.pop("store", None),
            ports=_opt(m.pop("ports", None), lambda v: list(v)),
            session=_opt(m.pop("session", None), lambda v: Session.from_cbor(v)),
            image=m.pop("image", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["name"] = self.name
        m["code_repo_url"] = self.code_repo_url
        m["code_commit_id"] = self.code_commit_id
        m["env_repo_url"] = self.env_repo_url
        m["env_commit_id"] = self.env_commit_id
        m["dockerfile_path"] = self.dockerfile_path
        m["command"] = list(self.command)
        m["args"] = list(self.args)
        m["env"] = dict(self.env)
        m["resources"] = self.resources.to_cbor()
        m["timeout_seconds"] = self.timeout_seconds
        m["retry"] = self.retry.to_cbor()
        if self.priority is not None:
            m["priority"] = self.priority
        if self.queue is not None:
            m["queue"] = self.queue
        if self.inputs is not None:
            m["inputs"] = [x.to_cbor() for x in self.inputs]
        if self.outputs is not None:
            m["outputs"] = list(self.outputs)
        if self.shm_size_mb is not None:
            m["shm_size_mb"] = self.shm_size_mb
        if self.secrets is not None:
            m["secrets"] = list(self.secrets)
        if self.checkpoint is not None:
            m["checkpoint"] = self.checkpoint.to_cbor()
        if self.lost_after_seconds is not None:
            m["lost_after_seconds"] = self.lost_after_seconds
        if self.after is not None:
            m["after"] = [x.to_cbor() for x in self.after]
        if self.shared is not None:
            m["shared"] = self.shared.to_cbor()
        if self.store is not None:
            m["store"] = self.store
        if self.ports is not None:
            m["ports"] = list(self.ports)
        if self.session is not None:
            m["session"] = self.session.to_cbor()
        if self.image is not None:
            m["image"] = self.image
        m.update(self.extra)
        return m


@dataclass
class TaskSubmitted:
    """CDDL `task-submitted`."""

    at: int
    project: str
    spec: TaskSpec
    idempotency_key: Optional[str]
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskSubmitted":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskSubmitted"),
            project=_need(m, "project", "TaskSubmitted"),
            spec=TaskSpec.from_cbor(_need(m, "spec", "TaskSubmitted")),
            idempotency_key=_need(m, "idempotency_key", "TaskSubmitted"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["project"] = self.project
        m["spec"] = self.spec.to_cbor()
        m["idempotency_key"] = self.idempotency_key
        m.update(self.extra)
        return m


@dataclass
class TaskWaiting:
    """CDDL `task-waiting`."""

    at: int
    reason: str
    kind: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskWaiting":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskWaiting"),
            reason=_need(m, "reason", "TaskWaiting"),
            kind=m.pop("kind", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["reason"] = self.reason
        if self.kind is not None:
            m["kind"] = self.kind
        m.update(self.extra)
        return m


@dataclass
class TaskAssigned:
    """CDDL `task-assigned`."""

    at: int
    node_id: uuid.UUID
    attempt: int
    gpus: Optional[List[str]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskAssigned":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskAssigned"),
            node_id=uuid.UUID(bytes=bytes(_need(m, "node_id", "TaskAssigned"))),
            attempt=_need(m, "attempt", "TaskAssigned"),
            gpus=_opt(m.pop("gpus", None), lambda v: list(v)),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["node_id"] = self.node_id.bytes
        m["attempt"] = self.attempt
        if self.gpus is not None:
            m["gpus"] = list(self.gpus)
        m.update(self.extra)
        return m


@dataclass
class TaskPreparing:
    """CDDL `task-preparing`."""

    at: int
    node_id: uuid.UUID
    attempt: int
    step: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskPreparing":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskPreparing"),
            node_id=uuid.UUID(bytes=bytes(_need(m, "node_id", "TaskPreparing"))),
            attempt=_need(m, "attempt", "TaskPreparing"),
            step=_need(m, "step", "TaskPreparing"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["node_id"] = self.node_id.bytes
        m["attempt"] = self.attempt
        m["step"] = self.step
        m.update(self.extra)
        return m


@dataclass
class PrepareStep:
    """CDDL `prepare-step`."""

    name: str
    millis: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PrepareStep":
        m = dict(m)
        return cls(
            name=_need(m, "name", "PrepareStep"),
            millis=_need(m, "millis", "PrepareStep"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["name"] = self.name
        m["millis"] = self.millis
        m.update(self.extra)
        return m


@dataclass
class GpuInUse:
    """CDDL `gpu-in-use`."""

    model: str
    driver: str
    uuid: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "GpuInUse":
        m = dict(m)
        return cls(
            model=_need(m, "model", "GpuInUse"),
            driver=_need(m, "driver", "GpuInUse"),
            uuid=m.pop("uuid", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["model"] = self.model
        m["driver"] = self.driver
        if self.uuid is not None:
            m["uuid"] = self.uuid
        m.update(self.extra)
        return m


@dataclass
class TaskPrepared:
    """CDDL `task-prepared`."""

    at: int
    node_id: uuid.UUID
    attempt: int
    code_commit_id: str
    env_commit_id: str
    dockerfile_digest: str
    image_id: str
    steps: List[PrepareStep]
    gpus: List[GpuInUse]
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskPrepared":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskPrepared"),
            node_id=uuid.UUID(bytes=bytes(_need(m, "node_id", "TaskPrepared"))),
            attempt=_need(m, "attempt", "TaskPrepared"),
            code_commit_id=_need(m, "code_commit_id", "TaskPrepared"),
            env_commit_id=_need(m, "env_commit_id", "TaskPrepared"),
            dockerfile_digest=_need(m, "dockerfile_digest", "TaskPrepared"),
            image_id=_need(m, "image_id", "TaskPrepared"),
            steps=[PrepareStep.from_cbor(x) for x in _need(m, "steps", "TaskPrepared")],
            gpus=[GpuInUse.from_cbor(x) for x in _need(m, "gpus", "TaskPrepared")],
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["node_id"] = self.node_id.bytes
        m["attempt"] = self.attempt
        m["code_commit_id"] = self.code_commit_id
        m["env_commit_id"] = self.env_commit_id
        m["dockerfile_digest"] = self.dockerfile_digest
        m["image_id"] = self.image_id
        m["steps"] = [x.to_cbor() for x in self.steps]
        m["gpus"] = [x.to_cbor() for x in self.gpus]
        m.update(self.extra)
        return m


@dataclass
class OutputObject:
    """CDDL `output-object`."""

    path: str
    key: str
    size: int
    sha256: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "OutputObject":
        m = dict(m)
        return cls(
            path=_need(m, "path", "OutputObject"),
            key=_need(m, "key", "OutputObject"),
            size=_need(m, "size", "OutputObject"),
            sha256=_need(m, "sha256", "OutputObject"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["path"] = self.path
        m["key"] = self.key
        m["size"] = self.size
        m["sha256"] = self.sha256
        m.update(self.extra)
        return m


@dataclass
class TaskOutputs:
    """CDDL `task-outputs`."""

    at: int
    node_id: uuid.UUID
    attempt: int
    files: List[OutputObject]
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskOutputs":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskOutputs"),
            node_id=uuid.UUID(bytes=bytes(_need(m, "node_id", "TaskOutputs"))),
            attempt=_need(m, "attempt", "TaskOutputs"),
            files=[OutputObject.from_cbor(x) for x in _need(m, "files", "TaskOutputs")],
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["node_id"] = self.node_id.bytes
        m["attempt"] = self.attempt
        m["files"] = [x.to_cbor() for x in self.files]
        m.update(self.extra)
        return m


@dataclass
class TaskStarted:
    """CDDL `task-started`."""

    at: int
    node_id: uuid.UUID
    attempt: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskStarted":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskStarted"),
            node_id=uuid.UUID(bytes=bytes(_need(m, "node_id", "TaskStarted"))),
            attempt=_need(m, "attempt", "TaskStarted"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["node_id"] = self.node_id.bytes
        m["attempt"] = self.attempt
        m.update(self.extra)
        return m


@dataclass
class TaskSucceeded:
    """CDDL `task-succeeded`."""

    at: int
    exit_code: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskSucceeded":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskSucceeded"),
            exit_code=_need(m, "exit_code", "TaskSucceeded"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["exit_code"] = self.exit_code
        m.update(self.extra)
        return m


@dataclass
class TaskFailed:
    """CDDL `task-failed`."""

    at: int
    exit_code: Optional[int]
    reason: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskFailed":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskFailed"),
            exit_code=_need(m, "exit_code", "TaskFailed"),
            reason=_need(m, "reason", "TaskFailed"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["exit_code"] = self.exit_code
        m["reason"] = self.reason
        m.update(self.extra)
        return m


@dataclass
class TaskTimedOut:
    """CDDL `task-timed_out`."""

    at: int
    timeout_seconds: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskTimedOut":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskTimedOut"),
            timeout_seconds=_need(m, "timeout_seconds", "TaskTimedOut"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["timeout_seconds"] = self.timeout_seconds
        m.update(self.extra)
        return m


@dataclass
class TaskLost:
    """CDDL `task-lost`."""

    at: int
    node_id: uuid.UUID
    attempt: int
    reason: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskLost":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskLost"),
            node_id=uuid.UUID(bytes=bytes(_need(m, "node_id", "TaskLost"))),
            attempt=_need(m, "attempt", "TaskLost"),
            reason=_need(m, "reason", "TaskLost"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["node_id"] = self.node_id.bytes
        m["attempt"] = self.attempt
        m["reason"] = self.reason
        m.update(self.extra)
        return m


@dataclass
class TaskDisconnected:
    """CDDL `task-disconnected`."""

    at: int
    node_id: uuid.UUID
    attempt: int
    lost_at: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskDisconnected":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskDisconnected"),
            node_id=uuid.UUID(bytes=bytes(_need(m, "node_id", "TaskDisconnected"))),
            attempt=_need(m, "attempt", "TaskDisconnected"),
            lost_at=_need(m, "lost_at", "TaskDisconnected"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["node_id"] = self.node_id.bytes
        m["attempt"] = self.attempt
        m["lost_at"] = self.lost_at
        m.update(self.extra)
        return m


@dataclass
class TaskReconnected:
    """CDDL `task-reconnected`."""

    at: int
    node_id: uuid.UUID
    attempt: int
    running: bool
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskReconnected":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskReconnected"),
            node_id=uuid.UUID(bytes=bytes(_need(m, "node_id", "TaskReconnected"))),
            attempt=_need(m, "attempt", "TaskReconnected"),
            running=_need(m, "running", "TaskReconnected"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["node_id"] = self.node_id.bytes
        m["attempt"] = self.attempt
        m["running"] = self.running
        m.update(self.extra)
        return m


@dataclass
class TaskReprioritized:
    """CDDL `task-reprioritized`."""

    at: int
    priority: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskReprioritized":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskReprioritized"),
            priority=_need(m, "priority", "TaskReprioritized"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["priority"] = self.priority
        m.update(self.extra)
        return m


@dataclass
class TaskRetrying:
    """CDDL `task-retrying`."""

    at: int
    attempt: int
    exit_code: Optional[int]
    reason: str
    not_before: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskRetrying":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskRetrying"),
            attempt=_need(m, "attempt", "TaskRetrying"),
            exit_code=_need(m, "exit_code", "TaskRetrying"),
            reason=_need(m, "reason", "TaskRetrying"),
            not_before=_need(m, "not_before", "TaskRetrying"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["attempt"] = self.attempt
        m["exit_code"] = self.exit_code
        m["reason"] = self.reason
        m["not_before"] = self.not_before
        m.update(self.extra)
        return m


@dataclass
class TaskCancelRequested:
    """CDDL `task-cancel_requested`."""

    at: int
    reason: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskCancelRequested":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskCancelRequested"),
            reason=_need(m, "reason", "TaskCancelRequested"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["reason"] = self.reason
        m.update(self.extra)
        return m


@dataclass
class TaskCancelled:
    """CDDL `task-cancelled`."""

    at: int
    reason: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TaskCancelled":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TaskCancelled"),
            reason=_need(m, "reason", "TaskCancelled"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["reason"] = self.reason
        m.update(self.extra)
        return m


@dataclass
class PipelineStep:
    """CDDL `pipeline-step`."""

    name: str
    spec: TaskSpec
    needs: Optional[List[str]] = None
    when: Optional[str] = None
    matrix: Optional[Dict[str, List[str]]] = None
    merge: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineStep":
        m = dict(m)
        return cls(
            name=_need(m, "name", "PipelineStep"),
            spec=TaskSpec.from_cbor(_need(m, "spec", "PipelineStep")),
            needs=_opt(m.pop("needs", None), lambda v: list(v)),
            when=m.pop("when", None),
            matrix=_opt(m.pop("matrix", None), lambda v: {k: list(x) for k, x in v.items()}),
            merge=m.pop("merge", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["name"] = self.name
        m["spec"] = self.spec.to_cbor()
        if self.needs is not None:
            m["needs"] = list(self.needs)
        if self.when is not None:
            m["when"] = self.when
        if self.matrix is not None:
            m["matrix"] = {k: list(x) for k, x in self.matrix.items()}
        if self.merge is not None:
            m["merge"] = self.merge
        m.update(self.extra)
        return m


@dataclass
class PipelineSubmitted:
    """CDDL `pipeline-submitted`."""

    at: int
    project: str
    name: Optional[str]
    steps: List[PipelineStep]
    idempotency_key: Optional[str]
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineSubmitted":
        m = dict(m)
        return cls(
            at=_need(m, "at", "PipelineSubmitted"),
            project=_need(m, "project", "PipelineSubmitted"),
            name=_need(m, "name", "PipelineSubmitted"),
            steps=[PipelineStep.from_cbor(x) for x in _need(m, "steps", "PipelineSubmitted")],
            idempotency_key=_need(m, "idempotency_key", "PipelineSubmitted"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["project"] = self.project
        m["name"] = self.name
        m["steps"] = [x.to_cbor() for x in self.steps]
        m["idempotency_key"] = self.idempotency_key
        m.update(self.extra)
        return m


@dataclass
class PipelineStepsStartedStep:
    """A member of a map in the CDDL."""

    step: str
    task: uuid.UUID
    run: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineStepsStartedStep":
        m = dict(m)
        return cls(
            step=_need(m, "step", "PipelineStepsStartedStep"),
            task=uuid.UUID(bytes=bytes(_need(m, "task", "PipelineStepsStartedStep"))),
            run=_need(m, "run", "PipelineStepsStartedStep"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["step"] = self.step
        m["task"] = self.task.bytes
        m["run"] = self.run
        m.update(self.extra)
        return m


@dataclass
class PipelineStepsStarted:
    """CDDL `pipeline-steps_started`."""

    at: int
    steps: List[PipelineStepsStartedStep]
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineStepsStarted":
        m = dict(m)
        return cls(
            at=_need(m, "at", "PipelineStepsStarted"),
            steps=[PipelineStepsStartedStep.from_cbor(x) for x in _need(m, "steps", "PipelineStepsStarted")],
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["steps"] = [x.to_cbor() for x in self.steps]
        m.update(self.extra)
        return m


@dataclass
class PipelineStepEnded:
    """CDDL `pipeline-step_ended`."""

    at: int
    step: str
    task: uuid.UUID
    outcome: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineStepEnded":
        m = dict(m)
        return cls(
            at=_need(m, "at", "PipelineStepEnded"),
            step=_need(m, "step", "PipelineStepEnded"),
            task=uuid.UUID(bytes=bytes(_need(m, "task", "PipelineStepEnded"))),
            outcome=_need(m, "outcome", "PipelineStepEnded"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["step"] = self.step
        m["task"] = self.task.bytes
        m["outcome"] = self.outcome
        m.update(self.extra)
        return m


@dataclass
class PipelineStepSkipped:
    """CDDL `pipeline-step_skipped`."""

    at: int
    step: str
    reason: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineStepSkipped":
        m = dict(m)
        return cls(
            at=_need(m, "at", "PipelineStepSkipped"),
            step=_need(m, "step", "PipelineStepSkipped"),
            reason=_need(m, "reason", "PipelineStepSkipped"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["step"] = self.step
        m["reason"] = self.reason
        m.update(self.extra)
        return m


@dataclass
class PipelineCancelRequested:
    """CDDL `pipeline-cancel_requested`."""

    at: int
    reason: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineCancelRequested":
        m = dict(m)
        return cls(
            at=_need(m, "at", "PipelineCancelRequested"),
            reason=_need(m, "reason", "PipelineCancelRequested"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["reason"] = self.reason
        m.update(self.extra)
        return m


@dataclass
class PipelineRerun:
    """CDDL `pipeline-rerun`."""

    at: int
    steps: List[str]
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineRerun":
        m = dict(m)
        return cls(
            at=_need(m, "at", "PipelineRerun"),
            steps=list(_need(m, "steps", "PipelineRerun")),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["steps"] = list(self.steps)
        m.update(self.extra)
        return m


@dataclass
class PipelineEnded:
    """CDDL `pipeline-ended`."""

    at: int
    outcome: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "PipelineEnded":
        m = dict(m)
        return cls(
            at=_need(m, "at", "PipelineEnded"),
            outcome=_need(m, "outcome", "PipelineEnded"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["outcome"] = self.outcome
        m.update(self.extra)
        return m


@dataclass
class ScheduleCreated:
    """CDDL `schedule-created`."""

    at: int
    project: str
    name: str
    cron: str
    timezone: str
    missed: str
    task: Optional[Dict[str, Any]] = None
    pipeline: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ScheduleCreated":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ScheduleCreated"),
            project=_need(m, "project", "ScheduleCreated"),
            name=_need(m, "name", "ScheduleCreated"),
            cron=_need(m, "cron", "ScheduleCreated"),
            timezone=_need(m, "timezone", "ScheduleCreated"),
            missed=_need(m, "missed", "ScheduleCreated"),
            task=_opt(m.pop("task", None), lambda v: dict(v)),
            pipeline=_opt(m.pop("pipeline", None), lambda v: dict(v)),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["project"] = self.project
        m["name"] = self.name
        m["cron"] = self.cron
        m["timezone"] = self.timezone
        m["missed"] = self.missed
        if self.task is not None:
            m["task"] = dict(self.task)
        if self.pipeline is not None:
            m["pipeline"] = dict(self.pipeline)
        m.update(self.extra)
        return m


@dataclass
class ScheduleFired:
    """CDDL `schedule-fired`."""

    at: int
    due: int
    task_id: Optional[uuid.UUID] = None
    pipeline_id: Optional[uuid.UUID] = None
    error: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ScheduleFired":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ScheduleFired"),
            due=_need(m, "due", "ScheduleFired"),
            task_id=_opt(m.pop("task_id", None), lambda v: uuid.UUID(bytes=bytes(v))),
            pipeline_id=_opt(m.pop("pipeline_id", None), lambda v: uuid.UUID(bytes=bytes(v))),
            error=m.pop("error", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["due"] = self.due
        if self.task_id is not None:
            m["task_id"] = self.task_id.bytes
        if self.pipeline_id is not None:
            m["pipeline_id"] = self.pipeline_id.bytes
        if self.error is not None:
            m["error"] = self.error
        m.update(self.extra)
        return m


@dataclass
class ScheduleSkipped:
    """CDDL `schedule-skipped`."""

    at: int
    first: int
    last: int
    count: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ScheduleSkipped":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ScheduleSkipped"),
            first=_need(m, "first", "ScheduleSkipped"),
            last=_need(m, "last", "ScheduleSkipped"),
            count=_need(m, "count", "ScheduleSkipped"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["first"] = self.first
        m["last"] = self.last
        m["count"] = self.count
        m.update(self.extra)
        return m


@dataclass
class SchedulePaused:
    """CDDL `schedule-paused`."""

    at: int
    reason: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "SchedulePaused":
        m = dict(m)
        return cls(
            at=_need(m, "at", "SchedulePaused"),
            reason=_need(m, "reason", "SchedulePaused"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["reason"] = self.reason
        m.update(self.extra)
        return m


@dataclass
class ScheduleResumed:
    """CDDL `schedule-resumed`."""

    at: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ScheduleResumed":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ScheduleResumed"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m.update(self.extra)
        return m


@dataclass
class ScheduleDeleted:
    """CDDL `schedule-deleted`."""

    at: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ScheduleDeleted":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ScheduleDeleted"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m.update(self.extra)
        return m


@dataclass
class NodeEnrolled:
    """CDDL `node-enrolled`."""

    at: int
    name: str
    labels: Dict[str, str]
    secret_hash: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "NodeEnrolled":
        m = dict(m)
        return cls(
            at=_need(m, "at", "NodeEnrolled"),
            name=_need(m, "name", "NodeEnrolled"),
            labels=dict(_need(m, "labels", "NodeEnrolled")),
            secret_hash=_need(m, "secret_hash", "NodeEnrolled"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["name"] = self.name
        m["labels"] = dict(self.labels)
        m["secret_hash"] = self.secret_hash
        m.update(self.extra)
        return m


@dataclass
class NodeRevoked:
    """CDDL `node-revoked`."""

    at: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "NodeRevoked":
        m = dict(m)
        return cls(
            at=_need(m, "at", "NodeRevoked"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m.update(self.extra)
        return m


@dataclass
class Gpu:
    """CDDL `gpu`."""

    model: str
    memory_mb: int
    index: Optional[int] = None
    uuid: Optional[str] = None
    compute_capability: Optional[str] = None
    mig_profile: Optional[str] = None
    pci_bus_id: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "Gpu":
        m = dict(m)
        return cls(
            model=_need(m, "model", "Gpu"),
            memory_mb=_need(m, "memory_mb", "Gpu"),
            index=m.pop("index", None),
            uuid=m.pop("uuid", None),
            compute_capability=m.pop("compute_capability", None),
            mig_profile=m.pop("mig_profile", None),
            pci_bus_id=m.pop("pci_bus_id", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["model"] = self.model
        m["memory_mb"] = self.memory_mb
        if self.index is not None:
            m["index"] = self.index
        if self.uuid is not None:
            m["uuid"] = self.uuid
        if self.compute_capability is not None:
            m["compute_capability"] = self.compute_capability
        if self.mig_profile is not None:
            m["mig_profile"] = self.mig_profile
        if self.pci_bus_id is not None:
            m["pci_bus_id"] = self.pci_bus_id
        m.update(self.extra)
        return m


@dataclass
class NodeResources:
    """CDDL `node-resources`."""

    cpu_millis: int
    memory_mb: int
    disk_mb: int
    gpus: List[Gpu]
    os: str
    wsl: bool
    docker_version: Optional[str]
    agent_version: str
    gpu_driver: Optional[str] = None
    cuda_version: Optional[str] = None
    networks: Optional[List[str]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "NodeResources":
        m = dict(m)
        return cls(
            cpu_millis=_need(m, "cpu_millis", "NodeResources"),
            memory_mb=_need(m, "memory_mb", "NodeResources"),
            disk_mb=_need(m, "disk_mb", "NodeResources"),
            gpus=[Gpu.from_cbor(x) for x in _need(m, "gpus", "NodeResources")],
            os=_need(m, "os", "NodeResources"),
            wsl=_need(m, "wsl", "NodeResources"),
            docker_version=_need(m, "docker_version", "NodeResources"),
            agent_version=_need(m, "agent_version", "NodeResources"),
            gpu_driver=m.pop("gpu_driver", None),
            cuda_version=m.pop("cuda_version", None),
            networks=_opt(m.pop("networks", None), lambda v: list(v)),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["cpu_millis"] = self.cpu_millis
        m["memory_mb"] = self.memory_mb
        m["disk_mb"] = self.disk_mb
        m["gpus"] = [x.to_cbor() for x in self.gpus]
        m["os"] = self.os
        m["wsl"] = self.wsl
        m["docker_version"] = self.docker_version
        m["agent_version"] = self.agent_version
        if self.gpu_driver is not None:
            m["gpu_driver"] = self.gpu_driver
        if self.cuda_version is not None:
            m["cuda_version"] = self.cuda_version
        if self.networks is not None:
            m["networks"] = list(self.networks)
        m.update(self.extra)
        return m


@dataclass
class NodeRegistered:
    """CDDL `node-registered`."""

    at: int
    name: str
    labels: Dict[str, str]
    resources: NodeResources
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "NodeRegistered":
        m = dict(m)
        return cls(
            at=_need(m, "at", "NodeRegistered"),
            name=_need(m, "name", "NodeRegistered"),
            labels=dict(_need(m, "labels", "NodeRegistered")),
            resources=NodeResources.from_cbor(_need(m, "resources", "NodeRegistered")),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["name"] = self.name
        m["labels"] = dict(self.labels)
        m["resources"] = self.resources.to_cbor()
        m.update(self.extra)
        return m


@dataclass
class NodeHeartbeat:
    """CDDL `node-heartbeat`."""

    at: int
    running_tasks: int
    disk_free_mb: Optional[int]
    low_disk: bool
    gpus: Optional[List[str]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "NodeHeartbeat":
        m = dict(m)
        return cls(
            at=_need(m, "at", "NodeHeartbeat"),
            running_tasks=_need(m, "running_tasks", "NodeHeartbeat"),
            disk_free_mb=_need(m, "disk_free_mb", "NodeHeartbeat"),
            low_disk=_need(m, "low_disk", "NodeHeartbeat"),
            gpus=_opt(m.pop("gpus", None), lambda v: list(v)),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["running_tasks"] = self.running_tasks
        m["disk_free_mb"] = self.disk_free_mb
        m["low_disk"] = self.low_disk
        if self.gpus is not None:
            m["gpus"] = list(self.gpus)
        m.update(self.extra)
        return m


@dataclass
class NodeHeartbeatV1:
    """CDDL `node-heartbeat-v1`."""

    at: int
    running_tasks: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "NodeHeartbeatV1":
        m = dict(m)
        return cls(
            at=_need(m, "at", "NodeHeartbeatV1"),
            running_tasks=_need(m, "running_tasks", "NodeHeartbeatV1"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["running_tasks"] = self.running_tasks
        m.update(self.extra)
        return m


@dataclass
class NodeOffline:
    """CDDL `node-offline`."""

    at: int
    last_seen: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "NodeOffline":
        m = dict(m)
        return cls(
            at=_need(m, "at", "NodeOffline"),
            last_seen=_need(m, "last_seen", "NodeOffline"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["last_seen"] = self.last_seen
        m.update(self.extra)
        return m


@dataclass
class NodeScheduling:
    """CDDL `node-scheduling`."""

    at: int
    mode: str
    reason: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "NodeScheduling":
        m = dict(m)
        return cls(
            at=_need(m, "at", "NodeScheduling"),
            mode=_need(m, "mode", "NodeScheduling"),
            reason=_need(m, "reason", "NodeScheduling"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["mode"] = self.mode
        m["reason"] = self.reason
        m.update(self.extra)
        return m


@dataclass
class TokenIssued:
    """CDDL `token-issued`."""

    at: int
    name: str
    digest: str
    projects: List[str]
    admin: bool
    user: Optional[str] = None
    expires_at: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TokenIssued":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TokenIssued"),
            name=_need(m, "name", "TokenIssued"),
            digest=_need(m, "digest", "TokenIssued"),
            projects=list(_need(m, "projects", "TokenIssued")),
            admin=_need(m, "admin", "TokenIssued"),
            user=m.pop("user", None),
            expires_at=m.pop("expires_at", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["name"] = self.name
        m["digest"] = self.digest
        m["projects"] = list(self.projects)
        m["admin"] = self.admin
        if self.user is not None:
            m["user"] = self.user
        if self.expires_at is not None:
            m["expires_at"] = self.expires_at
        m.update(self.extra)
        return m


@dataclass
class TokenRevoked:
    """CDDL `token-revoked`."""

    at: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "TokenRevoked":
        m = dict(m)
        return cls(
            at=_need(m, "at", "TokenRevoked"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m.update(self.extra)
        return m


@dataclass
class ProjectCreated:
    """CDDL `project-created`."""

    at: int
    description: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ProjectCreated":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ProjectCreated"),
            description=_need(m, "description", "ProjectCreated"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["description"] = self.description
        m.update(self.extra)
        return m


@dataclass
class ProjectMemberAdded:
    """CDDL `project-member_added`."""

    at: int
    user: str
    role: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ProjectMemberAdded":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ProjectMemberAdded"),
            user=_need(m, "user", "ProjectMemberAdded"),
            role=_need(m, "role", "ProjectMemberAdded"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["user"] = self.user
        m["role"] = self.role
        m.update(self.extra)
        return m


@dataclass
class ProjectRoleChanged:
    """CDDL `project-role_changed`."""

    at: int
    user: str
    role: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ProjectRoleChanged":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ProjectRoleChanged"),
            user=_need(m, "user", "ProjectRoleChanged"),
            role=_need(m, "role", "ProjectRoleChanged"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["user"] = self.user
        m["role"] = self.role
        m.update(self.extra)
        return m


@dataclass
class ProjectMemberRemoved:
    """CDDL `project-member_removed`."""

    at: int
    user: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ProjectMemberRemoved":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ProjectMemberRemoved"),
            user=_need(m, "user", "ProjectMemberRemoved"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["user"] = self.user
        m.update(self.extra)
        return m


@dataclass
class ProjectArchived:
    """CDDL `project-archived`."""

    at: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "ProjectArchived":
        m = dict(m)
        return cls(
            at=_need(m, "at", "ProjectArchived"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m.update(self.extra)
        return m


@dataclass
class SecretSet:
    """CDDL `secret-set`."""

    at: int
    version: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "SecretSet":
        m = dict(m)
        return cls(
            at=_need(m, "at", "SecretSet"),
            version=_need(m, "version", "SecretSet"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["version"] = self.version
        m.update(self.extra)
        return m


@dataclass
class SecretDeleted:
    """CDDL `secret-deleted`."""

    at: int
    version: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "SecretDeleted":
        m = dict(m)
        return cls(
            at=_need(m, "at", "SecretDeleted"),
            version=_need(m, "version", "SecretDeleted"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["version"] = self.version
        m.update(self.extra)
        return m


@dataclass
class DispatchRun:
    """CDDL `dispatch-run`."""

    at: int
    task_id: uuid.UUID
    attempt: int
    spec: TaskSpec
    gpus: Optional[List[str]] = None
    fence_after_seconds: Optional[int] = None
    project: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "DispatchRun":
        m = dict(m)
        return cls(
            at=_need(m, "at", "DispatchRun"),
            task_id=uuid.UUID(bytes=bytes(_need(m, "task_id", "DispatchRun"))),
            attempt=_need(m, "attempt", "DispatchRun"),
            spec=TaskSpec.from_cbor(_need(m, "spec", "DispatchRun")),
            gpus=_opt(m.pop("gpus", None), lambda v: list(v)),
            fence_after_seconds=m.pop("fence_after_seconds", None),
            project=m.pop("project", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["task_id"] = self.task_id.bytes
        m["attempt"] = self.attempt
        m["spec"] = self.spec.to_cbor()
        if self.gpus is not None:
            m["gpus"] = list(self.gpus)
        if self.fence_after_seconds is not None:
            m["fence_after_seconds"] = self.fence_after_seconds
        if self.project is not None:
            m["project"] = self.project
        m.update(self.extra)
        return m


@dataclass
class DispatchCancel:
    """CDDL `dispatch-cancel`."""

    at: int
    task_id: uuid.UUID
    reason: str
    grace_seconds: int
    attempt: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "DispatchCancel":
        m = dict(m)
        return cls(
            at=_need(m, "at", "DispatchCancel"),
            task_id=uuid.UUID(bytes=bytes(_need(m, "task_id", "DispatchCancel"))),
            reason=_need(m, "reason", "DispatchCancel"),
            grace_seconds=_need(m, "grace_seconds", "DispatchCancel"),
            attempt=m.pop("attempt", None),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["task_id"] = self.task_id.bytes
        m["reason"] = self.reason
        m["grace_seconds"] = self.grace_seconds
        if self.attempt is not None:
            m["attempt"] = self.attempt
        m.update(self.extra)
        return m


@dataclass
class LogChunk:
    """CDDL `log-chunk`."""

    at: int
    attempt: int
    stream: str
    text: str
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "LogChunk":
        m = dict(m)
        return cls(
            at=_need(m, "at", "LogChunk"),
            attempt=_need(m, "attempt", "LogChunk"),
            stream=_need(m, "stream", "LogChunk"),
            text=_need(m, "text", "LogChunk"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["attempt"] = self.attempt
        m["stream"] = self.stream
        m["text"] = self.text
        m.update(self.extra)
        return m


@dataclass
class DiskAlert:
    """CDDL `disk-alert`."""

    at: int
    server: str
    path: str
    free_bytes: int
    min_free_bytes: int
    extra: Dict[str, Any] = field(default_factory=dict)
    """Fields a newer producer added that this module does not know."""

    @classmethod
    def from_cbor(cls, m: Dict[str, Any]) -> "DiskAlert":
        m = dict(m)
        return cls(
            at=_need(m, "at", "DiskAlert"),
            server=_need(m, "server", "DiskAlert"),
            path=_need(m, "path", "DiskAlert"),
            free_bytes=_need(m, "free_bytes", "DiskAlert"),
            min_free_bytes=_need(m, "min_free_bytes", "DiskAlert"),
            extra=m,
        )

    def to_cbor(self) -> Dict[str, Any]:
        m: Dict[str, Any] = {}
        m["at"] = self.at
        m["server"] = self.server
        m["path"] = self.path
        m["free_bytes"] = self.free_bytes
        m["min_free_bytes"] = self.min_free_bytes
        m.update(self.extra)
        return m


# The class of each rule, by its CDDL name.
RULES: Dict[str, Any] = {
    "after": After,
    "checkpoint": Checkpoint,
    "disk-alert": DiskAlert,
    "dispatch-cancel": DispatchCancel,
    "dispatch-run": DispatchRun,
    "gpu": Gpu,
    "gpu-in-use": GpuInUse,
    "log-chunk": LogChunk,
    "node-enrolled": NodeEnrolled,
    "node-heartbeat": NodeHeartbeat,
    "node-heartbeat-v1": NodeHeartbeatV1,
    "node-offline": NodeOffline,
    "node-registered": NodeRegistered,
    "node-resources": NodeResources,
    "node-revoked": NodeRevoked,
    "node-scheduling": NodeScheduling,
    "output-object": OutputObject,
    "pipeline-cancel_requested": PipelineCancelRequested,
    "pipeline-ended": PipelineEnded,
    "pipeline-rerun": PipelineRerun,
    "pipeline-step": PipelineStep,
    "pipeline-step_ended": PipelineStepEnded,
    "pipeline-step_skipped": PipelineStepSkipped,
    "pipeline-steps_started": PipelineStepsStarted,
    "pipeline-submitted": PipelineSubmitted,
    "prepare-step": PrepareStep,
    "project-archived": ProjectArchived,
    "project-created": ProjectCreated,
    "project-member_added": ProjectMemberAdded,
    "project-member_removed": ProjectMemberRemoved,
    "project-role_changed": ProjectRoleChanged,
    "retry-policy": RetryPolicy,
    "schedule-created": ScheduleCreated,
    "schedule-deleted": ScheduleDeleted,
    "schedule-fired": ScheduleFired,
    "schedule-paused": SchedulePaused,
    "schedule-resumed": ScheduleResumed,
    "schedule-skipped": ScheduleSkipped,
    "secret-deleted": SecretDeleted,
    "secret-set": SecretSet,
    "session": Session,
    "shared-folder": SharedFolder,
    "task-assigned": TaskAssigned,
    "task-cancel_requested": TaskCancelRequested,
    "task-cancelled": TaskCancelled,
    "task-disconnected": TaskDisconnected,
    "task-failed": TaskFailed,
    "task-input": TaskInput,
    "task-lost": TaskLost,
    "task-outputs": TaskOutputs,
    "task-prepared": TaskPrepared,
    "task-preparing": TaskPreparing,
    "task-reconnected": TaskReconnected,
    "task-reprioritized": TaskReprioritized,
    "task-resources": TaskResources,
    "task-retrying": TaskRetrying,
    "task-spec": TaskSpec,
    "task-started": TaskStarted,
    "task-submitted": TaskSubmitted,
    "task-succeeded": TaskSucceeded,
    "task-timed_out": TaskTimedOut,
    "task-waiting": TaskWaiting,
    "token-issued": TokenIssued,
    "token-revoked": TokenRevoked,
}
