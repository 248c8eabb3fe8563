"""``dask-kaas bench --scenario chaos``: tenants keep the pool busy while
workers die.

Several tenants run a closed loop of requests, each checked against NumPy,
while a worker process is killed with SIGKILL every few seconds (its Nanny
starts a new one, with an empty device cache) and, optionally, every worker
at once mid-run.  The tenants mix three kinds of job (:mod:`.chaos_jobs`):
the workload's plain requests, chains of two graphs where the second consumes
the first's ``keep_on_device`` output, and requests with consts the cluster
has never seen (new weights arriving during the kills).  A request is *lost*
if its future errs or has not finished by the end of the grace period,
*wrong* if its result differs from NumPy; both are counted per kind.  After
the run the cluster is given ``recover_s`` to have every worker back, and
the count is reported.  The promises under test: no request is lost while
its client lives, and the pool does not shrink under repeated kills.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import as_completed
from tqdm import tqdm

from .chaos_jobs import JobMaker, Submitted
from .workloads import Tenant, Workload


@dataclass
class ChaosSpec:
    duration: float = 60.0
    kill_every: float = 3.0
    #: Seconds into the run at which every worker is killed at once (None: never).
    kill_all_at: float | None = None
    outstanding: int = 2  # requests in flight per tenant
    grace: float = 120.0  # how long unfinished requests may take after the run
    request_pool: int = 16
    seed: int = 0
    #: Every n-th job of a tenant is a kept-output chain (two graphs, the
    #: second consuming the first's ``keep_on_device`` output); 0: never.
    chain_every: int = 3
    #: Every n-th job of a tenant brings consts the cluster has never seen; 0: never.
    fresh_every: int = 7
    #: Workers the cluster should have; after the run it is given
    #: ``recover_s`` to have them all back, and the count is reported.
    expected_workers: int | None = None
    recover_s: float = 60.0


@dataclass
class ChaosResult:
    submitted: int = 0
    done: int = 0
    lost: int = 0
    wrong: int = 0
    kills: int = 0
    kill_all: int = 0
    errors: Counter = field(default_factory=Counter)
    duration_s: float = 0.0
    #: Per job kind ("plain", "chain", "fresh"): submitted/done/lost/wrong.
    kinds: dict[str, Counter] = field(default_factory=dict)
    workers_end: int | None = None
    workers_expected: int | None = None
    workers_min: int | None = None
    #: Longest stretch (s) with fewer workers than expected, sampled every
    #: 0.5 s: how long a killed worker takes to be back under this load.
    longest_short_s: float = 0.0

    def count(self, kind: str, what: str) -> None:
        self.kinds.setdefault(kind, Counter())[what] += 1

    def summary(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "done": self.done, "lost": self.lost,
                "wrong": self.wrong, "worker_kills": self.kills,
                "all_workers_killed": self.kill_all, "errors": dict(self.errors),
                "by_kind": {k: dict(v) for k, v in sorted(self.kinds.items())},
                "workers_end": self.workers_end, "workers_expected": self.workers_expected,
                "workers_min_seen": self.workers_min,
                "longest_short_of_workers_s": round(self.longest_short_s, 1),
                "duration_s": round(self.duration_s, 1),
                "throughput_rps": self.done / self.duration_s if self.duration_s else 0.0}


def _kill(client: Any, every_worker: bool, rng: random.Random) -> int:
    """SIGKILL one (or every) worker process of a local cluster; returns how
    many were killed.  Their Nannies start new processes."""
    try:
        pids = client.run(os.getpid, on_error="ignore")
    except Exception:  # noqa: BLE001 - workers are coming and going: try next time
        return 0
    pids = {a: p for a, p in pids.items() if isinstance(p, int)}
    if not pids:
        return 0
    victims = list(pids) if every_worker else [rng.choice(sorted(pids))]
    for addr in victims:
        try:
            os.kill(pids[addr], signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(victims)


def _worker_count(client: Any) -> int | None:
    try:
        return len(client.scheduler_info(n_workers=-1)["workers"])
    except TypeError:  # an older scheduler_info without n_workers
        return len(client.scheduler_info()["workers"])
    except Exception:  # noqa: BLE001 - the scheduler is busy: no sample this time
        return None


def _job_kind(n: int, spec: ChaosSpec) -> str:
    """The kind of a tenant's n-th job (1-based): chains and fresh consts
    interleaved with the workload's plain requests."""
    if spec.chain_every and n % spec.chain_every == 0:
        return "chain"
    if spec.fresh_every and n % spec.fresh_every == 0:
        return "fresh"
    return "plain"


