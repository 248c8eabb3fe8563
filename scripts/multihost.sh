#!/usr/bin/env bash
# Multi-host fault test: a dask scheduler, the dask_kaas gateway, KaaS workers
# and a client, each on its own "host" -- a Linux network namespace -- joined
# by a private bridge that lives in a namespace of its own (the machine's own
# network namespace gets no interface, address or route).  Addresses are
# 10.213.<id>.x; there is no default route, so nothing can leave the bridge.
#
# Scenarios, each with load through the direct client (KaasClient) and
# through the gateway (KServe v2 over HTTP) at once, every result checked
# against NumPy:
#   baseline   results right across hosts
#   kill       a worker host killed (SIGKILL to everything in its namespace)
#   link20     a worker host's link down for 20 s, then up again
#   link40     a worker host's link down for 40 s (past Dask's TCP timeout)
#   gwlink     the gateway host's link down for 20 s (HTTP callers retry)
# and prints one JSON line per scenario: {"scenario", "direct": {...},
# "gateway": {...}} with ok/lost/wrong counts, plus the workers connected
# at the end.
#
# Usage: sudo scripts/multihost.sh [--scenarios baseline,kill,link20]
#            [--load-s SECONDS] [--json FILE]
# Needs root, `ip netns`, and the project's Python environment (python,
# dask on PATH).  Everything it creates is removed on exit (trap).
set -euo pipefail

SCENARIOS="baseline,kill,link20,link40,gwlink"
LOAD_S=""
JSON_OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --scenarios) SCENARIOS="$2"; shift 2 ;;
    --load-s) LOAD_S="$2"; shift 2 ;;
    --json) JSON_OUT="$2"; shift 2 ;;
    -h|--help) sed -n 2,24p "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ] || ! ip netns list >/dev/null 2>&1; then
  echo "multihost.sh needs root and ip netns" >&2; exit 77
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
DASK=${DASK:-$(dirname "$(command -v "$PY")")/dask}
ID=${KAAS_NETNS_ID:-$(( ($$ % 200) + 20 ))}
NET=10.213.$ID
P=kh$ID                  # namespace / interface prefix (interface names <= 15 chars)
SW=${P}sw                # the switch namespace holding the bridge
WORK=$(mktemp -d /tmp/kaas-multihost.XXXXXX)
HOSTS="sched:1 gw:2 w1:11 w2:12 w3:13 cli:100"

