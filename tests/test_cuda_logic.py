"""The CUDA path's decisions, checked without a GPU.

Everything the CUDA backend decides that does not need a device to decide
(byte order, out-of-memory retries, sticky faults, shared-memory limits,
per-device worker specs, pool sizing, the NVRTC output) is a plain function
or goes through the Backend interface, so it is tested here on the CPU.
The same paths on a real GPU are in tests/test_gpu.py.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from dask_kaas import (
    DeviceFaultError,
    DeviceOutOfMemoryError,
    GraphError,
    InOut,
    KaasError,
    Kernel,
    KernelExecutionError,
    KernelGraph,
    Out,
)
from dask_kaas.device.cpu import CpuBackend
from dask_kaas.device.faults import STICKY_ERRORS, is_sticky_fault
from dask_kaas.device.runtime import WorkerRuntime
from dask_kaas.request import GraphRequest, InputRef

X = np.arange(64, dtype=np.float32).reshape(8, 8)
W = np.eye(8, dtype=np.float32)


def one_kernel_graph(fn, name="k"):
    g = KernelGraph("g1")
    x = g.input("x", (8, 8), np.float32)
    g.const("w", (8, 8), np.float32)
    y = g.output("y", (8, 8), np.float32)
    g.launch(Kernel.array(fn, name=name), [x, Out(y)])
    return g


def request(key, wid="w-id"):
    return GraphRequest(key, "g1", "t", [InputRef("x", 256, None),
                                          InputRef("w", 256, wid, const=True)])


def double(xp, x, y):
    y[...] = 2 * x


def run(rt, graph, key, wid="w-id"):
    """``rt.run`` with input x inline and the const w cached as ``wid``
    (where the runtime takes cache identities from the Dask keys the worker
    received, they are passed as Identities)."""
    try:
        from dask_kaas.device.runtime import Identities
    except ImportError:
        return rt.run(graph, request(key, wid), [X, W])
    return rt.run(graph, request(key, wid), [X, W], Identities([None, wid]))


# -- item 8: byte order ------------------------------------------------------

@pytest.mark.parametrize("dtype", [">f4", ">i8", ">c16", ">u2", np.dtype("<f8").newbyteorder()])
def test_non_native_byte_order_is_refused_when_declared(dtype):
    native = np.dtype(dtype).newbyteorder("=")
    g = KernelGraph("bo")
    with pytest.raises(GraphError, match="graph 'bo', buffer 'w'.*native byte order"):
        g.const("w", (4,), dtype)
    assert "w" not in g.buffers
    assert g.const("w", (4,), native).dtype.isnative  # the native spelling is fine


def test_non_native_byte_order_is_refused_in_a_graph_document():
    from dask_kaas.graph.serialize import graph_from_dict

    g = one_kernel_graph(double)
    doc = g.to_dict()
    doc["buffers"][1]["dtype"] = ">f4"
    with pytest.raises(KaasError, match="buffer 'w'.*native byte order"):
        graph_from_dict(doc)


def test_single_byte_dtypes_have_no_byte_order_and_are_kept():
    g = KernelGraph("bytes")
    assert g.input("a", 3, ">u1").dtype == np.uint8
    assert g.input("b", 3, "|i1").dtype == np.int8


# -- item 3: out of memory inside a kernel -----------------------------------

def test_out_of_memory_inside_a_kernel_empties_the_cache_and_retries():
    """A real failure of the backend's allocator (NumPy's, on the CPU
    backend) inside a kernel: evict and run once more."""
    calls = []

    def needs_temporaries(xp, x, y):
        calls.append(1)
        if len(calls) == 1:
            xp.empty(2**62, np.uint8)  # the allocator fails: 4 EiB
        y[...] = 2 * x

    rt = WorkerRuntime(CpuBackend(), 10_000)
    run(rt, one_kernel_graph(double), "warm", wid="other")
    assert "other" in rt.cache
    out, report = run(rt, one_kernel_graph(needs_temporaries), "k1")
    np.testing.assert_array_equal(out["y"], 2 * X)
    assert len(calls) == 2
    assert "other" not in rt.cache  # the cache was emptied before the retry
    assert report["misses"] == 1 and rt.stats()["errors"] == 0
    assert rt.cache._private_bytes == 0


def test_out_of_memory_inside_a_kernel_twice_is_a_device_out_of_memory_error():
    def always(xp, x, y):
        xp.empty(2**62, np.uint8)

    rt = WorkerRuntime(CpuBackend(), 10_000)
    with pytest.raises(DeviceOutOfMemoryError, match="graph 'g1'.*even after emptying"):
        run(rt, one_kernel_graph(always), "k")
    assert rt.cache._private_bytes == 0 and rt.broken is None


# -- item 9: sticky device faults ---------------------------------------------

class StandInIllegalAddressError(RuntimeError):
    """Stands in for CuPy's CUDARuntimeError(cudaErrorIllegalAddress)."""

    status = 700


