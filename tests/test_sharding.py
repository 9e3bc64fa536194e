"""Sharding: meshes, parameter rules, and sharded steps equal to one device (8 simulated CPUs).

Run as a script (``python tests/test_sharding.py PROCESS_ID PORT``) it is one of the two
processes of ``test_two_processes_match_one_device``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs import default
from dit_jax import sharding, train, train_state
from tests.fake_tpu_vm import FakeMetadataServer, fake_tpu_chips, tpu_vm_metadata
from tests.processes import free_port, run_processes

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
MESHES = [(8, 1, 1), (4, 2, 1), (1, 8, 1), (2, 2, 2)]


def tiny_config():
    """A depth-2, width-64, 4-head DiT on 8x8x4 inputs, batch 16."""
    c = default.get_config()
    c.model.update(hidden_size=64, depth=2, num_heads=4, patch_size=2, input_size=8, in_channels=4, num_classes=10)
    c.train.batch_size = 16
    return c


def tiny_problem(scan_blocks: bool = False):
    """For the tiny model with a gradient-keeping SGD: a function creating its state, its
    (unjitted) step, and a batch."""
    c = tiny_config()
    c.model.scan_blocks = scan_blocks
    graphdef, fixed, _ = train_state.create_train_state(c)
    # SGD whose state is the last gradient (a trace with decay 0): grads are compared exactly.
    tx = optax.chain(optax.trace(decay=0.0), optax.scale(-0.5))

    def init_state():
        state = train_state.create_train_state(c)[2]
        return state.replace(opt_state=tx.init(state.params))

    step = functools.partial(train.train_step, graphdef=graphdef, fixed=fixed, diffusion=train.build_diffusion(c),
                             tx=tx, ema_decay=optax.constant_schedule(0.9))
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((16, 8, 8, 4)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    return init_state, step, batch


def mesh_of(shape):
    """A (data, fsdp, tensor) mesh over the first simulated CPU devices."""
    return sharding.create_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices("cpu")[:int(np.prod(shape))])


def names_of(path):
    return jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def setup():
    """``tiny_problem`` and its state and metrics after each of ``STEPS`` steps on one device."""
    init_state, step, batch = tiny_problem()
    state = init_state()
    single = mesh_of((1, 1, 1))
    ref_step = jax.jit(step)
    states, metrics = [jax.device_put(state, sharding.train_state_shardings(state, single))], []
    for _ in range(STEPS):
        new, m = ref_step(states[-1], sharding.global_batch(batch, single))
        states.append(new)
        metrics.append(jax.device_get(m))
    return state, step, batch, states[-1], metrics


def assert_tree_close(actual, expected, rtol):
    """Leafwise close within ``rtol``, near-zero entries within ``rtol`` of the leaf's largest value."""
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=rtol * np.abs(e).max(), err_msg=names_of(path))


# Pure data parallelism and all three axes at once in the default suite; the other two layouts in `make test-all`.
@pytest.mark.parametrize("shape", [pytest.param(s, marks=() if s in ((8, 1, 1), (2, 2, 2)) else pytest.mark.slow)
                                   for s in MESHES], ids=lambda s: "x".join(map(str, s)))
def test_sharded_steps_match_one_device(setup, shape):
    state, step, batch, ref_state, ref_metrics = setup
    mesh = mesh_of(shape)
    shardings = sharding.train_state_shardings(state, mesh)
    # No out_shardings: what comes out is the layout GSPMD propagated through the step (it may
    # split a small weight the rules replicate, so each step starts from the rules' layout).
    sharded_step = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)))
    current, losses = state, []
    for _ in range(STEPS):
        current, metrics = sharded_step(jax.device_put(current, shardings), sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, [m["loss"] for m in ref_metrics], rtol=1e-5)
    assert_tree_close(current.opt_state[0].trace, ref_state.opt_state[0].trace, rtol=1e-5)  # last grads
    assert_tree_close(current.params, ref_state.params, rtol=1e-5)
    assert_tree_close(current.ema_params, ref_state.ema_params, rtol=1e-5)
    # Every weight the rules shard is still sharded that way after the step.
    sharded = 0
    for (path, out), expected in zip(jax.tree_util.tree_leaves_with_path(current), jax.tree.leaves(shardings)):
        if expected.spec != P():
            assert out.sharding.is_equivalent_to(expected, out.ndim), (names_of(path), out.sharding.spec, expected.spec)
            sharded += 1
    assert sharded > 0 if shape[1] * shape[2] > 1 else sharded == 0


