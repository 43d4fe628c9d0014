"""The Slurm executor: each worker step (GGUF conversion, quantize, verify) is a batch job.

The runner stays on the submitting machine and runs the host steps (calibration, export fix-ups,
serving, benchmarks, gates, report) there; the run directory must be on a filesystem the nodes share.
A worker step becomes `sbatch` of a small script that runs `python -m runner.worker SPEC` in the
step's scratch folder, with the resources the recipe gives its kind (`execution.slurm`). Independent
strategies' steps are submitted side by side and Slurm decides where and when they run.

Containers: when the step's container plugin has an image and the cluster has pyxis (`srun
--container-image`), the job runs the worker inside it with the docker executor's mounts (the
scratch folder read-write, the step's input paths read-only, the plugin's mounts); without pyxis, in
the job's Python environment (the same interpreter path as the runner's, or `slurm.python`).

A job is named `recipe-runner` and carries the run directory in its comment, which is how `recipe
clean` finds the jobs of a crashed run. Cancelling the run (Ctrl-C, SIGTERM, a crash that unwinds)
`scancel`s its jobs; a job that fails, times out, runs out of memory or is preempted fails its step
with Slurm's state and reason and the job log's last lines.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.executors.base import Executor, WorkerFailed, read_result, worker_failure
from runner.executors.docker import input_paths
from runner.processes import RUN_DIR_ENV, worker_pythonpath
from runner.run_dir import write_json_atomic, write_text_atomic
from runner.steps.base import StepResult
from runner.steps.registry import step_kinds, worker_kinds
from runner.worker_contract import SPEC_FILE

JOB_NAME = "recipe-runner"
COMMENT_PREFIX = "recipe-runner:"
TERMINAL_OK = {"COMPLETED"}
TERMINAL_FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                   "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


def slurm_available() -> str | None:
    """None when sbatch, squeue, scontrol and scancel are on PATH; else which one is missing."""
    for tool in ("sbatch", "squeue", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return tool
    return None


async def _run(*argv: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, "", f"{argv[0]} did not answer in {timeout:.0f}s"
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o ID`: one line of Key=Value pairs (values without spaces, except a few
    trailing ones we do not read)."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _seconds_between(start: str, end: str) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


def pyxis_available() -> bool:
    """Whether this cluster's srun takes --container-image (the pyxis plugin)."""
    import subprocess

    try:
        help_text = subprocess.run(["srun", "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--container-image" in help_text


def job_script(*, argv: list[str], scratch: Path, log_path: Path, run_dir: Path, resources: Any,
               env: dict[str, str], container_image: str | None, mounts: list[tuple[Path, bool]]) -> str:
    """The batch script for one worker step."""
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={JOB_NAME}",
             f"#SBATCH --comment={COMMENT_PREFIX}{run_dir}",
             f"#SBATCH --output={log_path}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --chdir={scratch}"]
    for flag, value in (("--partition", resources.partition), ("--account", resources.account),
                        ("--time", resources.time), ("--cpus-per-task", resources.cpus), ("--mem", resources.mem)):
        if value is not None:
            lines.append(f"#SBATCH {flag}={value}")
    if resources.gpus:
        lines.append(f"#SBATCH --gres=gpu:{resources.gpus}")
    lines += [f"#SBATCH {arg}" for arg in resources.sbatch_args]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    command = " ".join(shlex.quote(a) for a in argv)
    if container_image:
        mount_arg = ",".join(f"{p}:{p}" + ("" if rw else ":ro") for p, rw in mounts)
        command = (f"srun --container-image={shlex.quote(container_image)} --container-mounts={shlex.quote(mount_arg)} "
                   f"--container-workdir={shlex.quote(str(scratch))} {command}")
    lines.append(f"exec {command}")
    return "\n".join(lines) + "\n"


class SlurmExecutor(Executor):
    name = "slurm"
    uses_containers = True  # the plugin's image, when the cluster has pyxis
    remote = True  # worker steps take no GPU of the submitting machine

    def __init__(self, run_dir: Path, spec: Any, poll_s: float = 1.0):
        missing = slurm_available()
        if missing is not None:
            raise RunnerError(f"execution.executor is slurm but `{missing}` is not on PATH: run from a machine of "
                              "the cluster (a login node), or use --executor local")
        self.run_dir = run_dir.resolve()
        self.spec = spec
        self.poll_s = poll_s
        self.jobs: set[str] = set()  # submitted and not known to be finished
        self._pyxis: bool | None = None

    def _uses_pyxis(self, container: Any) -> str | None:
        """The image to run the worker in, or None (the job's Python environment)."""
        if container is None or getattr(container, "runtime", "local") != "docker" or not container.image:
            return None
        if self.spec.containers == "never":
            return None
        if self._pyxis is None:
            self._pyxis = pyxis_available()
        return container.image if self._pyxis else None

    async def run_worker(self, *, worker_kind: str, params: dict[str, Any], scratch: Path, log_path: Path,
                         container: Any) -> StepResult:
        spec_path = scratch / SPEC_FILE
        write_json_atomic(spec_path, {"kind": worker_kind, "params": params, "output_dir": str(scratch)})
        kind = step_kinds()[worker_kinds()[worker_kind]]  # the step kind the recipe gives resources to
        resources = self.spec.resources_for(kind.name, kind.slurm)
        image = self._uses_pyxis(container)
        python = (container.python if image else None) or self.spec.python or sys.executable
        mounts = [(scratch, True)] + [(p, False) for p in input_paths(params) if not p.is_relative_to(scratch)]
        if image:
            mounts += [(Path(m.source), not m.read_only) for m in getattr(container, "mounts", [])]
        env = {RUN_DIR_ENV: str(self.run_dir), "PYTHONPATH": worker_pythonpath(os.environ.get("PYTHONPATH"))}
        script = scratch / "job.sbatch"
        write_text_atomic(script, job_script(argv=[python, "-m", "runner.worker", str(spec_path)], scratch=scratch,
                                             log_path=log_path, run_dir=self.run_dir, resources=resources, env=env,
                                             container_image=image, mounts=mounts))
        rc, out, err = await _run("sbatch", "--parsable", str(script))
        if rc != 0:
            raise WorkerFailed(f"sbatch refused the job: {(err or out).strip()}")
        job_id = out.strip().split(";")[0]
        self.jobs.add(job_id)
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"[slurm] submitted job {job_id}" + (f" (container {image} through pyxis)" if image else "")
                      + "\n")
        try:
            info = await self._wait(job_id)
        except asyncio.CancelledError:
            await self.cancel([job_id])
            raise
        self.jobs.discard(job_id)
        state = info.get("JobState", "UNKNOWN")
        slurm = {"job_id": job_id, "node": info.get("NodeList") or info.get("BatchHost"), "state": state,
                 "partition": info.get("Partition"),
                 "queue_wait_s": _seconds_between(info.get("SubmitTime", ""), info.get("StartTime", "")),
                 "run_s": _seconds_between(info.get("StartTime", ""), info.get("EndTime", "")),
                 "started_at": info.get("StartTime"), "ended_at": info.get("EndTime"),
                 "container_image": image}
        tail = deque(_tail(log_path), maxlen=30)
        if state not in TERMINAL_OK:
            reason = info.get("Reason", "None")
            cause = worker_failure(scratch, _exit_status(info.get("ExitCode")), list(tail))
            why = f" ({reason})" if reason not in ("None", "") else ""
            raise WorkerFailed(f"Slurm job {job_id} ended {state}{why} on {slurm['node'] or 'no node'}: {cause}")
        result = read_result(scratch, tail)
        result.summary["slurm"] = slurm
        return result

    async def _wait(self, job_id: str) -> dict[str, str]:
        """Poll the job until it ends; its last `scontrol` fields (or sacct's when it left memory)."""
        last: dict[str, str] = {}
        misses = 0
        while True:
            rc, out, _ = await _run("scontrol", "show", "job", "-o", job_id)
            if rc == 0 and out.strip():
                last = parse_scontrol(out)
                misses = 0
                state = last.get("JobState", "")
                if state in TERMINAL_OK or state in TERMINAL_FAILED:
                    return last
            else:
                misses += 1
                if misses >= 3:  # purged from the controller's memory (MinJobAge): ask accounting
                    found = await _sacct(job_id)
                    if found:
                        return {**last, **found}
                    if misses >= 10:
                        return {**last, "JobState": last.get("JobState") if last.get("JobState") in TERMINAL_OK
                                else "UNKNOWN", "Reason": "the controller forgot the job and there is no accounting"}
            await asyncio.sleep(self.poll_s)

    async def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            await _run("scancel", *job_ids, timeout=30)
            self.jobs.difference_update(job_ids)

    def cleanup(self) -> None:
        """scancel whatever of this run is still queued or running (the run ended, however)."""
        cancel_jobs(sorted(self.jobs))
        self.jobs.clear()


