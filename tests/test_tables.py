"""Table 5 from run folders (dcc.evaluation.tables), its median-group figure
(dcc.evaluation.figures.save_group_columns) and the evaluate.py command of a checkpoint
(dcc.lit.checkpoints.evaluate_command), against values worked out by hand or by scipy."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from dcc.evaluation.runs import Run
from dcc.evaluation.tables import (
    markdown,
    median_case,
    number,
    paired_tests,
    plus_minus,
    read_refine,
    summary_rows,
    write_csv,
    xcoreg_row,
)

SD2 = 100 * statistics.stdev([0.6, 0.7])  # 7.07: the std of two groups 10 points apart


def _run(strategy: str, rows: dict) -> Run:
    return Run(strategy, Path(f"/runs/{strategy}"), Path(f"/runs/{strategy}"),
               Path(f"/runs/{strategy}/checkpoints/best.ckpt"), rows)


def _runs() -> dict[str, Run]:
    """DGR and DCC+All on three groups of two patients (DCC+AT and DCC+BS not run)."""
    unreg = {"Case3001-z1-s0": 0.60, "Case3001-z1-s1": 0.70, "Case3002-z1-s0": 0.50}
    dgr = {"Case3001-z1-s0": 0.80, "Case3001-z1-s1": 0.85, "Case3002-z1-s0": 0.75}
    dcc = {"Case3001-z1-s0": 0.82, "Case3001-z1-s1": 0.90, "Case3002-z1-s0": 0.79}
    structure = {"reg_dsc/myocardium": 0.7, "reg_dsc/LV": 0.9, "reg_dsc/RV": 0.8,
                 "unreg_dsc/myocardium": 0.5, "unreg_dsc/LV": 0.6, "unreg_dsc/RV": 0.55}
    runs = {
        "dgr": _run("dgr", {c: {"reg_dsc": dgr[c], "unreg_dsc": unreg[c], **structure,
                                "folding": f, "time_s": 0.01}
                            for c, f in zip(unreg, (1.0, 2.0, 3.0), strict=True)}),
        "dcc_all": _run("dcc_all", {c: {"reg_dsc": dcc[c], "unreg_dsc": unreg[c], **structure,
                                        "seg_dsc/LGE": s, "seg_dsc/C0": 0.8, "seg_dsc/T2": 0.9,
                                        "seg_dsc": 0.8, "folding": 0.0, "time_s": 0.02}
                                    for c, s in zip(unreg, (0.6, 0.7, 0.8), strict=True)}),
    }
    return runs


# ---------------------------------------------------------------------------- refinement CSVs
def test_read_refine_per_group_with_other_column_names(tmp_path):
    """A per-group file naming its columns name / refine_iterations / case / dice_after /
    seconds_per_group, Dice as a fraction for two methods and in % for X-CoReg."""
    path = tmp_path / "refine.csv"
    path.write_text(
        "name,refine_iterations,case,dice_after,seconds_per_group\n"
        "network,,Case3001-z1,0.70,0.10\n"
        "network,,Case3001-z2,0.80,0.30\n"
        "network,,Case3002-z1,0.90,0.20\n"
        "network + refine,20,Case3001-z1,0.75,1.0\n"
        "network + refine,20,Case3001-z2,0.85,\n"
        "network + refine,20,Case3002-z1,,2.0\n"
        "X-CoReg,,Case3001-z1,72.0,3.0\n"
        "X-CoReg,,Case3001-z2,82.0,5.0\n"
    )
    rows = {r["method"]: r for r in read_refine(path)}
    assert list(rows) == ["network", "network + refine (20 steps)", "X-CoReg"]
    net, refine, xcoreg = rows.values()
    assert net["reg_dsc_mean"] == pytest.approx(80.0) and net["reg_dsc_std"] == pytest.approx(10.0)
    assert net["time_s"] == pytest.approx(0.2) and net["groups"] == 3
    assert net["cases"] == pytest.approx({"Case3001-z1": 0.7, "Case3001-z2": 0.8,
                                          "Case3002-z1": 0.9})
    # the group without a Dice is left out of the Dice, not of the time
    assert refine["reg_dsc_mean"] == pytest.approx(80.0) and refine["groups"] == 2
    assert refine["reg_dsc_std"] == pytest.approx(100 * math.sqrt(0.005))
    assert refine["time_s"] == pytest.approx(1.5) and set(refine["cases"]) == {
        "Case3001-z1", "Case3001-z2"}
    # Dice in %: kept in %, and the per-group values back as fractions for the t-tests
    assert xcoreg["reg_dsc_mean"] == pytest.approx(77.0) and xcoreg["time_s"] == 4.0
    assert xcoreg["cases"] == pytest.approx({"Case3001-z1": 0.72, "Case3001-z2": 0.82})
    assert xcoreg_row(list(rows.values()))["method"] == "X-CoReg"


def test_read_refine_summary_rows_and_bad_files(tmp_path):
    path = tmp_path / "summary.csv"
    path.write_text(
        "setting,mean_reg_dsc,reg_dsc_sd,time_per_group_s,n\n"
        "network,0.81,0.04,0.05,24\n"
        "network + X-CoReg refine,0.84,0.03,0.9,24\n"
        "X-CoReg,80.5,,3.1,24\n"
    )
    rows = read_refine(path)
    assert [r["method"] for r in rows] == ["network", "network + X-CoReg refine", "X-CoReg"]
    assert rows[0]["reg_dsc_mean"] == pytest.approx(81.0)
    assert rows[0]["reg_dsc_std"] == pytest.approx(4.0)
    assert (rows[0]["time_s"], rows[0]["groups"], rows[0]["cases"]) == (0.05, 24, {})
    assert rows[2]["reg_dsc_mean"] == 80.5 and rows[2]["reg_dsc_std"] is None
    # the refinement that starts from the network is not X-CoReg alone
    assert xcoreg_row(rows) is rows[2] and xcoreg_row(rows[:2]) is None
    assert number({"a": "", "b": "n/a", "c": "2.5"}, "a", "b", "c") == 2.5
    assert number({"a": ""}, "a", "missing") is None
    path.write_text("case,dice\nA,0.5\n")
    with pytest.raises(ValueError, match="no method column"):
        read_refine(path)
    path.write_text("method,reg_dsc\n")
    assert read_refine(path) == []


# ---------------------------------------------------------------------------- rows and tests
def test_summary_rows_by_hand():
    xcoreg = {"method": "X-CoReg", "reg_dsc_mean": 77.0, "reg_dsc_std": 7.0, "time_s": 4.0,
              "groups": 2}
    rows = {r["strategy"]: r for r in summary_rows(_runs(), xcoreg)}
    assert list(rows) == ["none", "dgr", "dcc_at", "dcc_bs", "dcc_all", "xcoreg"]
    none, dgr, dcc = rows["none"], rows["dgr"], rows["dcc_all"]
    assert none["groups"] == 3 and none["reg_dsc_mean"] == pytest.approx(60.0)
    assert none["reg_dsc_std"] == pytest.approx(10.0)
    assert none["reg_dsc/LV_mean"] == pytest.approx(60.0) and none["reg_dsc/LV_std"] == 0
    assert dgr["reg_dsc_mean"] == pytest.approx(80.0) and dgr["reg_dsc_std"] == pytest.approx(5.0)
    # folding and time are not Dice: not scaled to %
    assert dgr["folding_mean"] == pytest.approx(2.0) and dgr["folding_std"] == pytest.approx(1.0)
    assert dgr["time_s_mean"] == pytest.approx(0.01)
    assert not any(k.startswith("seg_dsc") for k in dgr)  # DGR trains without labels
    assert dcc["seg_dsc/LGE_mean"] == pytest.approx(70.0) and dcc["seg_dsc/T2_mean"] == 90.0
    assert rows["dcc_at"] == {"method": "DCC+AT", "strategy": "dcc_at", "missing": True,
                              "paper_reg_dsc_mean": 88.5, "paper_reg_dsc_std": 3.4,
                              "paper_seg_dsc/LGE_mean": 82.0, "paper_seg_dsc/LGE_std": 3.8,
                              "paper_seg_dsc/C0_mean": 81.2, "paper_seg_dsc/C0_std": 4.5,
                              "paper_seg_dsc/T2_mean": 83.4, "paper_seg_dsc/T2_std": 4.1}
    assert none["paper_reg_dsc_mean"] == 72.2 and dcc["paper_seg_dsc/C0_mean"] == 92.4
    assert rows["xcoreg"]["reg_dsc_mean"] == 77.0 and rows["xcoreg"]["time_s_mean"] == 4.0


def test_paired_tests_match_scipy():
    runs = _runs()
    cases = list(runs["dgr"].rows)
    extra = {"xcoreg": {cases[0]: 0.7, cases[1]: 0.75}}  # X-CoReg on two groups only
    pairs = [("none", "dgr"), ("dgr", "dcc_all"), ("dgr", "dcc_bs"), ("xcoreg", "dcc_all")]
    tests = paired_tests(runs, pairs, extra)
    assert [(t["a"], t["b"]) for t in tests] == [
        ("None", "DGR"), ("DGR", "DCC+All"), ("DGR", "DCC+BS"), ("X-CoReg", "DCC+All")]
    unreg, dgr, dcc = ([runs[s].rows[c][k] for c in cases]
                       for s, k in (("dgr", "unreg_dsc"), ("dgr", "reg_dsc"),
                                    ("dcc_all", "reg_dsc")))
    for test, (a, b) in zip(tests[:2], ((unreg, dgr), (dgr, dcc)), strict=True):
        expected = stats.ttest_rel(b, a)
        assert test["groups"] == 3 and test["patients"] == 2
        assert test["t"] == pytest.approx(expected.statistic)
        assert test["p"] == pytest.approx(expected.pvalue)
        assert test["diff_mean"] == pytest.approx(100 * statistics.fmean(np.subtract(b, a)))
    # DGR -> DCC+All: differences 2, 5, 4 points
    assert tests[1]["diff_mean"] == pytest.approx(11 / 3)
    assert tests[2] == {"a": "DGR", "b": "DCC+BS", "missing": True}
    # X-CoReg's per-group values against DCC+All on the groups both have
    assert tests[3]["groups"] == 2 and tests[3]["diff_mean"] == pytest.approx(13.5)
    assert math.isnan(tests[3]["p_patients"])  # one patient: no patient-level test
    assert all(t.get("missing") for t in paired_tests({}, pairs[:2]))


def test_median_case_is_the_lower_median_of_the_most_supervised_strategy():
    rows = {c: {"reg_dsc": v} for c, v in
            {"A": 0.9, "B": 0.7, "C": 0.8, "D": math.nan, "E": 0.6}.items()}
    assert median_case({"dgr": _run("dgr", {"Z": {"reg_dsc": 0.5}}),
                        "dcc_all": _run("dcc_all", rows)}) == ("dcc_all", "B")
    assert median_case({"dgr": _run("dgr", {"Z": {"reg_dsc": 0.5}}),
                        "dcc_at": _run("dcc_at", rows)}) == ("dcc_at", "B")
    assert median_case({"dgr": _run("dgr", {"Z": {"reg_dsc": 0.5}})}) == ("dgr", "Z")
    assert median_case({}) is None


# ---------------------------------------------------------------------------- files
def test_write_csv_joins_the_columns_of_all_rows(tmp_path):
    path = tmp_path / "t.csv"
    write_csv(path, [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}, {"method": "None"}])
    with open(path, newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["a", "b", "c", "method"], ["1", "2.5", "", ""],
                                       ["3", "", "x", ""], ["", "", "", "None"]]


def test_markdown_cells(tmp_path):
    runs = _runs()
    refine = [{"method": "network", "reg_dsc_mean": 80.0, "reg_dsc_std": 10.0, "time_s": 0.2,
               "groups": 3}, {"method": "X-CoReg", "reg_dsc_mean": 77.0, "reg_dsc_std": None,
                              "time_s": None, "groups": None}]
    runs["dcc_all"].latency_s = 0.0123  # the median figure's timing of one group
    rows = summary_rows(runs, None)
    tests = paired_tests(runs, [("none", "dgr"), ("dcc_at", "dcc_all")])
    budgets = {"dgr": {"steps": 10, "epochs": 2, "fit_minutes": 1.5, "max_time": "00:00:05:00",
                       "command": "python train.py experiment=mscmr_dgr"}, "dcc_all": {}}
    text = markdown(
        runs, {"dcc_at": "no run folder or checkpoint at /runs/mscmr_dcc_at"}, rows, tests,
        refine, Path("results/refine.csv"),
        {"case": "Case3001-z1-s1", "by": "dcc_all", "path": tmp_path / "t5_median.png"},
        "python bench/mscmr_table5.py --runs r", 2, ["python evaluate.py ckpt_path=x"],
        budgets=budgets, gathered_on="a test machine",
    )
    lines = text.splitlines()
    assert lines[0].startswith("# Table 5 on MyoPS 2020")
    assert "Test split: 3 groups of 2 patient(s) (Case3001, Case3002)" in text
    assert "median of repeats, 2 thread(s)" in text
    assert "| None | 60.0 ± 10.0 | 72.2 ± 10.1 | — | — | — | — | — | — |" in lines
    assert "| DGR | 80.0 ± 5.0 | 86.2 ± 4.1 | — | — | — | — | 10.0 | — |" in lines
    assert "| DCC+AT | missing | 88.5 ± 3.4 | | | | | | |" in lines
    assert ("| DCC+All | 83.7 ± 5.7 | 89.5 ± 3.5 | 70.0 ± 10.0 | 80.0 ± 0.0 | 90.0 ± 0.0 | "
            "92.6 / 92.4 / 92.7 | 20.0 | 12.3 |") in lines
    assert "| DGR | 70.0 ± 0.0 | 90.0 ± 0.0 | 80.0 ± 0.0 | 2.0 ± 1.0 |" in lines
    t = stats.ttest_rel([0.80, 0.85, 0.75], [0.60, 0.70, 0.50])
    tp = stats.ttest_rel([0.825, 0.75], [0.65, 0.50])
    assert (f"| None | DGR | 3 | +20.0 | {t.statistic:.2f} | {t.pvalue:.2g} | 2 | "
            f"{tp.statistic:.2f} | {tp.pvalue:.2g} |") in lines
    assert "| DCC+AT | DCC+All | missing | | | | | | |" in lines
    assert "| network | 80.0 ± 10.0 | 3 | 0.200 |" in lines
    assert "| X-CoReg | 77.0 | — | — |" in lines
    assert "- DCC+AT (`mscmr_dcc_at`): no run folder or checkpoint at /runs/mscmr_dcc_at" in lines
    assert "![median group](t5_median.png)" in lines
    assert lines.count("Group `Case3001-z1-s1`, the median Reg DSC of DCC+All: the three "
                       "sequences before (None) and after registration by each strategy, with "
                       "the warped C0 label (None, DGR) or the posterior segmentation (DCC) as "
                       "contours, and the posterior segmentation (Eq. 53) in the last row.") == 1
    assert ("| DGR | /runs/dgr/checkpoints/best.ckpt | 10 | 2 | 1.5 | — | — | 00:00:05:00 | "
            "None | None | None | None | None | None / None | None (?) |") in lines
    assert "Gathered on: a test machine." in lines
    block = text[text.index("```\n") + 4:text.rindex("\n```")].splitlines()
    assert block == ["python train.py experiment=mscmr_dgr",
                     "# DCC+All: no .hydra/overrides.yaml in /runs/dcc_all",
                     "python evaluate.py ckpt_path=x", "python bench/mscmr_table5.py --runs r"]
    assert "Warning" not in text
    # groups tested on other data: said in bold
    runs["dgr"].rows["Case3002-z1-s0"]["unreg_dsc"] = 0.4
    text = markdown(runs, {}, rows, [], [], Path("r.csv"), None, "c", None, budgets={},
                    gathered_on="m")
    assert "**Warning: 1 test groups (e.g. Case3002-z1-s0) have different unregistered" in text
    assert "Not available (run bench/bench_mscmr_refine.py to write it)." in text


def test_plus_minus():
    assert plus_minus({"x_mean": 81.26, "x_std": 4.04}, "x") == "81.3 ± 4.0"
    assert plus_minus({"x_mean": 0.5, "x_std": math.nan}, "x", digits=2) == "0.50"
    assert plus_minus({"x_mean": math.nan, "x_std": 1.0}, "x") == "—"
    assert plus_minus({}, "x") == "—"


# ---------------------------------------------------------------------------- figure
def test_save_group_columns(tmp_path):
    """Two methods, three sequences drawn in another order, label maps below: a 2 x 4 grid of
    2.2-inch panels at 100 dpi, each structure in its own colour."""
    from PIL import Image

    from dcc.evaluation.figures import BRIGHT_COLOURS, save_group_columns

    labels = torch.zeros(40, 40, dtype=torch.long)
    labels[5:20, 5:35], labels[20:30, 5:35], labels[30:38, 5:35] = 1, 2, 3
    images = torch.rand(3, 40, 40)
    columns = [{"title": name, "images": images, "sequences": ("C0", "LGE", "T2"),
                "contour": labels, "seg": labels, "seg_title": "labels"}
               for name in ("None", "DCC+All")]
    path = tmp_path / "fig" / "median.png"
    save_group_columns(path, columns, ("LGE", "C0", "T2"), ("myocardium", "LV", "RV"), "title")
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (940, 440, 3)  # (2.2 * 4 + 0.6) x (2.2 * 2) inches
    colours = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in BRIGHT_COLOURS[:3]}
    present = {tuple(p) for p in image.reshape(-1, 3)}
    assert colours <= present
    with pytest.raises(ValueError):  # a sequence a column lacks
        save_group_columns(path, columns, ("T1",), ("myocardium", "LV", "RV"))


# ---------------------------------------------------------------------------- commands
def test_evaluate_command_names_what_differs_from_the_data_defaults(tmp_path):
    from dcc.data.datasets import DEFAULT_SPLIT_FILE
    from dcc.lit.checkpoints import evaluate_command

    defaults = {"image_size": 128, "spacing": 1.25, "root": "/data", "num_workers": 0,
                "split_file": "x", "sequences": ["C0", "LGE", "T2"], "num_ffds": 5,
                "cache_dir": None}
    saved = {"image_size": 96, "spacing": 1.25, "root": "/elsewhere", "num_workers": 4,
             "split_file": str(DEFAULT_SPLIT_FILE), "sequences": ["C0", "LGE"], "num_ffds": 5,
             "cache_dir": "/tmp/cache", "only_saved": 1}
    path = tmp_path / "best.ckpt"
    torch.save({"datamodule_hyper_parameters": saved}, path)
    assert evaluate_command(path, defaults) == (
        f"python evaluate.py data=myops ckpt_path={path} data.image_size=96 "
        'data.sequences=["C0","LGE"]')
    # a split of its own is named; overrides replace the saved value, in the order given
    saved["split_file"] = "/splits/mine.json"
    torch.save({"datamodule_hyper_parameters": saved}, path)
    assert evaluate_command(path, defaults, ["image_size=64", "root=/d"]) == (
        f"python evaluate.py data=myops ckpt_path={path} "
        f'data.split_file={json.dumps("/splits/mine.json")} data.sequences=["C0","LGE"] '
        "data.image_size=64 data.root=/d")
    torch.save({}, path)
    assert evaluate_command(path, defaults) == f"python evaluate.py data=myops ckpt_path={path}"
