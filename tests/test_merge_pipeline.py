"""The read / compute / write pipeline: order, errors from any stage, bounded buffers, overlap."""

from __future__ import annotations

import threading

import pytest
import torch

from vlmsafe.errors import InternalError
from vlmsafe.merge.pipeline import BufferPool, run_pipeline


def test_pipeline_keeps_order_and_runs_stages_in_three_threads():
    seen, threads = [], {"read": set(), "compute": set(), "write": set()}

    def source():
        for i in range(50):
            threads["read"].add(threading.get_ident())
            yield i

    def stage(x):
        threads["compute"].add(threading.get_ident())
        return x * x

    def sink(y):
        threads["write"].add(threading.get_ident())
        seen.append(y)

    run_pipeline(source(), stage, sink)
    assert seen == [i * i for i in range(50)]
    assert threads["compute"] == {threading.get_ident()}
    assert len(threads["read"] | threads["write"] | threads["compute"]) == 3


@pytest.mark.parametrize("where", ["source", "stage", "sink"])
def test_an_error_in_any_stage_stops_the_others_and_is_raised(where):
    done = []

    def source():
        for i in range(1000):
            if where == "source" and i == 5:
                raise ValueError("read failed")
            yield i

    def stage(x):
        if where == "stage" and x == 5:
            raise ValueError("compute failed")
        return x

    def sink(y):
        if where == "sink" and y == 5:
            raise ValueError("write failed")
        done.append(y)

    with pytest.raises(ValueError, match="failed"):
        run_pipeline(source(), stage, sink)
    assert len(done) < 10 and not [t for t in threading.enumerate() if t.name.startswith("vlmsafe-")]


def test_reading_runs_while_writing():
    """The writer of block 0 sees the reader produce a later block: reading overlaps writing."""
    produced_3 = threading.Event()
    overlapped = []

    def source():
        for i in range(8):
            if i == 3:
                produced_3.set()
            yield i

    def sink(y):
        if y == 0:
            overlapped.append(produced_3.wait(timeout=10))

    run_pipeline(source(), lambda x: x, sink)
    assert overlapped == [True]


def test_buffer_pool_blocks_when_exhausted_and_bounds_oversize():
    pool = BufferPool(2, 64, oversize_budget=200)
    a, b = pool.take(10), pool.take(64)
    assert a.numel() == 10 and b.numel() == 64
    got = []
    t = threading.Thread(target=lambda: got.append(pool.take(32)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # both buffers in use: waits
    pool.give([a.view(torch.int16)])  # a view of a pooled buffer returns it
    t.join(2)
    assert got and got[0].untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    with pytest.raises(InternalError, match="returned twice"):  # a bug, not an input: RuntimeError, no VlmsafeError
        pool.give([b, b])

    big = pool.take(150)  # larger than a buffer: from the oversize budget
    t = threading.Thread(target=lambda: got.append(pool.take(100)))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # 150 + 100 > 200: waits for the first to come back
    pool.give([big])
    t.join(2)
    assert not t.is_alive() and got[-1].numel() == 100


def test_a_write_outside_the_shard_plan_is_an_internal_error(tmp_path):
    """The writer follows the plan the merge made from the headers; a write off that plan is vlmsafe's bug: an
    InternalError (a RuntimeError with its traceback), never a one-line user error."""
    from vlmsafe.errors import VlmsafeError
    from vlmsafe.merge.writer import OutputTensor, ShardedWriter

    plan = [OutputTensor("a", torch.float32, (2,)), OutputTensor("b", torch.float32, (3,))]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=1 << 20)
    try:
        with pytest.raises(InternalError, match="out-of-plan write: got b, expected a") as info:
            writer.begin("b")
        assert isinstance(info.value, RuntimeError) and not isinstance(info.value, VlmsafeError)
        writer.write("a", torch.ones(2))
        with pytest.raises(InternalError, match="only 1 of 2 planned tensors were written"):
            writer.close()
    finally:
        writer.abort()
