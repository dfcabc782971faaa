"""Resuming reads a DeepSpeed checkpoint as data: a planted file is refused, never run.

DeepSpeed 0.19.8 reads each file of a (non-universal) checkpoint through ``engine.checkpoint_engine.load``:
the model states (``mp_rank_*_model_states.pt``, or ``zero_pp_rank_*_mp_rank_*_model_states.pt`` under
ZeRO-3, which also hold the optimizer state without ZeRO and our ``client_state``) and the ZeRO optimizer
partitions (``[bf16_]zero_pp_rank_*_optim_states.pt``). Its torch engine calls
``torch.load(weights_only=False)``, so a pickle planted in a run's checkpoint would run on every rank at
the next resume. ``SafeCheckpointEngine`` is that engine with a ``load`` that rebuilds only tensors,
containers and the plain DeepSpeed types in ``SAFE_GLOBALS`` (found by saving stages 0-3 in fp32, bf16
and fp16); anything else is an error naming the file.

DeepSpeed's other ``torch.load`` calls with ``weights_only=False`` on a load path are the universal
checkpoint loaders (``load_hp_checkpoint_state*``) and ``zero_to_fp32`` (reached by ZeRO-3 when the
optimizer states are not loaded): ``load_checkpoint`` refuses the first and never asks for the second.
"""

from __future__ import annotations

import glob
import os
import pickle

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# Beyond torch's own weights-only set (tensors, storages, dtypes, torch.Size, OrderedDict), the types
# DeepSpeed pickles into a checkpoint. Each is rebuilt by its class (``__new__`` or ``__init__``,
# which only store their arguments; an Enum's call is a lookup) plus a ``__dict__`` update with values
# that are themselves weights-only data: none can reach a function the file names.
SAFE_GLOBALS = [
    LossScaler,  # the ZeRO optimizers' static loss scale (fp32, bf16): numbers and flags
    DynamicLossScaler,  # the same under fp16's dynamic loss scaling, plus its dtype
    ZeroStageEnum,  # an int Enum: the stage the optimizer states were saved under
    fragment_address,  # a dataclass of two ints locating a parameter in a ZeRO 1/2 flat partition
]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be restored; the message names the file and why."""


def _reason(err: pickle.UnpicklingError) -> str:
    """The unpickler's own verdict, without the advice torch wraps around it (which ends in "set
    weights_only=False", the one thing not to do here)."""
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    verdict = [p for p in paragraphs[1:] if not p.startswith("Check the documentation")] or paragraphs
    return " ".join(verdict).rsplit("WeightsUnpickler error:", 1)[-1].strip()


def load_data(path: str, map_location=None):
    """``torch.load`` that rebuilds only data: tensors, containers and ``SAFE_GLOBALS``.

    The allow-list is scoped to this call, so other loads in the process do not inherit it.
    """
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused, it holds more than checkpoint data ({_reason(err)})") from None
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint file ({err})") from err


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, saving as before and loading only data."""

    def load(self, path: str, map_location=None):
        return load_data(path, map_location=map_location)


def use_safe_loads(engine) -> None:
    """Route every checkpoint read of ``engine`` through ``SafeCheckpointEngine``.

    Only DeepSpeed's default torch engine is replaced: the decoupled, fast and datastates engines
    (selected by the ``checkpoint`` config) read files their own way and are refused instead.
    """
    current = engine.checkpoint_engine
    if isinstance(current, SafeCheckpointEngine):
        return
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(
            f"DeepSpeed checkpoint engine {type(current).__name__} is not supported: "
            "only the torch engine's loads are made safe"
        )
    # DeepSpeed builds its engine from the parsed config in the same way (engine._configure_checkpointing)
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


def load_checkpoint(engine, directory: str, tag: str) -> dict:
    """Restore model and optimizer states from ``directory/tag`` as data; returns the client state.

    Raises ``CheckpointError`` naming the file for anything that is not plain checkpoint data, and
    for a directory without DeepSpeed model states, so a damaged checkpoint fails the run instead
    of letting it start over.
    """
    if engine.load_universal_checkpoint():
        raise CheckpointError(
            f"{directory}: universal checkpoints are not supported (DeepSpeed reads them with pickle)"
        )
    if not glob.glob(os.path.join(glob.escape(directory), glob.escape(tag), "*model_states.pt")):
        raise CheckpointError(f"{directory}: no DeepSpeed model states under tag {tag!r}")
    use_safe_loads(engine)
    path, client_state = engine.load_checkpoint(
        directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True, load_module_only=False
    )
    if path is None:
        raise CheckpointError(f"{directory}: no DeepSpeed state under tag {tag!r}")
    return client_state
