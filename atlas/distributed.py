"""A stage's work in shards on Ray actors, one model replica per worker; the driver merges.

The corpus pass and the clamp check are folds whose states merge (``PassState.merge``,
``Effects.merge``). A stage cuts its inputs into shards by identity (batches of input ids,
runs of neurons) and hands them here with a task function; each worker runs the task on
its own copy of the model and returns the shard's state; the driver folds the states in
shard order, whatever order they finish in, and alone writes the store. This module knows
nothing about what a state holds: it ships whatever the task returns and calls back the
stage, which calls the state's ``merge``.

Why actors and not Ray Data: a worker must load a model once (seconds to minutes) and keep
it for many shards, on one GPU; the result of a shard is one mergeable state rather than a
stream of rows; and the order of merging must be fixed by shard, not by block arrival.
Actors with ``max_restarts``/``max_task_retries`` give exactly that: a SIGKILLed worker is
restarted, reloads the model, reruns its shard, and the driver receives that shard's state
once.

Only a stage run with ``--ray`` imports this module (``tests/test_layout.py`` checks that
nothing else imports ray), so a plain install never needs it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from atlas.errors import AtlasError

try:
    import ray
    import ray.exceptions
except ImportError:                                     # the optional extra is not installed
    ray = None

RETRIES = 3                 # restarts of a killed worker, and reruns of the shard it held
POLL_S = 0.5                # how often the progress bar reads the workers' counts


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:600] or type(e).__name__


@dataclass(frozen=True)
class WorkerModel:
    """What every worker loads: the model as the driver was given it, and the hash it must have."""
    source: str | None
    dtype: str
    weights_hash: str


@dataclass(frozen=True)
class Shard:
    """One piece of a stage's work: ``task(lm, job, report) -> state``; ``size`` in progress units."""
    index: int
    task: Callable
    job: Any
    size: int


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` ('auto': the running local one, else a new local one)."""
    if ray is None:
        raise AtlasError("--ray needs Ray: pip install 'atlas-neurons[ray]'")
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "auto" else address, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)
    except Exception as e:  # a wrong address or a cluster that is down fails in many ways
        raise AtlasError(f"--ray {address}: cannot join a Ray cluster: {one_line(e)}") from None


class ShardWorker:
    """A Ray actor holding one copy of the model; ``run`` folds one shard with it."""

    def __init__(self, model: WorkerModel, device: str, threads: int):
        self.lm, self.problem, self.weights_hash = None, None, None
        try:
            # The weights are hashed before they load: a worker with other files loads nothing.
            from atlas.model.files import hash_weights, resolve
            self.weights_hash = hash_weights(resolve(model.source)[3])
            if self.weights_hash == model.weights_hash:
                import torch

                from atlas.model.load import load_model
                if device == "cpu":
                    torch.set_num_threads(threads)
                self.lm = load_model(model.source, device, model.dtype)
        except Exception as e:                          # reported by ready(), in one line
            self.problem = one_line(e)

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "problem": self.problem,
                "weights_hash": self.weights_hash}

    def run(self, task: Callable, index: int, job: Any, progress, env: dict[str, str]) -> Any:
        for name in [n for n in os.environ if n.startswith("ATLAS_FAULT") and n not in env]:
            del os.environ[name]
        os.environ.update(env)                          # the driver's fault points reach the workers
        return task(self.lm, job, lambda done: progress.set.remote(index, done))


class Progress:
    """Units done per shard, as the workers report them; a rerun shard starts its count again."""

    def __init__(self):
        self.done: dict[int, int] = {}

    def set(self, index: int, done: int) -> None:
        self.done[index] = done

    def counts(self) -> dict[int, int]:
        return self.done


_POOLS: dict[tuple, list] = {}


def workers(model: WorkerModel, address: str, n: int, device: str = "auto", threads: int = 0) -> list:
    """``n`` workers (0: one per GPU of the cluster, or one per CPU core without GPUs), each with the model.

    Workers are kept for the rest of the process, so the stages of one build (and a
    benchmark's runs) share them. Every worker's weights hash is checked against the driver's
    before it gets work; a worker that differs, or cannot load the model, fails the run in
    one line.
    """
    connect(address)
    resources = ray.cluster_resources()
    gpus = 0 if device == "cpu" else int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if device.startswith("cuda") and not gpus:
        raise AtlasError(f"--device {device} asked for, but the Ray cluster has no GPU")
    n = n or gpus or cpus
    if gpus and n > gpus:
        raise AtlasError(f"--ray-workers {n}: the Ray cluster has {gpus} GPU(s), one worker each")
    threads = threads or max(1, cpus // n)
    if not gpus and n * threads > cpus:
        raise AtlasError(f"--ray-workers {n}: the Ray cluster has {cpus} CPU core(s); "
                         f"{n} workers of {threads} thread(s) would wait for each other forever")
    key = (model, address, "cuda" if gpus else "cpu")
    pool = _POOLS.get(key, [])
    if len(pool) >= n:              # more threads or fewer change the speed, not the rows
        return pool[:n]
    shutdown()                      # workers of another model or setting would hold the cores
    pool = _POOLS[key] = []
    kind = "GPU" if gpus else "CPU"
    need = n if gpus else n * threads
    for _ in range(40):             # workers just ended free their cores within a moment
        have = int(ray.available_resources().get(kind, 0))
        if have >= need:
            break
        time.sleep(0.25)
    else:
        raise AtlasError(f"--ray-workers {n}: the Ray cluster has {have} free {kind}(s) "
                         f"of {gpus or cpus}, and {n} workers need {need}")
    remote = ray.remote(ShardWorker).options(
        max_restarts=RETRIES, max_task_retries=RETRIES,
        **({"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": threads}))
    new = [remote.remote(model, "cuda" if gpus else "cpu", threads) for _ in range(n - len(pool))]
    try:
        infos = ray.get([w.ready.remote() for w in new])
    except ray.exceptions.RayError as e:
        shutdown()
        raise AtlasError(f"a Ray worker could not start: {one_line(e)}") from None
    for info in infos:
        bad = info["problem"] or (info["weights_hash"] != model.weights_hash and
                                  f"it loaded weights {str(info['weights_hash'])[:19]}…, not the driver's "
                                  f"{model.weights_hash[:19]}… (every node must hold the same model files)")
        if bad:
            shutdown()
            raise AtlasError(f"the Ray worker on {info['node']} (pid {info['pid']}) cannot take part: {bad}")
    pool += new
    return pool


def stage_workers(ctx, address: str, n: int) -> list:
    """The workers for a stage's ``Context``: the model, device and dtype the driver was given."""
    source = ctx.model
    if source and Path(source).expanduser().exists():       # workers may start in another directory
        source = str(Path(source).expanduser().resolve())
    return workers(WorkerModel(source, ctx.dtype, ctx.weights_hash), address, n, ctx.device)


def shutdown() -> None:
    """End this process's workers (they end with the process anyway)."""
    for pool in _POOLS.values():
        for w in pool:
            ray.kill(w)
    _POOLS.clear()


def run_shards(pool: Sequence, shards: Sequence[Shard], fold: Callable[[Shard, Any], None],
               progress: bool = True, desc: str = "shards", unit: str = "tok") -> float:
    """Run every shard on the pool, one at a time per worker; ``fold(shard, state)`` in shard order.

    One progress bar counts the units of all workers. Returns the seconds the shards took.
    """
    counter = ray.remote(Progress).options(num_cpus=0).remote()
    sizes = {s.index: s.size for s in shards}
    bar = tqdm(total=sum(sizes.values()), desc=desc, unit=unit, unit_scale=True, disable=not progress)
    todo, idle = list(reversed(shards)), list(pool)
    running: dict = {}
    finished: dict[int, tuple[Shard, Any]] = {}
    order = [s.index for s in shards]
    next_fold = 0
    env = {k: v for k, v in os.environ.items() if k.startswith("ATLAS_FAULT")}
    began = time.perf_counter()
    try:
        while todo or running:
            while idle and todo:
                shard, worker = todo.pop(), idle.pop()
                running[worker.run.remote(shard.task, shard.index, shard.job, counter, env)] = (shard, worker)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            for ref in ready:
                shard, worker = running.pop(ref)
                finished[shard.index] = (shard, _result(ref, shard))
                idle.append(worker)
            while next_fold < len(order) and order[next_fold] in finished:
                fold(*finished.pop(order[next_fold]))
                next_fold += 1
            if progress:
                counts = ray.get(counter.counts.remote())
                done_units = sum(sizes[i] for i in order[:next_fold]) + sum(sizes[i] for i in finished) + \
                    sum(min(counts.get(s.index, 0), s.size) for s, _ in running.values())
                bar.update(done_units - bar.n)
    finally:
        bar.close()
        ray.kill(counter)
    return time.perf_counter() - began


def _result(ref, shard: Shard) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:             # the task itself failed: its own message
        cause = getattr(e, "cause", None) or e
        raise AtlasError(f"shard {shard.index} failed on a Ray worker: {one_line(cause)}") from None
    except ray.exceptions.RayError as e:                 # the worker died more often than Ray retries
        raise AtlasError(f"shard {shard.index}: its Ray worker died {RETRIES + 1} times "
                         f"({type(e).__name__}); see the Ray logs of the node") from None
