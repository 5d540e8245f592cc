"""OpenVINO's TBB partitioner for single queries, STATIC (its default) vs AUTO, alone and beside CPU burners.

One compiled model per partitioner, single 256 px inferences, p50 over ``--n`` calls, idle then beside
``--burners`` busy processes, interleaved round by round (docs/benchmarks.md, "Contention").

    python benchmarks/partitioner_ab.py --model CACHE_DIR/models/efficientnet_lite0-...-fp32.onnx
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from common import print_table, write_results
from contention_bench import Burners


def p50_ms(request, pixels: np.ndarray, n: int) -> float:
    for _ in range(3):
        request.infer({0: pixels})
    times = []
    for _ in range(n):
        start = time.perf_counter()
        request.infer({0: pixels})
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported ONNX model (<cache_dir>/models/)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burners", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    core = ov.Core()
    pixels = np.random.default_rng(0).integers(0, 255, (1, args.size, args.size, 3), dtype=np.uint8)
    requests = {}
    for partitioner in ("STATIC", "AUTO"):
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
            "INFERENCE_PRECISION_HINT": "f32",
            "TBB_PARTITIONER": partitioner,
        }
        requests[partitioner] = core.compile_model(str(args.model), "CPU", config).create_infer_request()
    rows = []
    for round_ in range(args.rounds):
        for partitioner, request in requests.items():
            idle = p50_ms(request, pixels, args.n)
            with Burners(args.burners):
                busy = p50_ms(request, pixels, args.n)
            rows.append(
                {"round": round_, "partitioner": partitioner, "idle_p50_ms": idle, "busy_p50_ms": busy,
                 "busy_over_idle": busy / idle}
            )  # fmt: skip
    print_table(rows, ["round", "partitioner", "idle_p50_ms", "busy_p50_ms", "busy_over_idle"], "TBB partitioner")
    print(f"\nwrote {write_results('partitioner_ab', {'results': rows}, args.json)}")


if __name__ == "__main__":
    main()
