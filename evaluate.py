"""Test a checkpoint: ``python evaluate.py ckpt_path=PATH [overrides]`` (conf/evaluate.yaml);
register and segment your own files: ``python evaluate.py mode=predict ckpt_path=PATH
predict.inputs=[...] predict.out=DIR`` (conf/predict/default.yaml).
Bad input stops before anything is written: one line, exit 2."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    from dcc.data.io import InputError
    from dcc.lit.entry import exit_on_bad_input
    from dcc.lit.train import tolerant_console

    tolerant_console()
    if cfg.get("mode") == "predict":
        from dcc.lit.predict import main as predict

        predict(cfg)
        return
    from dcc.lit.train import format_summary, prepare_evaluation, run_evaluation

    with exit_on_bad_input():
        if cfg.get("mode") != "test":
            raise InputError(f"mode={cfg.get('mode')}: use mode=test or mode=predict")
        prepared = prepare_evaluation(cfg)
    print(format_summary(run_evaluation(cfg, prepared), "test"))


if __name__ == "__main__":
    main()
