"""`atlas bench corpus --ray 1,2`: the corpus pass on 1, 2 … Ray workers in one run, and its scaling.

Every worker has one thread (one CPU) or one GPU, so n workers use n times the hardware of
one: the scaling efficiency is ``tokens/s with n workers / (n x tokens/s with 1)``. The
timed span is the whole sharded pass as a build runs it: shards dispatched, folded on the
workers, shipped back and merged on the driver in shard order. Model loading is not timed
(the workers load once, before the first run). The load average is recorded beside the
figures, since other work on the machine takes cores from the workers.
"""

from __future__ import annotations

import os
import platform
import time

from atlas.config import ExemplarConfig


def bench_corpus_ray(workers: list[int], model: str = "default", device: str = "auto", dtype: str = "auto",
                     batches: int = 32, batch_size: int = 16, context: int = 128, repeats: int = 1,
                     address: str = "auto") -> dict:
    from atlas import distributed
    from atlas.model.load import load_model
    from atlas.stages.exemplars import read_rows, shards

    lm = load_model(model, "cpu", dtype)            # the driver only cuts the corpus into inputs
    cfg = ExemplarConfig(max_tokens=batches * batch_size * context, context=context, batch_size=batch_size)
    rows = read_rows(cfg, lm.tokenizer)
    tokens = len(rows) * context
    # Shards of a few batches each, so that every worker count gets several per worker.
    cfg.checkpoint_every = 1
    spec = distributed.WorkerModel(lm.source, dtype, lm.weights_hash())
    pool = distributed.workers(spec, address, max(workers), device, threads=1)
    parts = shards(cfg, rows, 0, tokens, max(workers))
    merges: list[float] = []
    merged: list = []

    def timed(n: int, part) -> float:
        acc = []

        def fold(shard, state):
            t = time.perf_counter()
            acc[:] = [state if not acc else acc[0].merge(state)]
            merges.append(time.perf_counter() - t)

        began = time.perf_counter()
        distributed.run_shards(pool[:n], part, fold, progress=False)
        merged[:] = acc
        return time.perf_counter() - began

    timed(len(pool), parts[:len(pool)])             # warm-up: one shard on every worker
    load_before = os.getloadavg()
    runs = {n: [] for n in workers}
    for _ in range(max(1, repeats)):                # worker counts alternate, so drift falls on all alike
        for n in workers:
            runs[n].append(timed(n, parts))
    seconds = {n: min(t) for n, t in runs.items()}
    load_after = os.getloadavg()
    # A shard's state has the shape of the merged one: k slots per neuron.
    state_mb = sum(t.numel() * t.element_size() for t in merged[0].state_dict().values()) / 2**20
    one = tokens / seconds[min(workers)] / min(workers)
    return {
        "stage": "corpus on Ray", "model": lm.model_id, "tokens": tokens, "batch": f"{batch_size} x {context}",
        "shards": len(parts), "worker": "1 GPU" if device.startswith("cuda") else f"1 thread ({platform.processor() or platform.machine()})",
        "runs": [{"workers": n, "seconds": seconds[n], "tokens_per_s": tokens / seconds[n],
                  "efficiency": tokens / seconds[n] / (n * one)} for n in workers],
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "cpus": os.cpu_count(), "merge_s": sorted(merges)[len(merges) // 2] if merges else None,
        "state_mb": state_mb,
    }


def print_scaling_table(r: dict) -> None:
    print(f"model           {r['model']}")
    print(f"timed           {r['tokens']:,} tokens in batches of {r['batch']}, {r['shards']} shards; "
          f"each worker {r['worker']}")
    for run in r["runs"]:
        print(f"{run['workers']:>3} worker(s)    {run['seconds']:.2f} s  {run['tokens_per_s']:>9,.0f} tokens/s  "
              f"scaling efficiency {run['efficiency']:.2f}")
    print(f"driver merge    {r['merge_s']:.2f} s per shard state of {r['state_mb']:.0f} MiB (median)")
    la = r["load_average"]
    print(f"load average    {' '.join(map(str, la['before']))} before, {' '.join(map(str, la['after']))} after "
          f"({r['cpus']} CPUs)")
