"""Train deep combined computing: ``python train.py [overrides]`` (Hydra, conf/train.yaml).

With no arguments: DCC+All on the embedded cardiac phantom, on CPU, then the test Dice.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    from dcc.lit.train import format_summary, run_training

    result = run_training(cfg)
    print(format_summary(result, "test" if cfg.get("test", True) else "val"))
    # the value an optimisation sweep maximises
    return result["metrics"].get("val/reg_dsc")


if __name__ == "__main__":
    main()
