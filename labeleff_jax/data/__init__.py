"""Input side of labeleff_jax: dataset constants, per-example preprocessing and the grain pipeline."""
