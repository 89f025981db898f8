"""semantica_jax: pretraining Semantica (image-conditioned pixel diffusion on web-page image pairs)."""
import os

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements():
    with open(os.path.join(_HERE, "requirements.txt")) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


_DEMO = ["gradio==6.31.0"]

setup(
    name="semantica_jax",
    version="0.1.0",
    description="JAX/Flax pretraining of Semantica: diverse image variations from web-page image pairs",
    long_description=open(os.path.join(_HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["semantica_jax", "semantica_jax.*", "data_pipeline", "data_pipeline.*",
                                    "semantica_study"]),
    install_requires=_requirements(),
    extras_require={
        # Parity tests build reference models offline with the CPU build of torch 2.13.0.
        # libtpu (via jax[tpu]) lets a test AOT-compile the tiny config for a TPU topology on CPU.
        # pytest-xdist: launch/test.sh runs the test files on 2 workers (a file stays on one worker,
        # so its module fixtures are built once).
        # selenium drives the Debian chromium + chromium-driver (setup_env.sh --apt installs them) in
        # the demo's browser test; nbclient + ipykernel execute notebooks/variations.ipynb.
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "execnet==2.1.2", "torch==2.13.0",
                 "transformers==5.24.0", "safetensors==0.8.0", "jax[tpu]==0.10.2", "prdc==0.2",
                 "scikit-learn==1.9.1", "selenium==4.51.0", "nbclient==0.11.0", "nbformat==5.11.1",
                 "ipykernel==7.4.0", *_DEMO],
        # `semantica-demo`: the browser demo of an export (Gradio; installs beside the pins above).
        "demo": _DEMO,
        # Running notebooks/variations.ipynb: its kernel, and `jupyter-execute` (nbclient).
        "notebook": ["ipykernel==7.4.0", "nbformat==5.11.1", "nbclient==0.11.0"],
        # Web-scale preprocessing; needs protobuf 6.33.6, which requirements.txt pins.
        "data": ["apache-beam[tfrecord]==2.77.0", "google-crc32c==1.9.0", "pyarrow==25.0.1"],
        # AOT compile for / run on TPU (libtpu 0.0.42.1 matches jax 0.10.2).
        "tpu": ["jax[tpu]==0.10.2"],
        "gpu": ["jax[cuda12]==0.10.2"],
        # launch/compile_for.py: AOT compile for TPU pods and H100 nodes on a CPU-only host.
        "aot": ["jax[tpu]==0.10.2", "jax-cuda12-plugin==0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "semantica-train=semantica_jax.main:run",
            "semantica-build-fmnist=data_pipeline.fashion_mnist:run",
            "semantica-build-pages=data_pipeline.build_pages:run",
            "semantica-similarity=semantica_jax.similarity:run",
            "semantica-convert-encoder=semantica_jax.convert_encoder:run",
            "semantica-export=semantica_jax.export:run",
            "semantica-eval=semantica_jax.evaluation.job:run",
            "semantica-vary=semantica_jax.vary:run",
            "semantica-study=semantica_study.cli:run",
            "semantica-demo=semantica_jax.demo:run",
        ],
    },
)
