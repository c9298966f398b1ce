"""The REST API (gateway/openapi.json) over the standard library's HTTP."""

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Union

# States a task does not leave.
FINAL = ("succeeded", "failed", "timed_out", "cancelled")


class ApiError(Exception):
    """An answer other than 2xx: `status`, the machine-readable `code`
    (`invalid_request`, `not_found`, ...), the `message` and, for a refused
    body, each rejected field with its reason."""

    def __init__(self, status: int, code: str, message: str, fields: Optional[List[Dict[str, str]]] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.fields = fields or []


class Client:
    """A UniDesk main server at `url` (e.g. `https://unidesk.example.org`),
    acting with an API token."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    # ---- the wire ------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None, query: Optional[Dict[str, Any]] = None,
              headers: Optional[Dict[str, str]] = None) -> Any:
        url = self.url + path
        query = {k: v for k, v in (query or {}).items() if v is not None}
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
                raise ApiError(e.code, err.get("error", "error"), err.get("message", ""), err.get("fields")) from None
            except (ValueError, AttributeError):
                raise ApiError(e.code, "error", raw.decode(errors="replace")[:500]) from None
        return json.loads(text) if text else None

    @staticmethod
    def _path(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    # ---- tasks ---------------------------------------------------------

    def submit(self, project: str, code_repo_url: str, code_commit_id: str, command: List[str],
               idempotency_key: Optional[str] = None, projected: bool = True, **spec: Any) -> str:
        """Submits a task and returns its id. `spec` takes the other fields
        of `SubmitTask` (env_repo_url, env_commit_id, dockerfile_path,
        resources, inputs, outputs, timeout_seconds, ...). With `projected`
        (the default) it returns once the read models hold the task, so
        `task` finds it at once."""
        body = {"project": project, "code_repo_url": code_repo_url,
                "code_commit_id": code_commit_id, "command": list(command), **spec}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        query = {"wait": "projected"} if projected else None
        return self._call("POST", "/api/v1/tasks", body, query=query, headers=headers)["task_id"]

    def task(self, task_id: str) -> Dict[str, Any]:
        """A task as the read model holds it (`TaskView`)."""
        return self._call("GET", f"/api/v1/tasks/{self._path(task_id)}")

    def tasks(self, **filters: Any) -> List[Dict[str, Any]]:
        """One page of tasks, newest first (filters: state, project, node,
        queue, before, limit)."""
        return self._call("GET", "/api/v1/tasks", query=filters)["items"]

    def history(self, task_id: str) -> List[Dict[str, Any]]:
        """Every event of the task, from the event stream."""
        return self._call("GET", f"/api/v1/tasks/{self._path(task_id)}/events")

    def cancel(self, task_id: str, reason: Optional[str] = None) -> Dict[str, Any]:
        return self._call("POST", f"/api/v1/tasks/{self._path(task_id)}/cancel", {"reason": reason})

    def wait(self, task_id: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Waits until the task has ended and returns it; `TimeoutError`
        after `timeout` seconds. Follows the task's output meanwhile (a long
        poll that answers at once when a line arrives), so a task that writes
        is seen to end without delay; a quiet one is looked at again at
        least every 2 s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            t = self.task(task_id)
            if t["state"] in FINAL:
                return t
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"task {task_id} still {t['state']} after {timeout} s")
            wait = 2 if left is None else max(0, min(2, int(left)))
            after = self._log_page(task_id, after, wait)["next"]

    def _log_page(self, task_id: str, after: int, wait: Optional[int]) -> Dict[str, Any]:
        return self._call("GET", f"/api/v1/tasks/{self._path(task_id)}/logs",
                          query={"after": after, "wait": wait})

    def logs(self, task_id: str, follow: bool = False) -> Iterator[Dict[str, Any]]:
        """The task's output chunks (`LogLine`: seq, at, attempt, stream,
        text), in order; with `follow`, until the task has ended."""
        after = 0
        while True:
            page = self._log_page(task_id, after, 30 if follow else None)
            yield from page["lines"]
            after = page["next"]
            if page["lines"]:
                continue
            if not follow or self.task(task_id)["state"] in FINAL:
                # Lines stored between the last page and the end.
                last = self._log_page(task_id, after, None)
                yield from last["lines"]
                if not last["lines"]:
                    return
                after = last["next"]

    def log_text(self, task_id: str) -> str:
        """The task's whole output as one text."""
        return "".join(line["text"] for line in self.logs(task_id))

    def outputs(self, task_id: str) -> Dict[str, bytes]:
        """What the task's last run left in the object store, by path."""
        return {o["path"]: self._fetch(o["download"]) for o in self.task(task_id)["outputs"]}

    # ---- schedules -----------------------------------------------------

    def create_schedule(self, name: str, cron: str, task: Optional[Dict[str, Any]] = None,
                        pipeline: Optional[Dict[str, Any]] = None, timezone: str = "UTC",
                        missed: str = "skip") -> str:
        """Makes a schedule that submits `task` (the body of `submit`, as a
        dict with `project`) or `pipeline` at the times of `cron` (5 fields,
        or 6 with seconds first) in `timezone`; `missed`: `skip` or
        `catch_up`. Returns its id."""
        body: Dict[str, Any] = {"name": name, "cron": cron, "timezone": timezone, "missed": missed}
        if task is not None:
            body["task"] = task
        if pipeline is not None:
            body["pipeline"] = pipeline
        return self._call("POST", "/api/v1/schedules", body, query={"wait": "projected"})["schedule_id"]

    def schedule(self, schedule_id: str) -> Dict[str, Any]:
        """A schedule with its next time and how its last one went."""
        return self._call("GET", f"/api/v1/schedules/{self._path(schedule_id)}")

    def schedules(self, project: Optional[str] = None) -> List[Dict[str, Any]]:
        return self._call("GET", "/api/v1/schedules", query={"project": project})["items"]

    def pause_schedule(self, schedule_id: str, reason: Optional[str] = None) -> None:
        self._call("POST", f"/api/v1/schedules/{self._path(schedule_id)}/pause", {"reason": reason},
                   query={"wait": "projected"})

    def resume_schedule(self, schedule_id: str) -> None:
        self._call("POST", f"/api/v1/schedules/{self._path(schedule_id)}/resume", query={"wait": "projected"})

    def delete_schedule(self, schedule_id: str) -> None:
        self._call("DELETE", f"/api/v1/schedules/{self._path(schedule_id)}", query={"wait": "projected"})

    # ---- project files -------------------------------------------------

    def upload(self, project: str, path: str, data: Union[bytes, str]) -> Dict[str, Any]:
        """Stores `data` (bytes, or the name of a local file) as the
        project's file `path`, in one PUT or in parts as the server plans."""
        if isinstance(data, str):
            with open(data, "rb") as f:
                data = f.read()
        p = self._path(project)
        plan = self._call("POST", f"/api/v1/projects/{p}/uploads", {"path": path, "size_bytes": len(data)})
        if plan["kind"] == "single":
            self._send(plan["url"], data)
            return {"path": path, "size": len(data)}
        size = plan["part_size"]
        for part in plan["parts"]:
            n = part["number"]
            self._send(part["url"], data[(n - 1) * size:n * size])
        return self._call("POST", f"/api/v1/projects/{p}/uploads/{self._path(plan['upload_id'])}/complete",
                          {"path": path, "size_bytes": len(data)})

    def files(self, project: str) -> List[Dict[str, Any]]:
        return self._call("GET", f"/api/v1/projects/{self._path(project)}/files")["files"]

    def download(self, project: str, path: str) -> bytes:
        d = self._call("GET", f"/api/v1/projects/{self._path(project)}/files/{urllib.parse.quote(path)}")
        return self._fetch(d["download"])

    # ---- presigned URLs ------------------------------------------------

    def _send(self, signed: Dict[str, Any], data: bytes) -> None:
        req = urllib.request.Request(signed["url"], data=data, method=signed.get("method", "PUT"))
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            resp.read()

    def _fetch(self, signed: Optional[Dict[str, Any]]) -> bytes:
        if not signed:
            raise ApiError(503, "unavailable", "the platform has no object store configured now")
        req = urllib.request.Request(signed["url"], method=signed.get("method", "GET"))
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return resp.read()
