"""benchmarks/collapse_study.py: records, aggregation over seeds and tables (no training here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

@pytest.fixture(scope="module")
def study(import_benchmark):
    return import_benchmark("collapse_study")


def _record(method: str, seed: int, knn: float, fixed: bool = False) -> dict:
    return {"method": method, "dataset": "cifar10", "seed": seed, "knn_top1": knn, "linear_top1": knn + 0.02,
            "kmeans": {"ami": 0.2}, "prototype_argmax_clustering": None if fixed else {"ami": 0.1},
            "prototypes_fixed": fixed, "unique_prototypes": None if fixed else {"0.1": 1.0},
            "unique_prototypes_used": None if fixed else {"0.1": 0.5}, "nearest_utilization_capped": 0.25,
            "effective_rank": 40.0, "embedding_std": 0.05, "samples_per_second": 100.0, "train_seconds": 10.0,
            "alarms": ["unused_prototypes"] if seed == 1 else [], "spectrum": [3.0, 2.0, 1.0],
            "unique_curve": None if fixed else {"eps": [0.1, 0.5], "fraction": [1.0, 0.5]},
            "per_epoch": [{"epoch": 0.0, "knn_top1": 0.3}, {"epoch": 1.0, "knn_top1": knn}]}


def test_mean_std_is_the_sample_statistic_and_skips_missing_values(study):
    mean, std, n = study.mean_std([0.4, None, 0.5, 0.6])
    assert (mean, n) == (pytest.approx(0.5), 3)
    assert std == pytest.approx(0.1)          # sqrt(((0.1)^2 + 0 + (0.1)^2) / 2)
    assert study.mean_std([0.7]) == (0.7, 0.0, 1)
    assert study.mean_std([None]) is None


def test_aggregate_over_seeds_and_table_marks_fixed_prototypes_na(study):
    records = {"cifar10": {"carp": [_record("carp", s, k) for s, k in ((0, 0.50), (1, 0.52), (2, 0.54))],
                           "cplearn": [_record("cplearn", 0, 0.45, fixed=True)]}}
    agg = study.aggregate(records["cifar10"]["carp"])
    assert agg["seeds"] == [0, 1, 2] and agg["alarms"] == ["unused_prototypes"]
    assert agg["knn_top1"][0] == pytest.approx(0.52) and agg["knn_top1"][1] == pytest.approx(0.02)
    table = study.markdown_tables(records)
    carp_row = next(line for line in table.splitlines() if line.startswith("| carp |"))
    assert "0.520 ± 0.020" in carp_row and "100.0 ± 0.0 / 50.0 ± 0.0" in carp_row and "25.0 ± 0.0" in carp_row
    cplearn_row = next(line for line in table.splitlines() if line.startswith("| cplearn |"))
    assert "n/a (fixed)" in cplearn_row and "± " not in cplearn_row   # one seed: no spread


def test_existing_records_are_not_trained_again_and_collect_reads_them_all(study, tmp_path, capsys):
    records = tmp_path / "records"
    for seed in (0, 3):
        path = records / "cifar10" / f"carp-seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_record("carp", seed, 0.5 + seed / 100)))
    # --data points nowhere: a run that had to be trained would fail
    study.main(["--data", str(tmp_path / "missing"), "--records", str(records), "--out", str(tmp_path / "out"),
                "--methods", "carp", "--datasets", "cifar10", "--seeds", "0"])
    report = json.loads((tmp_path / "out" / "study.json").read_text())
    assert report["aggregated"]["cifar10"]["carp"]["seeds"] == [0]
    capsys.readouterr()
    study.main(["--collect", "--records", str(records), "--out", str(tmp_path / "out"), "--datasets", "cifar10"])
    report = json.loads(capsys.readouterr().out)
    knn = report["aggregated"]["cifar10"]["carp"]["knn_top1"]
    assert knn[2] == 2 and knn[0] == pytest.approx(0.515) and knn[1] == pytest.approx(0.03 / math.sqrt(2))
    assert any(p.endswith("spectra_cifar10.png") for p in report["figures"])
    assert any(p.endswith("knn_by_epoch_cifar10.png") for p in report["figures"])


def test_every_study_method_names_a_bundled_recipe(study):
    configs = Path(__file__).resolve().parent.parent / "src" / "nocollapse" / "configs" / "cifar10"
    for name, (recipe, _) in study.STUDY.items():
        assert (configs / f"{recipe}.yaml").is_file(), name


def test_claim_pairs_say_whether_a_difference_is_inside_the_seed_noise(study):
    dino = [_record("dino", s, k) for s, k in ((0, 0.50), (1, 0.52), (2, 0.54))]      # mean 0.52, std 0.02
    close = [_record("dino_decoupled", s, k) for s, k in ((0, 0.51), (1, 0.53), (2, 0.55))]
    far = [_record("dino_decoupled", s, k) for s, k in ((0, 0.60), (1, 0.61), (2, 0.62))]
    se_close = math.sqrt(0.02 ** 2 / 3 + 0.02 ** 2 / 3)                              # 0.0163
    near = study.compare(dino, close, ("knn_top1",))
    assert near["difference"] == pytest.approx(0.01) and near["standard_error"] == pytest.approx(se_close)
    assert near["inside_noise"] is True
    assert study.compare(dino, far, ("knn_top1",))["inside_noise"] is False         # +0.09 vs 2 * 0.0129
    single = study.compare(dino[:1], far[:1], ("knn_top1",))
    assert single["standard_error"] is None and single["inside_noise"] is None


def test_cplearn_is_compared_with_the_best_prototype_method(study):
    methods = {"dino": [_record("dino", 0, 0.45)], "carp": [_record("carp", 0, 0.52)],
               "cplearn": [_record("cplearn", 0, 0.47, fixed=True)], "supcon": []}
    pairs = study.claim_pairs(methods)
    assert [(p["baseline"], p["remedy"]) for p in pairs] == [("carp", "cplearn")]
    assert pairs[0]["knn_top1"]["difference"] == pytest.approx(-0.05)


def test_write_docs_refills_only_the_marked_blocks(study, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- study-summary:start -->\nold\n<!-- study-summary:end -->\nmiddle\n"
                   "<!-- study-full:start -->\nold\n<!-- study-full:end -->\nend\n")
    records = {"cifar10": {"dino": [_record("dino", 0, 0.45)], "dino_decoupled": [_record("dino_decoupled", 0, 0.47)]}}
    assert study.write_doc_blocks(doc, records, {"dino": 123.4})
    text = doc.read_text()
    summary, full = text.split("middle")
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| dino | 0 | 0.450 |" in summary and "| 123 |" in summary and "claim pairs" not in summary
    assert "claim pairs" in full and "+0.020 (one seed: spread not estimated)" in full
    assert not study.write_doc_blocks(doc, records, {"dino": 123.4})                  # idempotent


def test_committed_study_tables_match_the_committed_records(study):
    """The README's and the results' study blocks are what --write-docs makes of docs/study."""
    repo = Path(__file__).resolve().parent.parent
    records: dict[str, dict[str, list[dict]]] = {}
    diverged: dict[str, dict[str, list[dict]]] = {}
    for dataset in study.DATASETS:
        for name in study.STUDY:
            paths = sorted((repo / "docs" / "study" / dataset).glob(f"{name}-seed*.json"),
                           key=lambda p: int(p.stem.rsplit("-seed", 1)[1]))
            records.setdefault(dataset, {})[name], diverged.setdefault(dataset, {})[name] = study.partition(
                [json.loads(p.read_text()) for p in paths])
    speeds = study.load_throughput(repo / "docs" / "throughput")
    for doc in ("README.md", "docs/results.md"):
        text = (repo / doc).read_text()
        assert study.DOC_BLOCK.search(text), doc
        assert study.render_doc_blocks(text, records, speeds, diverged) == text, (
            f"{doc}: run benchmarks/collapse_study.py --collect --out docs/study --write-docs README.md docs/results.md")


def test_long_tail_claim_pairs_also_compare_the_balanced_protocol(study):
    def lt(method, seed, knn, balanced):
        return {**_record(method, seed, knn), "dataset": "cifar10_lt", "balanced_knn_top1": balanced,
                "balanced_linear_top1": balanced + 0.01}
    records = {"cifar10_lt": {"supcon": [lt("supcon", 0, 0.30, 0.46), lt("supcon", 1, 0.30, 0.47)],
                              "clop": [lt("clop", 0, 0.28, 0.43), lt("clop", 1, 0.28, 0.44)]}}
    pairs = study.claim_pairs(records["cifar10_lt"], study.pair_metrics("cifar10_lt"))
    assert pairs[0]["balanced_knn_top1"]["difference"] == pytest.approx(-0.03)
    assert pairs[0]["balanced_linear_top1"]["difference"] == pytest.approx(-0.03)
    table = study.markdown_tables(records)
    head = next(line for line in table.splitlines() if line.startswith("| baseline |"))
    assert head.endswith("| balanced k-NN difference | balanced linear difference |")
    row = next(line for line in table.splitlines() if line.startswith("| supcon | clop |"))
    assert "-0.030 ± 0.007 (outside the noise)" in row                    # se = sqrt(2 * 0.00707^2 / 2)
    assert study.pair_metrics("cifar10") == ("knn_top1", "linear_top1")


def test_cplearn_comparison_table_and_its_doc_block(study):
    barlow = dict(_record("barlow_twins", 0, 0.40), prototype_argmax_clustering=None)
    cplearn = [dict(_record("cplearn", s, k, fixed=True),
                    prototype_argmax_clustering={"ami": 0.12, "intracluster_variance_ratio": r})
               for s, k, r in ((0, 0.36, 0.5), (1, 0.37, 0.4))]
    methods = {"cplearn": cplearn, "barlow_twins": [barlow], "dino": [_record("dino", 0, 0.45)]}
    rows = study.comparison_table(methods)
    assert [r.split(" | ")[0].strip("| ") for r in rows[2:]] == list(study.CPLEARN_COMPARISON)
    assert "0.365 ± 0.007" in rows[2] and "0.450 ± 0.071" in rows[2]       # k-NN, intracluster ratio
    assert rows[3].count("n/a (no prototypes or codes)") == 2               # Barlow Twins
    assert "no record yet" in rows[4]                                       # SwAV
    text = "a\n<!-- study-comparison:start -->\nold\n<!-- study-comparison:end -->\nb"
    filled = study.render_doc_blocks(text, {"cifar10": methods}, {})
    assert "old" not in filled and "| cplearn | 0, 1 |" in filled and filled.endswith("end -->\nb")


def test_a_diverged_run_is_recorded_and_named_in_the_table_not_averaged(study, tmp_path, monkeypatch, capsys):
    """A run that stops on a non-finite loss leaves the trainer's failure.json: the study writes a
    record that says where it diverged, goes on with the queue, and the table names the seed."""
    import subprocess

    def diverge(run_dir, recipe, overrides, dataset):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "failure.json").write_text(json.dumps(
            {"reason": "non_finite_loss", "step": 14, "epoch": 0, "lr": 0.1753, "loss": "nan", "message": "..."}))
        raise subprocess.CalledProcessError(2, ["nocollapse", "train"])

    monkeypatch.setattr(study, "train_and_evaluate", diverge)
    records = tmp_path / "records"
    (records / "cifar10").mkdir(parents=True)
    (records / "cifar10" / "vicreg-seed0.json").write_text(json.dumps(_record("vicreg", 0, 0.44)))
    study.main(["--data", str(tmp_path / "data"), "--records", str(records), "--out", str(tmp_path / "out"),
                "--methods", "vicreg", "byol", "--datasets", "cifar10", "--seeds", "0", "1"])
    saved = json.loads((records / "cifar10" / "byol-seed1.json").read_text())
    assert saved["diverged"] == {"reason": "non_finite_loss", "step": 14, "epoch": 0, "lr": 0.1753, "loss": "nan"}
    report = json.loads((tmp_path / "out" / "study.json").read_text())
    assert report["aggregated"]["cifar10"]["vicreg"]["seeds"] == [0]          # the diverged seed is not averaged
    assert "byol" not in report["aggregated"]["cifar10"]
    assert [d["seed"] for d in report["diverged"]["cifar10"]["byol"]] == [0, 1]
    capsys.readouterr()
    study.main(["--collect", "--records", str(records), "--out", str(tmp_path / "out"), "--markdown"])
    table = capsys.readouterr().out
    vicreg_row = next(line for line in table.splitlines() if line.startswith("| vicreg |"))
    assert "0 (seed 1 diverged at step 14 (lr 0.175))" in vicreg_row and "0.440" in vicreg_row
    byol_row = next(line for line in table.splitlines() if line.startswith("| byol |"))
    assert "| 0, 1 | diverged: seed 0 diverged at step 14" in byol_row


def test_a_run_that_fails_without_diverging_stops_the_study_and_records_nothing(study, tmp_path, monkeypatch):
    import subprocess

    def crash(run_dir, recipe, overrides, dataset):
        raise subprocess.CalledProcessError(1, ["nocollapse", "train"])

    monkeypatch.setattr(study, "train_and_evaluate", crash)
    with pytest.raises(subprocess.CalledProcessError):
        study.main(["--data", str(tmp_path / "data"), "--records", str(tmp_path / "records"),
                    "--out", str(tmp_path / "out"), "--methods", "byol", "--datasets", "cifar10"])
    assert not list(tmp_path.glob("records/**/*.json"))


def test_the_comparison_figure_takes_a_rerun_spectrum_only_where_the_record_has_none(study, tmp_path, monkeypatch):
    import nocollapse.diagnostics.plots as plots

    drawn = {}
    monkeypatch.setattr(plots, "plot_spectrum", lambda spectra, path, **kw: drawn.update(spectra=spectra,
                                                                                          styles=kw["styles"]) or path)
    swav = dict(_record("swav", 1, 0.33), embedding_spectrum=[1.0, 0.5])
    dino = _record("dino", 0, 0.45)                                   # collected before the spectrum existed
    reruns = {"dino": [dict(_record("dino", 0, 0.44), embedding_spectrum=[1.0, 0.1])],
              "swav": [dict(_record("swav", 0, 0.34), embedding_spectrum=[1.0, 0.9])]}
    study.comparison_figure({"swav": [swav], "dino": [dino]}, tmp_path / "f.png", reruns)
    assert drawn["spectra"] == {"swav (seed 1)": [1.0, 0.5], "dino (seed 0, rerun)": [1.0, 0.1]}
    assert drawn["styles"]["dino (seed 0, rerun)"] == plots.distinct_styles(list(study.STUDY))["dino"]


def test_swav_and_swav_decoupled_are_a_claim_pair(study):
    """Decoupled prototypes' third host: SwAV's pair is compared like DINO's and CARP's."""
    swav = [_record("swav", s, k) for s, k in ((0, 0.34), (1, 0.33))]
    decoupled = [_record("swav_decoupled", s, k) for s, k in ((0, 0.22), (1, 0.26))]
    pair = next(p for p in study.claim_pairs({"swav": swav, "swav_decoupled": decoupled})
                if p["baseline"] == "swav")
    assert pair["remedy"] == "swav_decoupled" and pair["knn_top1"]["difference"] == pytest.approx(-0.095)
    assert pair["knn_top1"]["seeds"] == (2, 2)
