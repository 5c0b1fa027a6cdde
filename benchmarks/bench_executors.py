"""Cells per minute of one study run by the local executor and by Ray, side by side.

    python benchmarks/bench_executors.py [--workers 2] [--samples 256] [--width 8] [--json PATH]

Both runs train the same study (two small ResNets, every ordered pair, every
layer pair) into fresh folders; the Ray run starts a local Ray instance with
``--workers`` CPUs, one CPU per task. Ray's start-up is counted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import modelstitch as ms
from modelstitch import data, zoo


def build(out: Path, samples: int, width: int) -> ms.Study:
    nets = {}
    for k, arch in enumerate(["R1111", "R1211"]):
        torch.manual_seed(k)
        nets[arch] = zoo.small_resnet(arch, width=width)
    return ms.Study(
        nets,
        train_data=data.subset(data.digits(), samples),
        test_data=data.subset(data.digits(train=False), samples // 2),
        out=out,
        recipe=ms.Recipe(batch_size=64, epochs=1),
        device="cpu",
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import ray

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.workers)
        start = time.perf_counter()
        local = build(Path(tmp) / "local", args.samples, args.width).run(progress=False)
        result["local"] = time.perf_counter() - start
        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            build(Path(tmp) / "ray", args.samples, args.width).run(progress=False, executor="ray")
        finally:
            ray.shutdown()
        result["ray"] = time.perf_counter() - start
        cells = len(local.rows())
    summary = {
        "cells": cells,
        "seconds": result,
        "cells_per_minute": {k: 60 * cells / v for k, v in result.items()},
        "workers": args.workers,
        "torch_threads_local": args.workers,
    }
    print(
        f"{cells} cells; local {result['local']:.1f} s ({summary['cells_per_minute']['local']:.0f} cells/min); "
        f"ray with {args.workers} workers {result['ray']:.1f} s ({summary['cells_per_minute']['ray']:.0f} cells/min)"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