cleanup() {
  set +e
  if [ -n "${KAAS_MULTIHOST_LOGS:-}" ]; then cp "$WORK"/*.log "$KAAS_MULTIHOST_LOGS"/ 2>/dev/null; fi
  for h in $HOSTS; do
    n=${P}${h%%:*}
    for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
  done
  sleep 0.3
  for h in $HOSTS; do ip netns del "${P}${h%%:*}" 2>/dev/null; done
  ip netns del "$SW" 2>/dev/null   # removes the bridge and the veth ends in it
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

ns() { local n=$1; shift; ip netns exec "${P}$n" "$@"; }

ip netns add "$SW"
ip netns exec "$SW" ip link set lo up
ip netns exec "$SW" ip link add br0 type bridge
ip netns exec "$SW" ip link set br0 up
for h in $HOSTS; do
  name=${h%%:*}; octet=${h##*:}
  ip netns add "${P}$name"
  ip link add "${P}${name}a" type veth peer name "${P}${name}b"
  ip link set "${P}${name}a" netns "${P}$name"
  ip link set "${P}${name}b" netns "$SW"
  ns "$name" ip link set lo up
  ns "$name" ip link set "${P}${name}a" name eth0
  ns "$name" ip addr add "$NET.$octet/24" dev eth0
  ns "$name" ip link set eth0 up
  ip netns exec "$SW" ip link set "${P}${name}b" master br0
  ip netns exec "$SW" ip link set "${P}${name}b" up
done
# No default route anywhere: only 10.213.$ID.0/24 and each namespace's loopback.

export DASK_KAAS__BACKEND=cpu PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL=${DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL:-60s}
SCHED=tcp://$NET.1:8786

start_scheduler() {
  ns sched "$DASK" scheduler --host "$NET.1" --port 8786 --no-dashboard \
    --preload dask_kaas.preload >"$WORK/sched.log" 2>&1 &
}
start_worker() {  # name octet
  # Under a supervisor loop, as systemd's Restart=always would run it: a
  # worker the scheduler removed while its host was cut off shuts itself
  # down when the link returns ("Scheduler was unaware of this worker;
  # shutting down."), Nanny included; the host's supervisor starts it again.
  ns "$1" bash -c 'while :; do "$0" worker "$1" --host "$2" --nthreads 2 --resources GPU=1 \
    --no-dashboard --preload dask_kaas.preload --name "$3"; sleep 1; done' \
    "$DASK" "$SCHED" "$NET.$2" "$1" >>"$WORK/$1.log" 2>&1 &
}
TOKEN=multihost-secret
DIGEST=$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)
OPS_DIGEST=$(printf %s "$TOKEN-ops" | sha256sum | cut -d' ' -f1)
cat >"$WORK/tenants.yaml" <<YAML
tenants:
  alice: {token_sha256: "$DIGEST", max_in_flight: 64}
operators:
  ops: {token_sha256: "$OPS_DIGEST"}
YAML
start_gateway() {
  ns gw "$PY" -m dask_kaas.gateway --scheduler "$SCHED" --host "$NET.2" --port 8000 \
    --tenants "$WORK/tenants.yaml" >>"$WORK/gw.log" 2>&1 &
}

start_scheduler
sleep 2
start_worker w1 11; start_worker w2 12; start_worker w3 13
start_gateway

fault() {  # scenario: runs in the background while the driver loads the cluster
  case "$1" in
    baseline) ;;
    kill)
      sleep "$FAULT_AT"
      echo "fault: killing host w3" >&2
      for pid in $(ip netns pids "${P}w3"); do kill -9 "$pid" 2>/dev/null || true; done
      sleep 5; start_worker w3 13 ;;      # the host comes back later, empty
    link20|link40)
      sleep "$FAULT_AT"
      local s=${1#link}
      echo "fault: w1's link down for ${s}s" >&2
      ip netns exec "$SW" ip link set "${P}w1b" down
      sleep "$s"; ip netns exec "$SW" ip link set "${P}w1b" up ;;
    gwlink)
      sleep "$FAULT_AT"
      echo "fault: the gateway's link down for 20s" >&2
      ip netns exec "$SW" ip link set "${P}gwb" down
      sleep 20; ip netns exec "$SW" ip link set "${P}gwb" up ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}

cat >"$WORK/driver.py" <<'PY'
"""Load through the direct client and the gateway; every result checked."""
import json, sys, threading, time, urllib.error, urllib.request, io
import numpy as np
from dask_kaas import KaasClient, Kernel, KernelGraph, In, Out

sched, gw, token, scenario, load_s = sys.argv[1:6]
load_s = float(load_s)
N = 64

def graph():
    g = KernelGraph("mh")
    x = g.input("x", (4, N), np.float32); w = g.const("w", (N, N), np.float32)
    h = g.temp("h", (4, N), np.float32); y = g.output("y", (4, N), np.float32)
    g.launch(Kernel.library("gemm"), [In(x), In(w), Out(h)])
    g.launch(Kernel.library("relu"), [In(h), Out(y)])
    return g

G = graph()
W = (np.random.default_rng(1).standard_normal((N, N)) / 8).astype(np.float32)
H = {"Authorization": f"Bearer {token}"}

def http(method, path, body=None, ctype="application/json", timeout=150):
    req = urllib.request.Request(f"http://{gw}{path}", data=body, method=method,
                                 headers={**H, "Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()

def setup_gateway():
    for _ in range(120):
        try:
            http("GET", "/v2/health/ready", timeout=5); break
        except urllib.error.HTTPError:
            break  # it answers
        except Exception:
            time.sleep(0.5)
    http("PUT", "/v1/models/mh", G.to_json().encode())
    buf = io.BytesIO(); np.save(buf, W)
    http("PUT", "/v1/models/mh/consts/w", buf.getvalue(), "application/octet-stream")

def direct_load(client, stop, c, outstanding=4):
    rng = np.random.default_rng(2)
    live = []
    def one():
        x = rng.standard_normal((4, N)).astype(np.float32)
        return client.submit_kernel_graph(G, {"x": x, "w": W}, tenant="direct"), x
    while not stop.is_set() or live:
        while not stop.is_set() and len(live) < outstanding:
            try:
                live.append(one())
            except Exception as e:
                c["lost"] += 1; c["errors"].append(f"submit {type(e).__name__}: {e}"[:200])
        f, x = live.pop(0)
        try:
            y = f.result(timeout=240)["y"]
        except Exception as e:
            c["lost"] += 1; c["errors"].append(f"{type(e).__name__}: {e}"[:200]); continue
        ok = np.allclose(y, np.maximum(x @ W, 0), rtol=1e-4, atol=1e-4)
        c["ok" if ok else "wrong"] += 1

def gateway_load(stop, c):
    rng = np.random.default_rng(3)
    while not stop.is_set():
        x = rng.standard_normal((4, N)).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [4, N],
                                       "data": x.ravel().tolist()}]}).encode()
        t_end = time.monotonic() + 240
        while True:  # a caller retries a connection that could not be made (no request sent)
            try:
                st, out = http("POST", "/v2/models/mh/infer", body); break
            except urllib.error.HTTPError as e:
                st, out = e.code, e.read(); break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                if time.monotonic() > t_end:
                    st, out = None, str(e).encode(); break
                c["retried_connects"] += 1; time.sleep(1)
        if st != 200:
            c["lost"] += 1; c["errors"].append(f"HTTP {st}: {out[:160]!r}"); continue
        y = np.array(json.loads(out)["outputs"][0]["data"], np.float32).reshape(4, N)
        c["ok" if np.allclose(y, np.maximum(x @ W, 0), rtol=1e-4, atol=1e-4) else "wrong"] += 1

def main():
    client = KaasClient(sched, set_as_default=False)
    client.wait_for_workers(3, timeout=120)
    setup_gateway()
    stop = threading.Event()
    d = {"ok": 0, "lost": 0, "wrong": 0, "errors": []}
    g = {"ok": 0, "lost": 0, "wrong": 0, "errors": [], "retried_connects": 0}
    ts = [threading.Thread(target=direct_load, args=(client, stop, d)),
          threading.Thread(target=gateway_load, args=(stop, g))]
    print("driver: load running", file=sys.stderr, flush=True)
    for t in ts: t.start()
    time.sleep(load_s); stop.set()
    for t in ts: t.join()
    t_end = time.monotonic() + 90
    while len(client.scheduler_info()["workers"]) < 3 and time.monotonic() < t_end:
        time.sleep(0.5)
    workers = len(client.scheduler_info()["workers"])
    for c in (d, g):
        from collections import Counter
        c["errors"] = dict(Counter(c["errors"]).most_common(5))
    print(json.dumps({"scenario": scenario, "load_s": load_s, "direct": d, "gateway": g,
                      "workers_end": workers}), flush=True)
    client.close()

main()
PY

run_scenario() {
  local s=$1 load
  case "$s" in
    baseline) load=${LOAD_S:-10} ;;
    kill) load=${LOAD_S:-20} ;;
    link20|gwlink) load=${LOAD_S:-40} ;;
    link40) load=${LOAD_S:-60} ;;
  esac
  FAULT_AT=5
  echo "== $s (load ${load}s)" >&2
  # The driver needs ~5 s to connect and register its model before the fault.
  fault "$s" &
  local fpid=$!
  ns cli "$PY" "$WORK/driver.py" "$SCHED" "$NET.2:8000" "$TOKEN" "$s" "$load" \
    | tee -a "${JSON_OUT:-/dev/null}"
  wait "$fpid" || true
}

IFS=, read -ra LIST <<<"$SCENARIOS"
for s in "${LIST[@]}"; do run_scenario "$s"; done
