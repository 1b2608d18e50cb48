"""Metrics layer (above :mod:`dcc.spatial`, below data, evaluation, the engine and the network):
gWI and gRE of transforms (paper Eqs. 49-52), Dice and the surface distances (HD95, ASD)
of label maps
(:mod:`dcc.metrics.functional`)."""

from dcc.metrics.functional import (
    composed_points,
    dice,
    foreground_mask,
    groupwise_registration_error,
    groupwise_warping_index,
    nanmean,
    pairwise_dice,
    pairwise_surface_distances,
    registration_error,
    surface_distances,
    warping_index,
)

__all__ = [
    "groupwise_warping_index",
    "groupwise_registration_error",
    "composed_points",
    "warping_index",
    "registration_error",
    "foreground_mask",
    "pairwise_dice",
    "dice",
    "surface_distances",
    "pairwise_surface_distances",
    "nanmean",
]
