"""jobs.evaluate end to end: a saved debug checkpoint on the prepared fixtures -> JSON + Markdown (+ MLflow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F

from jobs import evaluate
from jobs.tracking import ensure_experiment
from model.checkpoint import load_model, save_model
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
    # an untrained byte model is near-uniform over 260 ids: CE close to ln(260) = 5.56
    assert 4.0 < result["final_ce"] < 7.0
    # one category per image: the 18-class probe, trained on the train split, scored on val
    assert result["probe_kind"] == "category"
    assert result["probe_chance"] == pytest.approx(1 / 18)
    assert result["probe_category_num_test"] == 36
    assert "trained on 'train' (180 images)" in result["probe_setup"]
    assert 0.0 <= result["probe_accuracy"] <= 1.0
    assert "probe_map80" not in result
    sample = result["samples"][0]
    assert set(sample) == {"image_id", "greedy", "sampled", "references"} and sample["references"]


def test_coco_multilabel_probe_and_image_cap(prepared_coco, checkpoint):
    result = evaluate.evaluate_model(str(checkpoint), str(prepared_coco), split="train2017", max_images=6)
    assert result["num_images"] == 6
    # no other split to learn from: the 6 images are cut 3 / 3
    assert result["probe_setup"].startswith("50/50 split")
    assert result["probe_map80_categories"] >= 1
    assert 0.0 <= result["probe_map80"] <= 1.0
    assert result["reference_unique_words"] > 20  # real COCO captions
    assert 0.0 <= result["bleu4"] <= 1.0 and result["cider_d"] >= 0.0

    # one image: nothing to train a probe on, and the report still renders
    single = evaluate.evaluate_model(str(checkpoint), str(prepared_coco), split="train2017", max_images=1)
    assert single["num_images"] == 1 and single["probe_accuracy"] is None and single["probe_kind"] == "none"
    assert single["cider_d"] == 0.0  # CIDEr-D needs at least two images for its idf
    assert "| Probe: 20 keyword categories, accuracy / chance | n/a |" in single["markdown"]


def test_val_split_falls_back_to_the_held_out_part_of_train(prepared_coco, tmp_path):
    ckpt = _save_debug(tmp_path / "model.safetensors", **{"data.train_split": "train2017", "data.val_fraction": 0.5})
    result = evaluate.evaluate_model(str(ckpt), str(prepared_coco), split="val")
    assert 0 < result["num_images"] < 8
    # the probe learns from the train rows that training itself saw, never from the evaluated ones
    assert f"minus its held-out 0.5 ({8 - result['num_images']} images)" in result["probe_setup"]


def test_cross_entropy_matches_a_direct_forward(prepared_shapes, checkpoint):
    loaded = load_model(checkpoint)
    model, cfg = loaded.model, loaded.config
    data, _ = evaluate.load_eval_data(str(prepared_shapes), "val", cfg, limit=2)
    tokenizer = ByteTokenizer(cfg.model.max_seq_length)
    refs = [[data.captions[0][0]], [data.captions[1][1]]]
    plans = evaluate.encode_plans(model, data.images, batch_size=1, device=torch.device("cpu"))
    ce, _ = evaluate.caption_cross_entropy(model, plans, refs, tokenizer, cfg, batch_size=8, device=torch.device("cpu"))

    ids, _ = tokenizer.batch([refs[0][0], refs[1][0]])
    with torch.no_grad():
        logits = model(data.images, ids).logits  # (2, T, V)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)
    assert ce == pytest.approx(expected.item(), rel=1e-4)


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
    assert f"no checkpoint at {missing}" in capsys.readouterr().err

    assert evaluate.main(["--model", str(checkpoint), "--data", str(prepared_shapes), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "prepared split folder" in err and str(prepared_shapes / "test") in err

    not_a_checkpoint = tmp_path / "junk.safetensors"
    not_a_checkpoint.write_bytes(b"not safetensors")
    assert evaluate.main(["--model", str(not_a_checkpoint), "--data", str(prepared_shapes)]) == 2
    assert "not a readable safetensors checkpoint" in capsys.readouterr().err


def test_runs_uri_and_logging_into_the_active_mlflow_run(prepared_shapes, checkpoint, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
