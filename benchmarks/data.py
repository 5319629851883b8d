"""Data pipeline speed: prepare throughput (JPEG draft mode on/off) and training ingest (Ray Data vs DataLoader).

    python -m benchmarks.data [--images 2048] [--prepare-images 96] [--epochs 2] [--rounds 2]

1. prepare, per core: `jobs.prepare.decode_batch` (read, decode, resize, re-encode) in this process on
   real COCO JPEGs (the test fixture's 640x4xx photos), stored at 64 and 256 pixels, draft on and off.
2. prepare, end to end: the whole `jobs.prepare.prepare` job on Ray over a COCO-shaped folder.
3. ingest at the seed config (64x64, batch 32, T=128): batches/s over full epochs of the Ray Dataset
   from `build_train_dataset` with each shuffle mode streaming (`data.ingest=stream`) and materialised
   (`data.ingest=materialize`: decoded once; per epoch Ray Data only reorders the blocks, and `torch_batches`
   permutes rows, draws captions, tokenises and normalises on the consumer), plus Ray's local shuffle buffer,
   against a plain torch DataLoader (2 workers) streaming the same shards through the same decode/tokenise
   functions. Ray Data batches come through `data.torch_batches` (the training loop's call).

The COCO-shaped input is the fixture's 8 photos copied under many image ids (content does not change
decode cost). Figures are the best epoch after one warm-up epoch; they depend on machine load. The per-epoch
ratio of the materialised ingest to the DataLoader is also printed for every round (its spread).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from jobs import dataset as data
from jobs.prepare import decode_batch, prepare
from jobs.runtime import ensure_ray
from model.config import Config, load_config

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "coco"
MATERIALIZED = "Ray Data, ingest=materialize, shuffle=file"
LOADER = "torch DataLoader, 2 workers, same shards"


def make_coco_root(root: Path, n: int) -> None:
    """A COCO-shaped split 'bench' with `n` images (copies of the fixture photos) and 5 captions each."""
    sources = sorted((FIXTURE / "train2017").glob("*.jpg"))
    captions = json.loads((FIXTURE / "annotations" / "captions_train2017.json").read_text())
    texts = [a["caption"] for a in captions["annotations"]]
    (root / "bench").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(n):
        name = f"{i + 1:012d}.jpg"
        shutil.copyfile(sources[i % len(sources)], root / "bench" / name)
        images.append({"id": i + 1, "file_name": name})
        for k in range(5):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "caption": texts[(5 * i + k) % len(texts)]})
    (root / "annotations" / "captions_bench.json").write_text(json.dumps({"images": images, "annotations": anns}))


def bench_decode_per_core(n: int) -> list[tuple[int, bool, float]]:
    """(stored size, draft, images/s) for decode_batch in this one process."""
    sources = sorted((FIXTURE / "train2017").glob("*.jpg"))
    names = np.array([p.name for p in sources] * (n // len(sources) + 1), dtype=object)[:n]
    batch = {"image_id": np.arange(n, dtype=np.int64), "file_name": names}
    out = []
    for size in (64, 256):
        for draft in (True, False):
            kwargs = {"image_dir": str(FIXTURE / "train2017"), "image_size": size, "max_pixels": 10**8, "draft": draft}
            decode_batch({k: v[:8] for k, v in batch.items()}, image_format="jpeg", **kwargs)  # warm caches
            start = time.perf_counter()
            result = decode_batch(batch, image_format="jpeg", **kwargs)
            elapsed = time.perf_counter() - start
            assert not any(result["reason"]), set(result["reason"])
            out.append((size, draft, n / elapsed))
    return out


def bench_prepare_job(coco: Path, out: Path, draft: bool) -> float:
    """images/s of the whole prepare job (annotations, Ray Data decode, Parquet, manifest)."""
    start = time.perf_counter()
    manifest = prepare(coco, "bench", out, image_size=64, draft=draft, shard_rows=128, progress=False)
    return manifest["images"] / (time.perf_counter() - start)


def _epochs(make_iter, epochs: int) -> tuple[float, float, float]:
    """(best batches/s over a whole epoch, best batches/s after the first batch, mean first-batch latency in s).

    One warm-up epoch first. A Ray Dataset re-executes every epoch (that is what reshuffles it and redraws
    captions), so its epoch time is a start-up latency plus a steady streaming rate; both are reported.
    """
    best = steady = 0.0
    latencies = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        first, n = None, 0
        for _ in make_iter(epoch + 1):
            n += 1
            if first is None:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        if epoch > 0:
            best = max(best, n / total)
            steady = max(steady, (n - 1) / max(total - first, 1e-9))
            latencies.append(first)
    return best, steady, sum(latencies) / len(latencies)


class ShardStream(torch.utils.data.IterableDataset):
    """The DataLoader baseline: each worker streams its share of the shards row group by row group."""

    def __init__(self, files: list[str], cfg: Config) -> None:
        self.files, self.cfg = files, cfg

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        files = self.files if info is None else self.files[info.id :: info.num_workers]
        rng = np.random.default_rng()
        m, d = self.cfg.model, self.cfg.data
        for path in rng.permutation(files):
            reader = pq.ParquetFile(path)
            for group in rng.permutation(reader.num_row_groups):
                table = reader.read_row_group(int(group), columns=["image", "captions"])
                images, captions = table["image"].to_pylist(), table["captions"].to_pylist()
                for i in rng.permutation(len(images)):
                    caption = captions[i][rng.integers(len(captions[i]))]
                    ids, mask = data.encode_captions([caption], m.max_seq_length, d.max_caption_chars)
                    pixels = data.decode_images([images[i]], m.image_size)
                    yield {
                        "images": torch.from_numpy(pixels[0]),
                        "caption_ids": torch.from_numpy(ids[0]),
                        "caption_mask": torch.from_numpy(mask[0]),
                    }


def bench_ingest(
    root: Path, epochs: int, rounds: int
) -> tuple[list[tuple[str, tuple[float, float, float]]], float, list[float]]:
    """Each variant `rounds` times, interleaved (machine load drifts), keeping its best figures; plus the
    one-off seconds `build_train_dataset` took to materialise the decoded dataset, and each round's
    per-epoch rate of the materialised ingest over the DataLoader's."""
    variants = {}
    materialize_s = 0.0
    for ingest, shuffle in [("stream", "none"), ("stream", "file"), ("stream", "block"), ("materialize", "file")]:
        overrides = [f"--data.ingest={ingest}", f"--data.shuffle={shuffle}", "--data.num_samples=0"]
        cfg = load_config("seed_run2", [*overrides, "--data.val_fraction=0"])
        cfg.data.train_split, cfg.data.val_split = "bench", "none"
        start = time.perf_counter()
        ds = data.build_train_dataset(root, cfg)
        if ingest == "materialize":
            materialize_s = time.perf_counter() - start
        variants[f"Ray Data, ingest={ingest}, shuffle={shuffle}"] = lambda epoch, ds=ds, cfg=cfg: data.torch_batches(
            ds.iterator(), 32, cfg, epoch=epoch, device="cpu"
        )
    file_cfg = load_config("seed_run2", ["--data.shuffle=file", "--data.ingest=stream"])
    file_cfg.data.train_split, file_cfg.data.val_split = "bench", "none"
    ds = data.build_train_dataset(root, file_cfg)
    variants["Ray Data, stream, file + local_shuffle_buffer_size=1024"] = lambda _epoch: ds.iter_torch_batches(
        batch_size=32, prefetch_batches=file_cfg.data.prefetch_batches, local_shuffle_buffer_size=1024
    )
    files = data.shard_paths(root / "bench")
    loader = torch.utils.data.DataLoader(ShardStream(files, cfg), batch_size=32, num_workers=2, persistent_workers=True)
    variants[LOADER] = lambda _epoch: iter(loader)

    best: dict[str, tuple[float, float, float]] = {}
    ratios = []
    for _ in range(rounds):
        rates = {}
        for name, make_iter in variants.items():
            rate, steady, latency = _epochs(make_iter, epochs)
            rates[name] = rate
            old = best.get(name, (0.0, 0.0, float("inf")))
            best[name] = (max(old[0], rate), max(old[1], steady), min(old[2], latency))
        ratios.append(rates[MATERIALIZED] / rates[LOADER])
    return list(best.items()), materialize_s, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="images in the ingest set (32 per batch)")
    parser.add_argument("--prepare-images", type=int, default=96, help="images for the prepare figures")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up one")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# benchmarks.data  {datetime.date.today()}  {platform.processor() or platform.machine()}  "
        f"{os.cpu_count()} CPUs  load {load:.1f}  torch threads {torch.get_num_threads()}"
    )

    print("\n## prepare, one core (decode_batch in-process, COCO JPEGs)")
    for size, draft, rate in bench_decode_per_core(args.prepare_images):
        print(f"stored {size:3d}px  draft={'on ' if draft else 'off'}  {rate:7.1f} images/s/core")

    print(f"\n{ensure_ray()}")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_coco_root(tmp / "coco", max(args.images, args.prepare_images))
        print("\n## prepare, whole job on Ray (stored 64px JPEG)")
        cpus = int(ray_cpus())
        prepare(tmp / "coco", "bench", tmp / "warmup", image_size=64, limit=64, progress=False)  # start workers
        rates: dict[bool, float] = {}
        for draft in [False, True] * args.rounds:  # interleaved, best of `rounds` each
            rates[draft] = max(rates.get(draft, 0.0), bench_prepare_job(tmp / "coco", tmp / "prepared", draft))
        for draft in (True, False):
            per_core = rates[draft] / (os.cpu_count() or 1)
            mode = "on " if draft else "off"
            print(f"draft={mode}  {rates[draft]:7.1f} images/s  ({per_core:.1f} per core; Ray CPUs {cpus})")

        runs = f"best of {args.rounds}x{args.epochs} epochs"
        print(f"\n## ingest, seed config (64x64, batch 32, T=128), {args.images} images, {runs}")
        print(f"{'':58s} {'epoch b/s':>10s} {'steady b/s':>11s} {'1st batch':>10s}")
        results, materialize_s, ratios = bench_ingest(tmp / "prepared", args.epochs, args.rounds)
        for name, (rate, steady, latency) in results:
            print(f"{name:58s} {rate:10.1f} {steady:11.1f} {latency:9.2f}s")
        loader = dict(results)[LOADER]
        for name, (rate, steady, _latency) in results:
            if name.startswith("Ray Data"):
                print(f"{name:58s} {rate / loader[0]:9.2f}x per epoch, {steady / loader[1]:5.2f}x steady vs DataLoader")
        print(f"materialising the decoded dataset (once, before the first epoch): {materialize_s:.2f} s")
        spread = ", ".join(f"{r:.2f}x" for r in ratios)
        print(f"{MATERIALIZED} per epoch vs DataLoader, each round: {spread}")


def ray_cpus() -> float:
    return ray.cluster_resources().get("CPU", 0.0)


if __name__ == "__main__":
    main()
