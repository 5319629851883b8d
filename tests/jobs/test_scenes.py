"""The scenes set: captions parse back to the annotated ground truth, splits, bits, and caption scoring."""

from __future__ import annotations

import json
import math

import pytest

from jobs import make_scenes
from jobs.scene_grammar import (
    Scene,
    SceneObject,
    SceneSpec,
    SceneSpecError,
    attribute_bits,
    bits_per_image,
    parse_caption,
    read_spec,
    render_caption,
)
from jobs.scene_metrics import scene_report, score_caption

SPEC = SceneSpec(min_objects=1, max_objects=3, colours=4, shapes=3, sizes=2, grid=3, image_size=24, holdout_every=4)


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    make_scenes.make_scenes(out, SPEC, train=120, val=20, compo=20, seed=3)
    return out


def _ground_truth(out, split):
    """image id -> Scene from the instances annotations (not from the captions)."""
    inst = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
    objects: dict[int, list[SceneObject]] = {img["id"]: [] for img in inst["images"]}
    for ann in inst["annotations"]:
        o = ann["scene_object"]
        objects[ann["image_id"]].append(SceneObject(o["cell"], o["size"], o["colour"], o["shape"]))
        cat = next(c for c in inst["categories"] if c["id"] == ann["category_id"])
        assert (cat["colour"], cat["shape"]) == (o["colour"], o["shape"])
    return {i: Scene(objs) for i, objs in objects.items()}


@pytest.mark.parametrize("split", ["train", "val", "compo"])
def test_generated_captions_parse_back_to_the_annotated_scene(scenes_dir, split):
    truth = _ground_truth(scenes_dir, split)
    caps = json.loads((scenes_dir / "annotations" / f"captions_{split}.json").read_text())["annotations"]
    assert len(caps) == len(truth) == {"train": 120, "val": 20, "compo": 20}[split]
    for ann in caps:
        parsed = parse_caption(ann["caption"], SPEC)
        assert parsed is not None, ann["caption"]
        assert parsed.objects == truth[ann["image_id"]].objects
        assert SPEC.min_objects <= len(parsed.objects) <= SPEC.max_objects
        assert (scenes_dir / split / f"{ann['image_id']:012d}.png").is_file()


def test_compositional_split_holds_pairs_train_never_shows(scenes_dir):
    held = SPEC.held_out_pairs()
    assert held and len(held) < len(SPEC.classes())
    train_pairs = {(o.colour, o.shape) for s in _ground_truth(scenes_dir, "train").values() for o in s.objects}
    assert not train_pairs & held
    for scene in _ground_truth(scenes_dir, "compo").values():
        assert {(o.colour, o.shape) for o in scene.objects} & held
    # every colour and every shape still appears in train, only some pairings are new
    assert {c for c, _ in train_pairs} == set(SPEC.colour_names)
    assert {s for _, s in train_pairs} == set(SPEC.shape_names)
    assert read_spec(scenes_dir) == SPEC


