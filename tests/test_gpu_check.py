"""benchmarks/gpu_check.py: its dry run takes every path of the GPU check on the CPU."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def gpu_check(import_benchmark):
    return import_benchmark("gpu_check")


@pytest.mark.slow
@pytest.mark.long
def test_the_dry_run_takes_every_path_and_reports_one_json(gpu_check, tmp_path, capsys):
    out = tmp_path / "check.json"
    result = gpu_check.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == result
    assert result["dry_run"] and result["ok"], result
    assert result["tests"]["exit_code"] == 0 and "1 passed" in result["tests"]["summary"]
    assert result["torchrun"]["exit_code"] == 0 and result["torchrun"]["device"] == "cpu"
    assert result["torchrun"]["processes"] == 1
    assert result["mixture_bf16"]["ok"] and result["mixture_bf16"]["max_abs_diff_responsibilities"] <= 1e-4
    methods = [s["method"] for s in result["steps"]]
    for name in ("dino", "dino_decoupled", "carp", "cplearn", "clop", "swav", "barlow_twins", "vicreg", "byol",
                 "simsiam"):
        assert name in methods, name
    # the large-K cases (64 in the dry run) for DINO and DINO + decoupled
    assert {s["num_prototypes"] for s in result["steps"] if s["method"] == "dino"} == {32, 64}
    for step in result["steps"]:
        assert step["finite_losses"], step
        assert step["ratio_step_to_backbone"] > 0 and step["ratio_by_flops"] >= 1.0, step
        assert step["gflops"]["step"] >= step["gflops"]["backbone"] > 0, step


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the full check would run")
def test_without_a_gpu_the_full_check_refuses_and_says_to_dry_run(gpu_check, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([])
    assert stop.value.code == 2 and "--dry-run" in capsys.readouterr().err
