"""Test set-up: 8 fake CPU devices, so sharding code runs as it would on a pod slice.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compiled executables are cached on disk for this session only (a fresh directory each run), so a
# program compiled by one test (or by a subprocess it starts) is not compiled again by the next.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="semantica_jax_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# Keep TensorFlow off the accelerator path and quiet; tf.data only needs the CPU.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


# The slowest files first: launch/test.sh runs files on 2 workers in this order
# (--dist loadfile --no-loadscope-reorder), so the long ones do not start last.
_SLOW_FIRST = ("test_multihost.py", "test_reliability.py", "test_study.py", "test_evaluation.py", "test_demo.py",
               "test_train.py", "test_bench.py", "test_scale.py", "test_models.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept
