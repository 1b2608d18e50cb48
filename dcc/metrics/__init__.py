"""Metrics layer (above :mod:`dcc.spatial`, below data, evaluation, the engine and the network):
gWI and gRE of transforms (paper Eqs. 49-52), Dice and the surface distances (HD95, ASD) of
label maps (:mod:`dcc.metrics.functional`)."""

from dcc.metrics import functional
from dcc.metrics.functional import *  # noqa: F403 (the layer's public functions)

__all__ = functional.__all__
