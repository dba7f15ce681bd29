"""Launchers: where the blocks of a sweep run. Each block is one subprocess (utils/sweeps/runner.py).

* ``local``: blocks run on this machine, ``workers`` at a time (threads that each wait on one setting's
  process; the processes do the work). Each process gets OMP/MKL threads = CPUs // workers.
  ``workers=1`` runs them one after the other.
* ``slurm``: a submitit job array (one task per block) with the partition / GPUs / CPUs / memory / time
  of :class:`SlurmOptions`. ``cluster="local"`` or ``"debug"`` uses submitit's LocalExecutor /
  DebugExecutor instead of SLURM (tests, dry runs). Without ``wait`` the command returns after submitting.
* ``ray``: one Ray task per block with ``num_cpus`` / ``num_gpus``, on the cluster at ``address``
  (``host:port``, ``ray://host:port`` or ``auto``; checked for reachability first) or on a local Ray
  started by the command (and shut down after).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from utils.sweeps.runner import REPO, Block, run_block, stop_requested
from utils.sweeps.spec import SweepError

Report = Callable[[list[dict]], None]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_local(blocks: list[Block], workers: int | None, report: Report) -> None:
    workers = max(1, min(workers or available_cpus(), len(blocks)))
    threads = str(max(1, available_cpus() // workers))
    blocks = [replace(block, env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **block.env}) for block in blocks]
    if workers == 1:
        for block in blocks:
            report(run_block(block))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in as_completed([pool.submit(run_block, block) for block in blocks]):
            report(future.result())


@dataclass
class SlurmOptions:
    """A run's SLURM choices. A None parameter takes the sweep file's `slurm:` value (spec.SlurmSettings,
    the one home of the defaults): see `over`."""

    partition: str | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int | None = None
    array_parallelism: int | None = None
    additional_parameters: dict | None = None
    cluster: str | None = None  # None = SLURM (submitit's auto); "local" / "debug" for tests
    wait: bool = False

    def over(self, settings) -> "SlurmOptions":
        """These choices, every parameter left None filled from the sweep file's SlurmSettings."""
        return replace(self, **{key: value for key, value in settings.model_dump().items() if getattr(self, key) is None})


def run_slurm(blocks: list[Block], options: SlurmOptions, folder: Path, name: str, report: Report) -> list[str]:
    """Submit the blocks as one submitit job array; returns the job ids (waits and reports with ``wait``)."""
    try:
        import submitit
    except ImportError as error:
        raise SweepError("--launcher slurm needs the Python package 'submitit' (pip install submitit)") from error
    if options.cluster in (None, "slurm") and shutil.which("sbatch") is None:
        # submitit's AutoExecutor would silently fall back to running here, in the background
        raise SweepError("--launcher slurm: SLURM is not available on this machine (no 'sbatch' on PATH); run on a "
                         "SLURM login node, or ask for submitit's local executor by name with --slurm_cluster local")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=options.cluster or "slurm")
    parameters = {"name": name, "timeout_min": options.timeout_min, "cpus_per_task": options.cpus_per_task}
    if options.mem_gb is not None:
        parameters["mem_gb"] = options.mem_gb
    if options.cluster in (None, "slurm"):
        parameters["slurm_array_parallelism"] = options.array_parallelism
        if options.gpus_per_node:
            parameters["gpus_per_node"] = options.gpus_per_node
        if options.partition:
            parameters["slurm_partition"] = options.partition
        if options.additional_parameters:
            parameters["slurm_additional_parameters"] = dict(options.additional_parameters)
    elif options.gpus_per_node:
        parameters["gpus_per_node"] = options.gpus_per_node
    executor.update_parameters(**parameters)
    with _repository_on_pythonpath():  # the job unpickles run_block: it must import utils.sweeps
        jobs = executor.map_array(run_block, blocks)
    if options.wait or options.cluster == "debug":
        for job in jobs:
            report(job.result())
    return [str(job.job_id) for job in jobs]


@contextlib.contextmanager
def _repository_on_pythonpath():
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), previous]))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` / ``ray://host:port`` address must accept a TCP connection (else SweepError)."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SweepError(f"Ray address '{address}' is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise SweepError(f"Ray address '{address}' cannot be reached: {error}") from error


def run_ray(blocks: list[Block], address: str | None, num_cpus: float, num_gpus: float, report: Report,
            local_cpus: int | None = None) -> None:
    try:
        import ray
    except ImportError as error:
        raise SweepError("--launcher ray needs the Python package 'ray' (pip install 'ray[default]')") from error
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}}
    started_here = False
    if not ray.is_initialized():
        if address is not None:
            check_ray_address(address)
            try:
                ray.init(address=address, runtime_env=runtime_env, logging_level="ERROR", log_to_driver=False)
            except ConnectionError as error:
                raise SweepError(f"Ray address '{address}' cannot be reached: {error}") from error
        else:
            ray.init(num_cpus=local_cpus or available_cpus(), include_dashboard=False, runtime_env=runtime_env,
                     logging_level="ERROR", log_to_driver=False)
        started_here = True
    try:
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(run_block)
        pending = [task.remote(block) for block in blocks]
        cancelled = False
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if stop_requested() is not None and not cancelled:
                # a cancelled task gets KeyboardInterrupt: its run_block stops its process and records it
                for ref in pending:
                    ray.cancel(ref)
                cancelled = True
            for ref in done:
                try:
                    report(ray.get(ref))
                except (ray.exceptions.TaskCancelledError, ray.exceptions.RayTaskError):
                    if not cancelled:
                        raise
    finally:
        if started_here:
            ray.shutdown()
