"""Where every array of a run lives: the device mesh, the parameter rules, the batch layout.

One ``Mesh`` with axes ``("data", "fsdp", "tensor")`` (GSPMD, ``AxisType.Auto``):

- the batch is split over ``("data", "fsdp")`` and replicated over ``tensor``;
- tensor parallelism (``tensor > 1``) splits attention ``qkv`` / ``q`` / ``kv`` (kernels
  ``[in, n, heads * head_dim]``: whole heads) and MLP ``fc1`` by output, and ``proj`` / ``fc2``
  by input (Megatron style: one all-reduce per pair);
- FSDP (``fsdp > 1``) splits each weight of at least ``FSDP_MIN_SIZE`` elements along its
  largest free axis divisible by the ``fsdp`` size; smaller ones are replicated;
- optimiser state and EMA parameters take the sharding of the parameter they mirror; the
  step counter and RNG key are replicated.

XLA inserts the collectives (all-gathers of FSDP weights, reductions of gradients and of
row-parallel outputs); the step itself is the plain single-device ``train.train_step``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dit_jax.models import architecture

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Weights with fewer elements than this are replicated: gathering them would cost more
# latency than their memory is worth (biases, norms, small embeddings).
FSDP_MIN_SIZE = 2**12
# (module, layer) names of the tensor-parallel linears: split by output ...
COLUMN_PARALLEL = {("attn", "qkv"), ("cross_attn", "q"), ("cross_attn", "kv"), ("mlp", "fc1")}
# ... and by input, so each pair needs one reduction of its output and nothing in between.
ROW_PARALLEL = {("attn", "proj"), ("cross_attn", "proj"), ("mlp", "fc2")}


def detect_cluster(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, *, timeout_s: int = 300,
                   ) -> tuple[str | None, int | None, int | None, list[int] | None]:
    """``(coordinator address, process count, this process's id, its local device ids)`` with the
    unset ones filled in by JAX's own cluster detection (what ``jax.distributed.initialize()`` does
    without arguments).

    JAX recognises Slurm, Open MPI, Kubernetes, GKE TPU pods (``TPU_WORKER_HOSTNAMES``) and Cloud
    TPU VMs made by ``gcloud compute tpus`` (through the GCE metadata server: the worker number and
    the slice's network endpoints; ``GCE_METADATA_IP`` points it elsewhere). Outside all of them the
    unset values stay None. The local device ids are set where a launcher starts one process per
    device (e.g. Slurm on GPUs). ``timeout_s`` bounds the wait for the coordinator's name to resolve.
    """
    from jax._src import clusters  # the detection jax.distributed.initialize() runs; it has no public name

    address, count, index, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        coordinator_address, num_processes, process_id, None, None, timeout_s)
    return address, count, index, None if local is None else list(local)


def _require_attached_tpus() -> None:
    """On a machine with TPU chips attached, train on them or fail, never silently on the host CPU.

    Where libtpu is missing (a CPU-only ``jax`` in the venv), JAX warns and falls back to the CPU;
    then this asks for the TPU (``jax_platforms=tpu``), so the first use of the devices fails with
    JAX's error naming the problem. An explicit ``JAX_PLATFORMS`` (e.g. ``cpu``) is obeyed.
    """
    from jax._src import hardware_utils

    if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms:
        return  # the user's choice, or JAX's own on a TPU VM with libtpu ("tpu,cpu": a failing TPU is an error)
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    if chips:
        logging.info("%d TPU chips are attached: requiring the TPU backend (set JAX_PLATFORMS to choose)", chips)
        jax.config.update("jax_platforms", "tpu")


def define_distributed_flags() -> None:
    """The absl flags of a multi-process run outside detected clusters, for every command that starts one."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join the other processes of a multi-process run; a no-op in a single process or if done already.

    Under Slurm, Open MPI, Kubernetes or on a Cloud TPU slice everything is detected
    (``detect_cluster``); elsewhere pass the coordinator's ``host:port``, the number of processes and
    this one's id. Where TPU chips are attached they are required (no silent CPU fallback, see
    ``_require_attached_tpus``). Must run before anything touches the devices (call it first in ``main``).
    """
    if jax.distributed.is_initialized():
        return
    _require_attached_tpus()
    address, count, index, local_devices = detect_cluster(coordinator_address, num_processes, process_id)
    if count is not None and count > 1:
        jax.distributed.initialize(address, count, index, local_device_ids=local_devices)


def is_main_process() -> bool:
    """Process 0 alone logs, writes images and summaries."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Wait until every process has reached the point ``name`` (a no-op in a one-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolve ``data``/``fsdp``/``tensor`` sizes (at most one ``-1`` = all remaining devices)."""
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes must be positive, with at most one -1 (= the rest of the devices); "
                         f"got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if num_devices % fixed:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices: the fixed "
                         f"sizes multiply to {fixed}, which does not divide {num_devices}")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but there are "
                         f"{num_devices}; set one axis to -1 to take the rest")
    return tuple(sizes)


