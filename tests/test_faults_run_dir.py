"""Faults of issue 30 around the run directory, selection and `recipe clean`, each reproduced first.

The table of faults, before and now, is docs/reliability.md.

Steps are driven with the real Runner, RunDir and gates step, and step kinds written here (as in
test_scheduler.py) where a model is not what is tested; the CLI runs as a real `recipe` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MINIMAL, placeholder_model, recipe, recipe_cli_env
from runner.executors.local import LocalExecutor
from runner.plan import build_plan
from runner.recipe.loader import load_recipe
from runner.run_dir import MARKER, RUN_JSON_FORMAT, RunDir, write_json_atomic
from runner.scheduler import Runner, RunOptions
from runner.steps import StepKind, StepResult
from runner.steps.registry import step_kinds

# Strategy a is the smallest, so the recipe's preference (smallest first) selects it over b and c.
SIZES = {"a": 1.0, "b": 2.0, "c": 3.0}
AB = MINIMAL.replace("    - name: max\n      preset: NVFP4_DEFAULT_CFG\n",
                     "    - {name: a, preset: NVFP4_DEFAULT_CFG}\n    - {name: b, preset: FP8_DEFAULT_CFG}\n")
ABC = AB + "    - {name: c, preset: NVFP4_AWQ_LITE_CFG}\n"
SELECT = """
gates:
  - {name: small, metric: size.gb, op: "<=", value: 10}
selection:
  prefer: [{metric: size.gb, order: min}]
