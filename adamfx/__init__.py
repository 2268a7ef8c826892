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
from adamfx._checkpoint import CheckpointError
from adamfx._checkpoint import convert_state
from adamfx._checkpoint import restore_npz
from adamfx._checkpoint import restore_orbax
from adamfx._checkpoint import save_npz
from adamfx._checkpoint import save_orbax
from adamfx._diagnostics import adam_diagnostics
from adamfx._diagnostics import adam_step_bound
from adamfx._flat import PackedState
from adamfx._flat import pack_state
from adamfx._flat import ravel_params
from adamfx._quant import QuantizedArray
from adamfx._quant import adam8bit
from adamfx._quant import adamw8bit
from adamfx._quant import scale_by_adam8bit
from adamfx._sharding import state_layout
from adamfx._sharding import zero1_shardings

__version__ = "0.1.0"

__all__ = (
    "AdamState",
    "CheckpointError",
    "PackedState",
    "QuantizedArray",
    "ScaleByAdamState",
    "adam",
    "adam_diagnostics",
    "adam_step_bound",
    "adam8bit",
    "adamax",
    "adamw",
    "adamw8bit",
    "amsgrad",
    "convert_state",
    "inject_hyperparams",
    "nadam",
    "nadamw",
    "pack_state",
    "ravel_params",
    "restore_npz",
    "restore_orbax",
    "save_npz",
    "save_orbax",
    "scale_by_adam",
    "scale_by_adam8bit",
    "scale_by_adamax",
    "state_layout",
    "zero1_shardings",
)
