"""Network start, iterative finish (issue #10): X-CoReg FFD refinement of dense fields
(dcc.coreg.refine), field composition (dcc.spatial.fields.compose_displacements), and the
``refine_iterations`` option of the predict and test modes."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tiny_runs import run_script, tiny_checkpoint

from dcc.coreg.refine import check_iterations, refine_batch, refine_group
from dcc.data.cardiac_phantom import cardiac_phantom
from dcc.data.io import write_image
from dcc.lit.checkpoints import load_checkpoint
from dcc.lit.datamodules import CardiacPhantomDataModule
from dcc.lit.predict import main, run_prediction
from dcc.metrics import pairwise_dice
from dcc.spatial.fields import compose_displacements, warp
from dcc.spatial.grid import Grid

SIZE = 32


def constant(values, n: int = 1, shape=(SIZE, SIZE)) -> torch.Tensor:
    """``(1, n, ndim, *shape)`` fields of one constant displacement per image."""
    values = torch.as_tensor(values, dtype=torch.float32).view(n, -1)
    return values.view(1, n, -1, *[1] * len(shape)).expand(1, n, values.shape[1], *shape).clone()


# ---------------------------------------------------------------------- composition
def test_translations_compose_to_their_sum():
    outer, inner = constant([[1.5, -2.0], [-0.5, 0.25]], 2), constant([[0.5, 1.0], [2.0, -1.0]], 2)
    torch.testing.assert_close(compose_displacements(outer, inner), outer + inner)
    outer3, inner3 = constant([[1.0, 2.0, -1.0]], shape=(4, 6, 5)), constant(
        [[-0.5, 0.5, 1.5]], shape=(4, 6, 5)
    )
    torch.testing.assert_close(compose_displacements(outer3, inner3), outer3 + inner3)


def test_composition_of_a_known_field():
    """inner: one voxel along x; outer: u_x(x, y) = 0.1 x + 0.05 y. Then
    u(x) = 1 + 0.1 (x + 1) + 0.05 y along x (where x + 1 stays on the lattice), and warping by
    the composition equals warping U o phi_outer by phi_inner."""
    y, x = torch.meshgrid(torch.arange(float(SIZE)), torch.arange(float(SIZE)), indexing="ij")
    outer = torch.zeros(1, 1, 2, SIZE, SIZE)
    outer[0, 0, 0] = 0.1 * x + 0.05 * y
    inner = constant([[1.0, 0.0]])
    u = compose_displacements(outer, inner)
    expected = 1 + 0.1 * (x + 1) + 0.05 * y
    torch.testing.assert_close(u[0, 0, 0, :, :-1], expected[:, :-1])
    torch.testing.assert_close(u[0, 0, 1], torch.zeros(SIZE, SIZE))
    # beyond the lattice the outer field keeps its border value
    torch.testing.assert_close(u[0, 0, 0, :, -1], 1 + 0.1 * (SIZE - 1) + 0.05 * y[:, -1])
    image = (torch.sin(x / 5) + torch.cos(y / 7))[None, None, None]
    once = warp(image, u)
    twice = warp(warp(image, outer), inner)
    inside = (slice(None),) * 3 + (slice(0, SIZE), slice(0, 12))  # x + u(x) stays inside
    torch.testing.assert_close(once[inside], twice[inside], atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="same shape"):
        compose_displacements(outer, constant([[1.0, 0.0]], shape=(SIZE, SIZE + 1)))


# ---------------------------------------------------------------------- refinement
@pytest.fixture(scope="module")
def shifted():
    """A 32^2 cardiac phantom group (C0, LGE, T2) with image j shifted by -t_j (t zero-mean,
    about 1 voxel = 4.7 mm): the field u_j = t_j re-aligns it."""
    phantom = cardiac_phantom(image_size=SIZE, fov=150.0, seed=3)
    shift = constant([[1.0, -1.0], [-1.0, 0.5], [0.0, 0.5]], 3)[0]
    images = warp(phantom.images[None, :, None], -shift[None])[0, :, 0]
    labels = warp(phantom.labels.expand(3, -1, -1)[None, :, None].float(), -shift[None], "nearest")
    return images, labels[0, :, 0].long(), phantom.spacing, shift


def reg_dice(labels, displacement) -> float:
    warped = warp(labels[None, :, None].float(), displacement[None], "nearest")[0, :, 0]
    return pairwise_dice(warped.long(), [1, 2, 3])["mean"]


def test_zero_iterations_return_the_network_field(shifted):
    images, _, spacing, shift = shifted
    result = refine_group(images, shift, 0, spacing)
    assert result.displacement is shift and not result.accepted
    fields, results = refine_batch(images[None], shift[None], 0, [spacing])
    torch.testing.assert_close(fields, shift[None], rtol=0, atol=0)


@pytest.mark.parametrize("start", ["zero", "half"])
def test_refinement_raises_dice_and_stays_zero_mean(shifted, start):
    images, labels, spacing, shift = shifted
    field = torch.zeros_like(shift) if start == "zero" else 0.5 * shift
    before = reg_dice(labels, field)
    result = refine_group(images, field, 40, spacing, lr=0.5)  # 4.7 mm shifts: larger steps
    after = reg_dice(labels, result.displacement)
    assert result.accepted and result.x_after > result.x_before
    assert after > before + 0.08, (before, after)
    assert result.displacement.mean(0).abs().max() < 1e-5  # Eq. (37) over the group
    assert result.displacement.shape == shift.shape and torch.isfinite(result.displacement).all()


def test_refinement_checks_its_input(shifted):
    images, _, spacing, shift = shifted
    with pytest.raises(ValueError, match="same group"):
        refine_group(images[:2], shift, 5, spacing)
    with pytest.raises(ValueError, match="spacing"):
        refine_group(images, shift, 5, [1.0])
    for bad in (-1, 2.5, "many", None, True):
        with pytest.raises(ValueError, match="refine_iterations"):
            check_iterations(bad)
    assert check_iterations(20) == 20 and check_iterations("3") == 3


# ---------------------------------------------------------------------- predict / evaluate
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def test_module_step_uses_the_refined_fields(ckpt):
    """With ``refine_iterations`` the test step's fields (and so every logged and tabulated
    metric) are the network's refined by refine_batch; in training they are never refined."""
    model = load_checkpoint(str(ckpt), lightning=True)
    data = CardiacPhantomDataModule(image_size=SIZE, num_train=1, num_val=1, num_test=2,
                                    batch_size=2)
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        plain = model.step(batch).net.displacement
        model.refine_iterations = 8
        refined = model.step(batch)
    expected, _ = refine_batch(batch["images"], plain, 8, batch["spacing"])
    torch.testing.assert_close(refined.net.displacement, expected)
    assert not torch.equal(expected, plain)
    model.train()  # training steps are never refined
    with torch.no_grad():
        torch.manual_seed(0)
        net = model.net(batch["images"], batch["domains"]).displacement
        torch.manual_seed(0)
        assert torch.equal(model.step(batch).net.displacement, net)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refine_files")
    phantom = cardiac_phantom(image_size=SIZE, fov=150.0, seed=3)
    grid = Grid.from_shape((SIZE, SIZE), phantom.spacing)
    paths = []
    for name, image in zip(phantom.names, phantom.images, strict=True):
        paths.append(str(folder / f"{name}.nii.gz"))
        write_image(paths[-1], image + 0.01, grid)
    return paths


