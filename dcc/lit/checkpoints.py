"""DCC checkpoints at the entry points: what a file must hold to be one, whether a resume
(``ckpt_path=``) or a warm start (``init_from=``) fits the model and data being run, and which
data settings an evaluation takes from it.

A checkpoint keeps the settings that *describe* its data (size, spacing, misalignment, ...) and
the *places* of the machine it was trained on (data root, split file, cache folder). The places
never travel: they always come from where the checkpoint is used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dcc.data.io import InputError

__all__ = [
    "PLACES",
    "read_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "network_mismatch",
    "check_resume",
    "data_settings",
    "evaluate_command",
    "export_model",
    "DATAMODULE_CLASS_KEY",
]

# data-module settings that say where the data are, not what they are
PLACES = ("root", "split_file", "cache_dir")
# settings a resumed run may change: how data are loaded, how often figures are drawn; the
# model's spacing is metadata copied from the data at the start of training
_LOADING = ("num_workers", "batch_size", "val_groups_per_slice")
_MODEL_METADATA = ("figure_every", "spacing")
# the data module's class, written by DCCModule.on_save_checkpoint
DATAMODULE_CLASS_KEY = "datamodule_class"


def read_checkpoint(path: str | None, setting: str = "ckpt_path") -> dict[str, Any]:
    """The contents of a DCC checkpoint; :class:`InputError` naming ``setting`` and the file when
    it is not given, missing, unreadable or not written by ``train.py``."""
    if not path:
        raise InputError(f"{setting}: give a checkpoint ({setting}=PATH, e.g. a run's "
                         "checkpoints/last.ckpt)")
    if not Path(path).is_file():
        raise InputError(f"{setting}={path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike: not a readable checkpoint
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{setting}={path}: cannot read the checkpoint ({reason})") from None
    if not isinstance(checkpoint, Mapping) or not {"state_dict", "hyper_parameters"} <= set(
        checkpoint
    ):
        raise InputError(
            f"{setting}={path}: not a DCC checkpoint (no state_dict and hyper_parameters); "
            "use a checkpoint written by train.py (checkpoints/*.ckpt)"
        )
    return dict(checkpoint)


def load_checkpoint(
    path: str | None, device: str = "cpu", setting: str = "ckpt_path", lightning: bool = False
):
    """The model of a checkpoint in eval mode, rebuilt from its hyper-parameters alone: the
    :class:`~dcc.nets.model.DCCModel` (network, loss, strategy; Lightning is not imported), or
    with ``lightning`` the :class:`~dcc.lit.module.DCCModule` (to test it with a Trainer).
    :class:`InputError` as :func:`read_checkpoint`, or when its network cannot be rebuilt."""
    return model_from_checkpoint(read_checkpoint(path, setting), path, device, setting, lightning)


def model_from_checkpoint(
    checkpoint: Mapping[str, Any],
    path: str | None,
    device: str = "cpu",
    setting: str = "ckpt_path",
    lightning: bool = False,
):
    """:func:`load_checkpoint` of a checkpoint already read (:func:`read_checkpoint`); ``path``
    and ``setting`` name it in the error."""
    hparams = dict(checkpoint["hyper_parameters"])
    try:
        if lightning:
            from dcc.lit.module import DCCModule

            model = DCCModule(**hparams)
        else:
            from dcc.nets.model import DCCModel

            model = DCCModel.from_hyperparameters(hparams)
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0]
        raise InputError(f"{setting}={path}: not a DCC model checkpoint ({reason})") from None
    return model.to(device).eval()


def network_mismatch(
    own: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], extra_domains: bool
) -> list[str]:
    """The tensors by which the state dict ``theirs`` does not fit the network ``own`` (missing,
    unexpected, ``name (their shape) -> (own shape)``). With ``extra_domains``, domain-specific
    norms ``(domains, C)`` of ``own`` may have more rows (a DCC+AT atlas beside the sequences)."""
    problems = sorted(set(own) ^ set(theirs))
    for key in sorted(set(own) & set(theirs)):
        mine, other = own[key], theirs[key]
        if mine.shape == other.shape:
            continue
        domain_norm = ".norms." in key and mine.dim() == 2 == other.dim()
        if (extra_domains and domain_norm and mine.shape[1] == other.shape[1]
                and mine.shape[0] > other.shape[0]):
            continue
        problems.append(f"{key} {tuple(other.shape)} -> {tuple(mine.shape)}")
    return problems


def _plain(value: Any) -> Any:
    """``value`` as plain JSON values (tuples become lists, configs plain containers)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.loads(json.dumps(value, default=str))