def create_mesh(mesh_config: Mapping[str, int], devices: list[jax.Device] | None = None) -> Mesh:
    """The run's mesh over ``devices`` (default: all, across processes), axes ``MESH_AXES``, GSPMD (Auto)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _names(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pytree key path as plain names, without the ``.value`` of nnx Variables."""
    names = tuple(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in path)
    return names[:-1] if names and names[-1] == "value" else names


def param_spec(names: tuple[Any, ...], shape: tuple[int, ...], axis_sizes: Mapping[str, int],
               fsdp_min_size: int = FSDP_MIN_SIZE) -> P:
    """The partition spec of one parameter, from its path names (e.g. ``(..., "mlp", "fc1", "kernel")``).

    The blocks of a ``scan_blocks`` model are stacked on a leading layer axis (``("blocks",
    "mlp", ...)`` without a block index): that axis stays whole (the scan walks it) and the rest
    is split as one block's parameter would be.
    """
    if "blocks" in names[:-1] and not isinstance(names[names.index("blocks") + 1], int) and shape:
        at = names.index("blocks") + 1
        layer = tuple(param_spec((*names[:at], 0, *names[at:]), tuple(shape[1:]), axis_sizes, fsdp_min_size))
        return P(None, *layer) if layer else P()
    spec: list[Any] = [None] * len(shape)
    tensor, fsdp = axis_sizes.get("tensor", 1), axis_sizes.get("fsdp", 1)
    layer, kind = tuple(names[-3:-1]), (names[-1] if names else None)
    if tensor > 1 and kind in ("kernel", "bias"):
        axis = None
        if layer in COLUMN_PARALLEL:
            axis = len(shape) - 1
        elif layer in ROW_PARALLEL and kind == "kernel":
            axis = 0
        if axis is not None:
            if shape[axis] % tensor:
                raise ValueError(f"parameter {'/'.join(map(str, names))} of shape {shape} cannot be split over "
                                 f"tensor={tensor} along axis {axis}; choose a tensor size dividing {shape[axis]}")
            spec[axis] = "tensor"
    if fsdp > 1 and math.prod(shape) >= fsdp_min_size:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if spec[axis] is None and shape[axis] % fsdp == 0:
                spec[axis] = "fsdp"
                break
    while spec and spec[-1] is None:  # canonical form: P() for replicated
        spec.pop()
    return P(*spec)