class StickyFaultBackend(CpuBackend):
    """A CPU backend that, like the CUDA one, calls some errors fatal; it can
    also fail in synchronize (where a faulting kernel is noticed on a GPU)."""

    fail_sync: BaseException | None = None

    def is_fatal(self, exc):
        return is_sticky_fault(exc, (StandInIllegalAddressError,))

    def synchronize(self, stream):
        if self.fail_sync is not None:
            raise self.fail_sync


def faulting_kernel(xp, x, y):
    raise StandInIllegalAddressError("cudaErrorIllegalAddress: an illegal memory access")


def test_a_sticky_fault_in_a_kernel_fails_the_request_and_marks_the_worker_broken():
    rt = WorkerRuntime(StickyFaultBackend(), 10_000)
    assert rt.broken is None
    with pytest.raises(DeviceFaultError, match="graph 'g1', launch 0 \\(kernel 'wild'\\)"
                       ".*illegal memory access.*restarted") as e:
        run(rt, one_kernel_graph(faulting_kernel, name="wild"), "k")
    assert isinstance(e.value, KernelExecutionError)
    assert "illegal memory access" in rt.broken
    assert rt.cache._private_bytes == 0
    assert all(entry.pins == 0 for entry in rt.cache._entries.values())
    first = rt.broken
    with pytest.raises(DeviceFaultError):
        run(rt, one_kernel_graph(faulting_kernel), "k2")
    assert rt.broken == first  # the first reason is kept
    back = pickle.loads(pickle.dumps(e.value))  # crosses from worker to client
    assert type(back) is DeviceFaultError and back.launch == 0 and back.kernel == "wild"


def test_a_sticky_fault_noticed_at_synchronize_is_a_device_fault():
    backend = StickyFaultBackend()
    backend.fail_sync = RuntimeError("CUDA error at stream.cpp:12: "
                                     "cudaErrorLaunchFailure unspecified launch failure")
    rt = WorkerRuntime(backend, 10_000)
    with pytest.raises(DeviceFaultError, match="graph 'g1'.*launch failure"):
        run(rt, one_kernel_graph(double), "k")
    assert "cudaErrorLaunchFailure" in rt.broken


def test_an_ordinary_kernel_error_does_not_break_the_worker():
    def bad(xp, x, y):
        raise ValueError("bad row")

    rt = WorkerRuntime(StickyFaultBackend(), 10_000)
    with pytest.raises(KernelExecutionError, match="ValueError: bad row") as e:
        run(rt, one_kernel_graph(bad), "k")
    assert type(e.value) is KernelExecutionError and rt.broken is None
    out, _ = run(rt, one_kernel_graph(double), "k2")
    np.testing.assert_array_equal(out["y"], 2 * X)


def test_the_cpu_backend_calls_nothing_fatal():
    assert not CpuBackend().is_fatal(StandInIllegalAddressError("cudaErrorIllegalAddress"))


class StandInDriverError(Exception):
    def __init__(self, status):
        super().__init__(f"CUDA driver error {status}")
        self.status = status


@pytest.mark.parametrize("status,sticky", [(700, True), (719, True), (716, True), (715, True),
                                           (2, False), (1, False), (222, False), (701, False),
                                           (True, False), ("700", False), (None, False)])
def test_sticky_classification_by_status(status, sticky):
    assert is_sticky_fault(StandInDriverError(status), (StandInDriverError,)) is sticky


