"""Official PyTorch DiT checkpoints <-> this model's parameters.

The official ``state_dict`` (as in the released ``DiT-XL-2-256x256.pt``) uses PyTorch names
and layouts: Linear weights ``[out, in]``, the patch conv ``[out, in, p, p]`` (NCHW). Here
kernels are ``[in, out]`` and ``[p, p, in, out]`` (NHWC), and attention's fused projections
``[in, n, out]`` (``qkv``: n = 3) with biases ``[n, out]``. Names map one to one: our state
path with ``layers`` (from ``nnx.Sequential``) dropped and ``kernel``/``embedding`` read as
``weight``. ``materialise`` gives a module zero arrays to load such weights into.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models import DiT

_RENAMES = {"kernel": "weight", "embedding": "weight"}


def materialise(abstract: nnx.Module) -> nnx.Module:
    """Zero arrays in place of an ``nnx.eval_shape`` module's shapes: no random init for weights about to be loaded."""
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


def official_name(path: tuple) -> str:
    """Our state path, e.g. ``('t_embedder', 'mlp', 'layers', 0, 'kernel')`` -> ``t_embedder.mlp.0.weight``."""
    parts = [str(p) for p in path if p != "layers"]
    parts[-1] = _RENAMES.get(parts[-1], parts[-1])
    return ".".join(parts)


# Conv kernels HWIO (ours) -> OIHW (official).
_CONV_TO_OFFICIAL = (3, 2, 0, 1)


def _to_official(array: np.ndarray, path: tuple) -> np.ndarray:
    """Our layout -> the official one: linear kernels ``[in, *out]`` -> ``[prod(out), in]`` (fused
    projections such as ``qkv [in, 3, out]`` flatten as the official fused layer), conv kernels
    HWIO -> OIHW, fused biases ``[n, out]`` -> ``[n * out]``; other arrays as they are."""
    if path[-1] == "kernel":
        return array.transpose(_CONV_TO_OFFICIAL) if array.ndim == 4 else array.reshape(array.shape[0], -1).T
    return array.reshape(-1) if path[-1] == "bias" else array


def from_official_layout(array: np.ndarray, path: tuple, shape: tuple[int, ...]) -> np.ndarray | None:
    """An official array in our layout of ``shape``, or None if it does not fit that shape."""
    if path[-1] == "kernel" and len(shape) == 4:
        array = array.transpose(np.argsort(_CONV_TO_OFFICIAL)) if array.ndim == 4 else array
    elif path[-1] == "kernel" and array.ndim == 2 and array.shape == (math.prod(shape[1:]), shape[0]):
        array = array.T.reshape(shape)
    elif path[-1] == "bias" and array.ndim == 1 and array.size == math.prod(shape):
        array = array.reshape(shape)
    return array if tuple(array.shape) == tuple(shape) else None


class _Layer:
    """Layer ``index`` of a variable stacked over the blocks (``DiT(scan_blocks=True)``), read and
    written like a variable (``layer[...]``) through a numpy copy of the stack shared by its layers."""

    def __init__(self, stack: np.ndarray, index: int):
        self.stack, self.index = stack, index

    def __getitem__(self, key):
        return self.stack[self.index][key]

    def __setitem__(self, key, value) -> None:
        self.stack[self.index][key] = value


def _flat_state(model: DiT) -> dict[tuple, nnx.Variable | _Layer]:
    """Path -> variable; a scanned model's stacked block variables appear as one ``_Layer`` per
    block under the unrolled path (``('blocks', i, ...)``), so both layouts have the same names."""
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    if not model.scan_blocks:
        return flat
    out = {}
    for path, var in flat.items():
        if path[0] != "blocks":
            out[path] = var
            continue
        stack = np.array(var[...])
        out.update({(path[0], i, *path[1:]): _Layer(stack, i) for i in range(stack.shape[0])})
    return out


