"""Methods that decide masks: one module per family, each with its own frozen hparams dataclass."""