def unstack(blocks):
    """A scanned model's stacked block pytree as the unrolled model's list of blocks."""
    depth = jax.tree.leaves(blocks)[0].shape[0]
    return [jax.tree.map(lambda a: a[i], blocks) for i in range(depth)]


@pytest.mark.slow  # the sharded steps above and test_models' scanned-block gradients are the fast siblings
def test_scanned_blocks_shard_like_unrolled_ones_and_step_the_same(setup):
    """``scan_blocks``: each stacked weight keeps its layer axis whole and splits the rest as one
    block's weight is split; the sharded step equals the unrolled model's on one device."""
    state, _, batch, ref_state, ref_metrics = setup
    init_state, step, _ = tiny_problem(scan_blocks=True)
    scanned = init_state()
    mesh = mesh_of((2, 2, 2))
    shardings = sharding.train_state_shardings(scanned, mesh)
    unrolled = sharding.train_state_shardings(state, mesh)
    stacked_specs = jax.tree.leaves(shardings.params["blocks"])
    split = 0
    depth = tiny_config().model.depth
    for block in (unrolled.params["blocks"][i] for i in range(depth)):
        for stacked, single in zip(stacked_specs, jax.tree.leaves(block), strict=True):
            assert stacked.spec == (P(None, *single.spec) if single.spec != P() else P())
            split += single.spec != P()
    assert split > 0
    assert shardings.params["blocks"]["mlp"]["fc1"]["kernel"].spec == P(None, "fsdp", "tensor")
    sharded_step = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)))
    losses = []
    for _ in range(STEPS):
        scanned, metrics = sharded_step(jax.device_put(scanned, shardings), sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, [m["loss"] for m in ref_metrics], rtol=1e-5)
    params = scanned.params
    reference_blocks = [ref_state.params["blocks"][i] for i in range(depth)]
    assert_tree_close(unstack(params["blocks"]), reference_blocks, rtol=1e-5)
    assert_tree_close(params["final_layer"], ref_state.params["final_layer"], rtol=1e-5)


@pytest.fixture(scope="module")
def abstract_state():
    """The tiny model's TrainState (AdamW) as shapes only: rules need no values."""
    return jax.eval_shape(lambda: train_state.create_train_state(tiny_config())[2])


