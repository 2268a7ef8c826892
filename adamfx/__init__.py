"""adamfx: Adam as a first-class JAX citizen, a drop-in for optax's Adam family."""

from adamfx._builders.adam import adam
from adamfx._builders.adam import adam8bit
from adamfx._builders.adam import adamax
from adamfx._builders.adam import adamaxw
from adamfx._builders.adam import adamw
from adamfx._builders.adam import adamw8bit
from adamfx._builders.adam import amsgrad
from adamfx._builders.adam import nadam
from adamfx._builders.adam import nadamw
from adamfx._builders.adam import scale_by_adam
from adamfx._builders.adam import scale_by_adam8bit
from adamfx._builders.adam import scale_by_adamax
from adamfx._builders.adam import scale_by_amsgrad
from adamfx._builders.adam import stable_adamw
from adamfx._builders.adam4bit import adam4bit
from adamfx._builders.adam4bit import adamw4bit
from adamfx._core.driver import AdaMaxState
from adamfx._core.driver import AdamState
from adamfx._core.driver import ScaleByAdamState
from adamfx._core.driver import ScaleByAmsgradState
from adamfx._core.param_rounding import ParamRoundingState
from adamfx._core.param_rounding import kahan_init
from adamfx._core.sharding import state_layout
from adamfx._core.sharding import zero1_shardings
from adamfx._formats.blockwise4bit import Blockwise4bit
from adamfx._formats.blockwise4bit import Quantized4bit
from adamfx._formats.blockwise8bit import Blockwise8bit
from adamfx._formats.dense import Dense
from adamfx._formats.quant import QuantizedArray
from adamfx._porting.conventions import FrameworkAdamState
from adamfx._porting.conventions import keras_adam
from adamfx._porting.conventions import keras_adamw
from adamfx._porting.conventions import torch_adam
from adamfx._porting.conventions import torch_adamw
from adamfx._porting.torch_state import from_torch_state
from adamfx._porting.torch_state import to_torch_state
from adamfx._sparse.clip import sparse_clip_by_global_norm
from adamfx._sparse.clip import sparse_global_norm
from adamfx._sparse.grad import row_sparse_grad
from adamfx._sparse.grad import value_and_row_sparse_grad
from adamfx._sparse.lazy import LazyAdamState
from adamfx._sparse.lazy import RowSparse
from adamfx._sparse.lazy import lazy_adam
from adamfx._sparse.lazy import lazy_adamw
from adamfx._sparse.lazy import scale_by_lazy_adam
from adamfx._wrappers.averaging import EmaParamsState
from adamfx._wrappers.averaging import averaged_params
from adamfx._wrappers.averaging import ema_params
from adamfx._wrappers.checkpoint import CheckpointError
from adamfx._wrappers.checkpoint import convert_state
from adamfx._wrappers.checkpoint import restore_npz
from adamfx._wrappers.checkpoint import restore_orbax
from adamfx._wrappers.checkpoint import save_npz
from adamfx._wrappers.checkpoint import save_orbax
from adamfx._wrappers.diagnostics import adam_diagnostics
from adamfx._wrappers.diagnostics import adam_step_bound
from adamfx._wrappers.flat import PackedState
from adamfx._wrappers.flat import pack_state
from adamfx._wrappers.flat import ravel_params
from adamfx._wrappers.inject import inject_hyperparams
from adamfx._wrappers.multisteps import MultiSteps

__version__ = "0.1.0"

__all__ = (
    "AdaMaxState",
    "AdamState",
    "Blockwise4bit",
    "Blockwise8bit",
    "CheckpointError",
    "Dense",
    "EmaParamsState",
    "FrameworkAdamState",
    "LazyAdamState",
    "MultiSteps",
    "PackedState",
    "Quantized4bit",
    "ParamRoundingState",
    "QuantizedArray",
    "RowSparse",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "adam",
    "adam_diagnostics",
    "adam_step_bound",
    "adam4bit",
    "adam8bit",
    "adamax",
    "adamaxw",
    "adamw",
    "adamw4bit",
    "adamw8bit",
    "amsgrad",
    "averaged_params",
    "convert_state",
    "ema_params",
    "from_torch_state",
    "inject_hyperparams",
    "kahan_init",
    "keras_adam",
    "keras_adamw",
    "lazy_adam",
    "lazy_adamw",
    "nadam",
    "nadamw",
    "pack_state",
    "ravel_params",
    "restore_npz",
    "restore_orbax",
    "row_sparse_grad",
    "save_npz",
    "save_orbax",
    "scale_by_adam",
    "scale_by_adam8bit",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_lazy_adam",
    "sparse_clip_by_global_norm",
    "sparse_global_norm",
    "stable_adamw",
    "state_layout",
    "to_torch_state",
    "torch_adam",
    "torch_adamw",
    "value_and_row_sparse_grad",
    "zero1_shardings",
)
