"""jobs.evaluate end to end: a saved debug checkpoint on the prepared fixtures -> JSON + Markdown (+ MLflow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs import caption_metrics, evaluate
from jobs.dataset import heldout_mask, load_split
from jobs.make_shapes import make_shapes
from jobs.prepare import prepare
from jobs.tracking import ensure_experiment
from model.checkpoint import CHECKPOINT_FILE, load_model, save_model
from model.config import load_config
from model.model import build_model
from model.tokenizer import PAD, ByteTokenizer

pytestmark = pytest.mark.ray  # the prepared fixtures are built with Ray Data

REQUIRED = [
    "markdown",
    "final_ce",
    "exact_match_pct",
    "probe_accuracy",
    "probe_chance",
    "greedy_unique_pct",
    "sampled_unique_pct",
    "bleu4",
    "cider_d",
    "collapse",
    "plan_bytes",
    "num_images",
    "greedy_unique",
    "sampled_unique",
    "greedy_unique_words",
    "reference_unique_words",
    "greedy_avg_length",
    "greedy_word_overlap_pct",
    "sampled_content_match_pct",
    "collapse_verdict",
]


def _save_debug(path: Path, **overrides) -> Path:
    cfg = load_config("debug", {"model.max_seq_length": 32, **overrides})
    torch.manual_seed(0)
    save_model(path, build_model(cfg.model), cfg)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_debug(tmp_path_factory.mktemp("eval-ckpt") / "model.safetensors")


def test_shapes_report_files_and_keys(prepared_shapes, checkpoint, tmp_path):
    report = tmp_path / "out" / "eval.json"
    result = evaluate.evaluate_model(str(checkpoint), str(prepared_shapes), split="val", report=str(report))

    on_disk = json.loads(report.read_text())
    markdown = report.with_suffix(".md").read_text()
    for key in REQUIRED:
        assert key in result and key in on_disk, key
    assert on_disk["markdown"] == markdown == result["markdown"]
    assert "| Greedy unique |" in markdown and "| CIDEr-D |" in markdown

    assert result["num_images"] == 36  # 2 per class x 18 classes
    assert result["plan_bytes"] == 4 * 32 * 2  # debug: K=4, D=32, fp16
    assert result["greedy_unique_pct"] == pytest.approx(100 * result["greedy_unique"] / 36)
    assert isinstance(result["collapse"], bool)
    assert result["collapse"] == (result["collapse_verdict"] == "collapsed")
    # one category per image: the 18-class probe, trained on the train split, scored on val
    assert result["probe_kind"] == "category"
    assert result["probe_chance"] == pytest.approx(1 / 18)
    assert result["probe_category_num_test"] == 36
    assert "trained on 'train' (180 images)" in result["probe_setup"]
    accuracy = result["probe_accuracy"]
    assert accuracy == result["probe_category_accuracy"] and accuracy * 36 == pytest.approx(round(accuracy * 36))
    assert "probe_map80" not in result
    sample = result["samples"][0]
    assert set(sample) == {"image_id", "greedy", "sampled", "references"} and sample["references"]


def test_coco_multilabel_probe_and_image_cap(prepared_coco, checkpoint):
    result = evaluate.evaluate_model(str(checkpoint), str(prepared_coco), split="train2017", max_images=6)
    assert result["num_images"] == 6
    # no other split to learn from: the 6 images are cut 3 / 3
    assert result["probe_setup"].startswith("50/50 split")
    assert result["probe_map80_categories"] >= 1
    # all 6 images are in the report's samples: the corpus metrics recompute from them
    greedy = [s["greedy"] for s in result["samples"]]
    refs = [s["references"] for s in result["samples"]]
    assert len(greedy) == 6
    assert result["reference_unique_words"] == len(caption_metrics.vocabulary([r for rs in refs for r in rs]))
    assert result["bleu4"] == caption_metrics.bleu4(greedy, refs)
    assert result["cider_d"] == caption_metrics.cider_d(greedy, refs)

    # one image: nothing to train a probe on, and the report still renders
    single = evaluate.evaluate_model(str(checkpoint), str(prepared_coco), split="train2017", max_images=1)
    assert single["num_images"] == 1 and single["probe_accuracy"] is None and single["probe_kind"] == "none"
    assert single["cider_d"] == 0.0  # CIDEr-D needs at least two images for its idf
    assert "| Probe: 20 keyword categories, accuracy / chance | n/a |" in single["markdown"]


def test_val_split_falls_back_to_the_held_out_part_of_train(prepared_coco, tmp_path):
    ckpt = _save_debug(tmp_path / "model.safetensors", **{"data.train_split": "train2017", "data.val_fraction": 0.5})
    result = evaluate.evaluate_model(str(ckpt), str(prepared_coco), split="val")
    ids = np.array(load_split(str(prepared_coco), "train2017", 8).image_ids)
    held_out = int(heldout_mask(ids, 0.5).sum())
    assert 0 < held_out < 8  # the fixture's ids split both ways at 0.5, so the check below has teeth
    assert result["num_images"] == held_out
    # the probe learns from the train rows that training itself saw, never from the evaluated ones
    assert f"minus its held-out 0.5 ({8 - result['num_images']} images)" in result["probe_setup"]


def test_final_ce_is_the_per_token_ce_of_a_direct_forward(prepared_shapes, checkpoint):
    """final_ce over the whole path (image -> plan -> decoder) equals one plain forward over every pair."""
    result = evaluate.evaluate_model(str(checkpoint), str(prepared_shapes), split="val", max_images=3)
    loaded = load_model(checkpoint)
    model, cfg = loaded.model, loaded.config
    data, _ = evaluate.load_eval_data(str(prepared_shapes), "val", cfg, limit=3)
    pairs = [(i, ref) for i, refs in enumerate(data.captions) for ref in refs[:5]]
    ids, _ = ByteTokenizer(cfg.model.max_seq_length).batch([ref[: cfg.data.max_caption_chars] for _, ref in pairs])
    with torch.no_grad():
        logits = model(data.images[[i for i, _ in pairs]], ids).logits  # (R, T, V)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)
    assert result["final_ce"] == pytest.approx(expected.item(), rel=1e-5)
    smoothed = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD, label_smoothing=0.1
    )
    assert result["final_ce_smoothed"] == pytest.approx(smoothed.item(), rel=1e-5)


def test_train_time_val_ce_is_evaluate_final_ce(ray_local, tmp_path):
    """The Ray Train loop's per-epoch validation and jobs.evaluate report one CE for one model and split.

    7 references per image: the old train loop scored all of them, jobs.evaluate the first 5.
    """
    from jobs.train_loop import MAX_EVAL_IMAGES, Evaluator

    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    make_shapes(raw, per_class=1, val_per_class=1, image_size=32, seed=0)
    captions_file = raw / "annotations" / "captions_val.json"
    coco = json.loads(captions_file.read_text())
    extra = [
        {"id": 10_000 + n, "image_id": image["id"], "caption": f"shape number {n} seen on a plain background"}
        for n, image in enumerate(coco["images"] * 2)
    ]
    coco["annotations"] += extra
    captions_file.write_text(json.dumps(coco))
    for split in ("train", "val"):
        prepare(raw, split, prepared, image_size=32, image_format="png", shard_rows=64, progress=False)

    ckpt = _save_debug(tmp_path / CHECKPOINT_FILE)
    loaded = load_model(ckpt)
    evaluator = Evaluator(loaded.config, str(prepared), torch.device("cpu"))
    assert {len(refs) for refs in evaluator.references} == {7}
    during_training = evaluator.evaluate(loaded.model).metrics
    report = evaluate.evaluate_model(str(ckpt), str(prepared), split="val", max_images=MAX_EVAL_IMAGES)
    assert report["num_images"] == 18
    assert during_training["val_ce"] == report["final_ce"]
    assert during_training["exact_match_pct"] == report["exact_match_pct"]
    assert during_training["greedy_unique_pct"] == report["greedy_unique_pct"]


def test_a_run_folder_evaluates_the_checkpoint_serve_would_load(prepared_shapes, tmp_path):
    """A Ray Train run folder keeps several epochs: evaluate and serve pick the same one (lowest val_ce)."""
    from serve.deployments import _load

    run = tmp_path / "runs" / "shapes"
    prints = {}
    for epoch, val_ce in ((1, "3.0"), (2, "2.0"), (3, "2.5")):
        cfg = load_config("debug", {"model.max_seq_length": 32})
        torch.manual_seed(epoch)
        path = run / f"checkpoint_00000{epoch}" / CHECKPOINT_FILE
        prints[epoch] = save_model(path, build_model(cfg.model), cfg, extra={"epoch": str(epoch), "val_ce": val_ce})
    result = evaluate.evaluate_model(str(run), str(prepared_shapes), split="val", max_images=2)
    assert result["fingerprint"] == prints[2]
    assert result["checkpoint"] == str(run / "checkpoint_000002" / CHECKPOINT_FILE)
    assert load_model(_load(str(run), None, 0).path).fingerprint == prints[2]


def test_sampling_is_seeded(checkpoint):
    model = load_model(checkpoint).model
    tokenizer = ByteTokenizer(model.cfg.max_seq_length)
    plans = torch.randn(3, model.cfg.plan_len, model.cfg.embed_dim, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")

    def sample(seed: int) -> list[str]:
        return evaluate.caption_plans(model, plans, tokenizer, batch_size=2, device=cpu, temperature=0.7, seed=seed)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_cli_reports_bad_input_precisely(prepared_shapes, checkpoint, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert evaluate.main(["--model", str(missing), "--data", str(prepared_shapes)]) == 2
    assert f"model path {missing} does not exist" in capsys.readouterr().err

    assert evaluate.main(["--model", str(checkpoint), "--data", str(prepared_shapes), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "prepared split folder" in err and str(prepared_shapes / "test") in err

    not_a_checkpoint = tmp_path / "junk.safetensors"
    not_a_checkpoint.write_bytes(b"not safetensors")
    assert evaluate.main(["--model", str(not_a_checkpoint), "--data", str(prepared_shapes)]) == 2
    assert "not a readable safetensors checkpoint" in capsys.readouterr().err


def test_runs_uri_and_logging_into_the_active_mlflow_run(
    prepared_shapes, checkpoint, tmp_path, monkeypatch, mlflow_store
):
    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient(uri)
        experiment_id = ensure_experiment(client, "eval-test", uri)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_artifact(str(checkpoint), artifact_path="checkpoint")
            source = f"runs:/{run.info.run_id}/checkpoint/model.safetensors"
            result = evaluate.evaluate_model(
                source, str(prepared_shapes), split="val", report=str(tmp_path / "eval.json"), max_images=4
            )
        logged = client.get_run(run.info.run_id)
        assert logged.data.metrics["eval/num_images"] == 4
        assert logged.data.metrics["eval/greedy_unique_pct"] == pytest.approx(result["greedy_unique_pct"])
        assert logged.data.tags["eval.collapse"] == result["collapse_verdict"]
        files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "eval")}
        assert files == {"eval.json", "eval.md"}
        assert result["fingerprint"] == load_model(checkpoint).fingerprint

        # --mlflow-run-id: log into a given run without an active one
        other = client.create_run(experiment_id).info.run_id
        assert evaluate.log_to_mlflow(result, [], run_id=other) == other
        assert client.get_run(other).data.metrics["eval/plan_bytes"] == 256
        assert all(math.isfinite(v) for v in client.get_run(other).data.metrics.values())
    finally:
        mlflow.set_tracking_uri(None)
