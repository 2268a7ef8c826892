"""adamfx: Adam as a first-class JAX citizen, a drop-in for optax's Adam family."""

from adamfx._adam import AdamState
from adamfx._adam import ScaleByAdamState
from adamfx._adam import adam
from adamfx._adam import adamax
from adamfx._adam import adamw
from adamfx._adam import amsgrad
from adamfx._adam import inject_hyperparams
from adamfx._adam import nadam
from adamfx._adam import nadamw
from adamfx._adam import scale_by_adam
from adamfx._adam import scale_by_adamax
from adamfx._diagnostics import adam_diagnostics
from adamfx._diagnostics import adam_step_bound

__version__ = "0.1.0"

__all__ = (
    "AdamState",
    "ScaleByAdamState",
    "adam",
    "adam_diagnostics",
    "adam_step_bound",
    "adamax",
    "adamw",
    "amsgrad",
    "inject_hyperparams",
    "nadam",
    "nadamw",
    "scale_by_adam",
    "scale_by_adamax",
)