def test_rules_shard_large_weights_by_fsdp_and_tensor(abstract_state):
    mesh = mesh_of((2, 2, 2))
    params = sharding.params_shardings(abstract_state.params, mesh)
    block = params["blocks"][0]
    # Column parallel by output (qkv [in, 3, heads * head_dim]: whole heads of each of q, k, v), row
    # parallel by input; FSDP takes the other (largest free) axis.
    assert block["attn"]["qkv"]["kernel"].spec == P("fsdp", None, "tensor")
    assert block["attn"]["qkv"]["bias"].spec == P(None, "tensor")
    assert block["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
    assert block["attn"]["proj"]["kernel"].spec == P("tensor", "fsdp")
    assert block["mlp"]["fc2"]["kernel"].spec == P("tensor", "fsdp")
    assert block["mlp"]["fc2"]["bias"].spec == P()
    # adaLN (6*64 outputs) is not tensor parallel, only FSDP; the patch conv's "proj" is not attention.
    assert block["adaLN_modulation"]["layers"][1]["kernel"].spec == P(None, "fsdp")
    assert params["x_embedder"]["proj"]["kernel"].spec == P()  # 2*2*4*64 elements < FSDP_MIN_SIZE
    assert params["final_layer"]["linear"]["bias"].spec == P()
    # Per device, FSDP x tensor keep a quarter of a fully split weight.
    qkv = jax.device_put(np.zeros((64, 3, 64), np.float32), block["attn"]["qkv"]["kernel"].get_value())
    assert qkv.addressable_shards[0].data.shape == (32, 3, 32)


def test_fsdp_takes_the_largest_divisible_axis_and_leaves_small_weights():
    sizes = {"data": 1, "fsdp": 4, "tensor": 1}
    assert sharding.param_spec(("w", "kernel"), (1001, 1152), sizes) == P(None, "fsdp")
    assert sharding.param_spec(("w", "kernel"), (1152, 4608), sizes) == P(None, "fsdp")
    assert sharding.param_spec(("w", "kernel"), (1001, 1003), sizes) == P()
    assert sharding.param_spec(("w", "bias"), (1152,), sizes) == P()
    assert sharding.param_spec(("w", "bias"), (1152,), sizes, fsdp_min_size=1) == P("fsdp")


def test_tensor_split_that_does_not_divide_is_rejected():
    with pytest.raises(ValueError, match=r"blocks/0/mlp/fc1/kernel.*tensor=3"):
        sharding.param_spec(("blocks", 0, "mlp", "fc1", "kernel"), (64, 256), {"tensor": 3})


@pytest.mark.parametrize("qkv", ["fused", pytest.param("split", marks=pytest.mark.slow)])  # split: a non-default switch
def test_tensor_parallel_step_splits_attention_by_heads_and_gathers_nothing(qkv):
    """Megatron-style: every device computes its own heads and MLP units; the only collectives of the
    whole train step are all-reduces of [batch, tokens, width] activations (no weight or qkv gathers),
    also when q, k and v are separate matmuls over the fused kernel's slices (``qkv="split"``)."""
    c = tiny_config()
    c.qkv = qkv
    c.mesh.update(data=1, fsdp=1, tensor=2)
    mesh = mesh_of((1, 1, 2))
    graphdef, fixed, state = train_state.create_train_state(c, mesh)
    step = train.make_train_step(c, graphdef, fixed, train.build_diffusion(c), mesh)
    _, _, batch = tiny_problem()
    hlo = step.lower(state, sharding.global_batch(batch, mesh)).compile().as_text()
    collectives = re.findall(r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(", hlo)
    assert collectives and {kind for _, kind in collectives} == {"all-reduce"}
    assert {shape.split("{")[0] for shape, _ in collectives} == {"f32[16,16,64]"}  # batch 16, 4x4 tokens, width 64
    # Attention logits per device: 2 of the 4 heads.
    assert re.search(r"f32\[16,2,16,16\]\S* dot\(", hlo)


def test_sharded_init_equals_the_unsharded_one_and_the_step_keeps_its_layout():
    """One jitted initialiser with output shardings (``train_state.on_mesh``): the values of the eager, unsharded
    path and of ``sharding.create_sharded_state`` (the former path), laid out by the rules, on a (2, 2, 2) mesh."""
    c = tiny_config()
    c.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = mesh_of((2, 2, 2))
    graphdef, fixed, state = train_state.create_train_state(c, mesh)
    _, _, eager = train_state.create_train_state(c)
    _, init, _ = train_state._initializer(c)
    former, shardings = sharding.create_sharded_state(lambda: init()[1], mesh)
    values = lambda tree: [np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                                      else a) for a in jax.tree.leaves(tree)]
    assert jax.tree.structure(state) == jax.tree.structure(eager) == jax.tree.structure(former)
    for a, b, e in zip(values(state), values(former), values(eager)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)  # jit vs eager: one ulp where XLA fuses
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    step = train.make_train_step(c, graphdef, fixed, train.build_diffusion(c), mesh, state)
    _, _, batch = tiny_problem()
    new_state, _ = step(state, sharding.global_batch(batch, mesh))
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(new_state), jax.tree.leaves(shardings)))


