#!/usr/bin/env bash
# A Docker engine in a network namespace of its own, with an "internet" in
# another one, for tests of what task containers may reach. Needs root.
#   isolated-docker.sh up ID DIR    start; prints KEY=VALUE lines
#   isolated-docker.sh down ID DIR  stop and remove everything
# The engine runs with its own iptables (NAT for task networks) inside its
# namespace; nothing is added to the machine's own. Its namespace stands for
# the node's host: it runs "host services" on 127.0.0.1:9999 and on its
# uplink address 10.98.0.1:9996, and refuses anything that comes in on the
# egress bridge (ud-egress0) unless it answers traffic that went out.
set -euo pipefail
cmd="$1" id="$2" dir="$3"
ns="ud-dock-$id" inet="ud-inet-$id"
export DOCKER_HOST="unix://$dir/docker.sock"

up() {
  mkdir -p "$dir/www"
  echo "hello from the internet" >"$dir/www/index.html"
  echo "a host service" >"$dir/www/host.html"
  ip netns add "$ns"
  ip netns add "$inet"
  ip link add uplink0 netns "$ns" type veth peer name down0 netns "$inet"
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add 10.98.0.1/24 dev uplink0
  ip -n "$ns" link set uplink0 up
  ip -n "$ns" route add default via 10.98.0.2
  ip -n "$inet" link set lo up
  ip -n "$inet" addr add 10.98.0.2/24 dev down0
  ip -n "$inet" addr add 10.99.0.2/24 dev down0
  ip -n "$inet" link set down0 up
  ip netns exec "$inet" busybox httpd -f -p 10.99.0.2:8080 -h "$dir/www" >/dev/null 2>&1 </dev/null &
  echo $! >"$dir/inet.pid"
  ip netns exec "$ns" busybox httpd -f -p 127.0.0.1:9999 -h "$dir/www" >/dev/null 2>&1 </dev/null &
  echo $! >"$dir/host-lo.pid"
  ip netns exec "$ns" busybox httpd -f -p 9996 -h "$dir/www" >/dev/null 2>&1 </dev/null &
  echo $! >"$dir/host-any.pid"
  # The node owner's rule (docs/nodes.md): nothing from the egress bridge
  # reaches the host itself, except answers to what the host sent.
  ip netns exec "$ns" iptables -I INPUT 1 -i ud-egress0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  ip netns exec "$ns" iptables -I INPUT 2 -i ud-egress0 -j REJECT
  nsenter --net="/run/netns/$ns" dockerd --iptables=true --bridge=none --storage-driver=vfs \
    --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" \
    --host "$DOCKER_HOST" >"$dir/dockerd.log" 2>&1 </dev/null &
  local pid=$! i
  for i in $(seq 300); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { tail -20 "$dir/dockerd.log" >&2; exit 1; }
    sleep 0.1
  done
  docker info >/dev/null
  source "$(dirname "$0")/../../scripts/deps.sh"
  ud_base_image >/dev/null
  echo "DOCKER_HOST=$DOCKER_HOST"
  echo "INTERNET=http://10.99.0.2:8080/index.html"
  echo "HOST_LOOPBACK=http://127.0.0.1:9999/host.html"
  echo "HOST_UPLINK=http://10.98.0.1:9996/host.html"
}

down() {
  if [ -S "$dir/docker.sock" ]; then
    docker rm -f $(docker ps -aq) >/dev/null 2>&1 || true
  fi
  for p in docker inet host-lo host-any; do
    [ -f "$dir/$p.pid" ] && kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
  done
  for _ in $(seq 100); do
    [ -f "$dir/docker.pid" ] && kill -0 "$(cat "$dir/docker.pid")" 2>/dev/null || break
    sleep 0.1
  done
  ip netns del "$ns" 2>/dev/null || true
  ip netns del "$inet" 2>/dev/null || true
  rm -rf "$dir"
}

"$cmd"
