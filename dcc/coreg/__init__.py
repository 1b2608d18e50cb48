"""X-CoReg: groupwise registration with the X-metric (Algorithm 1)."""

from dcc.coreg.config import StageConfig, XCoRegConfig, load_preset
from dcc.coreg.engine import CommonSpace, CoRegResult, XCoReg

__all__ = ["CoRegResult", "CommonSpace", "StageConfig", "XCoReg", "XCoRegConfig", "load_preset"]
