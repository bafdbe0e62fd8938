"""labeleff_jax: label-efficient deep learning on multimodal Earth-observation data (ben-ge), in JAX/Flax.

Importing the package changes nothing in the process: no environment variables, no XLA flags, no
allocator settings. CPU-only speed-ups are opt-in (`model.conv_impl`, scripts/cpu_env.sh).
"""

__version__ = "0.4.3"