def wait_for_workers_back(client: Any, expected: int, within: float) -> int | None:
    """Poll until ``expected`` workers are connected or ``within`` seconds
    pass; the last count seen."""
    deadline = time.monotonic() + within
    n = _worker_count(client)
    while (n is None or n < expected) and time.monotonic() < deadline:
        time.sleep(0.2)
        n = _worker_count(client)
    return n


def run_chaos(client: Any, workload: Workload, tenants: list[Tenant], spec: ChaosSpec,
              progress: bool = True) -> ChaosResult:
    """Drive the load and the killing; every request is accounted for."""
    rng = np.random.default_rng(spec.seed)
    requests = [workload.make_request(rng) for _ in range(spec.request_pool)]
    jobs = JobMaker(workload, requests, spec.seed)
    result = ChaosResult(workers_expected=spec.expected_workers)
    stop = threading.Event()
    kill_rng = random.Random(spec.seed)
    t0 = time.monotonic()

    def killer() -> None:
        killed_all = spec.kill_all_at is None
        next_kill = t0 + spec.kill_every
        next_sample = t0
        short_since: float | None = None
        while not stop.wait(0.05):
            now = time.monotonic()
            if now >= next_sample:
                n = _worker_count(client)
                if n is not None and (result.workers_min is None or n < result.workers_min):
                    result.workers_min = n
                if n is not None and spec.expected_workers is not None:
                    if n < spec.expected_workers:
                        short_since = now if short_since is None else short_since
                        result.longest_short_s = max(result.longest_short_s, now - short_since)
                    else:
                        short_since = None
                next_sample = now + 0.5
            if not killed_all and now - t0 >= spec.kill_all_at:  # type: ignore[operator]
                result.kill_all += 1 if _kill(client, True, kill_rng) else 0
                killed_all = True
                next_kill = now + spec.kill_every
            elif spec.kill_every > 0 and now >= next_kill:
                result.kills += _kill(client, False, kill_rng)
                next_kill = now + spec.kill_every

    owner: dict[str, tuple[str, Submitted]] = {}
    pending = as_completed()
    jobs_of: Counter = Counter()

    def submit(tenant: Tenant) -> None:
        """Submit the tenant's next job; a submission that raises is a lost
        request too, and the tenant tries again until the run ends."""
        while True:
            jobs_of[tenant.name] += 1
            n = jobs_of[tenant.name]
            kind = _job_kind(n, spec)
            result.submitted += 1
            result.count(kind, "submitted")
            try:
                job = jobs.submit(client, kind, tenant, n)
            except Exception as e:  # noqa: BLE001 - counted, then tried again
                result.lost += 1
                result.count(kind, "lost")
                result.errors[f"submit {kind}: {type(e).__name__}: {str(e)[:120]}"] += 1
                if time.monotonic() >= t0 + spec.duration:
                    return
                time.sleep(0.1)
                continue
            owner[job.future.key] = (tenant.name, job)
            pending.add(job.future)
            return

    by_name = {t.name: t for t in tenants}
    for t in tenants:
        for _ in range(spec.outstanding):
            submit(t)
    thread = threading.Thread(target=killer, name="kaas-chaos-killer", daemon=True)
    thread.start()
    bar = tqdm(total=None, unit="req", desc="chaos", disable=not progress)
    try:
        deadline = t0 + spec.duration
        while not pending.is_empty():
            if time.monotonic() >= deadline + spec.grace:
                break
            try:
                fut = next(pending)
            except StopIteration:
                break
            name, job = owner.pop(fut.key)
            try:
                out = fut.result(timeout=spec.grace)[job.output]
            except Exception as e:  # noqa: BLE001 - any failure is a lost request
                result.lost += 1
                result.count(job.kind, "lost")
                result.errors[f"{job.kind}: {type(e).__name__}: {str(e)[:160]}"] += 1
            else:
                if np.allclose(out, job.expected, rtol=1e-4, atol=1e-4):
                    result.done += 1
                    result.count(job.kind, "done")
                else:
                    result.wrong += 1
                    result.count(job.kind, "wrong")
            bar.update(1)
            if time.monotonic() < deadline:
                submit(by_name[name])
            elif not stop.is_set():
                stop.set()  # the run is over: no more killing while the rest finish
    finally:
        stop.set()
        thread.join()
        bar.close()
    left = pending.count()
    result.lost += left
    if left:
        result.errors["unfinished"] += left
        for _, job in owner.values():
            result.count(job.kind, "lost")
    result.duration_s = time.monotonic() - t0
    if spec.expected_workers is not None:
        result.workers_end = wait_for_workers_back(client, spec.expected_workers,
                                                   spec.recover_s)
    else:
        result.workers_end = _worker_count(client)
    return result


