"""Per-rank bytes of K-FAC's preconditioning placements: owner, hybrid (g gradient workers), all.

Issue 16 asks whether KAISA's gradient-worker fraction between ``owner`` (g = 1) and ``all``
(g = P) ever wins. This script (a) measures, on P gloo workers training the digits ResNet of
``benchmarks/kfac.py``, what each rank sends (as the root of a broadcast) and receives (from other
roots) per step under ``owner`` and ``all``, with the owners the preconditioner fixes, and (b)
evaluates the per-rank model for every g dividing P with those owners and layer sizes:

- workers of layer l: its owner o and one rank in each of the g groups of P/g consecutive ranks
  (``o mod P/g + k P/g``); the owner broadcasts the decomposition (d_l entries) to the other
  g - 1 workers when it changes, and each worker broadcasts the preconditioned gradient
  (s_l entries) to the other P/g - 1 ranks of its group, every step;
- rank r receives per step ``sum_{l: r in W_l, r != o_l} d_l / ius + sum_{l: r not in W_l} s_l``
  and, as a root, sends ``sum_{l: r = o_l} d_l / ius [g > 1] + sum_{l: r in W_l} s_l [g < P]``;
- the project's measure (``bytes_communicated``: the payload of every collective a rank takes
  part in) is ``sum_{l: r in W_l} d_l / ius [g > 1] + sum_l s_l [g < P]``.

Run: ``python benchmarks/kfac_hybrid.py --json PATH`` (``--quick``: fewer steps at 10/100).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kfac import _resnet, digits
from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from lightning_parallel.kfac.assignment import placement_costs
from lightning_parallel.kfac.communication import Communicator


def _worker(rank: int, size: int, port: int, configs: list[tuple[str, int, int, int]], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    counts = {"sent": 0, "received": 0, "counting": False}
    original = Communicator.broadcast

    def counted(self: Communicator, tensors: Any, src: int) -> Any:
        if counts["counting"] and self.world_size > 1 and tensors:
            payload = sum(t.numel() for t in tensors) * tensors[0].element_size()
            counts["sent" if src == self.rank else "received"] += payload
        return original(self, tensors, src)

    Communicator.broadcast = counted  # type: ignore[method-assign]
    x, y = digits()
    batch = 32
    try:
        for placement, fus, ius, steps in configs:
            model = _resnet()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            kfac = KFACPreconditioner(
                model, KFACOptions(placement=placement, factor_update_steps=fus, inv_update_steps=ius)
            )
            counts.update(sent=0, received=0, counting=False)
            before = 0
            for step in range(steps + 1):
                if step == 1:  # step 0 fixes the owners: not counted, as in benchmarks/kfac.py
                    counts["counting"], before = True, kfac.comm.bytes_communicated
                start = (rank * batch + step * batch * size) % (len(y) - batch)
                xb, yb = x[start : start + batch].reshape(-1, 1, 8, 8), y[start : start + batch]
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                for param in model.parameters():
                    if param.grad is not None:
                        dist.all_reduce(param.grad)
                        param.grad /= size
                kfac.step(optimizer)
                optimizer.step()
            dims = [(layer.in_dim, layer.out_dim) for layer in kfac.layers]
            queue.put(
                (
                    placement,
                    fus,
                    ius,
                    rank,
                    counts["sent"] / steps,
                    counts["received"] / steps,
                    (kfac.comm.bytes_communicated - before) / steps,
                    kfac.owners,
                    dims,
                )
            )
            kfac.remove_hooks()
            dist.barrier()
    finally:
        dist.destroy_process_group()


def per_rank_model(
    dims: list[tuple[int, int]], owners: list[int], size: int, g: int, ius: int, element: int = 4
) -> list[dict[str, float]]:
    """Bytes per step of rank r for g gradient workers per layer (eigen method, full rank), and its
    curvature bytes: its own layers' factors plus the decompositions (and cached damped inverses, as
    ``placement_costs`` counts them) of the layers it is a worker of."""
    span = size // g
    rows = []
    for r in range(size):
        sent = received = measure = curvature = 0.0
        for (i, o), owner in zip(dims, owners):
            s, d = o * i + 2, i * i + i + o * o + o + 2
            workers = {owner % span + k * span for k in range(g)}
            curvature += (i * i + o * o if r == owner else 0) + (d - 2 + i * i + o * o if r in workers else 0)
            if g > 1:
                measure += d / ius if r in workers else 0.0
                received += d / ius if r in workers and r != owner else 0.0
                sent += d / ius if r == owner else 0.0
            if g < size:
                measure += s
                received += s if r not in workers else 0.0
                sent += s if r in workers else 0.0
        rows.append(
            {
                "sent": element * sent,
                "received": element * received,
                "measure": element * measure,
                "curvature": element * curvature,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    size = args.workers
    long_steps = 20 if args.quick else 100
    configs = [(p, f, i, n) for f, i, n in ((1, 1, 3), (10, 100, long_steps)) for p in ("owner", "all")]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, size, port, configs, queue)) for r in range(size)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=1800) for _ in range(size * len(configs))]
    for proc in procs:
        proc.join(timeout=60)
    measured = [
        {
            "placement": p,
            "intervals": f"{f}/{i}",
            "rank": r,
            "sent": s,
            "received": rec,
            "bytes_communicated": m,
        }
        for p, f, i, r, s, rec, m, _, _ in sorted(results, key=lambda t: (t[1], t[0], t[3]))
    ]
    # the owners depend on the intervals (the cost the greedy balances); the same on every rank
    owners = {f"{t[1]}/{t[2]}": t[7] for t in results}
    dims = results[0][8]
    model = [
        {"g": g, "intervals": f"{f}/{i}", "rank": r, **row}
        for f, i in ((1, 1), (10, 100))
        for g in (d for d in range(1, size + 1) if size % d == 0)
        for r, row in enumerate(per_rank_model(dims, owners[f"{f}/{i}"], size, g, i))
    ]
    # the model's ends against the measurement (per rank) and against placement_costs (the project's measure)
    checks = []
    for row in measured:
        g = 1 if row["placement"] == "owner" else size
        (want,) = [
            m
            for m in model
            if m["g"] == g and m["intervals"] == row["intervals"] and m["rank"] == row["rank"]
        ]
        fus, ius = (int(v) for v in row["intervals"].split("/"))
        costs = placement_costs(
            [tuple(d) for d in dims],
            owners[row["intervals"]],
            method="eigen",
            factor_update_steps=fus,
            inv_update_steps=ius,
        )
        checks.append(
            {
                **{k: row[k] for k in ("placement", "intervals", "rank")},
                "sent_gap": row["sent"] - want["sent"],
                "received_gap": row["received"] - want["received"],
                "placement_costs_gap": row["bytes_communicated"] - costs[row["placement"]]["bytes_per_step"],
            }
        )
    worst = max(abs(c[k]) for c in checks for k in ("sent_gap", "received_gap", "placement_costs_gap"))
    print(f"largest |measured - model| over ranks, placements and intervals: {worst:.3g} bytes per step")
    out = {
        "workers": size,
        "owners": owners,
        "dims": dims,
        "measured": measured,
        "model": model,
        "checks": checks,
    }
    for row in measured:
        print(
            f"measured {row['placement']:5s} {row['intervals']:6s} rank {row['rank']}: sent {row['sent']:,.0f}"
            f" received {row['received']:,.0f} bytes_communicated {row['bytes_communicated']:,.0f}"
        )
    for row in model:
        print(
            f"model g={row['g']} {row['intervals']:6s} rank {row['rank']}: sent {row['sent']:,.0f}"
            f" received {row['received']:,.0f} measure {row['measure']:,.0f} curvature {row['curvature']:,.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