"""


def sized_kinds(plan, ran: list[str]) -> dict[str, StepKind]:
    """Every step writes a file; a benchmark writes the size of its strategy; gates is the real step."""

    async def run(ctx) -> StepResult:
        ran.append(ctx.step.id)
        (ctx.scratch / "out.txt").write_text(ctx.step.id)
        if ctx.step.kind == "benchmark":
            (ctx.scratch / "results.json").write_text(json.dumps(
                {"name": ctx.step.strategy, "suites": {}, "speed": {}, "size": {"gb": SIZES[ctx.step.strategy]}}))
            return StepResult(outputs={"results": "results.json"})
        return StepResult(outputs={"out": "out.txt"})

    kinds = {kind: StepKind(kind, run) for kind in {s.kind for s in plan.steps.values()}}
    kinds["gates"] = step_kinds()["gates"]
    return kinds


def run_plan(write, tmp_path, text: str, strategies: list[str] | None = None):
    plan = build_plan(load_recipe(write("r.yaml", text), env={}).recipe, strategies)
    ran: list[str] = []
    runner = Runner(plan, RunDir(tmp_path / "run"), LocalExecutor(), kinds=sized_kinds(plan, ran))
    return plan, asyncio.run(runner.run(RunOptions())), ran


def test_a_strategy_added_with_strategy_competes_with_the_ones_already_benchmarked(write, tmp_path):
    _, outcome, _ = run_plan(write, tmp_path, AB + SELECT)
    assert outcome.status == "complete"
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.record("gates")["summary"]["selection"]["best"] == "a"
    # c is added to the recipe and run alone: it is worse than a, so a stays selected.
    plan, outcome, ran = run_plan(write, tmp_path, ABC + SELECT, ["c"])
    assert outcome.status == "complete", outcome.messages
    assert not {s for s in ran if s.endswith((".a", ".b"))}  # --strategy limits what runs ...
    gates = run_dir.record("gates")
    assert gates["summary"]["selection"]["best"] == "a"  # ... not what competes
    assert gates["summary"]["candidates"] == ["a", "b", "c"] and gates["summary"]["not_benchmarked"] == {}
    assert set(gates["deps"]) == {"benchmark.a", "benchmark.b", "benchmark.c"}
    # Every strategy is current now: a plain run has nothing left to do, gates included.
    full, outcome, ran = run_plan(write, tmp_path, ABC + SELECT)
    assert outcome.status == "complete" and ran == []
    assert gates["key"] == full.keys["gates"]


def test_a_strategy_without_a_current_benchmark_is_named_as_not_benchmarked(write, tmp_path):
    plan, outcome, _ = run_plan(write, tmp_path, ABC + SELECT, ["c"])
    assert outcome.status == "complete", outcome.messages
    gates = RunDir(tmp_path / "run").record("gates")
    assert gates["summary"]["selection"]["best"] == "c" and gates["summary"]["candidates"] == ["c"]
    assert gates["summary"]["not_benchmarked"] == {"a": "not benchmarked in this run",
                                                   "b": "not benchmarked in this run"}
    table = RunDir(tmp_path / "run").output("gates", "table").read_text()
    assert "`a` is not judged: not benchmarked in this run." in table and "`b` is not judged" in table
    assert gates["key"] != build_plan(plan.recipe).keys["gates"]  # not the full plan's result


LOOK_ALIKE = {
    "recipe.yaml": "my own notes, not a recipe\n",
    "run.json": json.dumps({"status": "running", "steps": {"train": "done"}}) + "\n",
    "steps/01-setup.md": "step one of my project\n",
}


def look_alike(folder: Path) -> dict[str, str]:
    for name, text in LOOK_ALIKE.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def small_recipe(write, tmp_path: Path) -> Path:
    placeholder_model(tmp_path / "model")
    write("calib.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    return write("r.yaml", MINIMAL)


def test_a_look_alike_run_directory_is_refused_by_run_and_clean_and_never_rewritten(write, tmp_path):
    folder = tmp_path / "project"
    before = look_alike(folder)
    assert not RunDir(folder).is_run_dir()
    path = small_recipe(write, tmp_path)
    result = recipe("run", str(path), "--until", "source", "--run-dir", str(folder), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is not empty and is not a run directory" in result.stderr and "Traceback" not in result.stderr
    cleaned = recipe("clean", "--run-dir", str(folder), timeout=120)
    assert cleaned.returncode == 1 and "is not a run directory" in cleaned.stderr
    card = recipe("card", str(folder), timeout=120)
    assert card.returncode == 1 and "is not a run directory" in card.stderr and "Traceback" not in card.stderr
    after = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # not a byte written, renamed or removed
    # The runner's own run directories are still recognised: by the marker, or by run.json's format.
    made = RunDir(tmp_path / "made")
    made.claim()
    assert made.is_run_dir()
    old = tmp_path / "old"
    (old / "steps").mkdir(parents=True)
    write_json_atomic(old / "run.json", {"format": RUN_JSON_FORMAT, "status": "complete", "steps": {}})
    assert RunDir(old).is_run_dir()
    (folder / MARKER).write_text("")  # an empty file of that name is not the runner's marker either
    assert not RunDir(folder).is_run_dir()


class FakeDockerDaemon:
    """A Docker Engine API on a unix socket that lists the containers it is given and records every
    DELETE, so that this test runs wherever the tests do (tests/test_docker.py repeats the live-run case
    against a real engine where one runs, as in CI); the real `docker` SDK and the real `recipe clean`
    process talk to it."""

    def __init__(self, socket_path: Path, containers: dict[str, dict[str, str]]):
        import http.server
        import socketserver
        import threading
        from urllib.parse import urlparse

        self.containers = containers  # id -> labels
        self.deleted: list[str] = []
        daemon = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def address_string(self) -> str:
                return "unix"

            def log_message(self, *args) -> None:
                pass

            def reply(self, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Api-Version", "1.45")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                path = urlparse(self.path).path.split("/", 2)[-1] if self.path.startswith("/v1.") else \
                    urlparse(self.path).path.lstrip("/")
                if path == "version":
                    self.reply({"ApiVersion": "1.45", "Version": "27.0.0", "MinAPIVersion": "1.24"})
                elif path == "_ping":
                    data = b"OK"
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.send_header("Api-Version", "1.45")
                    self.end_headers()
                    self.wfile.write(data)
                elif path == "containers/json":
                    self.reply([{"Id": cid, "Names": [f"/{cid}"], "Labels": labels}
                                for cid, labels in daemon.containers.items() if cid not in daemon.deleted])
                elif path.startswith("containers/") and path.endswith("/json"):
                    cid = path.split("/")[1]
                    self.reply({"Id": cid, "Name": f"/{cid}", "Config": {"Labels": daemon.containers[cid]}})
                else:
                    self.send_error(404)

            def do_DELETE(self) -> None:  # noqa: N802
                daemon.deleted.append(urlparse(self.path).path.split("/")[-1])
                self.send_response(204)
                self.send_header("Api-Version", "1.45")
                self.end_headers()

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(socket_path), Handler)
        self.url = f"unix://{socket_path}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


HOLD_LOCK = ("import sys, time; from pathlib import Path; from runner.run_dir import RunDir\n"
             "with RunDir(Path(sys.argv[1])).locked():\n    print('holding', flush=True); time.sleep(600)\n")


def test_clean_never_touches_a_run_that_a_live_process_holds(tmp_path):
    import hashlib

    live, dead, old = (RunDir(tmp_path / name) for name in ("live", "dead", "old"))
    for run_dir in (live, dead, old):
        run_dir.claim()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(live.root)], stdout=subprocess.PIPE, text=True,
                              env=recipe_cli_env())
    legacy = hashlib.sha256(str(old.root).encode()).hexdigest()[:16]  # an earlier runner's label
    daemon = FakeDockerDaemon(tmp_path / "docker.sock", {
        "live-worker": {"recipe-runner.run": str(live.root), "recipe-runner.step": "quantize.a"},
        "dead-server": {"recipe-runner.run": str(dead.root), "recipe-runner.step": "serve.a"},
        "old-worker": {"recipe-runner.run": legacy, "recipe-runner.step": "verify.a"},
    })
    env = recipe_cli_env() | {"DOCKER_HOST": daemon.url}
    try:
        assert holder.stdout.readline().strip() == "holding" and live.is_locked()
        everything = recipe("clean", env=env, timeout=120)
        assert everything.returncode == 0, everything.stderr
        assert daemon.deleted == ["dead-server"]  # the live run's and the unknown run's are left
        assert f"left container live-worker: its run {live.root} is live" in everything.stdout
        assert "left container old-worker" in everything.stdout
        refused = recipe("clean", "--run-dir", str(live.root), env=env, timeout=120)
        assert refused.returncode == 1 and "is writing to" in refused.stderr
        assert daemon.deleted == ["dead-server"]  # refused before anything was removed
        assert (live.root / MARKER).is_file()
        ours = recipe("clean", "--run-dir", str(old.root), env=env, timeout=120)
        assert ours.returncode == 0, ours.stderr
        assert daemon.deleted == ["dead-server", "old-worker"]  # a run no one holds: its containers go
    finally:
        holder.kill()
        holder.wait()
        daemon.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB file system (tmpfs; needs root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs a tmpfs mount (root) to fill or write-protect a disk for real")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def big_calibration_recipe(write, tmp_path: Path) -> Path:
    """A recipe whose calibrate step writes more than 64 KB (its checked copy of the conversations)."""
    placeholder_model(tmp_path / "model")
    write("calib.jsonl", "".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i} " + "x" * 400}, {"role": "assistant", "content": "y" * 200}]})
        + "\n" for i in range(400)))
    return write("r.yaml", MINIMAL)


def test_a_full_disk_fails_the_run_with_one_line_and_run_json_says_failed(write, tmp_path, small_disk):
    path = big_calibration_recipe(write, tmp_path)
    run = small_disk / "run"
    result = recipe("run", str(path), "--until", "calibrate", "--run-dir", str(run), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr
    assert "calibrate failed: no space left on the device writing" in result.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "failed"  # not "running"
    again = recipe("run", str(path), "--until", "calibrate", "--run-dir", str(run), timeout=300)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "died without a word" not in again.stderr  # the previous run failed, and said so


def test_a_read_only_run_directory_is_one_line_for_run_and_clean(write, tmp_path, small_disk):
    path = small_recipe(write, tmp_path)
    run = small_disk / "run"
    assert recipe("run", str(path), "--until", "source", "--run-dir", str(run), timeout=300).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for args in (["run", str(path), "--until", "calibrate", "--run-dir", str(run)],
                 ["run", str(path), "--run-dir", str(small_disk / "new")],
                 ["clean", "--run-dir", str(run)]):
        result = recipe(*args, timeout=300)
        assert result.returncode == 1, args
        assert "Traceback" not in result.stderr, result.stderr
        assert "read-only file system" in result.stderr.splitlines()[-1], result.stderr


def scripted(plan, body) -> dict[str, StepKind]:
    """Every step is `body(ctx)` (async), run by the real Runner."""

    async def run(ctx) -> StepResult:
        await body(ctx)
        (ctx.scratch / "out.txt").write_text(ctx.step.id)
        return StepResult(outputs={"out": "out.txt"})

    return {kind: StepKind(kind, run) for kind in {s.kind for s in plan.steps.values()}}


def test_a_disk_filled_by_a_log_ends_in_one_line_per_step_and_run_json_failed(write, tmp_path, small_disk, capfd):
    plan = build_plan(load_recipe(write("r.yaml", MINIMAL), env={}).recipe)
    run_dir = RunDir(small_disk / "run")

    async def noisy(ctx) -> None:
        if ctx.step.id == "calibrate":  # a server's log fills the disk, then the step keeps logging
            with (ctx.scratch / "server.log").open("w") as log, contextlib.suppress(OSError):
                while True:
                    log.write("x" * 4096)
                    log.flush()
            for i in range(8):
                ctx.log.info("line %d %s", i, "y" * 4096)
            raise OSError(28, "No space left on device", str(ctx.scratch / "server.log"))

    outcome = asyncio.run(Runner(plan, run_dir, LocalExecutor(), kinds=scripted(plan, noisy)).run(RunOptions()))
    err = capfd.readouterr().err
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert "Logging error" not in err and "Traceback" not in err
    assert any(m.startswith("calibrate failed: no space left on the device writing") for m in outcome.messages)
    assert json.loads((run_dir.root / "run.json").read_text())["status"] == "failed"


def test_a_step_failing_in_a_task_group_names_each_cause(write, tmp_path):
    from runner.errors import RunnerError

    plan = build_plan(load_recipe(write("r.yaml", MINIMAL), env={}).recipe)
    run_dir = RunDir(tmp_path / "run")

    async def two_servers(ctx) -> None:
        if ctx.step.kind != "serve":
            return

        async def refused() -> None:  # what serving() raises for a taken port
            raise RunnerError("serve.port 8000 is in use by another process")

        async def second() -> None:
            raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 8001)")

        async with asyncio.TaskGroup() as group:  # as benchmark starts the candidate and the baseline
            group.create_task(refused())
            group.create_task(second())

    outcome = asyncio.run(Runner(plan, run_dir, LocalExecutor(), kinds=scripted(plan, two_servers)).run(RunOptions()))
    assert outcome.status == "failed"
    message = next(m for m in outcome.messages if m.startswith("serve.max failed"))
    assert "TaskGroup" not in message and "ExceptionGroup" not in message
    assert message.splitlines()[:2] == ["serve.max failed: serve.port 8000 is in use by another process",
                                        "    ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 8001)"]
    failed = json.loads((run_dir.logs_dir / "serve.max.failed.json").read_text())
    assert len(failed["causes"]) == 2


def test_the_progress_line_counts_a_failed_request_as_failed_not_answered():
    import aiohttp

    from runner.benchmark.suites import Suite, progress_line, run_suite
    from runner.errors import RunnerError
    from runner.testing.scripted_server import ScriptedServer

    lines: list[str] = []

    async def ask() -> None:
        server = ScriptedServer()
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                await run_suite(session, server.url, server.model,
                                Suite(name="probe", scorer="no_markdown", prompts=["[fail:500:99] one", "two", "three"]),
                                "", False, None, 1, lambda *counts: lines.append(progress_line("probe", *counts)))
        finally:
            await server.stop()

    with pytest.raises(RunnerError, match="1 of 3 requests"):
        asyncio.run(ask())
    assert len(lines) == 3 and lines[-1] == "suite probe: 2/3 answered, 1 failed"  # was "3/3 answered"
