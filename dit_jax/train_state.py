"""The train state: one pytree (``TrainState``) of everything a training step changes, the model it is built
from (``build_model``), and its creation directly in its sharded layout on a mesh.

The state is created by one jitted program with ``sharding.train_state_shardings`` as its output
layout, so a big model never sits whole on one device; its abstract form (shapes, dtypes,
shardings) is the restore target of a checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax._src import config as jax_config  # threefry_gpu_kernel_lowering: a context manager only here
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_jax import optimizer, sharding
from dit_jax.model_compute import SWITCH_FIELDS, compute_options
from dit_jax.models import DiT, architecture


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: a pytree, so it jits, shards and checkpoints as one."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    ema_params: nnx.State
    rng: jax.Array


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> DiT:
    """The DiT that ``config.model`` describes (a paper model by name, or explicit sizes)."""
    return DiT(**architecture(config.model), scan_blocks=config.model.scan_blocks, rngs=rngs,
               **compute_options(config.dtype, config.remat, config.attention,
                                 **{field: config[field] for field in SWITCH_FIELDS}))


def _initializer(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Callable[[], tuple[nnx.State, TrainState]],
                                                             tuple[nnx.State, TrainState]]:
    """(graphdef, ``init() -> (fixed state, train state)`` from ``config.seed``, their abstract shapes)."""
    graphdefs = []

    def init() -> tuple[nnx.State, TrainState]:
        init_key, state_key = jax.random.split(jax.random.key(config.seed))
        graphdef, params, fixed = nnx.split(build_model(config, rngs=nnx.Rngs(init_key)), nnx.Param, ...)
        graphdefs.append(graphdef)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=optimizer.make_optimizer(config).init(params),
                           ema_params=jax.tree.map(jnp.copy, params), rng=state_key)
        return fixed, state

    abstract = jax.eval_shape(init)
    return graphdefs[0], init, abstract


def _place(abstract_state: TrainState, mesh: Mesh) -> TrainState:
    """Abstract state leaves with their ``sharding.train_state_shardings`` on ``mesh``."""
    shardings = sharding.train_state_shardings(abstract_state, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def on_mesh(config: ml_collections.ConfigDict, mesh: Mesh
            ) -> tuple[nnx.GraphDef, nnx.State, TrainState, Callable[[], TrainState]]:
    """(graphdef, replicated fixed state, abstract sharded train state, a jitted initialiser of that state).

    The model is traced abstractly once here; the train state is created directly in its sharded
    layout (``sharding.train_state_shardings``) by one jitted program, so a big model never sits
    whole on one device and no parameter is touched eagerly; computing only the fixed state lets
    XLA skip the parameter initialisation when a checkpoint will be restored instead.
    """
    graphdef, init, (_, abstract_state) = _initializer(config)
    abstract_state = _place(abstract_state, mesh)
    fixed = jax.jit(lambda: init()[0], out_shardings=NamedSharding(mesh, PartitionSpec()))()
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    return graphdef, fixed, abstract_state, functools.partial(_run_initializer, lambda: init()[1], shardings)


def _run_initializer(init: Callable[[], TrainState], shardings: Any) -> TrainState:
    """``init`` jitted with ``shardings`` as its output layout and run; on NVIDIA GPUs with its random numbers
    drawn by JAX's threefry kernel (``jax_threefry_gpu_kernel_lowering``).

    The same threefry values either way; XLA otherwise expands every parameter's draw into its own
    fusions, and compiling those few hundred kernels was most of DiT-XL/2's 48-52 s initialisation on an
    H200. The kernel is one custom call that the SPMD partitioner cannot split, so it is used only where
    every leaf is replicated (a data-parallel mesh); should the kernel be missing, the expanded form is
    compiled instead, with one log line.
    """
    replicated = all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
    if jax.default_backend() == "gpu" and replicated:
        try:
            with jax_config.threefry_gpu_kernel_lowering(True):
                return jax.jit(init, out_shardings=shardings)()
        except (AttributeError, NotImplementedError, RuntimeError, ValueError) as e:
            logging.warning("the GPU threefry kernel is unavailable (%s); initialising with XLA's expanded random "
                            "numbers (a slower compile)", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return jax.jit(init, out_shardings=shardings)()


def create_train_state(config: ml_collections.ConfigDict,
                       mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State, TrainState]:
    """Initialise the model, optimiser and EMA (sharded over ``mesh`` if given); (graphdef, fixed state, train state)."""
    if mesh is None:
        graphdef, init, _ = _initializer(config)
        fixed, state = init()
        return graphdef, fixed, state
    graphdef, fixed, _, init_state = on_mesh(config, mesh)
    return graphdef, fixed, init_state()


def abstract_train_state(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
    """The train state's shapes, dtypes and shardings on ``mesh``, without computing it (a restore target)."""
    return _place(_initializer(config)[2][1], mesh)
