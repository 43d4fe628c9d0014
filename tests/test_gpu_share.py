"""GPU steps share a GPU by memory (runner/gpu_pool.py): the pool's rules, the real Runner sharing two
quantize steps whose predicted needs fit (and not when they do not), the lease a worker receives, and
the worker side (CUDA_VISIBLE_DEVICES, the capped free memory)."""

from __future__ import annotations

import asyncio
import os

import pytest
from test_scheduler import THREE, Recorder, make

from runner.executors.local import LocalExecutor
from runner.gpu_pool import USABLE_SHARE, GpuPool, Lease
from runner.scheduler import Runner, RunOptions
from runner.worker_contract import GPU_LEASE_PARAM

GB = 10**9


def test_needs_that_fit_share_a_gpu_and_the_rest_wait_in_order():
    async def scenario():
        pool = GpuPool(1, 80 * GB)
        a = await pool.acquire(0, 31 * GB)
        b = await pool.acquire(1, 31 * GB)
        assert a == Lease(0, 31 * GB) and b == Lease(0, 31 * GB)  # 62 of 73.6 GB usable
        waited = []
        third = asyncio.ensure_future(pool.acquire(2, 31 * GB, on_wait=lambda: waited.append(pool.waiting_for(31 * GB))))
        whole = asyncio.ensure_future(pool.acquire(3, None))
        await asyncio.sleep(0)
        assert not third.done() and not whole.done()
        assert "31 GB" in waited[0] and "62 of 74 GB leased" in waited[0]
        pool.release(a)
        await asyncio.sleep(0.01)
        assert third.done() and not whole.done()  # the whole-GPU step waits for an empty GPU
        pool.release(b)
        pool.release(third.result())
        await asyncio.sleep(0.01)
        assert whole.result() == Lease(0, None)
        # Behind a whole-GPU holder, even a small step waits.
        small = asyncio.ensure_future(pool.acquire(4, 1 * GB))
        await asyncio.sleep(0.01)
        assert not small.done()
        pool.release(whole.result())
        await asyncio.sleep(0.01)
        assert small.result() == Lease(0, 1 * GB)

    asyncio.run(scenario())


def test_unknown_memory_or_an_oversized_need_takes_a_whole_gpu():
    async def scenario():
        unknown = GpuPool(2, None)
        first, second = await unknown.acquire(0, 10 * GB), await unknown.acquire(1, 10 * GB)
        assert (first, second) == (Lease(0, None), Lease(1, None))  # one step per GPU, as before
        big = GpuPool(1, 80 * GB)
        assert not big.fits_alone(79 * GB) and big.fits_alone(int(80 * GB * USABLE_SHARE))
        assert await big.acquire(0, 79 * GB) == Lease(0, None)

    asyncio.run(scenario())


def test_a_head_of_line_step_is_not_overtaken():
    async def scenario():
        pool = GpuPool(1, 80 * GB)
        held = await pool.acquire(0, 40 * GB)
        big = asyncio.ensure_future(pool.acquire(1, 60 * GB))
        small = asyncio.ensure_future(pool.acquire(2, 10 * GB))
        await asyncio.sleep(0.01)
        assert not big.done() and not small.done()  # 10 GB would fit, but the 60 GB step came first
        pool.release(held)
        await asyncio.sleep(0.01)
        assert big.done() and small.done()

    asyncio.run(scenario())


class LeaseRecorder(Recorder):
    """Recorder whose quantize steps call their worker (a scripted executor) so the lease is seen."""

    def __init__(self, delay: float):
        super().__init__(delay=delay)
        self.leases: dict[str, dict] = {}

    def kinds(self, plan):
        kinds = super().kinds(plan)
        inner = kinds["quantize"].run

        async def quantize(ctx):
            await ctx.run_worker("quantize", {"x": 1})
            return await inner(ctx)

        kinds["quantize"] = kinds["quantize"].__class__("quantize", quantize)
        return kinds


class ScriptedExecutor(LocalExecutor):
    def __init__(self, recorder: LeaseRecorder):
        super().__init__()
        self.recorder = recorder

    async def run_worker(self, *, worker_kind, params, scratch, log_path, container):
        from runner.steps import StepResult

        self.recorder.leases[scratch.name.split(".")[0] + "." + scratch.name.split(".")[1]] = params.get(GPU_LEASE_PARAM)
        return StepResult(outputs={}, summary={})


@pytest.mark.parametrize(("need_gb", "together"), [(31, 2), (50, 1)])
def test_the_runner_shares_a_gpu_between_quantize_steps_that_fit(write, tmp_path, need_gb, together):
    text = THREE.replace("max_parallel: 2", "max_parallel: 3") + "  gpu_memory_gb: 80\n"
    plan, run_dir = make(write, tmp_path, text)
    recorder = LeaseRecorder(delay=0.2)
    runner = Runner(plan, run_dir, ScriptedExecutor(recorder), kinds=recorder.kinds(plan))
    runner.gpu_needs = {sid: need_gb * GB for sid, step in plan.steps.items() if step.kind == "quantize"}
    outcome = asyncio.run(runner.run(RunOptions(until=["quantize"])))
    assert outcome.status == "complete"
    assert recorder.max_heavy == together
    assert {lease["memory_bytes"] for lease in recorder.leases.values()} == {need_gb * GB}
    assert all(lease["index"] == 0 for lease in recorder.leases.values())


def test_the_worker_takes_its_lease(monkeypatch):
    from runner.worker import __main__ as entry

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv("RECIPE_GPU_MEMORY_BYTES", "")
    entry.apply_gpu_lease({"index": 1, "memory_bytes": 31 * GB})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"  # the second of the GPUs the run may use
    assert os.environ["RECIPE_GPU_MEMORY_BYTES"] == str(31 * GB)
    entry.apply_gpu_lease(None)  # no lease: nothing changes
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
