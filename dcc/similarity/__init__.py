"""Similarity layer: Parzen pmfs, the X-metric and the common-space update; the competing
groupwise metrics (:mod:`dcc.similarity.baselines`)."""

from dcc.similarity.modules import GroupObjective, XMetric, group_objective

__all__ = ["GroupObjective", "XMetric", "group_objective"]