def params_shardings(params: Any, mesh: Mesh) -> Any:
    """The same pytree as ``params`` with each leaf's ``NamedSharding`` from ``param_spec``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(_names(path), tuple(leaf.shape), mesh.shape)), params)


def follow_params(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree mirroring the params (optimiser moments, EMA): a leaf whose path ends
    with a parameter's path and has its shape takes that parameter's sharding; others are replicated."""
    by_path = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings)):
        by_path[_names(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, P())

    def lookup(path, leaf):
        names, shape = _names(path), tuple(getattr(leaf, "shape", ()))
        for start in range(len(names)):
            match = by_path.get(names[start:])
            if match is not None and match[0] == shape:
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(lookup, tree)


def train_state_shardings(state: Any, mesh: Mesh) -> Any:
    """A ``train_state.TrainState`` (concrete or abstract) of ``NamedSharding``: params by the rules,
    ``opt_state`` and ``ema_params`` following them, ``step`` and ``rng`` replicated."""
    params = params_shardings(state.params, mesh)
    replicated = NamedSharding(mesh, P())
    return state.replace(step=replicated, rng=replicated, params=params,
                         opt_state=follow_params(state.opt_state, state.params, params, mesh),
                         ema_params=follow_params(state.ema_params, state.params, params, mesh))


def create_sharded_state(init: Callable[[], Any], mesh: Mesh) -> tuple[Any, Any]:
    """Run ``init`` (a train-state constructor) under jit with the rules' output layout.

    Each device materialises only its own shards, which is how a state is created across
    processes (``device_put`` cannot reach other hosts' devices) and for models too large
    for one device. Returns the state and its shardings (for the step's in/out_shardings).
    """
    shardings = train_state_shardings(jax.eval_shape(init), mesh)
    return jax.jit(init, out_shardings=shardings)(), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over ``data`` x ``fsdp``, replicated over ``tensor``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many different slices of the global batch the mesh holds."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def process_batch_shards(mesh: Mesh) -> int:
    """How many different batch slices live on this process's devices (its share of ``batch_shards``)."""
    coords = set()
    for index, device in np.ndenumerate(mesh.devices):
        if device.process_index == jax.process_index():
            coords.add(index[:2])  # the (data, fsdp) position
    return len(coords)


def process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of the global batch (what its input pipeline must yield per step)."""
    shards, local = batch_shards(mesh), process_batch_shards(mesh)
    if global_batch_size % shards:
        raise ValueError(f"global batch size {global_batch_size} must be divisible by data x fsdp = {shards} "
                         f"(mesh {dict(mesh.shape)})")
    return global_batch_size // shards * local


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into global arrays sharded by ``batch_sharding``."""
    sharding, local_shards = batch_sharding(mesh), process_batch_shards(mesh)
    for name, value in local_batch.items():
        n = np.shape(value)[0] if np.ndim(value) else None
        if n is None or n % local_shards:
            raise ValueError(f"batch[{name!r}] has leading size {n} on process {jax.process_index()}, which must be "
                             f"divisible by this process's {local_shards} batch shards (mesh {dict(mesh.shape)}); "
                             "pick a batch size that is a multiple of data x fsdp")
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}


def batch_from_global(values: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays sharded by ``batch_sharding`` from values every process holds whole (e.g. a block of
    sample indices and their labels): each device takes its own slice, on any number of processes."""
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in values.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % batch_shards(mesh):
            raise ValueError(f"{name!r} has leading size {value.shape[0] if value.ndim else None}, which must be "
                             f"divisible by data x fsdp = {batch_shards(mesh)} (mesh {dict(mesh.shape)})")
        out[name] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
    return out


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise a clear error when the mesh cannot run this model and batch on ``num_devices``."""
    data, fsdp, tensor = mesh_shape(config.mesh, num_devices)
    problems = []
    if config.train.batch_size % (data * fsdp):
        problems.append(f"train.batch_size {config.train.batch_size} must be divisible by data x fsdp = {data * fsdp}")
    if tensor > 1:
        heads = architecture(config.model)["num_heads"]
        if heads % tensor:
            problems.append(f"model num_heads {heads} must be divisible by mesh.tensor {tensor}")
    if problems:
        raise ValueError("invalid mesh config: " + "; ".join(problems))
