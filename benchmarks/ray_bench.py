"""executor: ray against local extraction on the same photos, in the same run: equal vectors, and Ray's overhead.

    python benchmarks/ray_bench.py [--limit N] [--model efficientnet_lite0]

Local extraction runs before and after Ray (the machine is shared; their mean is the reference). Ray runs on a
local instance with this machine's CPUs (one actor per CPU, one inference thread each); its time includes
starting the actors and loading one model in each, which a cluster pays once per extraction too. JSON in
results/bench/ray.json.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import grocery_photos, print_table, timed, write_results
from lookalike import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N catalog photos")
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()

    import ray

    from lookalike.distributed import ensure_ray, extract_with_ray
    from lookalike.embedding import FeatureExtractor

    paths = grocery_photos("catalog", args.limit)
    settings = Settings(config_file=None, environ={}, model_name=args.model)
    extractor = FeatureExtractor(settings)
    extractor.extract(paths[:32])  # warm-up: first-call allocations are not part of either figure
    local_a, local = timed(lambda: extractor.extract(paths))
    init_s, _ = timed(lambda: ensure_ray(settings))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ray_s, remote = timed(lambda: extract_with_ray(settings, paths))
    time.sleep(1)
    local_b, _ = timed(lambda: extractor.extract(paths))
    ray.shutdown()

    a, b = remote.vectors[:, : extractor.dim], local.vectors[:, : extractor.dim]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    local_s = (local_a + local_b) / 2
    row = {
        "images": len(paths),
        "model": args.model,
        "dim": extractor.dim,
        "cores": len(os.sched_getaffinity(0)),
        "ray_actors": cpus,
        "local_s": local_s,
        "local_runs_s": [local_a, local_b],
        "local_img_s": len(paths) / local_s,
        "ray_init_s": init_s,
        "ray_s": ray_s,
        "ray_img_s": len(paths) / ray_s,
        "ray_over_local": ray_s / local_s,
        "min_cosine": float(cos.min()),
        "same_ok": remote.ok == local.ok,
        "same_errors": remote.errors == local.errors,
    }
    print_table([row], ["images", "ray_actors", "local_s", "ray_init_s", "ray_s", "ray_over_local", "min_cosine"],
                "executor: ray vs local (same run)")  # fmt: skip
    print(f"wrote {write_results('ray', {'results': [row]})}")


if __name__ == "__main__":
    main()
