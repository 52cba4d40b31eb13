"""The connection to Ray (a local Ray, or a running cluster) and the resource checks.

Every refusal here is one line (UserError), before anything is written.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from refilled.errors import UserError
from refilled.schema.search import SearchSettings

START_IT = "start it with `ray start --head` or check the address"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def connect(address: str | None, cpus: int | None = None) -> None:
    """Start a local Ray, or join a running cluster (`auto`, `host:port`)."""
    import ray

    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}}
    if address:
        import refilled
        env = {"py_modules": [refilled]}  # ship this package to the cluster's workers
        check_reachable(address)
    try:
        # "local": always a new Ray on this machine, never a cluster that `ray start` left running
        ray.init(address=address or "local", num_cpus=None if address else cpus, runtime_env=env,
                 include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to the Ray cluster at --address {address}: {_first_line(e)}; "
                        f"{START_IT}") from None


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast on a `host:port` nothing listens on: ray.init retries such an address
    for ever. `auto` is left to ray.init, which reports at once when no cluster runs
    here, unless RAY_ADDRESS names a `host:port` (then that is checked); a Ray Client
    address (ray://) reports its own errors."""
    target = os.environ.get("RAY_ADDRESS", "").strip() if address == "auto" else address
    if not target or target == "auto" or target.startswith("ray://") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        where = address if target == address else f"{address} (RAY_ADDRESS {target})"
        raise UserError(f"cannot connect to the Ray cluster at --address {where}: {reason}; {START_IT}") from None


def check_local_gpus(settings: SearchSettings) -> None:
    """A local Ray has this machine's CPUs and the GPUs CUDA shows this process
    (CUDA_VISIBLE_DEVICES applies): checked before Ray starts, so the error comes at once."""
    cpus = os.cpu_count() or 1
    if settings.resources.cpu > cpus:
        raise UserError(f"each trial asks for {settings.resources.cpu:g} CPUs but this machine has {cpus}: lower "
                        "search.resources.cpu (or --cpus-per-trial), or pass --address of a larger cluster")
    if settings.resources.gpu > 0:
        import torch

        have = torch.cuda.device_count()
        if settings.resources.gpu > have:
            raise UserError(f"each trial asks for {settings.resources.gpu} GPU but this machine has {have} (CUDA): "
                            "lower search.resources.gpu (or --gpus-per-trial), e.g. 0 for CPU trials, "
                            "or pass --address of a cluster with GPUs")


def check_resources(settings: SearchSettings) -> None:
    """Refuse per-trial resources the connected Ray does not have."""
    import ray

    have = ray.cluster_resources()
    if settings.resources.gpu > have.get("GPU", 0):
        raise UserError(f"each trial asks for {settings.resources.gpu} GPU but the Ray cluster has {have.get('GPU', 0):g}: "
                        "lower search.resources.gpu (or --gpus-per-trial), e.g. 0 for CPU trials")
    if settings.resources.cpu > have.get("CPU", 0):
        raise UserError(f"each trial asks for {settings.resources.cpu} CPUs but the Ray cluster has {have.get('CPU', 0):g}: "
                        "lower search.resources.cpu (or --cpus-per-trial)")
