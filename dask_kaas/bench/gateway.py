"""``dask-kaas bench-gateway``: the KServe gateway under load.

It starts a LocalKaasCluster and a gateway *process* (as in production),
registers one MLP model per tenant over HTTP, then

1. measures the latency of single requests, one at a time, through the
   gateway (``tritonclient.http``, binary tensors) and directly with a
   ``KaasClient`` on the same cluster, interleaved, and reports the p50 of
   each and their ratio (the gateway's overhead);
2. runs ``--clients`` concurrent HTTP clients spread over the tenants (closed
   loop: each sends its next request when the last one returns, so every
   tenant is backlogged for the whole run) for ``--duration`` seconds, checks
   every result against NumPy, and reports completions per tenant and their
   ratio next to the ratio of the weights.

The fair-share ratio can only show while both tenants have requests held in
the scheduler, so the load phase samples the scheduler's queue every 100 ms
and reports the share of samples in which both tenants had requests waiting
there.  The default request (an MLP on a 512 x 512 batch, hidden 4096: about
45 ms on a CPU worker) keeps two workers busy from 8 HTTP clients; a light
one (``--batch 32 --hidden 1024``, a few ms) leaves the workers waiting for
the gateway and clients on a small machine, nobody is backlogged, and the
completions follow the clients (near 1:1), as they should.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

import numpy as np


def weights_arg(text: str) -> list[float]:
    """An argparse type: 1 to 16 comma-separated weights, each in (0, 1000]."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text[:80]!r}") from None
    if not 1 <= len(weights) <= 16 or not all(0 < w <= 1000 for w in weights):
        raise argparse.ArgumentTypeError("1 to 16 weights, each > 0 and <= 1000")
    return weights


def seconds_arg(text: str) -> float:
    """An argparse type: seconds in (0, 3600]."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text[:80]!r}") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{seconds} is outside (0, 3600]")
    return seconds


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .placement import count_arg

    p.add_argument("--duration", type=seconds_arg, default=20.0, help="seconds of load")
    p.add_argument("--clients", type=count_arg(1, 256), default=8,
                   help="concurrent HTTP clients")
    p.add_argument("--weights", type=weights_arg, default=[2.0, 1.0],
                   help="tenant weights, comma-separated")
    p.add_argument("--workers", type=count_arg(1, 64), default=2)
    p.add_argument("--latency-requests", type=count_arg(1, 100_000), default=100,
                   help="single requests per path for the overhead figure")
    p.add_argument("--batch", type=count_arg(1, 65_536), default=512)
    p.add_argument("--hidden", type=count_arg(1, 65_536), default=4096)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--model", default=None,
                   help="serve an ONNX model instead of the MLP graph and compare dynamic "
                        "batching off and on: mlp, bert, a light model zoo name (resnet50, "
                        "...) or a path to a .onnx file (see dask_kaas.bench.gateway_onnx)")
    p.add_argument("--max-batch-size", type=count_arg(1, 1024), default=16,
                   help="--model: the batched model's max_batch_size")
    p.add_argument("--max-queue-delay-us", type=count_arg(0, 10_000_000), default=2000,
                   help="--model: the batched model's max_queue_delay")
    p.add_argument("--instances", type=count_arg(1, 64), default=2,
                   help="--model: batched runs of the model in flight at once")


def _start_gateway(scheduler: str, tenants_file: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dask_kaas.gateway", "--scheduler", scheduler, "--host",
         "127.0.0.1", "--port", "0", "--tenants", tenants_file],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"the gateway did not start: {line!r}")
    return proc, line.split()[-1].split("//")[1]


OPS_TOKEN = "bench-operator"
#: Pause before each single request of the overhead measurement.
IDLE_GAP_S = 0.02


def _server_latency(address: str) -> tuple[float, float]:
    """(sum, count) of the gateway's own latency histogram: the time from
    a decoded request to its results, without HTTP and tensor coding."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(f"http://{address}/metrics",
                                 headers={"Authorization": f"Bearer {OPS_TOKEN}"})
    with urllib.request.urlopen(req) as resp:
        text = resp.read().decode()
    total = count = 0.0
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "dask_kaas_gateway_latency_seconds_sum":
                total += sample.value
            elif sample.name == "dask_kaas_gateway_latency_seconds_count":
                count += sample.value
    return total, count


def _put(address: str, path: str, body: bytes, token: str) -> None:
    req = urllib.request.Request(f"http://{address}{path}", data=body, method="PUT",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req) as resp:
        resp.read()


