"""How a worker's failure reaches the user: its one-line reason first and once, the traceback in the
step log, "needs a CUDA GPU" said in those words, and nothing written outside the step's folder."""

from __future__ import annotations

import asyncio
import json

import pytest

from runner.executors.base import ERROR_FILE, WorkerFailed
from runner.executors.local import LocalExecutor
from runner.serving import engine_for
from runner.worker.__main__ import explain


def test_messages_that_mean_a_gpu_is_needed_say_so():
    message = explain(RuntimeError("fp4 kernels requires triton. Install with pip install triton"))
    assert message.startswith("needs a CUDA GPU") and "pip install triton" in message
    assert explain(SystemExit("verification failed: size")) == "verification failed: size"
    assert explain(ValueError("bad\nsecond line")) == "ValueError: bad"


def test_a_failing_worker_gives_its_reason_once_and_its_traceback_to_the_log(tmp_path):
    scratch = tmp_path / "run" / ".scratch" / "verify.x"
    scratch.mkdir(parents=True)
    log = tmp_path / "verify.log"
    params = {"checkpoint": str(tmp_path / "no_checkpoint"), "exclude": [],
              "rules": engine_for("vllm").verify_rules.to_params()}
    with pytest.raises(WorkerFailed) as caught:
        asyncio.run(LocalExecutor().run_worker(worker_kind="verify", params=params, scratch=scratch,
                                               log_path=log, container=None))
    message = str(caught.value)
    assert message.startswith("verification failed:") and "\n" not in message and "Traceback" not in message
    assert json.loads((scratch / ERROR_FILE).read_text())["error"] == message
    assert "Traceback" in log.read_text()
    # The worker ran in a folder of its own inside the scratch folder, and removed it.
    assert not (scratch / ".work").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "verify.log"]
