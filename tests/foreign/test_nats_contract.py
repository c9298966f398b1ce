"""Black-box contract test of UniDesk's NATS surface, using the third-party
nats-py client against a real nats-server, PostgreSQL and `unidesk serve`."""

import asyncio
import json
import os
import pathlib
import queue
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse

import cbor2
import nats
import nats.js.api
from nats.errors import NoRespondersError

REPO = pathlib.Path(__file__).resolve().parents[2]
UNIDESK = REPO / "target" / "debug" / "unidesk"
VERSION_FIELDS = ("code_repo_url", "code_commit_id", "env_repo_url", "env_commit_id", "dockerfile_path")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, marker, timeout, **popen):
    """Starts cmd and waits for a line containing marker on its piped stream.

    The pipe keeps being drained afterwards so the child never blocks on it."""
    proc = subprocess.Popen(cmd, text=True, **popen)
    stream = proc.stdout if popen.get("stdout") == subprocess.PIPE else proc.stderr
    lines = queue.Queue()

    def drain():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    seen, deadline = [], time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"{cmd[0]} not ready after {timeout}s:\n{''.join(seen)}")
        if line is None:
            raise AssertionError(f"{cmd[0]} exited ({proc.wait()}):\n{''.join(seen)}")
        seen.append(line)
        if marker in line:
            return proc, line.strip()


def stop(proc):
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def task_body(**overrides):
    task = {
        "project": "lab",
        "code_repo_url": "https://git.example.org/c.git",
        "code_commit_id": "c0ffee" + "0" * 34,
        "env_repo_url": "https://git.example.org/e.git",
        "env_commit_id": "e" * 40,
        "dockerfile_path": "Dockerfile",
        "command": ["python", "x.py"],
    }
    task.update(overrides)
    return task


