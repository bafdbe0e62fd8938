"""Input side of labeleff_jax: dataset facts (constants), label subsets, per-example transforms, opening the
prepared splits and the grain pipeline that turns them into batches."""
