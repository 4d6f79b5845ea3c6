"""Who am I in a multi-worker job: rank, world size and rendezvous address, from torchrun env or Vertex CLUSTER_SPEC.

Order of precedence:

1. torchrun / ``torch.distributed.run`` env: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
   ``LOCAL_RANK`` (when ``WORLD_SIZE`` is set).
2. Vertex AI ``CLUSTER_SPEC``: ``{"cluster": {"workerpool0": ["host:port"], "workerpool1": [...]}, "task":
   {"type": "workerpool0", "index": 0}}``. Worker pool 0 holds the one primary replica (rank 0); pool 1 holds the
   other workers (rank ``1 + index``). Pools 2 (reduction servers) and 3 (evaluators) take no part in training.
   The master is pool 0's host; its port is ``MASTER_PORT`` when set, else the port in the spec.
3. Neither: a single process (rank 0 of 1).

The backend is ``nccl`` when CUDA is available, else ``gloo``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from embedpipe.config import process_env

TRAINING_POOLS = ("workerpool0", "workerpool1")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_rank: int = 0
    source: str = "single"  # single | torchrun | cluster_spec
    participates: bool = True  # False for reduction-server / evaluator pools

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    return host, int(port)


def parse_cluster_spec(raw: str, env: Mapping[str, str] | None = None) -> DistInfo:
    """DistInfo from a Vertex ``CLUSTER_SPEC`` JSON string; raises ValueError with the reason when malformed."""
    env = process_env() if env is None else env
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        pool, index = str(task["type"]), int(task.get("index", 0))
        primary = cluster["workerpool0"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"CLUSTER_SPEC is not a Vertex cluster spec ({exc!r}): {raw[:200]}") from exc
    if not primary:
        raise ValueError("CLUSTER_SPEC has an empty workerpool0")
    workers = cluster.get("workerpool1") or []
    world = len(primary) + len(workers)
    addr, port = _host_port(primary[0], 29500)
    if env.get("MASTER_PORT"):
        port = int(env["MASTER_PORT"])
    if pool not in TRAINING_POOLS:
        return DistInfo(-1, world, addr, port, 0, "cluster_spec", participates=False)
    rank = index if pool == "workerpool0" else len(primary) + index
    if rank >= world:
        raise ValueError(f"CLUSTER_SPEC task {pool}[{index}] is outside the cluster ({world} training replicas)")
    return DistInfo(rank, world, addr, port, 0, "cluster_spec")


def from_env(env: Mapping[str, str] | None = None) -> DistInfo:
    env = process_env() if env is None else env
    if env.get("WORLD_SIZE"):
        return DistInfo(
            rank=int(env.get("RANK", "0")),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            source="torchrun",
        )
    if env.get("CLUSTER_SPEC"):
        return parse_cluster_spec(env["CLUSTER_SPEC"], env)
    return DistInfo()


def backend(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def init(info: DistInfo, timeout_s: float = 600.0) -> str:
    """Join the process group (no-op for one process); returns the device string this rank should use."""
    import datetime

    import torch

    from embedpipe.ml.embedding import default_device

    cuda = default_device() == "cuda"  # one rule for where models run; here one GPU per local rank
    device = f"cuda:{info.local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(info.local_rank)
    if info.distributed:
        import torch.distributed as dist

        dist.init_process_group(
            backend=backend(cuda),
            init_method=f"tcp://{info.master_addr}:{info.master_port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