def _infer(client: Any, x: np.ndarray, token: str) -> np.ndarray:
    import tritonclient.http as th

    inp = th.InferInput("x", list(x.shape), "FP32").set_data_from_numpy(x)
    out = th.InferRequestedOutput("y")
    return client.infer("mlp", [inp], outputs=[out],
                        headers={"Authorization": f"Bearer {token}"}).as_numpy("y")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "model", None):
        from .gateway_onnx import run as run_onnx

        return run_onnx(args)
    import tritonclient.http as th

    from ..client import KaasClient
    from ..cluster import LocalKaasCluster
    from ..gateway.tenants import token_digest
    from ..workloads import mlp

    weights = list(args.weights)
    names = [f"t{i + 1}" for i in range(len(weights))]
    tokens = {n: f"bench-token-{n}" for n in names}
    dims = dict(batch=args.batch, d_in=512, hidden=args.hidden, d_out=128)
    graph = mlp.mlp_graph(**dims)
    models = {n: mlp.make_model(n, dims["d_in"], dims["hidden"], dims["d_out"], seed=i)
              for i, n in enumerate(names)}
    with tempfile.TemporaryDirectory() as tmp, \
            LocalKaasCluster(args.workers, backend="cpu",
                             dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as direct:
        tenants_file = os.path.join(tmp, "tenants.yaml")
        with open(tenants_file, "w") as f:
            f.write("tenants:\n")
            for n, w in zip(names, weights):
                f.write(f"  {n}: {{token_sha256: {token_digest(tokens[n])}, weight: {w}, "
                        f"max_in_flight: {args.clients * 2}}}\n")
            f.write(f"operators:\n  ops: {{token_sha256: {token_digest(OPS_TOKEN)}}}\n")
        proc, address = _start_gateway(cluster.scheduler_address, tenants_file)
        try:
            for n in names:
                _put(address, "/v1/models/mlp", graph.to_json().encode(), tokens[n])
                for buf in ("w1", "b1", "w2", "b2"):
                    _put(address, f"/v1/models/mlp/consts/{buf}",
                         getattr(models[n], buf).tobytes(), tokens[n])
            result: dict[str, Any] = {"workers": args.workers, "clients": args.clients,
                                      "duration_s": args.duration, "dims": dims,
                                      "gateway": address, "cpus": os.cpu_count(),
                                      "load_average": os.getloadavg()[0]}
            inside = _server_latency(address)
            result["latency"] = _latency(args, th, address, direct, graph, models[names[0]],
                                         tokens[names[0]])
            inside_after = _server_latency(address)
            result["latency"]["gateway_inside_mean_ms"] = (
                (inside_after[0] - inside[0]) / max(inside_after[1] - inside[1], 1) * 1e3)
            result["load"] = _load(args, th, address, names, weights, tokens, models, direct)
            result["load"]["scheduler_weights"] = {
                n: w for n, w in direct.kaas_stats()["weights"].items() if n in names}
        finally:
            proc.terminate()
            proc.wait(30)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["load"]["wrong"] == 0 and result["load"]["errors"] == 0 else 1


def _latency(args: argparse.Namespace, th: Any, address: str, direct: Any, graph: Any,
             model: Any, token: str) -> dict[str, Any]:
    from ..workloads import mlp

    client = th.InferenceServerClient(address)
    rng = np.random.default_rng(1)
    gw_s, direct_s = [], []

    def via_gateway(x: np.ndarray) -> np.ndarray:
        return _infer(client, x, token)

    def via_client(x: np.ndarray) -> np.ndarray:
        return direct.submit_kernel_graph(graph, mlp.inputs_for(model, x),
                                          tenant="direct").result()["y"]

    # The two paths take turns going first, each after a short idle gap: a
    # request sent the instant another finishes meets the cluster still busy
    # with the last one, and always putting one path there biases the ratio.
    for i in range(args.latency_requests + 5):
        x = rng.standard_normal((args.batch, 512)).astype(np.float32)
        order = [(via_gateway, gw_s), (via_client, direct_s)]
        for call, samples in order if i % 2 == 0 else order[::-1]:
            time.sleep(IDLE_GAP_S)
            t0 = time.perf_counter()
            y = call(x)
            if i >= 5:  # the first requests compile, load and learn
                samples.append(time.perf_counter() - t0)
            np.testing.assert_allclose(y, model.reference(x), rtol=1e-3, atol=1e-3)
    p50_gw, p50_direct = float(np.median(gw_s)) * 1e3, float(np.median(direct_s)) * 1e3
    return {"requests": len(gw_s), "gateway_p50_ms": p50_gw, "direct_p50_ms": p50_direct,
            "ratio": p50_gw / p50_direct,
            "gateway_p99_ms": float(np.percentile(gw_s, 99)) * 1e3,
            "direct_p99_ms": float(np.percentile(direct_s, 99)) * 1e3}


def _held(dask_scheduler: Any) -> dict[str, int]:
    return dask_scheduler.extensions["kaas"].dispatch.queue.backlog()


def _sample_backlog(direct: Any, names: list[str], stop: threading.Event,
                    samples: list[bool]) -> None:
    """Whether every tenant had requests held in the scheduler, every 100 ms."""
    while not stop.wait(0.1):
        held = direct.run_on_scheduler(_held)
        samples.append(all(held.get(n, 0) > 0 for n in names))


def _load(args: argparse.Namespace, th: Any, address: str, names: list[str],
          weights: list[float], tokens: dict[str, str], models: dict[str, Any],
          direct: Any) -> dict[str, Any]:
    done: dict[str, list[float]] = {n: [] for n in names}
    latencies: dict[str, list[float]] = {n: [] for n in names}
    counts = {"wrong": 0, "errors": 0}
    lock = threading.Lock()

    # Inputs and their NumPy answers are made before the clock starts, so the
    # load generator spends its time sending requests, not computing references.
    work = []
    for i in range(args.clients):
        tenant = names[i % len(names)]
        rng = np.random.default_rng(100 + i)
        xs = [rng.standard_normal((args.batch, 512)).astype(np.float32) for _ in range(8)]
        work.append((tenant, [(x, models[tenant].reference(x)) for x in xs]))

    def client_loop(i: int) -> None:
        tenant, pairs = work[i]
        client = th.InferenceServerClient(address, network_timeout=120.0)
        n = 0
        while time.perf_counter() < stop_at:
            x, expected = pairs[n % len(pairs)]
            n += 1
            t0 = time.perf_counter()
            try:
                y = _infer(client, x, tokens[tenant])
            except Exception:  # noqa: BLE001 - counted and reported
                with lock:
                    counts["errors"] += 1
                continue
            t1 = time.perf_counter()
            ok = np.allclose(y, expected, rtol=1e-3, atol=1e-3)
            with lock:
                done[tenant].append(t1 - start)
                latencies[tenant].append(t1 - t0)
                counts["wrong"] += not ok

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=_sample_backlog, args=(direct, names, stop, samples))
    start = time.perf_counter()
    stop_at = start + args.duration
    for t in threads:
        t.start()
    sampler.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    # "all backlogged": every client keeps one request outstanding until the
    # load stops, so the window is the run, cut at the first tenant's last reply.
    last = [max(ts) for ts in done.values() if ts]
    window = min([args.duration, *last]) if len(last) == len(done) else 0.0
    per = {n: sum(1 for t in done[n] if t <= window) for n in names}
    out: dict[str, Any] = {
        "completed": {n: len(done[n]) for n in names},
        "completed_while_backlogged": per, "backlogged_window_s": window,
        "weights": dict(zip(names, weights)),
        "p50_ms": {n: float(np.median(latencies[n])) * 1e3 if latencies[n] else None
                   for n in names},
        "throughput_per_s": sum(len(v) for v in done.values()) / args.duration,
        "held_samples": len(samples),
        "all_held_share": sum(samples) / len(samples) if samples else 0.0, **counts}
    if len(names) == 2 and per[names[1]]:
        out["ratio"] = per[names[0]] / per[names[1]]
        out["weight_ratio"] = weights[0] / weights[1]
    return out