@pytest.mark.parametrize("exc,sticky", [
    (RuntimeError("CUDA error: CUDA_ERROR_MISALIGNED_ADDRESS misaligned address"), True),
    (RuntimeError("cudaErrorIllegalInstruction"), True),
    (RuntimeError("cudaErrorMemoryAllocation out of memory"), False),
    (MemoryError("cudaErrorIllegalAddress"), False),  # not a RuntimeError: not by name
    (ValueError("cudaErrorIllegalAddress"), False),
    (RuntimeError("\udcff\x00" * 1000), False),
])
def test_sticky_classification_by_message(exc, sticky):
    assert is_sticky_fault(exc, ()) is sticky


def test_the_sticky_table_names_each_code_in_both_apis():
    assert all(len(names) == 2 and names[0].startswith("cudaError")
               and names[1].startswith("CUDA_ERROR_") for names in STICKY_ERRORS.values())


# -- item 1: a device of its own for every worker ----------------------------

def test_initial_worker_specs_get_a_device_each_without_starting_workers():
    from dask_kaas.cluster import with_devices

    shared = {"cls": "Nanny", "options": {"nthreads": 2}}
    specs = {i: shared for i in range(4)}  # as LocalCluster builds them: one shared dict
    assigned: dict = {}
    out = with_devices(specs, ["0", "1"], assigned)
    envs = [out[i]["options"]["env"]["CUDA_VISIBLE_DEVICES"] for i in range(4)]
    assert envs == ["0,1", "1,0", "0,1", "1,0"]
    assert assigned == {0: "0", 1: "1", 2: "0", 3: "1"}
    assert "env" not in shared["options"]  # the shared spec is left alone
    assert all(out[i]["options"]["nthreads"] == 2 for i in range(4))
    again = with_devices(out, ["0", "1"], assigned)  # already assigned: unchanged
    assert [again[i]["options"]["env"] for i in range(4)] == [out[i]["options"]["env"]
                                                               for i in range(4)]


def test_a_scaled_up_worker_gets_the_least_used_device():
    from dask_kaas.cluster import next_device, with_devices

    assert next_device(["0", "1", "2"], ["0", "1", "0"]) == "2"
    assert next_device(["0", "1"], ["1"]) == "0"
    assigned = {0: "0", 2: "0", 3: "1"}  # worker 1 (on device 1) was retired
    out = with_devices({4: {"options": {"env": {"OTHER": "x"}}}}, ["0", "1"], assigned)
    assert out[4]["options"]["env"] == {"OTHER": "x", "CUDA_VISIBLE_DEVICES": "1,0"}


