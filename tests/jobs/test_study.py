"""The bottleneck study: verdict rules on hand-made rows (no Ray), vision pretraining -> frozen training,
and a --quick study of three tiny trials on local Ray that ends with a report and a verdict line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from jobs import study, study_report
from jobs.make_scenes import make_scenes
from jobs.scene_grammar import SceneSpec

SPEC = SceneSpec(min_objects=1, max_objects=2, colours=2, shapes=2, sizes=1, grid=2, image_size=16, holdout_every=4)


# ---------------------------------------------------------------------------
# Verdict rules on hand-made rows


def _row(arm: str, score: float, seed: int = 0) -> dict:
    where, _, rest = arm.partition("/")
    features, *variant = rest.split("+")
    row = {
        "bottleneck": "none" if where == "none" else "plan",
        "K": None if where == "none" else int(where[1:]),
        "plan_len": 9 if where == "none" else int(where[1:]),
        "embed_dim": 64,
        "model.vision_backbone": "frozen" if features == "frozen" else "scratch",
        "objective.category_weight": 1.0 if features == "category" else 0.0,
        "train.seed": seed,
        "scene_bits_recovered_pct": score,
    }
    for part in variant:  # the swept keys a variant arm's row carries
        if part.endswith("ep"):
            row["train.epochs"] = int(part[:-2])
        elif part.startswith("fusion"):
            row["model.fusion_depth"] = int(part[6:])
        elif part.startswith("pred"):
            row["model.semantic_predictor_depth"] = int(part[4:])
        else:
            row["model.conditioning"] = row["conditioning"] = part
    return row


def _verdict(scores: dict[str, float]) -> study_report.Verdict:
    rows = [_row(arm, s) for arm, s in scores.items()]
    return study_report.verdict(study_report.summarise(rows), "scene_bits_recovered_pct")


FLAT = {"K1/scratch": 40.0, "K4/scratch": 41.0, "K16/scratch": 42.0, "K64/scratch": 43.0}


def test_verdict_feature_limited_when_even_the_control_fails():
    v = _verdict({"none/scratch": 30.0, **FLAT})
    assert v.label == "feature-limited" and v.evidence == ["none/scratch"]


def test_verdict_not_limited_when_the_plan_keeps_up():
    assert _verdict({"none/scratch": 90.0, **FLAT, "K16/scratch": 87.0}).label == "not limited"


def test_verdict_trainability_when_flat_and_a_recipe_closes_the_gap():
    v = _verdict({"none/scratch": 90.0, **FLAT, "K16/category": 85.0, "K16/frozen": 70.0})
    assert v.label == "trainability-limited"
    assert {"none/scratch", "K16/scratch", "K16/category"} <= set(v.evidence)


def test_verdict_capacity_when_k_helps_and_nothing_closes_the_gap():
    rising = {"K1/scratch": 20.0, "K4/scratch": 35.0, "K16/scratch": 50.0, "K64/scratch": 70.0}
    v = _verdict({"none/scratch": 90.0, **rising, "K16/category": 55.0, "K16/frozen": 52.0})
    assert v.label == "capacity-limited"
    # the same rows with a frozen arm that reaches the control: no longer capacity
    v2 = _verdict({"none/scratch": 90.0, **rising, "K16/category": 55.0, "K16/frozen": 88.0})
    assert v2.label.startswith("mixed")


def test_variant_arms_are_named_by_what_they_change():
    names = [study_report.arm_of(_row(a, 1.0)) for a in ("K16/scratch+gated", "K16/frozen+24ep")]
    assert names == ["K16/scratch+gated", "K16/frozen+24ep"]
    deeper = {**_row("K16/scratch", 1.0), "model.fusion_depth": 3, "model.semantic_predictor_depth": 3}
    assert study_report.arm_of(deeper) == "K16/scratch+fusion3+pred3"
    # rows of the first study carry the conditioning column only (cross_attn): no suffix
    assert study_report.arm_of({**_row("K16/scratch", 1.0), "conditioning": "cross_attn"}) == "K16/scratch"


def test_verdict_trainability_when_a_conditioning_lever_closes_the_gap():
    v = _verdict({"none/scratch": 90.0, **FLAT, "K16/frozen": 50.0, "K16/scratch+prefix_film": 84.0})
    assert v.label == "trainability-limited" and "K16/scratch+prefix_film" in v.evidence


def test_verdict_plan_former_when_only_a_deeper_former_closes_the_gap():
    scores = {"none/scratch": 90.0, **FLAT, "K16/scratch+gated": 45.0, "K16/scratch+fusion3+pred3": 86.0}
    v = _verdict(scores)
    assert v.label == "plan-former-limited" and "K16/scratch+fusion3+pred3" in v.evidence


def test_verdict_frozen_lever_is_measured_against_the_frozen_control():
    # 78 is 19 below the scratch control but within CLOSED_GAP of the no-bottleneck frozen arm (85)
    v = _verdict({"none/scratch": 97.0, "none/frozen": 85.0, **FLAT, "K16/frozen": 78.0})
    assert v.label == "trainability-limited" and "none/frozen" in v.evidence


def test_verdict_budget_lever_is_measured_against_the_control_at_the_same_budget():
    scores = {"none/scratch": 97.0, "none/frozen": 85.0, **FLAT, "K16/frozen": 55.0, "K16/frozen+24ep": 80.0}
    assert _verdict(scores).label == "trainability-limited"  # within 10 of none/frozen at 12 epochs
    # the frozen control also climbs with twice the steps: 80 no longer closes the gap to it
    v = _verdict({**scores, "none/frozen+24ep": 95.0})
    assert v.label == "trainability-limited (climbing, not closed)" and "none/frozen+24ep" in v.evidence
    assert not any("within the seed spread of closing" in r for r in v.reasons)  # one seed each: no spread
    rows = [_row(a, sc) for a, sc in {**scores, "none/frozen+24ep": 95.0}.items()] + [_row("K16/scratch", 50.0, 1)]
    v = study_report.verdict(study_report.summarise(rows), "scene_bits_recovered_pct")  # spread 8: 80 is 15 below
    assert "warning: within the seed spread of closing the gap: K16/frozen+24ep (misses CLOSED_GAP by 5.0)" in v.reasons


def test_verdict_climbing_with_steps_is_trainability_not_closed():
    base = {"none/scratch": 90.0, **FLAT, "K16/frozen": 50.0}
    v = _verdict({**base, "K16/frozen+24ep": 66.0})  # +16 over K16/frozen; 64x the rows gave +3
    assert v.label == "trainability-limited (climbing, not closed)"
    assert {"K16/frozen+24ep", "K16/frozen"} <= set(v.evidence)
    # a budget gain below CLIMB is no verdict; steps must lift every recipe tried with more of them
    assert _verdict({**base, "K16/frozen+24ep": 55.0}).label == "inconclusive"
    mixed = _verdict({**base, "K16/frozen+24ep": 66.0, "K16/scratch+24ep": 45.0, "K16/scratch+fusion3+pred3": 70.0})
    assert mixed.label == "inconclusive (leaning plan former: K16/scratch+fusion3+pred3 +28.0)"


def test_merge_rows_tags_each_row_with_its_run_and_rejects_bad_input(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_row("K16/scratch", 40.0), {**_row("K4/scratch", 30.0), "study_run": "run 0"}]))
    rows = study.merge_rows(f"run 1={path}")
    assert [r["study_run"] for r in rows] == ["run 1", "run 0"]
    with pytest.raises(ValueError, match="LABEL=PATH"):
        study.merge_rows(str(path))
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a list of rows"):
        study.merge_rows(f"run 1={path}")


def test_report_rebuilds_from_merged_rows_and_names_each_rows_run(tmp_path, capsys):
    rows = [{**_row(a, sc), "study_run": "run 1"} for a, sc in {"none/scratch": 90.0, **FLAT}.items()]
    rows.append({**_row("K16/scratch+gated", 85.0), "study_run": "run 2"})
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "header.md").write_text("- run 1: `python -m jobs.study ...`\n")
    out = tmp_path / "report"
    argv = ["--rows", str(tmp_path / "rows.json"), "--out", str(out), "--header", str(tmp_path / "header.md")]
    assert study_report.main(argv) == 0
    md = (out / "report.md").read_text()
    assert "**Verdict: trainability-limited**" in md and "- run 1: `python -m jobs.study ...`" in md
    assert "| run 2 | `K16/scratch+gated` (1) |" in md and "`K16/scratch` (1)" in md.split("| run 1 |")[1]
    assert (out / "verdict.txt").read_text().startswith("trainability-limited\n")
    assert json.loads((out / "rows.json").read_text()) == rows
    (tmp_path / "bad.json").write_text("[]")
    assert study_report.main(["--rows", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "expected a non-empty list of rows" in capsys.readouterr().out


def test_seed_spread_is_reported_and_flags_noisy_gaps():
    rows = [_row("none/scratch", 90.0, 0), _row("none/scratch", 50.0, 1), *(_row(a, s) for a, s in FLAT.items())]
    arms = study_report.summarise(rows)
    control = next(a for a in arms if a.name == "none/scratch")
    assert control.mean("scene_bits_recovered_pct") == 70.0 and control.spread("scene_bits_recovered_pct") == 40.0
    v = study_report.verdict(arms, "scene_bits_recovered_pct")
    assert v.noise == 40.0 and any("within the seed spread" in r for r in v.reasons)
    md = study_report.markdown(arms, v, metric="scene_bits_recovered_pct", header=["- x"], compo=False)
    assert f"**Verdict: {v.label}**" in md and "70.0 ±20.0" in md and "CONTROL_FLOOR = 50" in md


def test_arm_points_cover_every_arm_and_seed():
    points = study.arm_points(study.FULL_ARMS, 2, "/w.safetensors")
    arms = [study_report.arm_of({**p, "K": p.get("model.num_latent_vectors")}) for p in points]
    assert arms.count("none/scratch") == 2 and arms.count("K16/scratch") == 2 and arms.count("K16/frozen") == 1
    frozen = [p for p in points if p["model.vision_backbone"] == "frozen"]
    assert all(p["model.vision_weights"] == "/w.safetensors" for p in frozen)


# ---------------------------------------------------------------------------
# With Ray: pretraining, frozen training, the quick study


@pytest.fixture(scope="module")
def prepared_scenes(ray_local, tmp_path_factory) -> Path:
    from jobs.make_scenes import prepare_all

    raw, out = tmp_path_factory.mktemp("scenes-raw"), tmp_path_factory.mktemp("scenes-pq")
    make_scenes(raw, SPEC, train=48, val=12, compo=8, seed=1)
    prepare_all(raw, out, ["train", "val", "compo"], SPEC.image_size)
    return out


TINY_MODEL = [
    "--model.image_size=16",
    "--model.max_seq_length=96",
    "--train.batch_size=8",
    "--objective.num_categories=5",
    "--tracking.enabled=false",
]


def _vision_tensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("encoder.vision.")}  # noqa: SIM118


@pytest.fixture(scope="module")
def pretrained_vision(prepared_scenes, tmp_path_factory) -> Path:
    """One vision pretraining (the CLI, 2 epochs) for the quick study's frozen arm."""
    from jobs import pretrain_vision

    tmp = tmp_path_factory.mktemp("pretrain")
    weights = tmp / "vision.safetensors"
    argv = ["--data", str(prepared_scenes), "--out", str(weights), "--epochs", "2", *TINY_MODEL]
    assert pretrain_vision.main([*argv, f"--train.storage_path={tmp / 'runs'}"]) == 0
    return weights


