"""labeleff_jax: label-efficient deep learning on multimodal Earth-observation data (ben-ge), in JAX/Flax."""

__version__ = "0.1.0"
