"""Each rank's share of the dual maps, timed in one process (issue #8's FSDP2 target).

Under FSDP2 on ``W`` ranks each atom's dual map is computed by one owner, the atoms handed
out by cost (``modnorm.distributed._owners``). The target is that a rank's share costs at
most ``1/W`` of the single-process dual map (plus the communication, which this leaves out).
This builds the GPT of ``benchmarks/distributed.py``, hands its atoms out as ``W`` ranks
would, and times, on one thread, the dual maps of all atoms and of each rank's atoms,
alternating between them so that a slower spell of a shared machine hits all alike (CPU
time; the median of ``--repeats`` rounds after one warm-up).

    python benchmarks/dual_split.py --width 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import modnorm as mn
from modnorm.distributed import _owners
from modnorm.modules import _atom_duals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # as benchmarks/distributed.py builds it: vocabulary 65, context 64, 2 blocks
    net = mn.GPT(65, 64, args.width, max(2, args.width // 64), 2)
    shares = net.atom_shares()
    owners = _owners(net, args.world)
    grads = [torch.randn_like(atom.weight) for atom, _ in shares]
    sets = {"all atoms": list(owners)}
    for r in range(args.world):
        sets[f"rank {r}'s"] = [i for i, o in owners.items() if o == r]
    times: dict[str, list[float]] = {name: [] for name in sets}
    for round_ in range(args.repeats + 1):
        for name, atoms in sets.items():
            items = [(shares[i][0], shares[i][1], grads[i]) for i in atoms]
            start = time.process_time()
            _atom_duals(items, "newton_schulz", "full")
            if round_:  # the first round warms up
                times[name].append(time.process_time() - start)
    print(f"GPT width {args.width}, {args.world} ranks, 1 thread, median of {args.repeats}")
    whole = statistics.median(times["all atoms"]) * 1e3
    for name, ts in times.items():
        shapes = sorted({tuple(shares[i][0].weight.shape) for i in sets[name]})
        ms = statistics.median(ts) * 1e3
        print(f"  {name:>10}: {ms:7.0f} ms ({ms / whole:.2f} of all) shapes {shapes}")


if __name__ == "__main__":
    main()
