"""The research log's Run-0 dataset: 6 colours x 3 shapes, written in COCO layout.

    python -m jobs.make_shapes --out data/shapes --per-class 100 --val-per-class 20
    python -m jobs.prepare --coco-root data/shapes --split train --out data/shapes-pq --image-size 64 --image-format png
    python -m jobs.prepare --coco-root data/shapes --split val --out data/shapes-pq --image-size 64 --image-format png

Output (the same layout as a COCO download, so one `prepare` serves both):

    DIR/annotations/captions_{train,val}.json    5 captions per image, every one naming "<colour> <shape>"
    DIR/annotations/instances_{train,val}.json   one instance per image: bbox, polygon, its class (18 categories)
    DIR/{train,val}/<image_id:012d>.png           PNG, so flat colours carry no JPEG ringing

Every image has its own light background tone, shape size, position and rotation (triangles), and a
small jitter on the shape colour, so no two images are identical (checked by hash, redrawn on a
collision). Everything derives from `--seed`: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
# One COCO category per class, ids 1..18 in colour-major order: "red circle" = 1, "red square" = 2, ...
CLASSES: list[tuple[str, str]] = [(c, s) for c in COLOURS for s in SHAPES]
SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges without a drawing library
# Shape diameter as a share of the side. Shapes fill most of the frame: at 32 px a small triangle and
# a small circle differ by a few antialiased pixels, and a from-scratch ViT then learns shape slowly.
SIZE_RANGE = (0.6, 0.9)
# Grey level of the background: light "paper" tones. Every one of the six colours is then darker than
# its background in at least one channel, so a shape's edges have one polarity per colour; over
# (20, 235) half the shapes were lighter than their background and circles and squares took the ViT
# longer to tell apart (benchmarks/RESULTS.md, "Run 0").
BACKGROUND_RANGE = (170, 250)
# Half the square's side as a share of the radius: a square as wide as the circle of the same size, so
# the two differ by four filled corners (each ~5% of the bounding box), not by a slightly smaller area.
SQUARE_HALF = 1.0


def category_id(colour: str, shape: str) -> int:
    return CLASSES.index((colour, shape)) + 1


def categories() -> list[dict]:
    return [
        {"id": category_id(c, s), "name": f"{c} {s}", "supercategory": s, "colour": c, "shape": s} for c, s in CLASSES
    ]


def captions_for(colour: str, shape: str) -> list[str]:
    """Five phrasings, each naming "<colour> <shape>" and nothing else about the image.

    As in the log ("captions like 'a red circle'"), a caption is right exactly when the class is: the
    greedy caption is an exact match for any phrasing the decoder picks, so 100% is reachable. (Captions
    that also named the background tone or the size were tried: the decoder then missed those facts
    on ~17% of held-out images after the shapes were already right.)
    """
    name = f"{colour} {shape}"
    return [
        f"{_article(name)} {name}",
        f"a picture of {_article(name)} {name}",
        f"there is {_article(name)} {name}",
        f"{_article(name)} {name} in the picture",
        f"an image of {_article(name)} {name}",
    ]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def draw_shape(rng: random.Random, colour: str, shape: str, size: int) -> tuple[Image.Image, list[float], list[float]]:
    """One image: returns (image, bbox [x, y, w, h], polygon [x1, y1, ...])."""
    big = size * SUPERSAMPLE
    # Backgrounds are low-saturation tones, so they never look like one of the six shape colours.
    grey = rng.randint(*BACKGROUND_RANGE)
    tint = [max(0, min(255, grey + rng.randint(-12, 12))) for _ in range(3)]
    fill = tuple(max(0, min(255, v + rng.randint(-15, 15))) for v in COLOURS[colour])

    frac = rng.uniform(*SIZE_RANGE)
    radius = frac * big / 2
    cx = rng.uniform(radius, big - radius)  # the whole shape stays inside the frame
    cy = rng.uniform(radius, big - radius)

    img = Image.new("RGB", (big, big), tuple(tint))
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in _angles(16, 0.0)]
    elif shape == "square":
        half = radius * SQUARE_HALF
        points = [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
        draw.polygon(points, fill=fill)
    else:
        # Equilateral, pointing roughly up, with a random tilt of up to +-20 degrees.
        tilt = math.radians(rng.uniform(-20, 20)) - math.pi / 2
        points = [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in _angles(3, tilt)]
        draw.polygon(points, fill=fill)
    img = img.resize((size, size), Image.Resampling.LANCZOS)

    xs = [x / SUPERSAMPLE for x, _ in points]
    ys = [y / SUPERSAMPLE for _, y in points]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    polygon = [round(v, 2) for xy in zip(xs, ys, strict=True) for v in xy]
    return img, [round(v, 2) for v in bbox], polygon


def _angles(n: int, start: float) -> list[float]:
    return [start + 2 * math.pi * i / n for i in range(n)]


def write_split(out: Path, split: str, per_class: int, size: int, rng: random.Random, first_id: int) -> int:
    """Images + both annotation files for one split; returns the next free image id."""
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    # Classes in shuffled order, so image ids (and hence prepared shards, sorted by id) are not class-sorted.
    labels = [cls for cls in CLASSES for _ in range(per_class)]
    rng.shuffle(labels)

    images, caption_anns, instance_anns = [], [], []
    seen: set[str] = set()
    for offset, (colour, shape) in enumerate(labels):
        image_id = first_id + offset
        while True:  # redraw on the (rare, tiny-image) chance of an exact duplicate
            img, bbox, polygon = draw_shape(rng, colour, shape, size)
            digest = hashlib.sha256(img.tobytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                break
        file_name = f"{image_id:012d}.png"
        img.save(image_dir / file_name, format="PNG", optimize=False)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size, "license": 0})
        for text in captions_for(colour, shape):
            caption_anns.append({"id": len(caption_anns) + 1, "image_id": image_id, "caption": text})
        instance_anns.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": category_id(colour, shape),
                "bbox": bbox,
                "area": round(bbox[2] * bbox[3], 2),
                "segmentation": [polygon],
                "iscrowd": 0,
            }
        )

    info = {"description": f"VL-JEPA Run-0 synthetic shapes ({split})", "version": "1.0", "year": 2026}
    licenses = [{"id": 0, "name": "generated", "url": ""}]
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    _write_json(
        ann_dir / f"captions_{split}.json",
        {"info": info, "licenses": licenses, "images": images, "annotations": caption_anns},
    )
    _write_json(
        ann_dir / f"instances_{split}.json",
        {
            "info": info,
            "licenses": licenses,
            "images": images,
            "annotations": instance_anns,
            "categories": categories(),
        },
    )
    return first_id + len(labels)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=None, separators=(",", ":")))
    tmp.replace(path)


def make_shapes(
    out: Path, *, per_class: int = 100, val_per_class: int = 20, image_size: int = 64, seed: int = 0
) -> dict:
    """Write both splits; returns a summary (image counts per split)."""
    # One RNG per split, derived from the seed, so changing --val-per-class leaves train untouched.
    train_next = write_split(out, "train", per_class, image_size, random.Random(f"{seed}/train"), first_id=1)
    summary = {"train": train_next - 1, "val": 0, "classes": len(CLASSES)}
    if val_per_class > 0:
        val_next = write_split(out, "val", val_per_class, image_size, random.Random(f"{seed}/val"), first_id=train_next)
        summary["val"] = val_next - train_next
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.make_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="dataset root to write (COCO layout)")
    parser.add_argument("--per-class", type=int, default=100, help="train images per class (18 classes)")
    parser.add_argument("--val-per-class", type=int, default=20, help="val images per class; 0 = no val split")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.val_per_class < 0 or args.image_size < 8:
        parser.error("need --per-class >= 1, --val-per-class >= 0 and --image-size >= 8")
    summary = make_shapes(
        args.out, per_class=args.per_class, val_per_class=args.val_per_class, image_size=args.image_size, seed=args.seed
    )
    print(
        f"wrote {summary['train']} train and {summary['val']} val images ({summary['classes']} classes) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
