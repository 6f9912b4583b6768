"""Methods that decide masks: one module per family, each with its own frozen hparams dataclass.

Each method is stated precisely in docs/methods.md."""
