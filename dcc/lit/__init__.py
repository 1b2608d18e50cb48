"""Lightning layer: the DCC LightningModule (:mod:`dcc.lit.module`), data modules, the
Hydra-driven runs and predict mode. Nothing is imported here, so that prediction
(:mod:`dcc.lit.predict`) does not load Lightning."""