@pytest.mark.ray
def test_vision_pretraining_trains_the_encoder(pretrained_vision):
    import torch

    from model.config import load_config
    from model.model import build_model

    pretrained = _vision_tensors(pretrained_vision)
    torch.manual_seed(0)
    fresh = build_model(load_config("debug", TINY_MODEL).model).encoder.vision.state_dict()
    init = {f"encoder.vision.{k}": v for k, v in fresh.items()}
    assert pretrained.keys() == init.keys()
    assert any(not torch.equal(pretrained[k], init[k]) for k in init if k.endswith("weight"))  # it did train


@pytest.mark.ray
def test_pretrain_rejects_data_without_labels_it_can_use(tmp_path, capsys):
    from jobs import pretrain_vision

    rc = pretrain_vision.main(["--data", str(tmp_path), "--out", str(tmp_path / "v.safetensors"), *TINY_MODEL])
    assert rc == 2 and "pretrain_vision: error:" in capsys.readouterr().err
    assert not (tmp_path / "v.safetensors").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_quick_study_ends_with_a_report_and_a_verdict(
    prepared_scenes, pretrained_vision, tmp_path, capsys, mlflow_store
):
    import torch
    from mlflow import MlflowClient

    from jobs.train_loop import VISION_FINGERPRINT_KEY
    from model.checkpoint import model_fingerprint, read_metadata

    out = tmp_path / "report"
    argv = ["--data", str(prepared_scenes), "--quick", "--storage", str(tmp_path / "runs"), "--out", str(out)]
    argv += ["--model.image_size=16", "--model.max_seq_length=96"]
    # The frozen arm's encoder from the module's one pretraining (the same vision shape as --quick's model):
    # the study's own pretraining step would repeat it (~20 s of the suite).
    argv += ["--vision-weights", str(pretrained_vision)]
    argv += [f"--tracking.tracking_uri={mlflow_store(tmp_path / 'mlflow.db')}"]
    assert study.main(argv) == 0
    printed = capsys.readouterr().out
    labels = ("feature-limited", "capacity-limited", "trainability-limited", "plan-former-limited", "not limited")
    labels += ("mixed", "inconclusive")
    verdict_line = [line for line in printed.splitlines() if line.startswith("study: verdict: ")]
    assert verdict_line and verdict_line[0].removeprefix("study: verdict: ").startswith(labels)

    rows = json.loads((out / "rows.json").read_text())
    assert {study_report.arm_of(r) for r in rows} == {"none/scratch", "K4/scratch", "K4/frozen"}
    for row in rows:
        assert row["status"] == "completed"
        for key in ("scene_bits_recovered_pct", "scene_colour_acc", "compo_scene_bits_recovered_pct"):
            assert 0.0 <= row[key] <= 100.0, (key, row)
        assert 0.0 <= row["compo_scene_bits_recovered"] <= row["compo_scene_bits_per_image"]
    md = (out / "report.md").read_text()
    assert "**Verdict: " in md and "| `K4/frozen` |" in md and "CONTROL_FLOOR" in md

    # The frozen arm trained on the module's pretrained encoder: loaded, then never updated (bit-identical),
    # while the rest of its model trained.
    (frozen,) = [r for r in rows if study_report.arm_of(r) == "K4/frozen"]
    trained = Path(frozen["checkpoint"].removeprefix("file://")) / "model.safetensors"
    pretrained = _vision_tensors(pretrained_vision)
    after = _vision_tensors(trained)
    assert after.keys() == pretrained.keys()
    for name, tensor in pretrained.items():
        assert torch.equal(after[name], tensor), name
    with safe_open(str(trained), framework="pt") as f, safe_open(str(pretrained_vision), framework="pt") as g:
        assert not torch.equal(f.get_tensor("decoder.head.weight"), g.get_tensor("decoder.head.weight"))
    # Which weights it loaded is on record: their fingerprint in the checkpoint and in the arm's MLflow params
    # (the suite's frozen-weights regression check: a frozen encoder was once randomly initialised, unrecorded).
    fingerprint = model_fingerprint({k.removeprefix("encoder.vision."): v for k, v in pretrained.items()})
    meta = read_metadata(trained)
    assert meta[VISION_FINGERPRINT_KEY] == fingerprint and meta["vision_weights"] == str(pretrained_vision), meta
    assert frozen.get("mlflow_run_id"), frozen
    params = MlflowClient(frozen["tracking_uri"]).get_run(frozen["mlflow_run_id"]).data.params
    assert params[VISION_FINGERPRINT_KEY] == fingerprint
    assert (out / "bits_vs_wire.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "verdict.txt").read_text().split("\n")[0] == verdict_line[0].removeprefix("study: verdict: ")

    meta = json.loads((tmp_path / "runs" / "study-quick" / "sweep.json").read_text())
    client = MlflowClient(meta["tracking_uri"])
    files = {f.path for f in client.list_artifacts(meta["parent_run_id"], "study")}
    assert {"study/report.md", "study/verdict.txt", "study/bits_vs_wire.png"} <= files
    assert client.get_run(meta["parent_run_id"]).data.tags["study.verdict"] == verdict_line[0].split(": ", 2)[2]
