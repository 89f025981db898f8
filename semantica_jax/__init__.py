"""semantica_jax: pretraining Semantica, an image-conditioned pixel diffusion model, in JAX/Flax."""

__version__ = "0.1.0"
