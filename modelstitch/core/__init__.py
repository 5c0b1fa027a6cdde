"""Layer 1, addressing and capture: layer names, hooks, probes, prefixes and suffixes.

Everything here works on a plain ``nn.Module`` and knows nothing of stitches:
`parse_address` and `list_layers` name layers, `capture`/`activations` record
their outputs with hooks that live only inside a call, `layer_specs` probes
shapes once, `prefix`/`suffix` split a network at a layer, `frozen` holds
networks in eval mode without ``requires_grad``, the batch helpers turn a
caller's data into ``(inputs, labels)`` batches, and `keep_freed_memory` stops
the C allocator from handing each batch's memory back to the system.
"""

from ._address import INPUT, Address, list_layers, missing_call_error, parse_address, repeated_call_error
from ._allocator import keep_freed_memory
from ._batches import BatchFn, as_loader, batch_rows, is_batch_list, iterate_batches, loader, split_batch, to_device
from ._capture import Activations, activations, capture
from ._checkpoint import load_checkpoint, save_checkpoint
from ._checks import BOOLEAN, PATH, SEED, TEXT, Allowed, check_names, choice, duplicates, integer, number
from ._device import resolve_device
from ._files import atomic_path, remove_orphans, write_text
from ._fingerprint import fingerprint_data, fingerprint_module
from ._freeze import frozen
from ._layout import ForwardLayout
from ._lock import folder_lock
from ._outputs import (
    OutputSelector,
    call_model,
    call_model_capturing_input,
    first_input_tensor,
    match_dtype,
    replace_output,
    select_output,
)
from ._positions import Positions, position_mask
from ._probe import layer_specs
from ._spec import ActivationSpec, Layout, layout_of
from ._split import Prefix, Suffix, SuffixMethod, prefix, prefix_outputs, suffix

__all__ = [
    "BOOLEAN",
    "PATH",
    "SEED",
    "TEXT",
    "Allowed",
    "INPUT",
    "ActivationSpec",
    "Activations",
    "Address",
    "BatchFn",
    "ForwardLayout",
    "Layout",
    "OutputSelector",
    "Positions",
    "Prefix",
    "Suffix",
    "SuffixMethod",
    "activations",
    "as_loader",
    "batch_rows",
    "atomic_path",
    "call_model",
    "call_model_capturing_input",
    "duplicates",
    "first_input_tensor",
    "capture",
    "check_names",
    "choice",
    "fingerprint_data",
    "fingerprint_module",
    "folder_lock",
    "frozen",
    "integer",
    "is_batch_list",
    "keep_freed_memory",
    "iterate_batches",
    "layer_specs",
    "layout_of",
    "list_layers",
    "load_checkpoint",
    "loader",
    "match_dtype",
    "number",
    "missing_call_error",
    "parse_address",
    "position_mask",
    "prefix",
    "prefix_outputs",
    "remove_orphans",
    "repeated_call_error",
    "replace_output",
    "resolve_device",
    "save_checkpoint",
    "select_output",
    "split_batch",
    "suffix",
    "to_device",
    "write_text",
]