def test_optimizer_and_ema_follow_params_step_and_rng_replicated(abstract_state):
    mesh = mesh_of((2, 2, 2))
    shardings = sharding.train_state_shardings(abstract_state, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract_state)
    params = jax.tree.leaves(shardings.params)
    adam = shardings.opt_state[0]
    for mirror in (adam.mu, adam.nu, shardings.ema_params):
        assert jax.tree.leaves(mirror) == params
    assert adam.count.spec == shardings.step.spec == shardings.rng.spec == P()
    assert any(s.spec != P() for s in params)


def test_mesh_sizes_and_axis_types():
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices("cpu"))
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"fsdp": 8}, 8) == (1, 8, 1)


@pytest.mark.parametrize("config, match", [
    ({"data": 3, "fsdp": -1}, "does not divide 8"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 0}, "must be positive"),
    ({"data": 2, "fsdp": 2}, "uses 4 devices but there are 8"),
    ({"data": -1, "model": 2}, "unknown axes"),
])
def test_bad_mesh_is_rejected(config, match):
    with pytest.raises(ValueError, match=match):
        sharding.create_mesh(config, jax.devices("cpu"))


def test_global_batch_is_split_over_data_and_fsdp():
    mesh = mesh_of((2, 2, 2))
    batch = {"image": np.arange(8 * 2 * 2 * 1, dtype=np.float32).reshape(8, 2, 2, 1), "label": np.arange(8)}
    arrays = sharding.global_batch(batch, mesh)
    for name, array in arrays.items():
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), array.ndim)
        np.testing.assert_array_equal(np.asarray(array), batch[name])
        assert array.addressable_shards[0].data.shape[0] == 2  # 4 batch shards, each on 2 tensor devices
    assert sharding.process_batch_size(16, mesh) == 16
    with pytest.raises(ValueError, match="divisible by data x fsdp = 4"):
        sharding.process_batch_size(10, mesh)
    with pytest.raises(ValueError, match=r"batch\['label'\] has leading size 6.*4 batch shards"):
        sharding.global_batch({"label": np.arange(6)}, mesh)


@pytest.mark.parametrize("overrides, match", [
    (dict(mesh=dict(data=2, fsdp=1, tensor=4)), r"num_heads 6 must be divisible by mesh.tensor 4"),
    (dict(mesh=dict(data=-1, fsdp=1, tensor=1), batch_size=12), r"batch_size 12 must be divisible by data x fsdp = 8"),
])
def test_config_that_does_not_fit_the_mesh_is_rejected(overrides, match):
    c = tiny_config()
    c.model.update(name="DiT-S/2")  # 6 heads
    c.mesh.update(overrides["mesh"])
    c.train.batch_size = overrides.get("batch_size", 16)
    with pytest.raises(ValueError, match=match):
        sharding.check_config(c, 8)


CLUSTER_ENV = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
               "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
               "JAX_COORDINATOR_PORT", "GCE_METADATA_IP")


@pytest.fixture
def no_cluster(monkeypatch):
    for name in CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_outside_a_cluster_nothing_is_detected(no_cluster):
    assert sharding.detect_cluster() == (None, None, None, None)
    # Explicit values are kept as given.
    assert sharding.detect_cluster("host:1234", 2, 1) == ("host:1234", 2, 1, None)


def test_slurm_is_detected_by_jax(no_cluster):
    no_cluster.setenv("SLURM_JOB_ID", "42")
    no_cluster.setenv("SLURM_STEP_NODELIST", "node[003-004]")
    no_cluster.setenv("SLURM_NTASKS", "2")
    no_cluster.setenv("SLURM_PROCID", "1")
    no_cluster.setenv("SLURM_LOCALID", "0")
    # JAX's Slurm port: 42 mod 4096 in the top 4096 ports; one process per local device (id = local id).
    assert sharding.detect_cluster() == (f"node003:{42 % 4096 + 65536 - 4096}", 2, 1, [0])


