"""Scale-out: multi-host decision, ICI x DCN meshes, per-process batches, remat policies, the golden
partition specs of the base config, and an ahead-of-time compile for a TPU topology.

Golden files: tests/golden/partition_specs_*.txt. After an intended sharding change, regenerate
them and review the diff:
  SEMANTICA_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_scale.py -k golden
The TPU tests need libtpu (`pip install 'jax[tpu]==0.10.2'`) and skip, saying so, without it.
"""
import importlib.util
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from semantica_jax import config_lib, distributed, sharding, train
from semantica_jax.models import layers, unet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
UPDATE_GOLDEN = os.environ.get("SEMANTICA_UPDATE_GOLDEN") == "1"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


base_experiment = _load("experiments/semantica_base.py", "semantica_base")
compile_for = _load("launch/compile_for.py", "compile_for")


def _libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


needs_libtpu = pytest.mark.skipif(
    not _libtpu_available(), reason="libtpu is not installed (pip install 'jax[tpu]==0.10.2')"
)
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="the CUDA PJRT plugin is not installed (pip install jax-cuda12-plugin==0.10.2)",
)


# ============================================================================ multi-host decision
@pytest.mark.parametrize("env, multihost", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5litepod-16"}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}, True),
    ({"TPU_PROCESS_ADDRESSES": "h0:8476,h1:8476"}, True),
    ({"MEGASCALE_NUM_SLICES": "1"}, False),
    ({"MEGASCALE_NUM_SLICES": "2"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, False),  # batch script, no srun
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"}, False),
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_NUM_TASKS": "2"}, True),
    ({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, True),
    ({"SEMANTICA_DISTRIBUTED": "1"}, True),
    ({"SEMANTICA_DISTRIBUTED": "0", "TPU_WORKER_HOSTNAMES": "a,b"}, False),
])
def test_multihost_decision(env, multihost):
    assert (distributed.multihost_reason(env) is not None) == multihost


def test_multihost_decision_errors_name_the_variable():
    with pytest.raises(ValueError, match="SEMANTICA_DISTRIBUTED='maybe'"):
        distributed.multihost_reason({"SEMANTICA_DISTRIBUTED": "maybe"})
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS='x'"):
        distributed.multihost_reason({"SLURM_STEP_NODELIST": "n1", "SLURM_STEP_NUM_TASKS": "x"})


def test_maybe_initialize_only_when_multihost(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.maybe_initialize({"TPU_WORKER_HOSTNAMES": "localhost"}) is False
    assert calls == []
    assert distributed.maybe_initialize({"SEMANTICA_DISTRIBUTED": "1"}) is True
    assert calls == [{}]  # coordinator, count and id from the cluster environment
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.maybe_initialize(env) is True
    assert calls[-1] == {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID is not set"):
        distributed.maybe_initialize({"JAX_COORDINATOR_ADDRESS": "h0:1", "JAX_NUM_PROCESSES": "2"})


# ============================================================================ mesh shapes
def _mesh_config(**kw):
    c = config_lib.default_config().mesh
    for k, v in kw.items():
        c[k] = v
    return c


def test_resolve_mesh_shape_ici_and_dcn():
    s = sharding.resolve_mesh_shape(_mesh_config(), 8)
    assert (s.ici, s.dcn, s.shape) == ((8, 1, 1), (1, 1, 1), (8, 1, 1))
    s = sharding.resolve_mesh_shape(_mesh_config(data=1, fsdp=-1), 512, num_granules=2)
    assert (s.ici, s.dcn, s.shape) == ((1, 256, 1), (2, 1, 1), (2, 256, 1))
    s = sharding.resolve_mesh_shape(_mesh_config(data=2, fsdp=2, model=2, dcn_data=1, dcn_fsdp=-1), 32, 4)
    assert s.shape == (2, 8, 2)
    # A config written before the DCN fields existed.
    legacy = ml_collections.ConfigDict({"data": 4, "fsdp": 2, "model": 1})
    assert sharding.resolve_mesh_shape(legacy, 8).shape == (4, 2, 1)


@pytest.mark.parametrize("kw, devices, granules, match", [
    (dict(data=-1, fsdp=-1), 8, 1, r"at most one of \['data', 'fsdp', 'model'\] may be -1"),
    (dict(dcn_data=-1, dcn_fsdp=-1), 8, 1, r"at most one of \['dcn_data', 'dcn_fsdp', 'dcn_model'\]"),
    (dict(data=3), 8, 1, r"config.mesh .*'data': 3.* multiplies to 3, but there are 8 devices"),
    (dict(data=-1, fsdp=3), 8, 1, "8 devices cannot be split"),
    (dict(dcn_data=1), 16, 2, "there are 2 slices/hosts"),
    (dict(model=0), 8, 1, r"config.mesh.model=0 must be a positive size or -1"),
])
def test_resolve_mesh_shape_errors_name_fields(kw, devices, granules, match):
    with pytest.raises(ValueError, match=match):
        sharding.resolve_mesh_shape(_mesh_config(**kw), devices, granules)


def _fake_devices(n, *, slices=1, processes=1, platform="cpu"):
    return [types.SimpleNamespace(id=i, platform=platform, device_kind="fake",
                                  slice_index=i * slices // n, process_index=i * processes // n)
            for i in range(n)]


def test_hybrid_device_array_puts_slices_outermost():
    devs = _fake_devices(16, slices=2)
    arr = sharding.device_array(_mesh_config(), devs)  # dcn_data=-1 -> 2 slices on 'data'
    assert arr.shape == (16, 1, 1)
    assert [d.slice_index for d in arr[:8].flat] == [0] * 8 and [d.slice_index for d in arr[8:].flat] == [1] * 8
    arr = sharding.device_array(_mesh_config(data=2, fsdp=4, dcn_data=1, dcn_fsdp=-1), devs)
    assert arr.shape == (2, 8, 1)
    assert {d.slice_index for d in arr[:, :4].flat} == {0} and {d.slice_index for d in arr[:, 4:].flat} == {1}
    # GPU hosts (one process each) are the granules when devices carry no slice ids.
    gpus = _fake_devices(16, processes=2, platform="gpu")
    for d in gpus:
        del d.slice_index
    assert sharding.device_granules(gpus)[0] == "process_index"
    arr = sharding.device_array(_mesh_config(data=1, fsdp=-1), gpus)
    assert arr.shape == (2, 8, 1) and {d.process_index for d in arr[1].flat} == {1}
    # A single TPU slice over many hosts is one granule: DCN sizes resolve to 1.
    assert sharding.device_granules(_fake_devices(16, processes=4, platform="tpu"))[0] == ""


def test_create_mesh_on_fake_cpu_devices():
    mesh = sharding.create_mesh(_mesh_config())
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
    mesh = sharding.create_mesh(_mesh_config(data=2, fsdp=2, model=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert "mesh (data=2, fsdp=2, model=2) over 8" in sharding.describe_mesh(mesh)


# ============================================================================ per-process batches
class _FakeMesh:
    """What per_process_batch_size reads of a Mesh, over fake multi-process devices."""

    def __init__(self, shape, processes):
        devs = _fake_devices(int(np.prod(shape)), processes=processes)
        self.devices = np.asarray(devs, dtype=object).reshape(shape)
        self.axis_names = sharding.MESH_AXES
        self.shape = dict(zip(sharding.MESH_AXES, shape))


def test_per_process_batch_size():
    mesh = sharding.create_mesh(_mesh_config(data=4, fsdp=2))
    assert sharding.per_process_batch_size(16, mesh) == 16  # one process holds every shard
    with pytest.raises(ValueError, match=r"config.batch_size=12 is not divisible by .* data\*fsdp=4\*2=8"):
        sharding.per_process_batch_size(12, mesh)
    assert sharding.per_process_batch_size(64, _FakeMesh((8, 2, 1), processes=4)) == 16
    # Batch shards over 2 rows of (data) but 4 processes along 'model': indivisible by processes ...
    model_across_hosts = _FakeMesh((2, 1, 8), processes=4)
    with pytest.raises(ValueError, match="config.batch_size=2 is not divisible by the process count 4"):
        sharding.per_process_batch_size(2, model_across_hosts)
    # ... and even when it divides, two processes would need the same rows.
    with pytest.raises(ValueError, match="keep config.mesh.model groups inside one host"):
        sharding.per_process_batch_size(8, model_across_hosts)


# ============================================================================ remat policies
def _checkpoint_policies(jaxpr) -> list:
    """The `policy` of every checkpoint (remat) equation, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat2"):  # jax.checkpoint's primitive
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _checkpoint_policies(inner)
    return found


def test_remat_policy_option():
    c = config_lib.default_config().model
    c.remat_policy = "sometimes"
    with pytest.raises(ValueError, match=r"config.model.remat_policy='sometimes'"):
        unet.unet_from_config(c)
    model = unet.UNet(channels=(8,), num_res_blocks=1, num_heads=2, attn_resolution=8)
    x, logsnr, tokens = jnp.ones((2, 8, 8, 3)), jnp.zeros((2,)), jnp.ones((2, 3, 4))
    args = (x, logsnr, tokens, tokens[:, 0], None)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, train=False))

    def grad_jaxpr(m):
        loss = lambda p: jnp.sum(m.apply(p, *args, train=True) ** 2)
        return jax.make_jaxpr(jax.grad(loss))(params).jaxpr

    assert _checkpoint_policies(grad_jaxpr(model)) == []
    for name, policy in layers.REMAT_POLICIES.items():
        # One rematerialised block per transformer block (down, mid, 2x up), with the policy.
        policies = _checkpoint_policies(grad_jaxpr(model.clone(remat=True, remat_policy=name)))
        assert len(policies) >= 4 and all(p is policy for p in policies), name


# ============================================================================ base config variants
def test_base_fsdp_variant():
    c = base_experiment.get_config("size=L,fsdp")
    assert (c.model.size, c.model.dtype, c.model.remat) == ("L", "bfloat16", True)
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.model, c.mesh.dcn_data) == (1, -1, 1, -1)
    assert sharding.resolve_mesh_shape(c.mesh, 512, num_granules=2).shape == (2, 256, 1)
    plain = base_experiment.get_config()
    assert (plain.mesh.data, plain.mesh.fsdp, plain.model.remat) == (-1, 1, False)


# ============================================================================ golden partition specs
GOLDEN_CASES = {
    # name: (variant, config.mesh overrides on the 8 fake devices)
    "semantica_base_2x2x2": ("", dict(data=2, fsdp=2, model=2)),
    "semantica_base_L_fsdp": ("size=L,fsdp", {}),
}


def _spec(s) -> str:
    return "P(" + ", ".join(repr(tuple(a)) if isinstance(a, tuple) else repr(a) for a in s) + ")"


def _spec_lines(prefix, abstract) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return [f"{prefix}{jax.tree_util.keystr(path, simple=True, separator='/')}  "
            f"{tuple(leaf.shape)} {leaf.dtype}  {_spec(leaf.sharding.spec)}" for path, leaf in flat]


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_partition_specs(name):
    variant, mesh_kw = GOLDEN_CASES[name]
    config = base_experiment.get_config(variant)
    config.encoder.allow_random_init = True  # abstract only: no weights are read
    for k, v in mesh_kw.items():
        config.mesh[k] = v
    trainer = train.build_trainer(config)  # abstract state: no device memory
    state = trainer.abstract_state
    params_specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
    # EMA and both Adam moments are sharded exactly like the parameters.
    assert jax.tree.map(lambda x: x.sharding.spec, state.ema_params) == params_specs
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]
    assert adam and all(jax.tree.map(lambda x: x.sharding.spec, s.mu) == params_specs for s in adam)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    lines = [f"# {name}: experiments/semantica_base.py:{variant} mesh {dict(trainer.mesh.shape)}; "
             "regenerate: SEMANTICA_UPDATE_GOLDEN=1 pytest tests/test_scale.py -k golden"]
    lines += _spec_lines("batch/", trainer.abstract_batch())
    lines += _spec_lines("params/", state.params)
    lines += _spec_lines("encoder/", trainer.abstract_enc_params)
    text = "\n".join(lines) + "\n"
    path = os.path.join(GOLDEN_DIR, f"partition_specs_{name}.txt")
    if UPDATE_GOLDEN:
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    assert os.path.exists(path), f"{path} missing: run with SEMANTICA_UPDATE_GOLDEN=1 to create it"
    with open(path) as f:
        golden = f.read()
    if golden != text:
        old, new = set(golden.splitlines()), set(text.splitlines())
        diff = [f"- {l}" for l in sorted(old - new)][:20] + [f"+ {l}" for l in sorted(new - old)][:20]
        pytest.fail(f"partition specs differ from {path} (SEMANTICA_UPDATE_GOLDEN=1 to accept):\n"
                    + "\n".join(diff))
    assert "batch/cond" in text and "P(('data', 'fsdp'))" in text


# ============================================================================ AOT compile targets
def test_target_mapping():
    t = compile_for.target_for("v5e-256")
    assert (t.topology, t.num_devices, t.wrap, t.chips_per_host_bounds) == (
        "v5e:16x16", 256, (True, True, False), (2, 2, 1))
    assert compile_for.target_for("v5litepod-8").chips_per_host_bounds == (2, 4, 1)
    t = compile_for.target_for("v4-64")
    assert (t.topology, t.num_devices, t.chip_config_name, t.wrap) == (
        "v4:2x4x4", 32, "megacore", (False,) * 3)
    t = compile_for.target_for("v5p-128")
    assert (t.topology, t.num_devices, t.wrap, t.hbm_bytes) == ("v5:4x4x4", 64, (True,) * 3, 95 * 2**30)
    assert compile_for.target_for("v6e-64").topology == "v6e:8x8"
    t = compile_for.target_for("8xH100")
    assert (t.name, t.platform, t.topology, t.num_devices) == ("h100-8", "cuda", "1x1x8", 8)
    assert compile_for.target_for("h100-16").topology == "1x2x8"
    for bad, match in [("v5e-3", r"v5e slices have \[1, 4, 8"), ("v4-7", "TensorCores"),
                       ("tpu-8", "unknown target"), ("h100-4", "whole 8-GPU hosts")]:
        with pytest.raises(ValueError, match=match):
            compile_for.target_for(bad)


@needs_libtpu
def test_multislice_topology_gives_a_hybrid_mesh():
    devices = compile_for.topology_devices(compile_for.target_for("v5e-16"), num_slices=2)
    mesh = sharding.create_mesh(_mesh_config(), devices)
    assert dict(mesh.shape) == {"data": 32, "fsdp": 1, "model": 1}
    assert [d.slice_index for d in mesh.devices[:16, 0, 0]] == [0] * 16
    assert [d.slice_index for d in mesh.devices[16:, 0, 0]] == [1] * 16
    assert sharding.per_process_batch_size(64, mesh) == 8  # 8 hosts of 4 chips


@needs_cuda_plugin
def test_gpu_hosts_give_a_hybrid_mesh():
    devices = compile_for.topology_devices(compile_for.target_for("h100-16"))
    mesh = sharding.create_mesh(_mesh_config(data=1, fsdp=-1), devices)  # FSDP in a host
    assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "model": 1}
    assert [d.process_index for d in mesh.devices[:, 0, 0]] == [0, 1]
    assert {d.process_index for d in mesh.devices[1].flat} == {1}
    assert sharding.per_process_batch_size(32, mesh) == 16


@needs_libtpu
def test_aot_compile_reports_a_step_that_does_not_fit():
    config = _load("experiments/semantica_tiny.py", "semantica_tiny").get_config()
    config.batch_size, config.model.channels = 65536, (16,)  # 16k examples of 16 px per chip
    config.model.patch_size = 1  # full-resolution feature maps
    config.data.image_size, config.encoder.image_size, config.model.attn_resolution = 16, 14, 16
    report = compile_for.compile_report(config, compile_for.target_for("v5e-4"))
    assert not report.fits and report.peak_bytes is None
    assert report.error.startswith("RESOURCE_EXHAUSTED: Ran out of memory on HBM")
    assert "DOES NOT FIT: RESOURCE_EXHAUSTED" in report.text()
    assert "| v5e-4 | 4 / 1 | 4×1×1 | 16384 | — | no (compile OOM) |" in report.markdown_row()


@needs_libtpu
def test_aot_compile_and_plan_tiny_config_for_tpu(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "compile_for.py"),
         f"--config={REPO}/experiments/semantica_tiny.py", "--topology=v5e-16", f"--json={out}",
         "--markdown", "--plan", "--plan_probes=1,2", "--plan_max_batch=2",
         # Compile time tracks model size per device: one UNet level, 16 px, 1-2 examples per chip.
         "--config.batch_size=16", "--config.model.channels=(16,)", "--config.data.image_size=16",
         "--config.model.patch_size=1",
         "--config.encoder.image_size=14", "--config.model.attn_resolution=16"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads(out.read_text())["plan"]
    report = plan["compiles"][0]  # the compile at 1 example per chip
    assert (report["target"], report["platform"], report["topology"]) == ("v5e-16", "tpu", "v5e:4x4")
    assert (report["devices"], report["processes"], report["batch_per_process"]) == (16, 4, 4)
    assert report["mesh"] == {"data": 16, "fsdp": 1, "model": 1}
    assert report["fits"] and 0 < report["peak_bytes"] < report["hbm_bytes"]
    assert report["flops_compiled"] > 0
    assert report["while_loops"] == 0  # unrolled blocks: the compiled FLOPs count is complete
    # The program's all-reduces carry the float32 gradient the roofline charges for (plus the
    # loss and metrics): the analytic traffic and the compiled one agree.
    (grad,) = plan["collectives"]
    assert grad["bytes"] == 4 * report["params"] and grad["ici_group"] == 16
    ops, nbytes = report["collectives"]["all-reduce"]
    assert ops >= 1 and 1.0 <= nbytes / grad["bytes"] < 1.1
    # Two compiled rows (1 and 2 per chip), both fitting; per-device FLOPs grow with the batch.
    rows = plan["rows"]
    assert [(r["batch_per_device"], r["global_batch"], r["compiled"]) for r in rows] == [
        (1, 16, True), (2, 32, True)]
    assert all(r["fits"] for r in rows) and rows[1]["flops"] > rows[0]["flops"]
    assert plan["recommended"] in (1, 2) and plan["config_batch"] == 16
    assert "plan       v5e-16: data-parallel over 16" in proc.stdout
    assert "config     global batch 16 (1 per device)" in proc.stdout
    assert "| v5e-16 | data-parallel over 16 |" in proc.stdout


# ============================================================================ batch rescaling
def test_scale_to_batch_keeps_the_run_in_pairs():
    c = config_lib.default_config()
    c.batch_size, c.optimizer.learning_rate, c.optimizer.warmup_steps = 256, 1e-4, 5000
    c.optimizer.ema_decay, c.train.num_steps = 0.9999, 500_000
    config_lib.scale_to_batch(c, 1024)
    assert c.batch_size == 1024 and c.optimizer.learning_rate == pytest.approx(2e-4)  # x sqrt(4)
    assert (c.optimizer.warmup_steps, c.train.num_steps) == (1250, 125_000)  # same pairs
    assert c.optimizer.ema_decay == pytest.approx(0.9999**4)  # same EMA horizon in pairs
    config_lib.scale_to_batch(c, 256)  # and back
    assert (c.optimizer.learning_rate, c.optimizer.warmup_steps, c.train.num_steps) == (
        pytest.approx(1e-4), 5000, 500_000)
    with pytest.raises(config_lib.ConfigError, match="batch_size=0"):
        config_lib.scale_to_batch(c, 0)


def test_base_config_batch_and_topology_variants():
    c = base_experiment.get_config()
    assert (c.batch_size, c.optimizer.learning_rate, c.train.num_steps) == (1024, pytest.approx(2e-4), 125_000)
    assert c.batch_size * c.train.num_steps == 256 * 500_000  # the reference run's 128 M pairs
    for topology, batch in base_experiment.PLANNED_BATCH.items():
        t = base_experiment.get_config(f"topology={topology}")
        assert t.batch_size == batch and batch % compile_for.target_for(topology).num_devices == 0
        assert t.batch_size * t.train.num_steps == 128_000_000
    ref = base_experiment.get_config("batch=256")
    assert (ref.optimizer.learning_rate, ref.optimizer.warmup_steps, ref.optimizer.ema_decay) == (1e-4, 5000, 0.9999)
    for bad, match in [("topology=v9-8", "planned: "), ("size=L,topology=v5e-256", "size=S only"),
                       ("batch=64,topology=v4-64", "not both")]:
        with pytest.raises(ValueError, match=match):
            base_experiment.get_config(bad)
