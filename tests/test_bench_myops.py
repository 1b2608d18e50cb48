"""The MyoPS bench of dcc-register: its misalignment models, and the command end to end on one
patient (the latter needs the real data; skipped with the reason when absent)."""

import json
import math

import pytest
import torch
from tiny_runs import load_bench

from dcc.data.cardiac import data_root
from dcc.data.misalignment import random_dense_warp, warp_dense

ROOT = data_root()




def test_dense_warp_has_the_stated_bounds():
    shape = (48, 40)
    coords = random_dense_warp(4, shape, max_angle=10, max_shift=8, max_deformation=7, seed=1)
    identity = random_dense_warp(1, shape, 0, 0, 0, seed=0)
    h, w = shape
    scale = torch.tensor([(w - 1) / 2, (h - 1) / 2])  # normalised -> voxels (x, y)
    # no motion at all gives the identity sampling
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    torch.testing.assert_close((identity[0] + 1) * scale, torch.stack([cols, rows], -1).float())
    # the deformation alone peaks at exactly max_deformation voxels
    only = random_dense_warp(2, shape, 0, 0, 7.0, seed=3)
    peak = ((only - identity) * scale).norm(dim=-1).flatten(1).amax(1)
    torch.testing.assert_close(peak, torch.full((2,), 7.0), atol=1e-4, rtol=0)
    # rotation + shift + deformation stay within their sum at the image centre
    centre = ((coords - identity) * scale)[:, h // 2, w // 2].norm(dim=-1)
    assert (centre <= 7 + 8 * math.sqrt(2) + 1).all()
    # edges replicated: a constant image stays constant, with no zero padding
    warped = warp_dense(torch.full((4, h, w), 3.0), coords)
    torch.testing.assert_close(warped, torch.full_like(warped, 3.0))
    # seeded
    torch.testing.assert_close(coords, random_dense_warp(4, shape, 10, 8, 7, seed=1))


@pytest.mark.data
@pytest.mark.skipif(
    ROOT is None or not (ROOT / "myops2020").is_dir(),
    reason="MyoPS data not found: set DCC_DATA_ROOT (CI uses ../shared/data)",
)
def test_bench_runs_one_patient(tmp_path):
    bench = load_bench("bench_myops")
    argv = ["--cases", "Case3012", "--seeds", "1", "--models", "dense,aligned", "--workers", "1",
            "--roi", "10", "--out", str(tmp_path), "--tag", "t", "--", "--iterations", "4"]
    assert bench.main(argv) == 0
    payload = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    groups = payload["groups"]
    assert {g["model"] for g in groups} == {"dense", "aligned"}
    # each group registered with its misalignment's seed
    assert all(g["engine_seed"] == 1 for g in groups) and payload["settings"]["seed"] == 1
    assert all(g["split"] == "test" for g in groups)  # Case3012 was not used for tuning
    aligned = next(g for g in groups if g["model"] == "aligned")
    assert aligned["dice_before"] == 1.0 and aligned["mean_displacement_mm"] == 0.0
    dense = next(g for g in groups if g["model"] == "dense")
    assert 0 < dense["dice_before"] < 1 and dense["mean_displacement_mm"] > 1
    assert "| test | dense | 1 |" in (tmp_path / "t.md").read_text(encoding="utf-8")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_methods_option_refuses_monomodal_metrics(capsys):
    bench = load_bench("bench_myops")
    args, _ = bench.parse_args(["--methods", "xcoreg", "gmm", "--", "--iterations", "4"])
    assert args.methods == ["xcoreg", "gmm"] and args.extra == ["--iterations", "4"]
    assert bench.parse_args(["--methods", "cte,ape"])[0].methods == ["cte", "ape"]
    assert bench.parse_args([])[0].methods == ["xcoreg"]  # the default, as before
    assert bench.parse_args(["--method", "dcc"])[0].methods == ["dcc"]
    for bad in (["--methods", "xcoreg", "vi"], ["--methods", "cg"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
        assert "one intensity scale" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "xcoreg", "mi"])
    assert "unknown mi" in capsys.readouterr().err


def test_comparison_of_methods_on_the_same_groups():
    """Paired against X-CoReg per model; a group below its start is counted per method."""
    bench = load_bench("bench_myops")
    results = []
    for case, before, x, g in (("A", 0.7, 0.90, 0.80), ("B", 0.6, 0.85, 0.50),
                               ("C", 0.8, 0.88, 0.83)):
        for method, after in (("xcoreg", x), ("gmm", g)):
            results.append({"case": case, "seed": 0, "model": "dense", "method": method,
                            "dice_before": before, "dice_after": after, "seconds": 2.0
                            if method == "xcoreg" else 3.0})
    text, tables = bench.compare(results, ["xcoreg", "gmm"])
    rows = {r["method"]: r for r in tables["dense"]}
    assert set(tables) == {"dense"} and rows["xcoreg"]["n"] == rows["gmm"]["n"] == 3
    assert rows["gmm"]["diff"] == pytest.approx(-0.1667, abs=1e-4)
    assert rows["gmm"]["below_start"] == 1 and rows["xcoreg"]["below_start"] == 0
    assert rows["gmm"]["time_ratio"] == pytest.approx(1.5)
    assert rows["gmm"]["worst_group"] == "B seed 0"
    assert "### dense: mean pairwise Dice (myocardium, LV, RV), before 0.700" in text
    assert "| GMM | 3 | 0.710 ± 0.182 | 0.830 | 1 | -0.167 |" in text


@pytest.mark.data
@pytest.mark.skipif(
    ROOT is None or not (ROOT / "myops2020").is_dir(),
    reason="MyoPS data not found: set DCC_DATA_ROOT (CI uses ../shared/data)",
)
def test_bench_runs_two_methods(tmp_path):
    bench = load_bench("bench_myops")
    argv = ["--cases", "Case3012", "--seeds", "0", "--models", "dense", "--workers", "1",
            "--methods", "xcoreg", "gmm", "--out", str(tmp_path), "--tag", "t", "--",
            "--iterations", "2"]
    assert bench.main(argv) == 0
    payload = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    groups = {g["method"]: g for g in payload["groups"]}
    assert sorted(groups) == ["gmm", "xcoreg"]
    assert groups["gmm"]["dice_before"] == groups["xcoreg"]["dice_before"]  # the same group
    assert payload["settings_by_method"]["gmm"]["method"] == "gmm"
    assert set(payload["summaries"]) == {"test/dense/xcoreg", "test/dense/gmm"}
    md = (tmp_path / "t.md").read_text(encoding="utf-8")
    assert "| test | dense | gmm | 1 |" in md and "## Methods against X-CoReg" in md
    diff = groups["gmm"]["dice_after"] - groups["xcoreg"]["dice_after"]
    assert f"| GMM | 1 | {groups['gmm']['dice_after']:.3f} ± " in md
    assert f"| {diff:.3f} |" in md
    saved = json.loads((tmp_path / "t_comparison.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in saved["tables"]["dense"]] == ["xcoreg", "gmm"]
    assert len(saved["records"]) == 2 and (tmp_path / "t_comparison.md").is_file()
