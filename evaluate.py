"""Test a checkpoint: ``python evaluate.py ckpt_path=PATH [overrides]`` (conf/evaluate.yaml);
register and segment your own files: ``python evaluate.py mode=predict ckpt_path=PATH
predict.inputs=[...] predict.out=DIR`` (conf/predict/default.yaml)."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train.py


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    from dcc.lit.train import tolerant_console

    tolerant_console()
    if cfg.get("mode") not in ("test", "predict"):
        print(
            f"evaluate.py: error: mode={cfg.get('mode')}: use mode=test or mode=predict",
            file=sys.stderr,
        )
        sys.exit(2)
    from dcc.coreg.refine import check_iterations

    try:
        check_iterations(cfg.get("refine_iterations", 0))
    except ValueError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if cfg.mode == "predict":
        from dcc.lit.predict import main as predict

        predict(cfg)
        return
    from dcc.lit.train import format_summary, run_evaluation

    print(format_summary(run_evaluation(cfg), "test"))


if __name__ == "__main__":
    main()