def test_a_cloud_tpu_vm_slice_is_detected_through_the_metadata_server(no_cluster):
    """Worker 1 of a 2-worker ``gcloud compute tpus`` slice: no environment variable says so, only
    the GCE metadata server (here a fake one) does; the coordinator is worker 0's address."""
    from jax._src import cloud_tpu_init
    from jax._src.clusters import cloud_tpu_cluster

    server = FakeMetadataServer(tpu_vm_metadata(1, 2))
    try:
        no_cluster.setenv("GCE_METADATA_IP", server.address)
        no_cluster.delenv("TPU_SKIP_MDS_QUERY", raising=False)  # set by JAX here: this CPU machine has no TPU chips
        # What JAX decides at import on a machine with TPU chips (tests/test_launch.py's fake pod starts it so).
        for module in (cloud_tpu_init, cloud_tpu_cluster):
            no_cluster.setattr(module, "running_in_cloud_tpu_vm", True)
        assert sharding.detect_cluster() == ("127.0.0.1:8482", 2, 1, None)
        no_cluster.setenv("JAX_COORDINATOR_PORT", "9999")
        assert sharding.detect_cluster()[0] == "127.0.0.1:9999"
    finally:
        server.close()


@pytest.mark.parametrize("chips, platforms_env, configured, required", [
    (4, None, None, True),        # TPU chips, no libtpu (JAX would fall back to the CPU): require the TPU
    (0, None, None, False),       # a CPU machine
    (4, "cpu", None, False),      # the user's explicit choice
    (4, None, "tpu,cpu", False),  # JAX's own choice with libtpu present (a failing TPU is already an error)
])
def test_attached_tpu_chips_are_required(monkeypatch, chips, platforms_env, configured, required):
    from jax._src import hardware_utils

    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (chips, None))
    if platforms_env is None:
        monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    else:
        monkeypatch.setenv("JAX_PLATFORMS", platforms_env)
    saved, update = jax.config.jax_platforms, jax.config.update
    update("jax_platforms", configured)  # the devices are up already: only the value changes, restored below
    updates = []
    try:
        with monkeypatch.context() as m:
            m.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
            sharding._require_attached_tpus()
    finally:
        update("jax_platforms", saved)
    assert updates == ([("jax_platforms", "tpu")] if required else [])


@pytest.mark.slow
def test_attached_tpu_chips_are_required_instead_of_a_silent_cpu_fallback(tmp_path):
    """A machine with TPU chips (fake ones in /sys) but no libtpu (a CPU-only jax in the venv): JAX
    alone warns and trains on the CPU; after ``initialize_distributed`` the first use of the devices
    fails with JAX's error instead. An explicit ``JAX_PLATFORMS`` is obeyed."""
    chips = fake_tpu_chips(tmp_path / "pci")
    if chips is None:
        pytest.skip("this machine refuses unprivileged user and mount namespaces (unshare -rm): no fake TPU chips")
    env = {k: v for k, v in os.environ.items() if k not in (*CLUSTER_ENV, "JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY")}
    env["PYTHONPATH"] = str(ROOT)
    program = "from dit_jax import sharding; {}; import jax; print(jax.default_backend(), jax.device_count())"

    def run(code, **extra):
        return subprocess.run([*chips, sys.executable, "-c", program.format(code)], env={**env, **extra}, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    alone = run("None")
    assert alone.returncode == 0 and alone.stdout.split()[0] == "cpu", alone.stderr[-3000:]
    assert "A Google TPU may be present on this machine" in alone.stderr  # JAX's warning, easy to miss in a log
    guarded = run("sharding.initialize_distributed()")
    assert guarded.returncode != 0 and "Unable to initialize backend 'tpu'" in guarded.stderr, guarded.stderr[-3000:]
    chosen = run("sharding.initialize_distributed()", JAX_PLATFORMS="cpu")
    assert chosen.returncode == 0 and chosen.stdout.split()[0] == "cpu", chosen.stderr[-3000:]


def test_single_process_initialisation_is_a_no_op():
    sharding.initialize_distributed()
    sharding.initialize_distributed()
    assert not jax.distributed.is_initialized()
    assert sharding.is_main_process()


def run_process(process_id: int, port: str) -> None:
    """One of two processes: its half of the batch, one step on a (2, 2, 2) mesh across both."""
    sharding.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
    init_state, step, batch = tiny_problem()
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    n = sharding.process_batch_size(len(batch["label"]), mesh)
    local = {name: value[process_id * n:(process_id + 1) * n] for name, value in batch.items()}
    state, shardings = sharding.create_sharded_state(init_state, mesh)
    sharded_step = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None))
    _, metrics = sharded_step(state, sharding.global_batch(local, mesh))
    print(json.dumps({"process": jax.process_index(), "main": sharding.is_main_process(), "local_batch": n,
                      "devices": jax.device_count(), "loss": float(metrics["loss"]),
                      "grad_norm": float(metrics["grad_norm"])}))


