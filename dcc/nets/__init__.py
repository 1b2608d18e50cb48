"""The DCC network (paper Sec. 3.5.3, Fig. 5): pure torch, imports nothing else of dcc."""

from dcc.nets.blocks import DomainBatchNorm, ResidualBlock
from dcc.nets.dccnet import DCCNet, DCCOutput

__all__ = ["DCCNet", "DCCOutput", "DomainBatchNorm", "ResidualBlock"]