def test_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        make_scenes.make_scenes(out, SPEC, train=10, val=0, seed=7)
    for rel in ("annotations/captions_train.json", "annotations/instances_train.json", "train/000000000004.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_bits_per_image_counts_distinct_scenes():
    # 2 or 3 objects on 9 cells, 4 colours x 2 shapes x 2 sizes: log2(2) + mean(log2(C(9,2) 16^2), log2(C(9,3) 16^3))
    spec = SceneSpec(min_objects=2, max_objects=3, colours=4, shapes=2, sizes=2, grid=3)
    expected = 1 + (math.log2(36 * 16**2) + math.log2(84 * 16**3)) / 2
    assert bits_per_image(spec) == pytest.approx(expected)
    assert expected > 15
    parts = attribute_bits(spec)
    assert parts["count"] + 2.5 * (parts["colour"] + parts["shape"] + parts["size"] + parts["position"]) == (
        pytest.approx(expected)
    )
    one = SceneSpec(min_objects=1, max_objects=1, colours=2, shapes=1, sizes=1, grid=1, image_size=8)
    assert bits_per_image(one) == pytest.approx(1.0)  # one object, one cell: just its colour


def test_bad_spec_and_cli_errors(tmp_path, capsys):
    with pytest.raises(SceneSpecError, match="max_objects=10 > grid cells"):
        SceneSpec(max_objects=10, grid=3)
    assert make_scenes.main(["--out", str(tmp_path / "x"), "--colours", "99"]) == 2
    assert "colours must be" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------
# Scoring hand-made captions

SCORE_SPEC = SceneSpec(min_objects=2, max_objects=3, colours=4, shapes=2, sizes=2, grid=3)
TRUTH = "a small red circle at the top left and a large blue square at the bottom right"


def _truth() -> Scene:
    return parse_caption(TRUTH, SCORE_SPEC)


def test_exact_caption_recovers_every_bit():
    s = score_caption(TRUTH, _truth(), SCORE_SPEC)
    assert s.parsed and s.exact and s.count_ok and s.objects_ok == 2
    assert s.hits == {"colour": 2, "shape": 2, "size": 2, "position": 2}
    assert s.bits_recovered == pytest.approx(s.bits) == pytest.approx(1 + math.log2(36) + 2 * 4)


def test_objects_in_another_order_are_still_exact():
    swapped = "a large blue square at the bottom right and a small red circle at the top left"
    assert score_caption(swapped, _truth(), SCORE_SPEC).exact


def test_one_wrong_colour_costs_its_bits():
    s = score_caption(TRUTH.replace("blue", "green"), _truth(), SCORE_SPEC)
    assert s.parsed and not s.exact and s.count_ok
    assert s.hits == {"colour": 1, "shape": 2, "size": 2, "position": 2}
    assert s.objects_ok == 1
    assert s.bits - s.bits_recovered == pytest.approx(2.0)  # log2(4 colours)


def test_wrong_position_is_matched_by_order_and_scores_the_rest():
    s = score_caption("a small red circle at the top left and a large blue square at the centre", _truth(), SCORE_SPEC)
    assert s.hits == {"colour": 2, "shape": 2, "size": 2, "position": 1}
    assert s.bits - s.bits_recovered == pytest.approx(math.log2(36) / 2)


def test_missing_object_costs_count_and_that_object():
    s = score_caption("a small red circle at the top left", _truth(), SCORE_SPEC)
    assert s.parsed and not s.count_ok
    assert s.hits == {"colour": 1, "shape": 1, "size": 1, "position": 1}
    assert s.bits_recovered == pytest.approx(2 + 1 + 1 + math.log2(36) / 2)


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a small red circle at the top left and",
        "a small red circle at the top left and a huge blue square at the bottom right",
        "a small red circle at the top left and a large blue square at the top left",  # two in one cell
        "a man riding a wave on a surfboard",
    ],
)
def test_off_grammar_captions_score_zero(caption):
    s = score_caption(caption, _truth(), SCORE_SPEC)
    assert not s.parsed and s.bits_recovered == 0 and sum(s.hits.values()) == 0


def test_report_aggregates_over_images():
    refs = [[TRUTH], ["a large yellow square at the top and a small blue circle at the left"]]
    preds = [TRUTH, "a large yellow square at the top and a small blue square at the left"]
    r = scene_report(preds, refs, SCORE_SPEC)
    assert r["scene_exact_pct"] == 50.0
    assert r["scene_shape_acc"] == 75.0 and r["scene_colour_acc"] == 100.0
    assert r["scene_object_acc"] == 75.0 and r["scene_count_acc"] == 100.0
    assert r["scene_bits_recovered"] == pytest.approx(r["scene_bits_per_image"] - 0.5)
    with pytest.raises(ValueError, match="not a scene"):
        scene_report(["x"], [["a dog"]], SCORE_SPEC)


def test_render_then_parse_round_trip_on_other_grids():
    for grid in (1, 2, 4):
        spec = SceneSpec(min_objects=1, max_objects=min(3, grid * grid), colours=8, shapes=4, sizes=1, grid=grid)
        scene = Scene([SceneObject(c, "", "orange", "diamond") for c in range(spec.max_objects)])
        caption = render_caption(scene, spec)
        assert caption.startswith("an orange diamond")
        assert parse_caption(caption, spec).objects == scene.objects
