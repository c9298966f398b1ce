"""The compose files in infra/: they parse, every file they name exists,
images are pinned, every variable they require is in the example settings,
and every UniDesk setting they pass is one the binaries read, with every
required one set. The binaries' own --help is the list of settings."""

import os
import re
import subprocess
import unittest

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
INFRA = os.path.join(ROOT, "infra")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def load(name):
    with open(os.path.join(INFRA, name)) as f:
        text = f.read()
    return yaml.safe_load(text), text


def settings(binary, *args):
    """(every UD_* setting the command reads, the required ones) from its --help."""
    out = subprocess.run([os.path.join(TARGET, "debug", binary), *args, "--help"],
                         capture_output=True, text=True, check=True).stdout
    names = set(re.findall(r"\[env: (UD_[A-Z0-9_]+)", out))
    usage, options = out.split("Options:", 1)
    required = set()
    for flag in re.findall(r"--([a-z0-9-]+) <", usage):
        m = re.search(r"--" + re.escape(flag) + r" <[^>]+>\s+.*?\[env: (UD_[A-Z0-9_]+)", options, re.S)
        if m:
            required.add(m.group(1))
    # Settings checked by the program itself say "(required)" in their help.
    for help_text, env in re.findall(r"--[a-z0-9-]+ <[^>]+>\s+([^\[]*?)\[env: (UD_[A-Z0-9_]+)", options, re.S):
        if "(required)" in help_text:
            required.add(env)
    return names, required


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return env


class ComposeFiles(unittest.TestCase):
    def check_common(self, name):
        doc, text = load(name)
        self.assertIn("services", doc)
        for sname, svc in doc["services"].items():
            image = svc.get("image", "")
            if image:
                self.assertRegex(image, r":[^:]+$", f"{name}: {sname} image is not pinned")
                self.assertNotIn(":latest", image)
            build = svc.get("build")
            if build:
                ctx = os.path.normpath(os.path.join(INFRA, os.path.dirname(name), build["context"]))
                self.assertTrue(os.path.isdir(ctx), f"{sname}: build context {ctx}")
                self.assertTrue(os.path.isfile(os.path.join(ctx, build["dockerfile"])), f"{sname}: {build['dockerfile']}")
            for vol in svc.get("volumes", []):
                src = vol.split(":")[0]
                if src.startswith("./") or src.startswith("../"):
                    path = os.path.normpath(os.path.join(INFRA, os.path.dirname(name), src))
                    self.assertTrue(os.path.exists(path), f"{name}: {sname} mounts missing {src}")
        return doc, text

    def test_main_server_compose(self):
        doc, text = self.check_common("compose.yaml")
        with open(os.path.join(INFRA, "main.env.example")) as f:
            example = dict(l.split("=", 1) for l in f.read().splitlines() if l and not l.startswith("#"))
        for var in re.findall(r"\$\{(UD_[A-Z0-9_]+):\?", text):
            self.assertIn(var, example, f"{var} is required but not in main.env.example")
        for var in re.findall(r"\$\{(UD_[A-Z0-9_]+)", text):
            self.assertIn(var, example, f"{var} is used but not in main.env.example")
        serve, required = settings("unidesk", "serve")
        self.assertIn("UD_DATABASE_URL", required)
        env = env_of(doc["services"]["unidesk"])
        for var in required:
            self.assertIn(var, env, f"unidesk serve needs {var}")
        backup, _ = settings("unidesk", "backup")
        for var in env:
            if var.startswith("UD_"):
                self.assertIn(var, serve | backup, f"{var} is not a setting unidesk reads")
        # The accounts file the server keeps in step is the one the hub includes.
        with open(os.path.join(INFRA, "server", "hub.conf")) as f:
            self.assertIn('include "accounts.conf"', f.read())
        self.assertEqual(doc["services"]["unidesk"]["pid"], "service:nats")
        # Only the leaf-node port and the proxy's are published.
        published = [p for s in doc["services"].values() for p in s.get("ports", [])]
        self.assertEqual(sorted(published), ["443:443", "7422:7422", "80:80"])
        for sname in ("hub-accounts",):
            self.assertTrue(doc["services"][sname]["entrypoint"])
        # The daily backup reads only what `unidesk backup` reads.
        self.assertIn("unidesk backup", " ".join(doc["services"]["backup"]["entrypoint"]))
        for var in env_of(doc["services"]["backup"]):
            self.assertIn(var, backup, f"{var} is not a setting unidesk backup reads")
        self.assertIn("UD_BACKUP_TO_OBJECT_STORE", backup)
        names, _ = settings("unidesk", "admin", "hub-accounts")
        for var in env_of(doc["services"]["hub-accounts"]):
            self.assertIn(var, names)

    def test_compute_node_compose(self):
        doc, _ = self.check_common("edge/compose.yaml")
        run, _ = settings("unidesk-edge", "run")
        leaf, _ = settings("unidesk-edge", "leaf-config")
        for var in env_of(doc["services"]["agent"]):
            self.assertIn(var, run, f"agent: {var} is not a setting unidesk-edge run reads")
        for var in env_of(doc["services"]["leaf-config"]):
            self.assertIn(var, leaf, f"leaf-config: {var}")
        # Task containers need the engine; the leaf's client port is not published.
        self.assertNotIn("ports", doc["services"]["leaf"])

    def test_gpu_override_gives_the_agent_every_gpu_to_read(self):
        doc, _ = load("edge/compose.gpu.yaml")
        base, _ = load("edge/compose.yaml")
        self.assertEqual(set(doc["services"]), {"agent"})
        self.assertIn("agent", base["services"])
        devices = doc["services"]["agent"]["deploy"]["resources"]["reservations"]["devices"]
        self.assertEqual(devices[0]["driver"], "nvidia")
        self.assertEqual(devices[0]["count"], "all")
        self.assertIn("utility", devices[0]["capabilities"])
        self.assertIn("gpu", devices[0]["capabilities"])

    def test_the_main_server_gets_its_secrets_key(self):
        doc, _ = load("compose.yaml")
        env = env_of(doc["services"]["unidesk"])
        key = env["UD_SECRETS_KEY_FILE"]
        mounted = [v for v in doc["services"]["unidesk"]["volumes"] if "}/secrets:" + os.path.dirname(key) in v]
        self.assertEqual(len(mounted), 1)
        self.assertIn("secret-key --out " + key, " ".join(doc["services"]["secret-key"]["entrypoint"]))


if __name__ == "__main__":
    unittest.main()