async def _sacct(job_id: str) -> dict[str, str] | None:
    rc, out, _ = await _run("sacct", "-j", job_id, "-X", "-n", "-P", "-o",
                            "State,ExitCode,NodeList,Submit,Start,End,Partition")
    if rc != 0 or not out.strip():
        return None
    state, exit_code, node, submit, start, end, partition = (out.strip().splitlines()[0].split("|") + [""] * 7)[:7]
    return {"JobState": state.split()[0] if state else "UNKNOWN", "ExitCode": exit_code, "NodeList": node,
            "SubmitTime": submit, "StartTime": start, "EndTime": end, "Partition": partition}


def _exit_status(value: str | None) -> int | None:
    try:
        return int(str(value).split(":")[0])
    except ValueError:
        return None


def _tail(path: Path, lines: int = 30) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def jobs_of(run_dir: Path | None) -> list[tuple[str, str]]:
    """(job id, run directory) of this user's queued or running runner jobs, of one run dir or all."""
    import subprocess

    if slurm_available() is not None:
        return []
    result = subprocess.run(["squeue", "--me", "--noheader", "--name", JOB_NAME, "--format=%i|%k"],
                            capture_output=True, text=True, timeout=60)
    found = []
    for line in result.stdout.splitlines():
        job_id, _, comment = line.partition("|")
        if not comment.startswith(COMMENT_PREFIX):
            continue
        owner = comment.removeprefix(COMMENT_PREFIX)
        if run_dir is None or Path(owner) == run_dir.resolve():
            found.append((job_id.strip(), owner))
    return found


def cancel_jobs(job_ids: list[str]) -> None:
    import subprocess

    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)


__all__ = ["SlurmExecutor", "cancel_jobs", "job_script", "jobs_of", "parse_scontrol"]
