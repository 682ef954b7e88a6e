"""Outside training, every baseline works like the other methods: a finished run is evaluated,
diagnosed (prototype measures for SwAV; the embeddings' measures and n/a without prototypes),
exported, and its epoch metrics came from the monitor."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY

HEADS = {
    "swav": ["method.prototypes=learned"],
    "barlow_twins": ["barlow_twins.hidden_dim=64", "barlow_twins.output_dim=32"],
    "vicreg": ["vicreg.hidden_dim=64", "vicreg.output_dim=32"],
    "byol": ["byol.hidden_dim=64", "byol.output_dim=16", "byol.predictor_hidden_dim=32"],
    "simsiam": ["simsiam.hidden_dim=64", "simsiam.output_dim=32", "simsiam.predictor_hidden_dim=16"],
}
PROTOTYPE_KEYS = ("method.num_prototypes", "method.head.")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HEADS))
def test_a_baseline_run_is_evaluated_diagnosed_and_exported(tmp_path, name, capsys):
    from nocollapse.cli import main

    tiny = TINY if name == "swav" else [o for o in TINY if not o.startswith(PROTOTYPE_KEYS)]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--set", *tiny, "train.epochs=1", "diagnostics.plots=false",
                 "eval.knn_init=false", f"method.name={name}", *HEADS[name]]) == 0
    summary = json.loads((run / "summary.json").read_text())
    table = capsys.readouterr().out
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if "effective_rank" in line]
    assert epochs, "the monitor's epoch metrics reached metrics.jsonl"

    assert main(["eval", str(run), "--knn"]) == 0
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["knn"]["knn_k20_t0.07"]["top1"] == pytest.approx(summary["knn_top1"], abs=1e-6)

    assert main(["diagnose", str(run)]) == 0
    text = capsys.readouterr().out
    report = json.loads((run / "diagnosis.json").read_text())
    assert report["source"]["method"] == name
    if name == "swav":
        assert report["num_prototypes"] == 32 and "unique_prototypes" in report
    else:
        assert "num_prototypes" not in report and report["embedding_rankme"] > 1
        assert "n/a" in text and "RankMe" in text
        assert "prototype measures n/a" in table

    out = tmp_path / "backbone.pt"
    assert main(["export", str(run), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