def test_two_processes_match_one_device(setup):
    """Two processes of 4 CPU devices each feed their own half of the batch: same step as one device."""
    ref = setup[-1][0]
    port = free_port()
    outputs = run_processes([[sys.executable, __file__, str(i), port] for i in range(2)], timeout=300)
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert [(r["process"], r["main"], r["local_batch"], r["devices"]) for r in results] == [(0, True, 8, 8),
                                                                                              (1, False, 8, 8)]
    for r in results:
        np.testing.assert_allclose([r["loss"], r["grad_norm"]], [ref["loss"], ref["grad_norm"]], rtol=1e-5)


if __name__ == "__main__":
    run_process(int(sys.argv[1]), sys.argv[2])


def test_gpu_initialiser_draws_the_same_values_and_falls_back_when_the_kernel_is_missing(monkeypatch, caplog):
    """``train_state._run_initializer`` on a (faked) GPU: inside the threefry-kernel context the replicated state equals
    the plain jit's; a kernel that fails to lower falls back to the expanded draw with one warning; a sharded
    layout never enters the kernel's context (the partitioner cannot split its custom call)."""
    import contextlib

    from jax._src import config as jax_config

    c = tiny_config()
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    mesh = mesh_of((8, 1, 1))
    _, init, (_, abstract) = train_state._initializer(c)
    shardings = jax.tree.map(lambda a: a.sharding, train_state._place(abstract, mesh))
    plain = jax.jit(lambda: init()[1], out_shardings=shardings)()
    values = lambda tree: [np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                                      else a) for a in jax.tree.leaves(tree)]
    monkeypatch.setattr(train_state.jax, "default_backend", lambda: "gpu")
    entered, original = [], jax_config.threefry_gpu_kernel_lowering

    @contextlib.contextmanager
    def kernel(on):
        entered.append(on)
        with original(on):
            yield

    monkeypatch.setattr(train_state.jax_config, "threefry_gpu_kernel_lowering", kernel)
    for a, b in zip(values(train_state._run_initializer(lambda: init()[1], shardings)), values(plain)):
        np.testing.assert_array_equal(a, b)
    assert entered == [True]

    @contextlib.contextmanager
    def missing(on):
        raise NotImplementedError("no cu_threefry2x32 here\nsecond line")
        yield

    monkeypatch.setattr(train_state.jax_config, "threefry_gpu_kernel_lowering", missing)
    with caplog.at_level("WARNING"):
        state = train_state._run_initializer(lambda: init()[1], shardings)
    assert [r.getMessage() for r in caplog.records if "threefry" in r.getMessage()] == [
        "the GPU threefry kernel is unavailable (no cu_threefry2x32 here); initialising with XLA's expanded random "
        "numbers (a slower compile)"]
    for a, b in zip(values(state), values(plain)):
        np.testing.assert_array_equal(a, b)

    entered.clear()
    monkeypatch.setattr(train_state.jax_config, "threefry_gpu_kernel_lowering", kernel)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    sharded = jax.tree.map(lambda a: a.sharding, train_state._place(abstract, mesh_of((2, 2, 2))))
    train_state._run_initializer(lambda: init()[1], sharded)
    assert entered == []
