"""Lightning layer: the DCC LightningModule, data modules and the Hydra-driven runs."""

from dcc.lit.module import DCCModule

__all__ = ["DCCModule"]