class NatsContract(unittest.IsolatedAsyncioTestCase):
    nats_proc = server_proc = None
    tmp = db_name = None

    @classmethod
    def setUpClass(cls):
        admin_url = os.environ.get("UD_TEST_DATABASE_URL")
        if not admin_url:
            raise AssertionError("UD_TEST_DATABASE_URL must be set to an admin PostgreSQL URL "
                                 "(e.g. postgres://postgres@127.0.0.1:5432/postgres)")
        cls.admin_url = admin_url
        cls.tmp = tempfile.mkdtemp(prefix="ud-nats-contract-")
        try:
            cls._start_all()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _start_all(cls):
        port = free_port()
        conf = pathlib.Path(cls.tmp, "nats.conf")
        conf.write_text(f'host: 127.0.0.1\nport: {port}\n'
                        f'jetstream {{ store_dir: "{cls.tmp}/js", domain: hub }}\n')
        cls.nats_url = f"nats://127.0.0.1:{port}"
        cls.nats_proc, _ = start([os.environ.get("UD_NATS_SERVER", "nats-server"), "-c", str(conf)],
                                 "Server is ready", 30,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        cls.db_name = f"fx_{secrets.token_hex(6)}"
        subprocess.run(["psql", cls.admin_url, "-v", "ON_ERROR_STOP=1", "-c", f"CREATE DATABASE {cls.db_name}"],
                       check=True, capture_output=True, timeout=30)
        db_url = urllib.parse.urlsplit(cls.admin_url)._replace(path=f"/{cls.db_name}").geturl()

        if not UNIDESK.exists():
            subprocess.run(["cargo", "build", "-p", "unidesk"], cwd=REPO, check=True)
        env = dict(os.environ, UD_NATS_URL=cls.nats_url, UD_DATABASE_URL=db_url, UD_LISTEN="127.0.0.1:0")
        cls.server_log = open(pathlib.Path(cls.tmp, "unidesk.log"), "w")
        cls.server_proc, _ = start([str(UNIDESK), "serve"], "UniDesk API listening on http://", 60,
                                   env=env, stdout=subprocess.PIPE, stderr=cls.server_log)

    @classmethod
    def tearDownClass(cls):
        stop(cls.server_proc)
        stop(cls.nats_proc)
        if getattr(cls, "server_log", None):
            cls.server_log.close()
        if cls.db_name:
            subprocess.run(["psql", cls.admin_url, "-c", f"DROP DATABASE IF EXISTS {cls.db_name}"],
                           capture_output=True, timeout=30)
        if cls.tmp:
            shutil.rmtree(cls.tmp, ignore_errors=True)

    async def asyncSetUp(self):
        self.nc = await nats.connect(self.nats_url, connect_timeout=5, allow_reconnect=False)

    async def asyncTearDown(self):
        await self.nc.close()

    async def request(self, subject, body, timeout=10):
        return await self.nc.request(subject, json.dumps(body).encode(), timeout=timeout)

    async def submit(self, key, **task):
        reply = await self.request("ud.cmd.task.submit",
                                   {"task": task_body(**task), "idempotency_key": key, "actor": "python"})
        self.assertFalse((reply.headers or {}).get("Nats-Service-Error-Code"), reply.headers)
        return json.loads(reply.data)

    async def next_event(self, sub, task_id):
        """The next message of sub for task_id, skipping other tasks' events."""
        async def wait():
            while True:
                msg = await sub.next_msg(timeout=None)
                if msg.subject.split(".")[2] == task_id:
                    return msg
        return await asyncio.wait_for(wait(), timeout=10)

    async def test_a_service_discovery(self):
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = await self.nc.request("$SRV.INFO.unidesk-tasks", b"", timeout=5)
                break
            except NoRespondersError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        info = json.loads(reply.data)
        self.assertEqual(info["name"], "unidesk-tasks")
        subjects = {e["subject"] for e in info.get("endpoints") or []}
        self.assertLessEqual({"ud.cmd.task.submit", "ud.cmd.task.cancel"}, subjects)

    async def test_b_submit_is_idempotent(self):
        first = await self.submit("py-1")
        self.assertTrue(first["task_id"])
        self.assertIsInstance(first["seq"], int)
        self.assertIs(first["created"], True)
        again = await self.submit("py-1")
        self.assertEqual(again["task_id"], first["task_id"])
        self.assertIs(again["created"], False)

    async def test_c_cancelled_event_by_subject(self):
        task_id = (await self.submit("py-cancel"))["task_id"]
        # What the stream stored, the way the contract says to read events.
        js = self.nc.jetstream()
        sub = await js.subscribe("ud.task.*.cancelled", ordered_consumer=True,
                                 deliver_policy=nats.js.api.DeliverPolicy.NEW)
        reply = await self.request("ud.cmd.task.cancel", {"task_id": task_id, "reason": "py", "actor": "python"})
        self.assertFalse((reply.headers or {}).get("Nats-Service-Error-Code"), reply.headers)

        msg = await self.next_event(sub, task_id)
        self.assertEqual(msg.subject, f"ud.task.{task_id}.cancelled")
        self.assertEqual(msg.metadata.stream, "UD_TASKS")
        self.assertGreater(msg.metadata.sequence.stream, 0)
        h = msg.headers or {}
        self.assertEqual(h.get("Ud-Event-Type"), "task.cancelled")
        self.assertEqual(h.get("Ud-Schema-Version"), "1")
        self.assertEqual(h.get("Content-Type"), "application/cbor")
        self.assertTrue(h.get("Nats-Msg-Id"))
        self.assertEqual(h.get("Ud-Correlation-Id"), h.get("Nats-Msg-Id"), "a root event correlates to itself")
        self.assertEqual(h.get("Ud-Actor"), "python")
        self.assertTrue(h.get("Ud-Correlation-Id"))
        payload = cbor2.loads(msg.data)
        self.assertEqual(set(payload), {"at", "reason"})
        self.assertEqual(payload["reason"], "py")
        self.assertIsInstance(payload["at"], int)

    async def test_d_submitted_event_payload(self):
        sub = await self.nc.subscribe("ud.task.*.submitted")
        await self.nc.flush()
        task = task_body(code_commit_id=secrets.token_hex(20), env_commit_id=secrets.token_hex(20),
                         dockerfile_path="docker/Dockerfile.gpu")
        task_id = (await self.submit("py-submitted", **task))["task_id"]

        msg = await self.next_event(sub, task_id)
        self.assertEqual((msg.headers or {}).get("Ud-Event-Type"), "task.submitted")
        payload = cbor2.loads(msg.data)
        self.assertLessEqual({"at", "project", "spec", "idempotency_key"}, set(payload))
        self.assertEqual(payload["project"], "lab")
        self.assertEqual(payload["idempotency_key"], "py-submitted")
        spec = payload["spec"]
        for field in VERSION_FIELDS:
            self.assertEqual(spec[field], task[field], field)
        self.assertEqual(spec["resources"]["cpu_millis"], 1000)

    async def test_e_error_contract(self):
        reply = await self.request("ud.cmd.task.submit", {"task": {"project": "lab"}})
        h = reply.headers or {}
        self.assertEqual(h.get("Nats-Service-Error-Code"), "400", h)
        self.assertTrue(h.get("Nats-Service-Error"))

        reply = await self.request("ud.cmd.task.cancel", {"task_id": "0190f000-0000-7000-8000-000000000000"})
        h = reply.headers or {}
        self.assertEqual(h.get("Nats-Service-Error-Code"), "404", h)
        self.assertTrue(h.get("Nats-Service-Error"))

        # An actor goes into every event's headers: a line break is refused
        # with a reason, and the service goes on answering.
        reply = await self.request("ud.cmd.task.submit",
                                   {"task": task_body(), "actor": "py\r\nUd-Actor: forged"})
        h = reply.headers or {}
        self.assertEqual(h.get("Nats-Service-Error-Code"), "400", h)
        self.assertIn("actor", h.get("Nats-Service-Error", ""))
        reply = await self.request("ud.cmd.task.submit", {"task": task_body(), "actor": "python"})
        self.assertFalse((reply.headers or {}).get("Nats-Service-Error-Code"), reply.headers)


if __name__ == "__main__":
    unittest.main()
