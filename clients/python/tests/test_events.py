"""The generated event classes against the CDDL and its golden files."""

import pathlib
import subprocess
import sys
import unittest
import uuid

import cbor2

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from unidesk import decode, events, rule_of  # noqa: E402

GOLDEN = HERE.parents[2] / "schemas" / "golden"


def goldens():
    for f in sorted(GOLDEN.glob("v*/*.cbor")):
        yield f, int(f.parent.name[1:]), f.stem.split("+")[0]


class Generated(unittest.TestCase):
    def test_module_is_in_step_with_the_cddl(self):
        run = subprocess.run([sys.executable, str(HERE.parent / "generate.py"), "--check"],
                             capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)

    def test_every_golden_file_decodes_whole_and_encodes_back_the_same(self):
        seen = 0
        for f, version, rule in goldens():
            subject = {"task": "ud.task.{}.{}", "node": "ud.node.{}.{}", "pipeline": "ud.pipeline.{}.{}",
                       "schedule": "ud.schedule.{}.{}",
                       "token": "ud.auth.token.{}.{}", "secret": "ud.auth.secret.lab.{}.{}",
                       "project": "ud.auth.project.{}.{}"}
            kind, name = rule.split("-", 1)
            first = {"secret": "KEY", "project": "vision-lab"}.get(kind, uuid.uuid4())
            ev = decode(subject[kind].format(first, name),
                        {"Ud-Schema-Version": str(version)}, f.read_bytes())
            with self.subTest(golden=str(f.relative_to(GOLDEN))):
                self.assertTrue(ev.known, f)
                self.assertEqual(ev.data.extra, {}, "fields the class does not know")
                self.assertEqual(ev.data.to_cbor(), cbor2.loads(f.read_bytes()))
            seen += 1
        self.assertGreaterEqual(seen, 40)

    def test_the_schema_version_picks_the_class(self):
        v1 = (GOLDEN / "v1" / "node-heartbeat.cbor").read_bytes()
        v2 = (GOLDEN / "v2" / "node-heartbeat.cbor").read_bytes()
        subject = f"ud.node.{uuid.uuid4()}.heartbeat"
        self.assertIsInstance(decode(subject, {}, v1).data, events.NodeHeartbeatV1)
        self.assertIsInstance(decode(subject, {"Ud-Schema-Version": "2"}, v2).data, events.NodeHeartbeat)
        later = decode(subject, {"Ud-Schema-Version": "3"}, v2)
        self.assertFalse(later.known)
        self.assertEqual(later.data, cbor2.loads(v2))
        self.assertFalse(decode(subject, {"Ud-Schema-Version": "two"}, v2).known)

    def test_ids_are_uuids_and_headers_are_read(self):
        node, event = uuid.uuid4(), uuid.uuid4()
        payload = cbor2.dumps({"at": 5, "node_id": node.bytes, "attempt": 2})
        ev = decode(f"ud.task.{uuid.uuid4()}.started",
                    {"Nats-Msg-Id": str(event), "Ud-Actor": "node:x", "Ud-Event-Type": "task.started"}, payload, seq=9)
        self.assertEqual((ev.type, ev.id, ev.actor, ev.seq), ("task.started", event, "node:x", 9))
        self.assertEqual(ev.data, events.TaskStarted(at=5, node_id=node, attempt=2))

    def test_a_payload_without_a_required_field_is_refused_by_name(self):
        with self.assertRaisesRegex(events.MissingField, "attempt"):
            decode(f"ud.task.{uuid.uuid4()}.started", {}, cbor2.dumps({"at": 5, "node_id": b"\0" * 16}))

    def test_a_newer_optional_field_is_kept_apart(self):
        ev = decode(f"ud.task.{uuid.uuid4()}.succeeded", {}, cbor2.dumps({"at": 1, "exit_code": 0, "new": "x"}))
        self.assertEqual(ev.data.extra, {"new": "x"})
        self.assertEqual(ev.data.to_cbor(), {"at": 1, "exit_code": 0, "new": "x"})

    def test_subjects_name_their_rules(self):
        t = uuid.uuid4()
        cases = {
            f"ud.task.{t}.timed_out": "task-timed_out",
            f"ud.pipeline.{t}.steps_started": "pipeline-steps_started",
            f"ud.schedule.{t}.fired": "schedule-fired",
            f"ud.auth.token.{t}.issued": "token-issued",
            "ud.auth.secret.lab.API_KEY.set": "secret-set",
            "ud.auth.project.lab.member_added": "project-member_added",
            f"ud.log.{t}": "log-chunk",
            "ud.alert.disk.low": "disk-alert",
            f"ud.dispatch.{t}.{t}.cancel": "dispatch-cancel",
            "ud.sys.projected.UD_TASKS": None,
            "other.subject": None,
        }
        for subject, rule in cases.items():
            self.assertEqual(rule_of(subject), rule, subject)
        for rule in filter(None, cases.values()):
            self.assertIn(rule, events.RULES)


if __name__ == "__main__":
    unittest.main()
