"""On a CUDA GPU: JPEG bytes -> vectors throughput (nvJPEG decode and resize on the GPU, fp16 network), and exact
search as a torch matrix product, with the card named. Run where a GPU is; it refuses to run without one.

    python benchmarks/gpu_bench.py [--model resnet50] [--batch-size 256] [--images 4096]

The photos come from ../shared/data/grocery (read into memory once, then cycled), so the figure is decoding +
resizing + the network, not the disk. The seed's pipeline on the same GPU (PIL decode on the CPU, fp32) is
measured beside it for the ratio.
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
from lookalike.stores.faiss_index import VectorIndex


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=8, help="threads reading JPEG headers and bytes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark is for a GPU machine")
    card = torch.cuda.get_device_name(0)
    photos = [p.read_bytes() for p in grocery_photos("catalog")]
    data = [photos[i % len(photos)] for i in range(args.images)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp16", "fp32"):
            settings = Settings(
                config_file=None,
                environ={},
                model_name=args.model,
                pretrained=args.model.startswith("efficientnet_lite"),
                device="cuda",
                precision=precision,
                batch_size=args.batch_size,
                num_workers=args.workers,
                cache_dir=tmp,
            )
            ex = FeatureExtractor(settings)
            ex.extract(data[: 2 * args.batch_size], progress=False)  # warm-up: cuDNN autotuning, nvJPEG init
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = ex.extract(data, progress=False)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "card": card,
                    "setting": f"{args.model} {precision}, nvJPEG"
                    if ex.tensor_decoder
                    else f"{args.model} {precision}",
                    "images": len(result.ok),
                    "images_per_s": len(result.ok) / seconds,
                }
            )
        seed = SeedPipeline(args.model)
        seed.net = seed.net.cuda()
        n_seed = min(len(data), 1024)
        seed_extract = _seed_on_gpu(seed)
        seed_extract(data[:64])
        torch.cuda.synchronize()
        start = time.perf_counter()
        seed_extract(data[:n_seed])
        torch.cuda.synchronize()
        seed_rate = n_seed / (time.perf_counter() - start)
        rows.append({"card": card, "setting": "seed pipeline (PIL, fp32)", "images": n_seed, "images_per_s": seed_rate})
        for row in rows:
            row["ratio_to_seed"] = row["images_per_s"] / seed_rate
        search_rows = _search(card)
    print_table(rows, ["card", "setting", "images", "images_per_s", "ratio_to_seed"], "JPEG bytes -> vectors on GPU")
    print_table(search_rows, ["card", "n", "dim", "queries", "ms_per_batch", "qps"], "exact search, torch on the GPU")
    print(f"\nwrote {write_results('gpu', {'extract': rows, 'search': search_rows}, args.json)}")


def _seed_on_gpu(seed: SeedPipeline):
    import torch

    def run(images):
        with torch.no_grad():
            for i in range(0, len(images), seed.batch_size):
                batch = torch.stack([seed._tensor(im) for im in images[i : i + seed.batch_size]]).cuda()
                seed.net(batch)[0].mean(dim=(2, 3)).cpu()

    return run


def _search(card: str) -> list[dict]:
    import torch

    rng = np.random.default_rng(0)
    rows = []
    for n, dim in ((1_000_000, 2048), (100_000, 1280)):
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        index = VectorIndex.build(vectors, "cosine", index_type="Flat", device="cuda")
        queries = rng.standard_normal((1024, dim), dtype=np.float32)
        index.search(queries[:8], 10)
        torch.cuda.synchronize()
        start = time.perf_counter()
        index.search(queries, 10)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append(
            {"card": card, "n": n, "dim": dim, "queries": len(queries), "ms_per_batch": seconds * 1000,
             "qps": len(queries) / seconds}
        )  # fmt: skip
        del index
    return rows


if __name__ == "__main__":
    main()
