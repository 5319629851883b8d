"""The `scenes` set's vocabulary, its caption grammar (render and parse) and its information content.

A scene is 1..N objects, each in its own cell of a G x G grid, each with a size, a colour and a
shape. Its caption names every object in row-major cell order, joined by "and":

    caption := object (" and " object)*
    object  := article [size " "] colour " " shape " at the " position
    article := "a" | "an"                       ("an" before a vowel; sizes are left out when there is one)
    position:= "top left" | "top" | ... | "centre" (grid 3), "top left" .. "bottom right" (grid 2),
               "row R column C" otherwise (1-based)

so a scene has exactly one caption and every caption parses back to exactly one scene.

The difficulty knobs live in `SceneSpec`; the attribute values are the first `colours` / `shapes` /
`sizes` entries of fixed palettes, so a spec's five integers name its whole vocabulary. `bits_per_image`
is log2 of the number of distinct scenes (averaged over the object count, drawn uniformly): what a
perfect plan must carry; `attribute_bits` splits it per attribute for "bits recovered".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs.make_shapes import COLOURS

# The shapes set's six colours (one home: jobs.make_shapes), in the scenes' own order, plus two more.
PALETTE: dict[str, tuple[int, int, int]] = {
    **{name: COLOURS[name] for name in ("red", "blue", "green", "yellow", "purple", "orange")},
    "cyan": (30, 190, 210),
    "pink": (240, 120, 180),
}
SHAPE_NAMES = ("circle", "square", "triangle", "diamond")
SIZE_NAMES = ("small", "large")
# Object diameter as a share of its grid cell, per size.
SIZE_FRACTION = {"small": 0.55, "large": 0.95}
NAMED_POSITIONS = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"),
}
SPEC_FILE = "scenes.json"  # beside the annotations, and copied into the prepared root


class SceneSpecError(ValueError):
    """A spec whose knobs cannot produce scenes (too many objects for the grid, an unknown palette size...)."""


@dataclass(frozen=True)
class SceneSpec:
    """Difficulty knobs of a scenes set."""

    min_objects: int = 2
    max_objects: int = 3
    colours: int = 4
    shapes: int = 2
    sizes: int = 2
    grid: int = 3
    image_size: int = 24
    # Compositional hold-out: every `holdout_every`-th (colour, shape) pair never appears in train.
    holdout_every: int = 0

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.min_objects <= self.max_objects, "need 1 <= min_objects <= max_objects"),
            (self.max_objects <= self.grid * self.grid, f"max_objects={self.max_objects} > grid cells"),
            (1 <= self.colours <= len(PALETTE), f"colours must be 1..{len(PALETTE)}"),
            (1 <= self.shapes <= len(SHAPE_NAMES), f"shapes must be 1..{len(SHAPE_NAMES)}"),
            (1 <= self.sizes <= len(SIZE_NAMES), f"sizes must be 1..{len(SIZE_NAMES)}"),
            (self.grid >= 1, "grid must be >= 1"),
            (self.image_size >= 4 * self.grid, f"image_size={self.image_size} gives cells under 4 px"),
            (self.holdout_every == 0 or self.holdout_every >= 2, "holdout_every must be 0 or >= 2"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise SceneSpecError("invalid scene spec: " + "; ".join(problems))

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(PALETTE)[: self.colours]

    @property
    def shape_names(self) -> tuple[str, ...]:
        return SHAPE_NAMES[: self.shapes]

    @property
    def size_names(self) -> tuple[str, ...]:
        return SIZE_NAMES[: self.sizes] if self.sizes > 1 else ("",)

    @property
    def cells(self) -> int:
        return self.grid * self.grid

    def position_name(self, cell: int) -> str:
        if self.grid in NAMED_POSITIONS:
            return NAMED_POSITIONS[self.grid][cell]
        return f"row {cell // self.grid + 1} column {cell % self.grid + 1}"

    def classes(self) -> list[tuple[str, str]]:
        """(colour, shape) pairs in colour-major order: COCO category ids 1..C*S."""
        return [(c, s) for c in self.colour_names for s in self.shape_names]

    def category_id(self, colour: str, shape: str) -> int:
        return self.classes().index((colour, shape)) + 1

    def held_out_pairs(self) -> set[tuple[str, str]]:
        """(colour, shape) pairs kept out of train: every holdout_every-th class, shifted per colour so
        each colour and each shape stays in training with its other partners."""
        if not self.holdout_every:
            return set()
        return {pair for i, pair in enumerate(self.classes()) if i % self.holdout_every == self.holdout_every - 1}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SceneSpec:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, order=True)
class SceneObject:
    cell: int  # row-major grid cell: the sort key, so a scene's objects have one order
    size: str
    colour: str
    shape: str


@dataclass
class Scene:
    objects: list[SceneObject] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.objects = sorted(self.objects)


# ---------------------------------------------------------------------------
# Render and parse


def render_caption(scene: Scene, spec: SceneSpec) -> str:
    """The one caption of a scene (see the grammar in the module docstring)."""
    parts = []
    for obj in scene.objects:
        words = " ".join(w for w in (obj.size, obj.colour, obj.shape) if w)
        article = "an" if words[0] in "aeiou" else "a"
        parts.append(f"{article} {words} at the {spec.position_name(obj.cell)}")
    return " and ".join(parts)


def _object_pattern(spec: SceneSpec) -> re.Pattern[str]:
    sizes = [s for s in spec.size_names if s]
    size = f"(?:(?P<size>{'|'.join(sizes)}) )?" if sizes else "(?P<size>)"
    positions = sorted((spec.position_name(c) for c in range(spec.cells)), key=len, reverse=True)
    return re.compile(
        rf"an? {size}(?P<colour>{'|'.join(spec.colour_names)}) (?P<shape>{'|'.join(spec.shape_names)})"
        rf" at the (?P<position>{'|'.join(map(re.escape, positions))})"
    )


def parse_caption(text: str, spec: SceneSpec) -> Scene | None:
    """A caption back to its scene, or None when it does not follow the grammar in full.

    Objects may come in any order and sizes may be missing (scored as wrong, not as unparseable);
    two objects in one cell, unknown words or leftover text make the caption unparseable.
    """
    pattern = _object_pattern(spec)
    cell_of = {spec.position_name(c): c for c in range(spec.cells)}
    objects = []
    for phrase in text.strip().split(" and "):
        m = pattern.fullmatch(phrase.strip())
        if m is None:
            return None
        size = m["size"] or ""
        objects.append(SceneObject(cell_of[m["position"]], size, m["colour"], m["shape"]))
    if len({o.cell for o in objects}) != len(objects):
        return None
    return Scene(objects)


# ---------------------------------------------------------------------------
# Information content


def attribute_bits(spec: SceneSpec) -> dict[str, float]:
    """Bits per attribute: count once per image; colour, shape, size, position once per object.

    Position is the share of log2(cells choose k) per object at the mean object count, so that
    count + k * (colour + shape + size + position) averages to `bits_per_image`.
    """
    counts = range(spec.min_objects, spec.max_objects + 1)
    mean_k = sum(counts) / len(counts)
    layout = sum(math.log2(math.comb(spec.cells, k)) for k in counts) / len(counts)
    return {
        "count": math.log2(len(counts)),
        "colour": math.log2(spec.colours),
        "shape": math.log2(spec.shapes),
        "size": math.log2(spec.sizes),
        "position": layout / mean_k,
    }


def bits_per_image(spec: SceneSpec) -> float:
    """log2(distinct scenes), averaged over the (uniform) object count: the information a caption carries."""
    counts = range(spec.min_objects, spec.max_objects + 1)
    per_object = math.log2(spec.colours * spec.shapes * spec.sizes)
    mean = sum(math.log2(math.comb(spec.cells, k)) + k * per_object for k in counts) / len(counts)
    return math.log2(len(counts)) + mean


def write_spec(folder: Path, spec: SceneSpec, extra: dict | None = None) -> Path:
    path = Path(folder) / SPEC_FILE
    data = {"spec": spec.to_dict(), "bits_per_image": bits_per_image(spec), "attribute_bits": attribute_bits(spec)}
    path.write_text(json.dumps({**data, **(extra or {})}, indent=2, sort_keys=True) + "\n")
    return path


def read_spec(folder: str | Path) -> SceneSpec | None:
    """The spec of a scenes set (raw or prepared root), or None when the folder is not one."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        return None
    try:
        return SceneSpec.from_dict(json.loads(path.read_text())["spec"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SceneSpecError(f"{path}: not a scenes spec ({exc})") from None