def _differences(prefix: str, saved: Mapping, current: Mapping, skip: tuple) -> list[str]:
    keys = sorted((set(saved) | set(current)) - set(skip))
    out = []
    for key in keys:
        theirs, mine = _plain(saved.get(key)), _plain(current.get(key))
        if theirs != mine:
            out.append(f"{prefix}.{key} {json.dumps(theirs)} in the checkpoint, "
                       f"{json.dumps(mine)} here")
    return out


def check_resume(path: str, model: torch.nn.Module, datamodule: Any) -> None:
    """Refuse (with :class:`InputError`) to resume from ``path`` a run of another experiment:
    another data module or data settings (places and loading aside), other model settings, or
    another network shape. The message names what differs and points to ``init_from=``."""
    checkpoint = read_checkpoint(path)
    differences = []
    saved_class = checkpoint.get(DATAMODULE_CLASS_KEY)
    data_class = type(datamodule).__name__
    if saved_class and saved_class != data_class:
        differences.append(f"data set {saved_class} in the checkpoint, {data_class} here")
    else:
        differences += _differences(
            "data", checkpoint.get("datamodule_hyper_parameters") or {},
            dict(datamodule.hparams), PLACES + _LOADING,
        )
    differences += _differences(
        "model", checkpoint["hyper_parameters"], dict(model.hparams), _MODEL_METADATA
    )
    shapes = network_mismatch(model.state_dict(), checkpoint["state_dict"], extra_domains=False)
    if shapes:
        differences.append("network " + ", ".join(shapes[:3])
                           + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""))
    if differences:
        shown = "; ".join(differences[:4]) + (
            f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise InputError(
            f"ckpt_path={path}: a run of another experiment, cannot resume it here ({shown}); "
            "resume with the overrides it was trained with, or start from its weights with "
            f"init_from={path}"
        )


def data_settings(
    checkpoint: Mapping[str, Any], keys: set[str] | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The data-module settings a checkpoint was trained with, without the :data:`PLACES` (they
    come from where it is used) and ``with_atlas`` (it follows the model); only ``keys`` when
    given; ``overrides`` (``key=value``, YAML values, keys among the saved ones) applied. Empty
    when the checkpoint saved none."""
    import yaml

    saved = {
        key: value
        for key, value in dict(checkpoint.get("datamodule_hyper_parameters") or {}).items()
        if key not in (*PLACES, "with_atlas") and (keys is None or key in keys)
    }
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in saved:
            raise InputError(f"data override {item}: use KEY=VALUE with KEY one of {sorted(saved)}")
        saved[key] = yaml.safe_load(value)
    return saved


def evaluate_command(
    checkpoint: str | Path, defaults: Mapping[str, Any], data: Sequence[str] = ()
) -> str:
    """``python evaluate.py data=myops ckpt_path=...`` that tests ``checkpoint`` on data made like
    its own: the saved data settings that differ from ``defaults`` (the data group's, e.g.
    ``conf/data/myops.yaml``: evaluate.py keeps them once ``data=myops`` is given), without the
    places, the default split file and the training-only settings, then the ``data`` overrides
    (``key=value``) as given."""
    from dcc.data.datasets import DEFAULT_SPLIT_FILE

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True).get(
        "datamodule_hyper_parameters", {}
    )
    skip = ("root", "with_atlas", "cache_dir", "num_workers", "val_groups_per_slice",
            "augmentation")
    given = [item.partition("=")[0] for item in data]

    def default_split(key: str, value: Any) -> bool:
        return key == "split_file" and Path(str(value)).resolve() == DEFAULT_SPLIT_FILE

    extra = [
        f"data.{k}={json.dumps(v).replace(' ', '')}"
        for k, v in saved.items()
        if k in defaults
        and k not in (*skip, *given)
        and defaults[k] != v
        and not default_split(k, v)
    ]
    extra += [f"data.{item}" for item in data]
    return " ".join(["python evaluate.py data=myops", f"ckpt_path={checkpoint}", *extra])


def export_model(
    source: str, destination: str, dtype: torch.dtype = torch.float16, **provenance: Any
) -> dict[str, Any]:
    """Write the network of the training checkpoint ``source`` as a small file that
    :func:`load_checkpoint` reads: the weights (floating point ones as ``dtype``; half precision
    halves the size), the model's hyper-parameters, the data settings without their places, and
    ``provenance`` (command, data, split, ...); no optimiser state. Returns what was written."""
    checkpoint = read_checkpoint(source)
    state = {
        key: value.to(dtype) if value.is_floating_point() else value
        for key, value in checkpoint["state_dict"].items()
    }
    exported = {
        "state_dict": state,
        "hyper_parameters": dict(checkpoint["hyper_parameters"]),
        "datamodule_hyper_parameters": data_settings(checkpoint),
        DATAMODULE_CLASS_KEY: checkpoint.get(DATAMODULE_CLASS_KEY),
        "provenance": {"source_global_step": checkpoint.get("global_step"), **provenance},
    }
    torch.save(exported, destination)
    return exported
