"""BufferDirectory's running totals and reverse index agree with a plain
recomputation after any sequence of worker reports and plans."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dask_kaas.plugin.directory import BufferDirectory

workers = st.sampled_from(["w0", "w1", "w2"])
buffers = st.sampled_from(["a", "b", "c", "d"])
sizes = st.integers(0, 1000)


class DirectoryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = BufferDirectory()
        self.resident: dict[str, dict[str, int]] = {}
        self.planned: dict[str, dict[str, int]] = {}
        self.sizes: dict[str, int] = {}

    @rule(w=workers, b=buffers, n=sizes)
    def added(self, w, b, n):
        self.d.added(w, b, n)
        self.resident.setdefault(w, {})[b] = n
        self.sizes[b] = n

    @rule(w=workers, b=buffers)
    def removed(self, w, b):
        self.d.removed(w, b)
        self.resident.get(w, {}).pop(b, None)

    @rule(w=workers, b=buffers, n=sizes)
    def plan(self, w, b, n):
        self.d.plan(w, b, n)
        held = self.planned.setdefault(w, {})
        held[b] = held.get(b, 0) + 1
        self.sizes.setdefault(b, n)

    @rule(w=workers, b=buffers)
    def unplan(self, w, b):
        self.d.unplan(w, b)
        held = self.planned.get(w, {})
        if b in held:
            held[b] -= 1
            if not held[b]:
                del held[b]

    @rule(w=workers, res=st.dictionaries(buffers, sizes, max_size=3))
    def reset(self, w, res):
        self.d.reset_worker(w, res)
        self.resident[w] = dict(res)
        self.sizes.update(res)

    @rule(w=workers)
    def forget_worker(self, w):
        self.d.forget_worker(w)
        self.resident.pop(w, None)
        self.planned.pop(w, None)

    @rule(b=buffers)
    def forget_buffer(self, b):
        self.d.forget_buffer(b)
        for table in (self.resident, self.planned):
            for held in table.values():
                held.pop(b, None)
        self.sizes.pop(b, None)

    @invariant()
    def agrees(self):
        for w in ("w0", "w1", "w2"):
            res = self.resident.get(w, {})
            plan = self.planned.get(w, {})
            expect = sum(res.values()) + sum(self.sizes.get(b, 0) for b in plan if b not in res)
            assert self.d.expected_bytes(w) == expect, w
        for b in ("a", "b", "c", "d"):
            expect = {w for w in ("w0", "w1", "w2")
                      if b in self.resident.get(w, {}) or b in self.planned.get(w, {})}
            assert self.d.holders(b) == expect
            assert all(self.d.holds(w, b) == (w in expect) for w in ("w0", "w1", "w2"))


DirectoryMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50,
                                              deadline=None)
test_directory_state_machine = DirectoryMachine.TestCase
