"""Similarity layer: Parzen pmfs, the X-metric and the common-space update."""

from dcc.similarity.modules import XMetric

__all__ = ["XMetric"]
