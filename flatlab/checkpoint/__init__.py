"""Checkpoints: safetensors weights with JSON metadata, training state, rebuilding, init-from.

Nothing here unpickles without ``trust_pickle=True`` (and then only ``weights_only=True``), and
nothing imports a module named in a file without ``trust_code=True``.

==========================  ======================================================================
:mod:`.files`               ``save_checkpoint``, ``read_checkpoint``, ``read_weights``: the format
:mod:`.state`               ``save_state``, ``load_state``: training state for ``--resume``
:mod:`.rebuild`             ``load_model``, ``load_dataset_for``: model and data from metadata
:mod:`.transfer`            ``init_from``: matching tensors of another file into a model
==========================  ======================================================================
"""

from flatlab.checkpoint.files import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    METADATA_KEYS,
    file_sha256,
    read_checkpoint,
    read_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from flatlab.checkpoint.rebuild import check_fit, load_dataset_for, load_model, load_weights
from flatlab.checkpoint.state import load_state, save_state
from flatlab.checkpoint.transfer import InitReport, choose_prefix, init_from

__all__ = ["CHECKPOINT_NAME", "FORMAT_VERSION", "METADATA_KEYS", "InitReport", "check_fit",
           "choose_prefix", "file_sha256", "init_from", "load_dataset_for", "load_model",
           "load_state", "load_weights", "read_checkpoint", "read_weights", "resolve_checkpoint",
           "save_checkpoint", "save_state"]
