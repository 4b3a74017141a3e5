"""nettransplant: network transplanting with back-distillation, in JAX/Flax."""

__version__ = "0.1.0"