def _print(r: dict[str, Any]) -> None:
    lat, load = r["latency"], r["load"]
    print(f"gateway {r['gateway']}, {r['workers']} CPU workers, MLP {r['dims']}, "
          f"{r['cpus']} CPUs, load average {r['load_average']:.1f}")
    print(f"single requests ({lat['requests']} each): gateway p50 {lat['gateway_p50_ms']:.2f} ms, "
          f"direct KaasClient p50 {lat['direct_p50_ms']:.2f} ms, ratio {lat['ratio']:.2f}x "
          f"(p99 {lat['gateway_p99_ms']:.1f} vs {lat['direct_p99_ms']:.1f} ms); inside the "
          f"gateway (submit to result, warm-up included) mean "
          f"{lat['gateway_inside_mean_ms']:.2f} ms")
    print(f"load: {r['clients']} HTTP clients for {r['duration_s']:g} s, "
          f"{load['throughput_per_s']:.1f} requests/s, wrong results {load['wrong']}, "
          f"errors {load['errors']}")
    for n, c in load["completed_while_backlogged"].items():
        print(f"  {n}: weight {load['weights'][n]:g}, completed {load['completed'][n]} "
              f"({c} while all backlogged), p50 {load['p50_ms'][n]:.1f} ms")
    if "ratio" in load:
        print(f"  completions ratio {load['ratio']:.2f} (weights {load['weight_ratio']:.2f}) "
              f"over {load['backlogged_window_s']:.1f} s")
    print(f"  every tenant had requests held in the scheduler in "
          f"{100 * load['all_held_share']:.0f}% of {load['held_samples']} samples")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dask-kaas bench-gateway", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
