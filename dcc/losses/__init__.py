"""Deep combined computing losses (paper Sec. 3.5, Eqs. 38-47)."""

from dcc.losses.functional import clip_probabilities, distance_probabilities
from dcc.losses.modules import DCCLoss, DCCLossOutput

__all__ = ["DCCLoss", "DCCLossOutput", "clip_probabilities", "distance_probabilities"]