def _write_stacks(model: DiT, flat: Mapping[tuple, nnx.Variable | _Layer]) -> None:
    """Store the stacks that ``_Layer`` views were written through back into a scanned model's variables."""
    if model.scan_blocks:
        for path, var in nnx.to_flat_state(nnx.state(model)):
            if path[0] == "blocks":
                layer = flat[(path[0], 0, *path[1:])]
                var[...] = np.asarray(layer.stack, dtype=var[...].dtype)


# The official modules' registration order (their state_dict's order); numbers (blocks, Sequential) count up.
_OFFICIAL_ORDER = {"pos_embed": 0, "x_embedder": 1, "t_embedder": 2, "y_embedder": 3, "blocks": 4, "final_layer": 5,
                   "norm1": 0, "norm_final": 0, "attn": 1, "linear": 1, "qkv": 1, "q": 1, "kv": 2, "proj": 3,
                   "norm_cross": 2, "cross_attn": 3, "norm2": 4, "mlp": 5, "fc1": 0, "fc2": 1, "adaLN_modulation": 6,
                   "weight": 0, "bias": 1}


def _official_position(name: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else _OFFICIAL_ORDER.get(p, 99) for p in name.split("."))


def to_official_state_dict(model: DiT) -> dict[str, np.ndarray]:
    """This model's weights as an official-layout ``state_dict`` of numpy arrays, in the official order."""
    state = {official_name(path): _to_official(np.asarray(var[...]), path) for path, var in _flat_state(model).items()}
    return {name: state[name] for name in sorted(state, key=_official_position)}


def load_checked(variables: Mapping[tuple, nnx.Variable], state_dict: Mapping[str, np.ndarray],
                 name_of: Callable[[tuple], str], *, header: str, hint: str = "", pytorch_layout: bool = True) -> None:
    """Copy a PyTorch ``state_dict`` (numpy arrays, PyTorch layouts) into ``variables`` (flat path -> variable).

    Every name and shape is checked before anything is written; on any mismatch a ValueError
    starts with ``header``, lists the missing, unexpected and wrongly shaped entries (shapes in
    the checkpoint's layout) and ends with ``hint``. Shared by the DiT and the VAE loaders, and
    (``pytorch_layout=False``: arrays already in this project's layouts) by the workdir loader.
    """
    by_name = {name_of(path): path for path in variables}
    missing = sorted(set(by_name) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_name))
    wrong = []
    converted = {}
    for name, path in by_name.items():
        if name not in state_dict:
            continue
        want = tuple(variables[path][...].shape)
        if pytorch_layout:
            value = from_official_layout(np.asarray(state_dict[name]), path, want)
        else:
            value = state_dict[name] if tuple(np.shape(state_dict[name])) == want else None
        if value is None:
            shown = _to_official(np.zeros(want, np.int8), path).shape if pytorch_layout else want
            wrong.append(f"{name}: checkpoint {tuple(np.shape(state_dict[name]))}, model {tuple(shown)}")
            continue
        converted[path] = value
    if missing or unexpected or wrong:
        lines = [header]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        if hint:
            lines.append(hint)
        raise ValueError("\n".join(lines))
    for path, value in converted.items():
        var = variables[path]
        var[...] = np.asarray(value, dtype=var[...].dtype)


def load_official_state_dict(model: DiT, state_dict: Mapping[str, np.ndarray], *, source: str = "state_dict") -> None:
    """Copy an official ``state_dict`` (numpy arrays, PyTorch names/layouts) into ``model`` in place.

    Every name and shape is checked before anything is written; on any mismatch a
    ValueError lists the missing, unexpected and wrongly shaped entries (e.g. a 512x512
    checkpoint given to a 256x256 model shows up as a ``pos_embed`` shape mismatch).
    """
    header = (f"{source} does not fit this DiT (input_size={model.input_size}, patch_size={model.patch_size}, "
              f"in_channels={model.in_channels}, out_channels={model.out_channels}, "
              f"num_classes={model.num_classes}, depth={model.depth}):")
    flat = _flat_state(model)
    load_checked(flat, state_dict, official_name, header=header,
                 hint="  Build the model that matches the checkpoint (model name, image size // 8, "
                      "learn_sigma, num_classes) or use the checkpoint made for this one.")
    _write_stacks(model, flat)
