#!/usr/bin/env bash
# Checks GPU jobs on a machine that has NVIDIA GPUs, end to end: two 1-GPU
# tasks of a CUDA image run side by side, and each must see exactly the one
# device it was given, and not the same one.
#
# On the GPU machine, with the platform up (scripts/stack.sh up joins this
# machine as a node; a remote platform works too):
#
#   UD_API_URL=http://127.0.0.1:8080 UD_TOKEN=$(cat .unidesk/admin.token) scripts/gpu-check.sh
#
# Settings: UD_GPU_CHECK_PROJECT (gpu-check), UD_GPU_CHECK_IMAGE (a CUDA base
# image), UD_GPU_CHECK_CODE_REPO / UD_GPU_CHECK_ENV_REPO with their commits
# (default: two small repositories made here, reachable by a node on this
# machine through file://).
set -euo pipefail
: "${UD_API_URL:?the API, e.g. http://127.0.0.1:8080}"
: "${UD_TOKEN:?a token for the project}"
project="${UD_GPU_CHECK_PROJECT:-gpu-check}"
image="${UD_GPU_CHECK_IMAGE:-nvidia/cuda:12.4.1-base-ubuntu22.04}"

work="$(mktemp -d /tmp/ud-gpu-check.XXXXXX)"
trap 'rm -rf "$work"' EXIT
repo() { # dir -> commit
  git -C "$1" -c init.defaultBranch=main init -q
  git -C "$1" add -A
  git -C "$1" -c user.name=gpu-check -c user.email=gpu-check@localhost commit -q -m check
  git -C "$1" rev-parse HEAD
}
if [ -z "${UD_GPU_CHECK_CODE_REPO:-}" ]; then
  mkdir -p "$work/code" "$work/env"
  printf 'FROM %s\n' "$image" > "$work/env/Dockerfile"
  cat > "$work/code/check.sh" <<'EOF'
echo "visible=${NVIDIA_VISIBLE_DEVICES:-}"
nvidia-smi -L
nvidia-smi --query-gpu=uuid,name,memory.total --format=csv,noheader
sleep 30
EOF
  UD_GPU_CHECK_CODE_COMMIT="$(repo "$work/code")"
  UD_GPU_CHECK_ENV_COMMIT="$(repo "$work/env")"
  UD_GPU_CHECK_CODE_REPO="file://$work/code"
  UD_GPU_CHECK_ENV_REPO="file://$work/env"
fi
export UD_GPU_CHECK_CODE_REPO UD_GPU_CHECK_ENV_REPO UD_GPU_CHECK_CODE_COMMIT UD_GPU_CHECK_ENV_COMMIT
export project

exec python3 - <<'EOF'
import json, os, sys, time, urllib.request

api, token, project = os.environ["UD_API_URL"].rstrip("/"), os.environ["UD_TOKEN"], os.environ["project"]

def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {path}: {e.code} {e.read().decode()}")

spec = {
    "project": project, "name": "gpu-check",
    "code_repo_url": os.environ["UD_GPU_CHECK_CODE_REPO"], "code_commit_id": os.environ["UD_GPU_CHECK_CODE_COMMIT"],
    "env_repo_url": os.environ["UD_GPU_CHECK_ENV_REPO"], "env_commit_id": os.environ["UD_GPU_CHECK_ENV_COMMIT"],
    "dockerfile_path": "Dockerfile", "command": ["sh", "check.sh"],
    "resources": {"cpus": 0.5, "memory_mb": 512, "gpus": 1}, "timeout_seconds": 1800,
}
ids = [call("POST", "/api/v1/tasks", spec)["task_id"] for _ in range(2)]
print("submitted", *ids)

def state(i):
    return call("GET", f"/api/v1/tasks/{i}")

deadline, together = time.time() + 1800, False
while time.time() < deadline:
    views = [state(i) for i in ids]
    states = [v["state"] for v in views]
    together |= states == ["running", "running"]
    if all(s in ("succeeded", "failed", "timed_out", "cancelled") for s in states):
        break
    if any(s == "pending" and v.get("reason") for s, v in zip(states, views)):
        print("waiting:", *[v.get("reason") for v in views if v.get("reason")])
    time.sleep(2)
else:
    sys.exit("the tasks did not end within 30 minutes")

problems, seen = [], []
for i, v in zip(ids, views):
    given = [e["data"].get("gpus", []) for e in call("GET", f"/api/v1/tasks/{i}/events")
             if e["type"] == "task.assigned"][-1]
    log = "".join(l["text"] + "\n" for l in call("GET", f"/api/v1/tasks/{i}/logs")["lines"])
    uuids = sorted({w.strip(",()") for w in log.split() if w.strip(",()").startswith(("GPU-", "MIG-"))})
    print(f"task {i}: {v['state']} on node {v.get('node_id')}; given {given}; saw {uuids}")
    print("  " + log.strip().replace("\n", "\n  "))
    if v["state"] != "succeeded":
        problems.append(f"{i} ended {v['state']}: {v.get('reason')}")
    if uuids != sorted(given):
        problems.append(f"{i} saw {uuids}, was given {given}")
    seen.append(tuple(given))
if not together:
    print("note: the two tasks never ran at the same time (a node with one GPU, or one was waiting)")
elif seen[0] == seen[1]:
    problems.append(f"both tasks ran on {seen[0]}")
if problems:
    sys.exit("GPU check FAILED:\n  " + "\n  ".join(problems))
print("GPU check passed: each task saw only its own device" + (", side by side" if together else ""))
EOF