def test_the_workers_of_a_cluster_really_see_their_own_device_first():
    import os

    from dask_kaas import KaasClient, LocalKaasCluster

    with LocalKaasCluster(2, backend="cpu", devices=["3", "5"],
                          dashboard_address="127.0.0.1:0") as cluster, \
            KaasClient(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["3,5", "5,3"]
        assert cluster.device_of == {0: "3", 1: "5"}
        ((name, spec),) = cluster.new_worker_spec().items()  # built, not started
        assert name == 2 and spec["options"]["env"]["CUDA_VISIBLE_DEVICES"] == "3,5"


@pytest.mark.parametrize("devices", [[], [True], ["0", "0"], ["0;rm -rf /"], 5, [1.5],
                                     ["\udcff"], ["0" * 100], [[0]]])
def test_hostile_device_lists_are_refused(devices):
    from dask_kaas.cluster import normalize_devices

    with pytest.raises(KaasError, match="GPU"):
        normalize_devices(devices)


def test_device_lists_in_the_forms_users_write():
    from dask_kaas.cluster import normalize_devices

    assert normalize_devices("0, 2") == ["0", "2"]
    assert normalize_devices([1, "GPU-8f2a-77"]) == ["1", "GPU-8f2a-77"]


# -- item 2: a hit waits for the copy another stream is still doing ----------

class StandInEvent:
    """Stands in for a CUDA event: the position in its stream's queue."""

    def __init__(self, stream, position):
        self.stream, self.position = stream, position


class StandInStream:
    """Stands in for a CUDA stream: records what is queued on it, in order."""

    def __init__(self, name):
        self.name, self.ops = name, []


class StreamRecordingBackend(CpuBackend):
    """The CPU backend, plus the stream operations a CUDA backend would queue."""

    def __init__(self):
        self.host_waits = []

    def to_device(self, host, stream):
        if stream is not None:
            stream.ops.append(("copy", host.nbytes))
        return super().to_device(host, stream)

    def record_ready(self, stream):
        event = StandInEvent(stream, len(stream.ops))
        stream.ops.append(("record", event))
        return event

    def wait_ready(self, marker, stream):
        if marker is None:
            return
        if stream is None:
            self.host_waits.append(marker)
        else:
            stream.ops.append(("wait", marker))


def _load(bid, n=800):
    from dask_kaas.device.cache import Load

    arr = np.full(n // 8, 1.0)
    return Load(bid, arr.nbytes, lambda: arr)


def test_a_hit_on_another_stream_waits_for_the_event_recorded_after_the_copy():
    from dask_kaas.device.cache import DeviceCache

    backend = StreamRecordingBackend()
    cache = DeviceCache(backend, 10_000)
    a, b = StandInStream("a"), StandInStream("b")
    first = cache.reserve([_load("w")], 0, a)
    assert [op for op, _ in a.ops] == ["copy", "record"]  # the event follows the copy
    event = a.ops[1][1]
    assert event.stream is a and event.position == 1
    second = cache.reserve([_load("w")], 0, b)  # a hit, while the copy may be in flight
    assert second.hits == 1 and b.ops == [("wait", event)]
    cache.release(first)
    cache.release(second)
    assert cache.read_host("w") is not None
    assert backend.host_waits == [event]  # a host read waits on the host


def test_the_cpu_backend_needs_no_ordering():
    backend = CpuBackend()
    assert backend.record_ready(None) is None
    backend.wait_ready(None, None)


# -- item 10: write-back does not hold the cache lock ---------------------------

class GatedWriteBackBackend(CpuBackend):
    """Device-to-host copies block until the test opens the gate."""

    def __init__(self):
        import threading

        self.gate = threading.Event()
        self.copying = threading.Event()

    def to_host(self, dev, stream):
        self.copying.set()
        assert self.gate.wait(10)
        return super().to_host(dev, stream)


def test_a_write_back_lets_other_slots_use_the_cache_meanwhile():
    import threading

    from dask_kaas.device.cache import DeviceCache
    from dask_kaas.device.handles import DeviceArray

    backend = GatedWriteBackBackend()
    cache = DeviceCache(backend, 2 * 800)
    res = cache.reserve([], 800)
    kept = np.arange(100, dtype=np.float64)
    handle = DeviceArray("k", kept.shape, kept.dtype, cache=cache)
    cache.release(res, keep={"k": (kept.copy(), kept.nbytes, handle)})
    cache.release(cache.reserve([_load("a")], 0))
    # "k" is the least recently used: loading "b" writes it back first.
    loader = threading.Thread(target=lambda: cache.release(cache.reserve([_load("b")], 0)))
    loader.start()
    try:
        assert backend.copying.wait(10)
        hit_done = threading.Event()
        hitter = threading.Thread(
            target=lambda: (cache.release(cache.reserve([_load("a")], 0)), hit_done.set()))
        hitter.start()
        assert hit_done.wait(5), "a hit on another slot waited for the write-back"
    finally:
        backend.gate.set()
        loader.join(10)
    hitter.join(10)
    assert set(cache.resident()) == {"a", "b"}
    np.testing.assert_array_equal(handle.get(), kept)
    assert cache.stats.writebacks == 1 and cache.stats.evictions == 1
    assert cache.used_bytes == 2 * 800


# -- item 4: shared memory against the device's opt-in limit -------------------

def shared_graph(shared_mem):
    g = KernelGraph("smem")
    x = g.input("x", (8, 8), np.float32)
    g.const("w", (8, 8), np.float32)
    y = g.output("y", (8, 8), np.float32)
    g.launch(Kernel.array(double, name="first"), [x, Out(y)])
    g.launch(Kernel.array(double, name="tiled"), [x, Out(y)], grid=1, block=32,
             shared_mem=shared_mem)
    return g


class Sm86Backend(CpuBackend):
    """The CPU backend with the shared-memory limit of an sm_86 GPU."""

    def shared_mem_limit(self):
        return 99 * 1024


def test_shared_memory_is_checked_against_the_device_opt_in_limit():
    from dask_kaas import LaunchConfigError
    from dask_kaas.graph.validate import check_shared_memory

    g = shared_graph(100 * 1024)
    check_shared_memory(g, 227 * 1024)  # fits a Hopper
    with pytest.raises(LaunchConfigError, match="graph 'smem', launch 1 \\(kernel 'tiled'\\)"
                       ".*102400 bytes.*at most 101376"):
        check_shared_memory(g, 99 * 1024)
    rt = WorkerRuntime(Sm86Backend(), 10_000)
    with pytest.raises(LaunchConfigError, match="launch 1 .*at most 101376"):
        run(rt, g, "k")
    assert rt.cache._private_bytes == 0
    out, _ = run(rt, shared_graph(64 * 1024), "k2")  # above 48 KiB is fine
    np.testing.assert_array_equal(out["y"], 2 * X)


class StandInRawKernel:
    """Stands in for a CuPy RawKernel's two shared-memory attributes."""

    def __init__(self, static):
        self.shared_size_bytes = static
        self.set_to = []

    @property
    def max_dynamic_shared_size_bytes(self):
        return self.set_to[-1] if self.set_to else None

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self.set_to.append(value)


def test_a_kernel_opts_in_above_48_kib_once_to_the_largest_size():
    from dask_kaas import LaunchConfigError
    from dask_kaas.device.cuda import opt_in_shared_memory

    raw, state = StandInRawKernel(static=0), {"static": None, "allowed": None}
    opt_in_shared_memory(raw, 32 * 1024, 227 * 1024, state)
    assert raw.set_to == []  # no opt-in needed
    opt_in_shared_memory(raw, 100 * 1024, 227 * 1024, state)
    opt_in_shared_memory(raw, 64 * 1024, 227 * 1024, state)
    assert raw.set_to == [100 * 1024]
    # static shared memory counts too: 40 KiB static + 16 KiB dynamic > 48 KiB
    raw, state = StandInRawKernel(static=40 * 1024), {"static": None, "allowed": None}
    opt_in_shared_memory(raw, 16 * 1024, 227 * 1024, state)
    assert raw.set_to == [16 * 1024]
    opt_in_shared_memory(raw, 180 * 1024, 227 * 1024, state)  # 220 KiB in all: fits
    assert raw.set_to == [16 * 1024, 180 * 1024]
    with pytest.raises(LaunchConfigError, match="194560 bytes.*40960 static.*232448"):
        opt_in_shared_memory(raw, 190 * 1024, 227 * 1024, state)


# -- item 5: pool and cache sizes ---------------------------------------------

GIB, MIB = 2**30, 2**20


def test_the_cache_leaves_headroom_in_the_pool():
    from dask_kaas.device.sizing import Headroom, size_device_memory

    room = Headroom(0.05, 256 * MIB)
    s = size_device_memory(141 * GIB, 140 * GIB, headroom=room)  # an H200, defaults
    assert s.pool_bytes == int(141 * GIB * 0.8) // 256 * 256
    assert s.headroom_bytes == int(s.pool_bytes * 0.05)
    assert s.cache_bytes == s.pool_bytes - s.headroom_bytes
    s = size_device_memory(16 * GIB, 15 * GIB, limit="96MB", headroom=room)
    assert s.cache_bytes == 96_000_000 and s.headroom_bytes == 256 * MIB
    assert s.pool_bytes == -(-(96_000_000 + 256 * MIB) // 256) * 256
    s = size_device_memory(16 * GIB, 15 * GIB, pool="4GiB", headroom=room)
    assert (s.pool_bytes, s.cache_bytes) == (4 * GIB, 4 * GIB - 256 * MIB)
    s = size_device_memory(16 * GIB, 15 * GIB, limit="1GiB", pool="4GiB", headroom=room)
    assert s.cache_bytes == GIB  # the limit, below what the pool would allow
    s = size_device_memory(80 * GIB, 10 * GIB, headroom=room)  # most of it already taken
    # What is free less the default reserve of 1 GiB (context, workspaces, modules).
    assert s.pool_bytes == 9 * GIB and s.reserve_bytes == GIB
    assert s.cache_bytes == 9 * GIB - int(9 * GIB * 0.05)
    s = size_device_memory(80 * GIB, 70 * GIB, limit=0.4, headroom=room)  # 2 per device
    assert s.cache_bytes == 32 * GIB and s.pool_bytes <= 0.45 * 80 * GIB


def test_a_pool_too_small_for_its_headroom_is_a_clear_error():
    from dask_kaas.device.sizing import Headroom, size_device_memory

    with pytest.raises(KaasError, match="no room for the device cache.*headroom"):
        size_device_memory(16 * GIB, 15 * GIB, pool="200MiB", headroom=Headroom(0.05, 256 * MIB))
    with pytest.raises(KaasError, match="no room"):
        size_device_memory(16 * GIB, 100 * MIB, headroom=Headroom(0.05, 256 * MIB))


def test_headroom_comes_from_the_config():
    import dask

    from dask_kaas.device.sizing import headroom_from_config

    assert headroom_from_config() == headroom_from_config({"fraction": 0.05,
                                                           "minimum": "256MiB"})
    with dask.config.set({"kaas.device-memory-headroom": {"fraction": 0.1, "minimum": 0}}):
        room = headroom_from_config()
    assert (room.fraction, room.minimum) == (0.1, 0) and room.of(1000) == 100


@pytest.mark.parametrize("value", [
    {"fraction": float("nan")}, {"fraction": float("inf")}, {"fraction": -0.1},
    {"fraction": 0.5}, {"fraction": "5%"}, {"fraction": True}, {"minimum": -1},
    {"minimum": "lots"}, {"minimum": 2**60}, {"minimum": 1.5}, {"minimum": None},
    {"minimum": "\udcff"}, {"other": 1}, [0.05], "5%", {"fraction": {"deep": [1]}},
])
def test_hostile_headroom_settings_are_refused_naming_the_key(value):
    from dask_kaas.device.sizing import headroom_from_config

    with pytest.raises(KaasError, match="kaas.device-memory-headroom"):
        headroom_from_config(value)


# -- item 6: which image NVRTC makes for a device --------------------------------

ARCHS = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)


@pytest.mark.parametrize("nvrtc,driver,arch,expected", [
    ((13, 5), (13, 0), 90, ("cubin", 90)),   # newer NVRTC, same major: cubin only
    ((13, 0), (13, 0), 90, ("cubin", 90)),
    ((13, 0), (13, 5), 130, ("ptx", 121)),   # unknown arch: PTX the driver can JIT
    ((12, 8), (13, 0), 90, ("cubin", 90)),   # older NVRTC on a newer driver
])
def test_the_image_is_a_cubin_or_ptx_the_driver_can_read(nvrtc, driver, arch, expected):
    from dask_kaas.device.nvrtc import choose_image

    assert choose_image(nvrtc, driver, arch, ARCHS) == expected


@pytest.mark.parametrize("nvrtc,driver,arch,why", [
    ((13, 5), (13, 0), 130, "PTX is newer than the driver's CUDA 13.0"),
    ((13, 0), (12, 8), 90, "NVRTC 13.0 is newer than the driver's CUDA 12.8"),
    ((13, 0), (13, 0), 50, "nor PTX for an older architecture"),
])
def test_an_image_no_driver_could_load_is_refused_up_front(nvrtc, driver, arch, why):
    from dask_kaas import KernelDefinitionError
    from dask_kaas.device.nvrtc import choose_image

    with pytest.raises(KernelDefinitionError, match=why):
        choose_image(nvrtc, driver, arch, ARCHS)


def test_driver_versions_decode_as_cuda_does():
    from dask_kaas.device.nvrtc import cuda_version

    assert cuda_version(13000) == (13, 0) and cuda_version(12080) == (12, 8)
    assert cuda_version(13050) == (13, 5)


@pytest.mark.parametrize("n,parts", [(1, 4), (4096, 4), (16 << 20, 8), ((16 << 20) - 3, 3),
                                     (12345, 1), (10, 0)])
def test_a_staging_chunk_is_split_among_fill_threads_exactly_once(n, parts):
    from dask_kaas.device.staging import split_ranges

    ranges = split_ranges(n, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # no gap, no overlap
    assert all(lo % 4096 == 0 for lo, _ in ranges) and len(ranges) <= max(1, parts)
    assert split_ranges(0, 4) == []


class FaultingCompileBackend(StickyFaultBackend):
    """Loading a module on a faulted device fails with the sticky error."""

    def compile(self, kernel):
        raise StandInIllegalAddressError("cudaErrorIllegalAddress: module load")


def test_a_sticky_fault_met_while_loading_a_kernel_is_a_device_fault():
    rt = WorkerRuntime(FaultingCompileBackend(), 10_000)
    with pytest.raises(DeviceFaultError, match="graph 'g1'.*module load"):
        run(rt, one_kernel_graph(double), "k")
    assert "module load" in rt.broken


def axpy_graph():
    g = KernelGraph("ax")
    x = g.input("x", (1000,), np.float64)
    y = g.output("y", (1000,), np.float64)
    g.launch(Kernel.library("copy"), [x, Out(y)])
    g.launch(Kernel.library("axpy"), [np.float64(2.0), x, InOut(y)])  # alpha * x: 8000 B
    return g


def test_the_temporaries_of_built_ins_are_set_aside_with_the_graph():
    from dask_kaas.graph.library import graph_temp_bytes

    g = axpy_graph()
    assert graph_temp_bytes(g) == 8000
    assert graph_temp_bytes(g, lambda n: -(-n // 256) * 256) == 8192
    xv = np.arange(1000, dtype=np.float64)
    req = GraphRequest("k", "ax", "t", [InputRef("x", 8000, None)])
    with pytest.raises(DeviceOutOfMemoryError, match="needs 24000 bytes"):
        WorkerRuntime(CpuBackend(), 20_000).run(g, req, [xv])
    rt = WorkerRuntime(CpuBackend(), 24_000)
    out, _ = rt.run(g, req, [xv])
    np.testing.assert_array_equal(out["y"], 3 * xv)
    assert rt.cache.stats.peak_used_bytes == 24_000 and rt.cache.used_bytes == 0


def test_gemm_with_beta_and_reduce_sum_count_their_temporaries():
    from dask_kaas.graph.library import graph_temp_bytes

    g = KernelGraph("gb")
    a = g.input("a", (4, 8), np.float32)
    b = g.const("b", (8, 16), np.float32)
    c = g.output("c", (4, 16), np.float32)
    s = g.output("s", (), np.float64)
    g.launch(Kernel.library("gemm"), [a, b, Out(c)])
    assert graph_temp_bytes(g) == 0  # matmul straight into c
    g.launch(Kernel.library("gemm"), [a, b, InOut(c), np.float32(1), np.float32(0.5)])
    g.launch(Kernel.library("reduce_sum"), [c, Out(s)])
    assert graph_temp_bytes(g) == 4 * 16 * 4  # a @ b before it is added to c


@pytest.mark.parametrize("limit,pool", [(float("nan"), None), (-1, None), ("lots", None),
                                        (True, None), (None, "\udcff"), (None, float("inf")),
                                        ({"a": 1}, None), (None, [1])])
def test_hostile_memory_sizes_are_refused(limit, pool):
    from dask_kaas.device.sizing import Headroom, size_device_memory

    with pytest.raises(KaasError, match="memory size"):
        size_device_memory(16 * GIB, 15 * GIB, limit=limit, pool=pool,
                           headroom=Headroom(0.05, 256 * MIB))


def test_a_limit_beyond_the_free_memory_gets_what_is_free():
    from dask_kaas.device.sizing import Headroom, size_device_memory

    s = size_device_memory(16 * GIB, 4 * GIB, limit="10TB", headroom=Headroom(0.05, 256 * MIB))
    assert s.pool_bytes == 3 * GIB and s.cache_bytes == 3 * GIB - 256 * MIB  # less the reserve