def run_scenario(args: Any) -> int:
    """``dask-kaas bench --scenario chaos`` (the CLI's arguments)."""
    import json

    from ..client import KaasClient
    from ..cluster import LocalKaasCluster
    from .workloads import make_workload

    tenants_n = int((args.tenants or "4").split(",")[0])
    workload = make_workload(args.workload, args.weights_mib, batch=args.batch)
    tenants = [workload.make_tenant(i) for i in range(tenants_n)]
    spec = ChaosSpec(duration=args.duration or (20.0 if args.quick else 60.0),
                     kill_every=args.kill_every, kill_all_at=args.kill_all_at,
                     outstanding=args.outstanding, expected_workers=args.workers)
    print(f"chaos: {tenants_n} tenants x {tenants[0].nbytes / 2**20:.1f} MiB on "
          f"{args.workers} workers for {spec.duration:.0f}s, a worker killed every "
          f"{spec.kill_every:g}s" + (f", all at {spec.kill_all_at:g}s"
                                     if spec.kill_all_at is not None else ""), flush=True)
    with LocalKaasCluster(args.workers, slots=args.slots, dashboard_address=None,
                          device_memory_limit=args.device_memory_limit) as cluster, \
            KaasClient(cluster) as client:
        res = run_chaos(client, workload, tenants, spec).summary()
    res.update(workload=args.workload, tenants=tenants_n, workers=args.workers,
               kill_every_s=spec.kill_every, kill_all_at_s=spec.kill_all_at)
    print(f"chaos: {res['done']} done, {res['lost']} lost, {res['wrong']} wrong of "
          f"{res['submitted']} submitted; {res['worker_kills']} single kills, "
          f"{res['all_workers_killed']} kill-all; {res['throughput_rps']:.1f} req/s; "
          f"errors {res['errors'] or 'none'}", flush=True)
    print(f"chaos: by kind {res['by_kind']}; workers at the end "
          f"{res['workers_end']}/{res['workers_expected']} (fewest seen "
          f"{res['workers_min_seen']}, longest short of workers "
          f"{res['longest_short_of_workers_s']}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "dask-kaas bench --scenario chaos", "chaos": res}, f,
                      indent=2)
    ok = res["lost"] == 0 and res["wrong"] == 0 and res["workers_end"] == args.workers
    return 0 if ok else 1
