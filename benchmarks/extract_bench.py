"""Extraction throughput, end to end: JPEG files on disk -> vectors in the index, against the seed's pipeline.

For each model, the seed's plain pipeline and each of our settings run over the same real photos, interleaved
round by round (the machine is shared: absolute speed drifts, ratios measured side by side hold). Reported:
images per second (best round), and the ratio to the seed's pipeline in the same run.

    python benchmarks/extract_bench.py [--models resnet50 efficientnet_b0 efficientnet_lite0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from common import SeedPipeline, grocery_photos, print_table, write_results
from lookalike import FeatureExtractor, Settings
from lookalike.backbones import get_backbone
from lookalike.stores.faiss_index import VectorIndex

# (label, settings overrides); img_size None = the model's own input size (224 except Lite0's 256)
CONFIGS = [
    ("torch fp32", dict(runtime="torch")),
    ("onnx fp32", dict(runtime="onnx")),
    ("openvino fp32", dict(runtime="openvino")),
    ("openvino fp32 @224", dict(runtime="openvino", img_size=224)),
    ("onnx int8", dict(runtime="onnx", precision="int8")),
    ("openvino int8", dict(runtime="openvino", precision="int8")),
    ("openvino int8 @224", dict(runtime="openvino", precision="int8", img_size=224)),
    ("openvino bf16", dict(runtime="openvino", precision="bf16")),
    # Decoding threads beside the network's two: how much do they fight on two cores?
    ("openvino int8, 1 decode thread", dict(runtime="openvino", precision="int8", num_workers=1)),
    ("openvino int8, decode inline", dict(runtime="openvino", precision="int8", num_workers=0)),
    ("openvino int8, 1 network thread", dict(runtime="openvino", precision="int8", threads=1)),
]
IMAGES = {"resnet50": 64, "efficientnet_b0": 128, "efficientnet_lite0": 128}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(IMAGES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=None, help="photos per round (default: per model)")
    parser.add_argument("--configs", nargs="+", default=None, help="labels of the settings to run (default: all)")
    parser.add_argument("--cache-dir", default=None, help="where exported models are kept (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    results = []
    for model in args.models:
        n = args.images or IMAGES.get(model, 128)
        paths = grocery_photos("catalog", every=max(1, 2640 // n))[:n]
        results += bench_model(model, paths, args.rounds, cache, args.configs)
        print_table(results, ["model", "setting", "img_size", "images_per_s", "ratio_to_seed", "init_s"], "extraction")
    path = write_results("extract", {"rounds": args.rounds, "results": results}, args.json)
    print(f"\nwrote {path}")


def bench_model(model: str, paths: list[Path], rounds: int, cache: Path, only: list[str] | None) -> list[dict]:
    files = [str(p) for p in paths]
    seed = SeedPipeline(model)
    runners = {"seed pipeline": lambda: SeedPipeline.index(seed.extract(files))}
    sizes = {"seed pipeline": 224}
    inits = {"seed pipeline": 0.0}
    for label, overrides in CONFIGS:
        if only and label not in only:
            continue
        settings = Settings(
            config_file=None,
            environ={},
            model_name=model,
            pretrained=model.startswith("efficientnet_lite"),  # random weights are fine for speed
            cache_dir=cache,
            **overrides,
        )
        if "@224" in label and get_backbone(model).input_size == 224:
            continue  # the model's own size is already 224
        start = time.perf_counter()
        extractor = FeatureExtractor(settings)
        extractor.extract(files[:8])  # warm-up: first-call allocations, lazy compilation
        inits[label] = time.perf_counter() - start
        sizes[label] = extractor.input_size
        runners[label] = _ours(extractor, files)
    best: dict[str, float] = {}
    for _ in range(rounds):  # interleaved: every setting sees the same machine load, round by round
        for label, run in runners.items():
            start = time.perf_counter()
            run()
            best[label] = min(best.get(label, np.inf), time.perf_counter() - start)
    seed_rate = len(files) / best["seed pipeline"]
    rows = []
    for label in runners:
        rate = len(files) / best[label]
        rows.append(
            {
                "model": model,
                "setting": label,
                "img_size": sizes[label],
                "images": len(files),
                "images_per_s": rate,
                "ratio_to_seed": rate / seed_rate,
                "init_s": inits[label],
            }
        )
    return rows


def _ours(extractor: FeatureExtractor, files: list[str]):
    def run():
        result = extractor.extract(files, progress=False)
        return VectorIndex.build(result.vectors[:, : extractor.dim], "cosine", index_type="auto")

    return run


if __name__ == "__main__":
    main()