def test_predict_refines_and_reports(tmp_path, ckpt, files):
    plain = run_prediction({"ckpt_path": str(ckpt), "predict": {"inputs": files,
                                                                 "out": str(tmp_path / "a")}})
    assert plain["refine"] is None
    report = run_prediction(
        {"ckpt_path": str(ckpt),
         "predict": {"inputs": files, "out": str(tmp_path / "b"), "refine_iterations": 6}}
    )
    assert report["refine"]["iterations"] == 6 and report["refine"]["seconds"] > 0
    assert report == json.loads((tmp_path / "b" / "report.json").read_text(encoding="utf-8"))


def test_predict_rejects_a_negative_count(tmp_path, ckpt, files, capsys):
    out = tmp_path / "out"
    config = {"ckpt_path": str(ckpt),
              "predict": {"inputs": files, "out": str(out), "refine_iterations": -3}}
    with pytest.raises(SystemExit) as exit_info:
        main(config)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "evaluate.py mode=predict: error: predict.refine_iterations must be >= 0 (0: the "
        "network alone), got -3"
    )
    assert not out.exists()


def test_evaluation_tables_and_logs_are_of_the_refined_fields(tmp_path, ckpt):
    """``evaluate.py ckpt_path=C refine_iterations=N``: the per-group table (MetricsTable) and
    the logged test metrics are both of the refined fields (they agree, and differ from the
    network alone's Reg DSC while the unregistered Dice stays)."""
    from test_configs import compose_cfg

    from dcc.lit.train import run_evaluation

    metrics = {}
    for n in (0, 12):
        cfg = compose_cfg(
            tmp_path / str(n),
            [f"ckpt_path={ckpt}", f"refine_iterations={n}", "data.num_test=2",
             "data.batch_size=2", "callbacks.metrics_table.figures=0",
             "+trainer.enable_progress_bar=false"],
            name="evaluate.yaml",
        )
        logged = run_evaluation(cfg)["metrics"]
        rows = list(csv.DictReader(open(tmp_path / str(n) / "metrics" / "test_groups.csv")))
        mean = sum(float(r["reg_dsc"]) for r in rows) / len(rows)
        assert logged["test/reg_dsc"] == pytest.approx(mean, abs=1e-5)
        metrics[n] = logged
    assert metrics[12]["test/unreg_dsc"] == metrics[0]["test/unreg_dsc"]
    assert metrics[12]["test/reg_dsc"] != metrics[0]["test/reg_dsc"]


def test_evaluate_command_rejects_a_negative_count(tmp_path, ckpt):
    proc = run_script(
        "evaluate.py",
        [f"ckpt_path={ckpt}", "refine_iterations=-1", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "evaluate.py: error: refine_iterations must be >= 0 (0: the network alone), got -1"
    ]


def test_one_option_for_both_modes(tmp_path):
    """``refine_iterations=N`` sets the test mode's count and the predict mode's default;
    ``predict.refine_iterations=N`` the predict mode's alone."""
    from test_configs import compose_cfg

    cfg = compose_cfg(tmp_path, ["ckpt_path=c.ckpt", "refine_iterations=7"], name="evaluate.yaml")
    assert (cfg.refine_iterations, cfg.predict.refine_iterations) == (7, 7)
    cfg = compose_cfg(tmp_path, ["ckpt_path=c.ckpt", "predict.refine_iterations=3"],
                      name="evaluate.yaml")
    assert (cfg.refine_iterations, cfg.predict.refine_iterations) == (0, 3)
