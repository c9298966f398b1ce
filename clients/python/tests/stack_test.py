"""The client against the whole local stack (scripts/stack.sh up): run by
tests/browser/run.sh with UD_API_URL, UD_ADMIN_TOKEN, UD_STATE_DIR and
UD_NATS_PORT set. A project file in, a task pinned to the demo repositories
run on the stack's node, its events followed over NATS as typed classes,
its log and output read back; bad input refused with the field named."""

import asyncio
import os
import pathlib
import subprocess
import sys
import unittest
import uuid

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import nats  # noqa: E402

from unidesk import ApiError, Client, events, subscribe  # noqa: E402


def need(name):
    value = os.environ.get(name)
    if not value:
        raise AssertionError(f"{name} must be set (tests/browser/run.sh sets it)")
    return value


class AgainstTheStack(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.client = Client(need("UD_API_URL"), need("UD_ADMIN_TOKEN"))
        self.state = pathlib.Path(need("UD_STATE_DIR"))
        password = (self.state / "platform.password").read_text().strip()
        self.nats_url = f"nats://platform:{password}@127.0.0.1:{need('UD_NATS_PORT')}"

    def commit(self, repo):
        return subprocess.run(["git", "-C", str(self.repo(repo)), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()

    def repo(self, name):
        """The stack's demo code repository; an environment of this test's
        own (the demo's Dockerfile and a comment), so that the browser tests
        after it still see the demo's environment built for the first time."""
        if name == "code":
            return self.state / "demo" / "code"
        env = self.state / "pyclient-env"
        if not (env / ".git").exists():
            env.mkdir(exist_ok=True)
            dockerfile = (self.state / "demo" / "env" / "Dockerfile").read_text()
            (env / "Dockerfile").write_text(dockerfile + "# the Python client's tests\n")
            for args in (["init", "-q"], ["add", "-A"],
                         ["-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-q", "-m", "env"]):
                subprocess.run(["git", "-C", str(env), *args], check=True, capture_output=True)
        return env

    async def test_a_task_from_input_to_output_with_its_events(self):
        c, project = self.client, "pyclient"
        numbers = b"".join(f"{n}\n".encode() for n in (6, 7, 29))
        await asyncio.to_thread(c.upload, project, "data/numbers.txt", numbers)
        self.assertEqual(await asyncio.to_thread(c.download, project, "data/numbers.txt"), numbers)

        nc = await nats.connect(self.nats_url)
        try:
            task = await asyncio.to_thread(
                c.submit, project, f"file://{self.repo('code')}", self.commit("code"), ["sh", "main.sh"],
                env_repo_url=f"file://{self.repo('env')}", env_commit_id=self.commit("env"),
                dockerfile_path="Dockerfile", resources={"cpus": 0.5, "memory_mb": 128},
                inputs=[{"source": "data/numbers.txt", "path": "numbers.txt"}], outputs=["result.txt"])
            seen = []

            async def follow():
                async for ev in subscribe(nc, f"ud.task.{task}.>", from_start=True):
                    seen.append(ev)
                    if ev.type in ("task.succeeded", "task.failed", "task.timed_out", "task.cancelled"):
                        return

            following = asyncio.ensure_future(follow())
            done = await asyncio.to_thread(c.wait, task, 300)
            await asyncio.wait_for(following, 60)
        finally:
            await nc.close()

        self.assertEqual(done["state"], "succeeded", done)
        log = await asyncio.to_thread(c.log_text, task)
        self.assertIn("sum of the input numbers: 42", log)
        outputs = await asyncio.to_thread(c.outputs, task)
        self.assertEqual(outputs["result.txt"], b"sum of the input numbers: 42\n")

        kinds = [type(ev.data) for ev in seen]
        for cls in (events.TaskSubmitted, events.TaskAssigned, events.TaskStarted, events.TaskSucceeded):
            self.assertIn(cls, kinds)
        submitted = next(ev.data for ev in seen if isinstance(ev.data, events.TaskSubmitted))
        self.assertEqual(submitted.project, project)
        self.assertEqual(submitted.spec.command, ["sh", "main.sh"])
        self.assertEqual(submitted.spec.inputs, [events.TaskInput(source="data/numbers.txt", path="numbers.txt")])
        started = next(ev for ev in seen if isinstance(ev.data, events.TaskStarted))
        self.assertIsInstance(started.data.node_id, uuid.UUID)
        self.assertEqual(str(started.data.node_id), done["node_id"])
        self.assertEqual([ev.seq for ev in seen], sorted(ev.seq for ev in seen))
        self.assertTrue(all(ev.known and ev.id for ev in seen))
        history = await asyncio.to_thread(c.history, task)
        self.assertEqual([h["event_id"] for h in history], [str(ev.id) for ev in seen])

    def test_a_schedule_is_made_read_paused_and_deleted(self):
        c = self.client
        task = {"project": "pyclient", "code_repo_url": f"file://{self.repo('code')}",
                "code_commit_id": self.commit("code"), "env_repo_url": f"file://{self.repo('env')}",
                "env_commit_id": self.commit("env"), "dockerfile_path": "Dockerfile", "command": ["true"]}
        sid = c.create_schedule("nightly", "0 3 * * *", task=task, timezone="Europe/Berlin")
        s = c.schedule(sid)
        self.assertEqual((s["state"], s["timezone"], s["task"]["command"]), ("active", "Europe/Berlin", ["true"]))
        self.assertTrue(s["next_due"])
        c.pause_schedule(sid, "maintenance")
        self.assertEqual(c.schedule(sid)["paused_reason"], "maintenance")
        c.resume_schedule(sid)
        self.assertIn(sid, [x["id"] for x in c.schedules("pyclient")])
        c.delete_schedule(sid)
        self.assertNotIn(sid, [x["id"] for x in c.schedules("pyclient")])
        with self.assertRaises(ApiError) as e:
            c.create_schedule("nightly", "every night", task=task, timezone="Mars/Olympus")
        self.assertEqual(sorted(f["field"] for f in e.exception.fields), ["cron", "timezone"])

    def test_bad_input_is_refused_with_the_field_named(self):
        with self.assertRaises(ApiError) as e:
            self.client.submit("pyclient", "file:///nowhere", "not-a-commit", ["true"])
        self.assertEqual(e.exception.status, 400)
        self.assertIn("code_commit_id", [f["field"] for f in e.exception.fields])
        with self.assertRaises(ApiError) as e:
            self.client.task(str(uuid.uuid4()))
        self.assertEqual(e.exception.status, 404)


if __name__ == "__main__":
    unittest.main()
