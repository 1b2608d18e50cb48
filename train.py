"""Train deep combined computing: ``python train.py [overrides]`` (Hydra, conf/train.yaml).

With no arguments: DCC+All on the embedded cardiac phantom, on CPU, then the test Dice.
Bad input (data, settings, checkpoints) stops before anything is written: one line, exit 2.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
# idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning made steps ~6x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    from dcc.lit.entry import exit_on_bad_input
    from dcc.lit.train import format_summary, prepare_training, run_training, tolerant_console

    tolerant_console()
    with exit_on_bad_input():
        prepared = prepare_training(cfg)
    result = run_training(cfg, prepared)
    if result["interrupted"]:  # exit 128 + SIGTERM, as a killed process, with the resume line
        last = result["last_ckpt"]
        resume = (f"resume with ckpt_path={last} (and the same overrides)" if last
                  else "no checkpoint was written yet, nothing to resume")
        print(f"train.py: terminated (SIGTERM); {resume}", file=sys.stderr)
        sys.exit(143)
    print(format_summary(result, "test" if cfg.get("test", True) else "val"))
    # the value an optimisation sweep maximises
    return result["metrics"].get("val/reg_dsc")


if __name__ == "__main__":
    main()
