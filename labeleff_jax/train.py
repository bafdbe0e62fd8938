"""The training engine: `train_and_evaluate(config, workdir)` runs one experiment end to end.

Read top to bottom like big_vision's train.py: setup and mesh, input, model and optimizer, sharding,
the jitted steps, checkpoint/resume, the loop, the final evaluation and the run's artefacts. Everything
an experiment varies comes from the config; this file has no experiment-specific branches.
"""

import contextlib
import dataclasses
import json
import pathlib
import threading
import time
import zlib
from typing import Any

from absl import logging
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from labeleff_jax import checkpoint as checkpoint_lib
from labeleff_jax import config_checks
from labeleff_jax import models
from labeleff_jax import objectives
from labeleff_jax import optim
from labeleff_jax import plots
from labeleff_jax import probe
from labeleff_jax import sharding
from labeleff_jax import transfer
from labeleff_jax import workdir as workdir_lib
from labeleff_jax import writers
from labeleff_jax.data import constants
from labeleff_jax.data import pipeline
from labeleff_jax.data import splits



class NonFiniteLossError(FloatingPointError):
  """Raised on the host when the training loss turns NaN or infinite."""


class RunStopped(Exception):
  """The run was asked to stop (`request_stop`, e.g. on SIGTERM) and did, after checkpointing."""


_stop_requested = threading.Event()


def request_stop() -> None:
  """Asks a running `train_and_evaluate` to stop at its next log step, after saving a checkpoint there.

  Safe to call from a signal handler (main.py calls it on SIGTERM). With several processes, the run
  stops when any of them was asked to.
  """
  _stop_requested.set()


# ---------------------------------------------------------------------------------------------------------
# Train state: (model, optimizer) split into a static graph, RNG streams and the saved arrays.
# ---------------------------------------------------------------------------------------------------------
def _split(bundle):
  graphdef, rng_state, state = nnx.split(bundle, nnx.RngState, ...)
  return graphdef, rng_state, state


def _reseed_policy(path, key, shape):
  """Per-module dropout keys: the step's key folded with a stable hash of the module path."""
  salted = jax.random.fold_in(key, zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF)
  return jax.random.split(salted, shape) if shape else salted


def _reseed(model, seed: int, step):
  """Re-derives every RNG stream from (seed, step), so a resumed run draws the same dropout masks."""
  tags = {node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}
  if tags:
    key = jax.random.fold_in(jax.random.key(seed), step)
    nnx.reseed(model, policy=_reseed_policy, **{tag: key for tag in tags})


def build_steps(graphdef, eval_graphdef, objective, schedule, seed: int, trainable):
  """The jitted train, eval and embedding steps (pure functions of the state and a global batch)."""

  def train_step(state, rng_state, batch, step):
    bundle = nnx.merge(graphdef, rng_state, state)
    model, optimizer = bundle["model"], bundle["optimizer"]
    _reseed(model, seed, step)

    def loss_fn(model):
      outputs = objective_forward(objective, model, batch)
      return objective.loss(model, outputs, batch)

    # Gradients only of what the optimizer updates (a linear probe never differentiates its backbone).
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
    (loss, aux), grads = grad_fn(model)
    optimizer.update(model, grads)
    _, _, new_state = _split(bundle)
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "learning_rate": jnp.asarray(schedule(step), jnp.float32), **aux}
    return new_state, step_metrics

  def eval_step(state, rng_state, batch):
    model = nnx.merge(eval_graphdef, rng_state, state)["model"]
    outputs = objective_forward(objective, model, batch)
    return jnp.sum(batch["valid"]), objective.eval_stats(outputs, batch), objective.predictions(outputs)

  def embed_step(state, rng_state, batch):
    model = nnx.merge(eval_graphdef, rng_state, state)["model"]
    return model.features(batch["inputs"])

  return (sharding.compile_together(jax.jit(train_step, donate_argnums=(0,)), "train step"),
          sharding.compile_together(jax.jit(eval_step), "eval step"),
          sharding.compile_together(jax.jit(embed_step), "embedding step"))


def objective_forward(objective, model, batch):
  forward = getattr(objective, "forward", None)
  return forward(model, batch) if forward is not None else model(batch["inputs"])


@dataclasses.dataclass
class TrainingSetup:
  """What a run trains: the replicated state, its RNG streams and the compiled-on-first-call steps."""
  state: Any
  rng_state: Any
  graphdef: Any
  train_step: Any
  eval_step: Any
  embed_step: Any
  num_params: int
  transfer_report: dict | None


def init_training(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, objective, *,
                  steps_per_epoch: int, total_steps: int) -> TrainingSetup:
  """Builds model (maybe loaded from `init_from`) and optimizer, replicates them on `mesh`, makes the steps."""
  model = models.create_model(config, rngs=nnx.Rngs(config.seed))
  num_params = models.count_params(model)
  transfer_report = transfer.load_pretrained(model, config)
  schedule = optim.make_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  tx = transfer.scale_backbone_updates(
      optim.make_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps), config)
  trainable = transfer.trainable_filter(config)
  # Built on the very model that was (maybe) loaded above, so loaded weights are the ones that train.
  optimizer = nnx.Optimizer(model, tx, wrt=trainable)
  bundle = {"model": model, "optimizer": optimizer}
  model.eval()
  eval_graphdef, _, _ = _split(bundle)
  model.train()
  transfer.freeze_for_probe(model, config)
  graphdef, rng_state, state = _split(bundle)
  # Parameters and optimizer state replicated on every device of the mesh; batches sharded on `data`.
  # Every process builds the same state from the seed (and the same init_from files); checked, since a
  # silent difference would train a different model on every host.
  sharding.check_same_everywhere(state, "the initial train state")
  train_step, eval_step, embed_step = build_steps(graphdef, eval_graphdef, objective, schedule,
                                                  config.seed, trainable)
  return TrainingSetup(sharding.replicate(state, mesh), sharding.replicate(rng_state, mesh), graphdef,
                       train_step, eval_step, embed_step, num_params, transfer_report)


# ---------------------------------------------------------------------------------------------------------
# Evaluation over a whole split.
# ---------------------------------------------------------------------------------------------------------
def evaluate(eval_step, state, rng_state, batches, objective) -> tuple[dict, Any]:
  """Accumulates exact whole-split metrics; returns (metrics, the first batch's inputs, labels and
  predictions as numpy arrays, for plots). Every process runs it and gets the same result."""
  accumulators = objective.new_accumulators()
  count, first = 0, None
  for batch in batches:
    valid_count, stats, predictions = eval_step(state, rng_state, batch)
    valid_count, stats = sharding.to_host((valid_count, stats))
    count += int(valid_count)
    for name, accumulator in accumulators.items():
      accumulator.update(stats[name])
    if first is None:
      first = sharding.to_host(({"inputs": batch["inputs"], "labels": batch["labels"]}, predictions))
  return {"num_examples": count, **objective.summarize(accumulators)}, first


# ---------------------------------------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       allow_config_change: bool = False) -> dict:
  """Trains, evaluates and writes every artefact of one run into `workdir`; returns the summary.

  The workdir is locked while the run lives. A workdir that holds a run of another config is refused
  (naming the keys that differ) unless `allow_config_change`, which is then recorded in
  `config_changes.jsonl`; a finished run of the same config is not run again: its summary is returned.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.get("mesh", {}).get("data", -1))
  config_checks.check(config, num_data_devices=mesh.shape["data"])
  lock = workdir_lib.WorkdirLock(workdir)
  refusal = None
  if writers.is_writer():  # process 0 owns the lock; every process learns whether it got it
    try:
      lock.acquire()
    except workdir_lib.WorkdirInUseError as error:
      refusal = error
  if sharding.any_process(refusal is not None):
    raise refusal or workdir_lib.WorkdirInUseError(f"workdir {workdir} is in use (see process 0's error)")
  # Whatever ends the run (an error, SIGTERM turned into SystemExit by main.py, Ctrl-C), the input
  # workers and the lock are released on the way out.
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(lock.release)
    return _train_and_evaluate(config, workdir, mesh, allow_config_change, cleanup)


def _check_identity(config, workdir: pathlib.Path, checkpointer, allow_config_change: bool) -> dict | None:
  """Compares the config with the one that wrote the workdir's checkpoints, before anything is written.

  Returns the finished run's summary when the workdir already holds this very run, complete.
  """
  run_identity = workdir_lib.identity(config)
  latest = checkpointer.latest_step()
  if latest is None:
    return None
  meta = checkpointer.read_meta(latest) or {}
  previous = meta.get("config")
  if previous is None:  # checkpoints of an older version, or an unreadable meta (restore will tell)
    return None
  changed = workdir_lib.differences(previous, run_identity)
  if changed and not allow_config_change:
    raise workdir_lib.ConfigChangedError(
        f"workdir {workdir} holds a run of another config (checkpoint step {latest}); changed keys:\n"
        f"{workdir_lib.describe(changed)}\nUse another --workdir for the new config, or pass "
        "--allow_config_change to continue this run with it deliberately (recorded in the workdir).")
  if changed:
    logging.warning("continuing the run in %s with a changed config (allowed):\n%s", workdir,
                    workdir_lib.describe(changed))
    record = {"resumed_at_step": latest, "changed": {key: list(pair) for key, pair in changed.items()}}
    if writers.is_writer():
      with (workdir / "config_changes.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return None
  try:
    summary = json.loads((workdir / "summary.json").read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None
  same_run = summary.get("config_fingerprint") == workdir_lib.fingerprint(run_identity)
  if same_run and summary.get("steps") == latest:
    logging.info("%s holds this run, finished at step %d: nothing to do", workdir, latest)
    return summary
  return None


def _train_and_evaluate(config, workdir: pathlib.Path, mesh, allow_config_change: bool,
                        cleanup: contextlib.ExitStack) -> dict:
  start_time = time.time()
  run_identity = workdir_lib.identity(config)
  checkpointer = checkpoint_lib.RunCheckpointer(workdir)
  finished = _check_identity(config, workdir, checkpointer, allow_config_change)
  if finished is not None:
    checkpointer.close()
    return finished
  writers.write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  synthetic_note = " (synthetic data)" if splits.is_synthetic(config) else ""

  # -- Input ----------------------------------------------------------------------------------------------
  sources = splits.open_splits(config)
  objective = objectives.make_objective(config)
  data_spec = pipeline.DataSpec.from_config(config)  # carries the labels the tasks and the probe need
  pretraining = config.get("objective", "supervised") == "contrastive"
  # Self-supervised pretraining learns from every training image; labels only feed its k-NN probe.
  train_indices = pipeline.select_indices(data_spec, sources["train"], "all" if pretraining else "labelled")
  probe_label = config_checks.probe_label(config)
  stats = pipeline.normalization_stats(data_spec, sources["train"], workdir=workdir)
  train_iter = pipeline.make_train_iterator(data_spec, sources["train"], mesh, indices=train_indices,
                                            stats=stats)
  cleanup.callback(train_iter.close)
  batch_size = data_spec.train_batch_size
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = config.train.get("max_steps", None) or config.train.num_epochs * steps_per_epoch
  logging.info("train examples %d (label fraction %s), %d steps/epoch, %d steps", len(train_indices),
               config.data.label_fraction, steps_per_epoch, total_steps)

  # -- Model, optimizer, sharded state and steps ---------------------------------------------------------
  setup = init_training(config, mesh, objective, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  num_params, transfer_report = setup.num_params, setup.transfer_report
  state, rng_state = setup.state, setup.rng_state
  train_step, eval_step, embed_step = setup.train_step, setup.eval_step, setup.embed_step

  def run_eval(split):
    """Whole-split metrics, plus the k-NN probe of the representation when the config asks for one."""
    batches = pipeline.make_eval_batches(data_spec, sources[split], mesh, stats=stats)
    result, first = evaluate(eval_step, state, rng_state, batches, objective)
    if probe_label:
      embed = lambda batch: embed_step(state, rng_state, batch)  # noqa: E731
      labelled = pipeline.select_indices(data_spec, sources["train"], "labelled")
      bank = probe.collect_features(embed, pipeline.make_eval_batches(
          data_spec, sources["train"], mesh, stats=stats), probe_label, keep_indices=labelled)
      query = probe.collect_features(embed, pipeline.make_eval_batches(
          data_spec, sources[split], mesh, stats=stats), probe_label)
      result["probe/knn_accuracy"] = probe.knn_accuracy(*bank, *query, k=config.probe.get("k", 20),
                                                        num_classes=constants.LABELS[probe_label].num_classes)
    return result, first

  # -- Checkpoints: resume from the workdir's newest intact checkpoint ------------------------------------
  start_step, pending, collapsed_at = 0, [], None
  latest = checkpointer.restore_latest(checkpoint_lib.abstract_like(nnx.to_pure_dict(state)))
  if latest is not None:
    _, pure, data_state, meta = latest
    nnx.replace_by_pure_dict(state, pure)
    train_iter.set_state(data_state)
    start_step = int(meta["step"])
    collapsed_at = meta.get("collapsed_at_step")  # a collapse before the interruption stays on record
    # The metrics of the steps since the last log point, so that the next log point averages the same
    # steps as it would have without the interruption.
    pending = [{key: np.asarray(value, dtype) for key, (value, dtype) in record.items()}
               for record in meta.get("pending_metrics", [])]
    logging.info("resumed from %s at step %d", checkpointer.directory, start_step)
  writer = writers.MetricWriter(workdir, resume_step=start_step if latest is not None else None)

  def save(step):
    unlogged = [{key: [value.item(), str(value.dtype)] for key, value in record.items()}
                for record in sharding.to_host(pending)]
    checkpointer.save(step, nnx.to_pure_dict(state), train_iter.get_state(),
                      {"step": step, "config": run_identity, "pending_metrics": unlogged,
                       "collapsed_at_step": collapsed_at,
                       "config_fingerprint": workdir_lib.fingerprint(run_identity)})

  # -- Loop -----------------------------------------------------------------------------------------------
  log_every = config.train.get("log_every_steps", 50)
  eval_every_epochs = config.train.get("eval_every_epochs", 1)
  checkpoint_every = config.train.get("checkpoint_every_steps", None) or steps_per_epoch
  train_images, train_seconds = 0, 0.0
  collapse_threshold = config.contrastive.collapse_threshold
  progress = tqdm.tqdm(total=total_steps, initial=start_step, disable=not writers.is_writer(),
                       mininterval=2.0,
                       desc="train", dynamic_ncols=True)
  step_start = time.time()
  with jax.set_mesh(mesh):
    for step in range(start_step, total_steps):
      batch = next(train_iter)
      state, step_metrics = train_step(state, rng_state, batch, jnp.asarray(step, jnp.int32))
      pending.append(step_metrics)
      done = step + 1
      if done % log_every == 0 or done == total_steps:
        fetched = sharding.to_host(pending)
        elapsed = time.time() - step_start
        # The first interval of a (re)started run includes compilation: keep it out of images/s.
        if step + 1 - len(pending) > start_step:
          train_images += len(pending) * batch_size
          train_seconds += elapsed
        for offset, values in enumerate(fetched):
          if not np.isfinite(values["loss"]):
            raise NonFiniteLossError(
                f"training loss became {values['loss']} at step {done - len(pending) + offset}: lower "
                "optimizer.learning_rate, set optimizer.grad_clip_norm, or check the inputs for NaNs")
        means = {key: float(np.mean([v[key] for v in fetched])) for key in fetched[0]}
        if "embedding_spread" in means and means["embedding_spread"] < collapse_threshold:
          collapsed_at = collapsed_at or done
          logging.warning("step %d: embeddings are collapsing (spread %.4f < %.4f): the projections "
                          "map different patches to nearly the same point", done,
                          means["embedding_spread"], collapse_threshold)
        means["images_per_second"] = len(pending) * batch_size / max(elapsed, 1e-9)
        means["epoch"] = done / steps_per_epoch
        writer.write(done, "train", means)
        progress.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{means['images_per_second']:.1f}")
        progress.update(done - progress.n)
        pending = []
        step_start = time.time()
      if done % steps_per_epoch == 0 and (done // steps_per_epoch) % eval_every_epochs == 0 \
          and done != total_steps:
        result, _ = run_eval("validation")
        writer.write(done, "validation", {**result, "epoch": done / steps_per_epoch})
        step_start = time.time()
      if done % checkpoint_every == 0 and done != total_steps:
        save(done)
      if (done % log_every == 0 and done != total_steps) and sharding.any_process(_stop_requested.is_set()):
        if done % checkpoint_every:
          save(done)
        checkpointer.wait()
        raise RunStopped(f"stopped at step {done} as asked (SIGTERM), after checkpointing that step: run "
                         "the same command again to continue")
    progress.close()
    if start_step < total_steps or latest is None:
      save(total_steps)
    checkpointer.wait()
    train_iter.close()  # its worker processes are not needed for the final evaluation

    # -- Final evaluation -----------------------------------------------------------------------------------
    final, examples = {}, None
    for split in ("validation", "test"):
      result, first = run_eval(split)
      final[split] = result
      writer.write(total_steps, split, {**result, "epoch": total_steps / steps_per_epoch})
      if split == "test":
        examples = first
  writer.close()
  checkpointer.close()

  # -- Artefacts ------------------------------------------------------------------------------------------
  summary = {
      "num_params": int(num_params),
      "steps": int(total_steps),
      "epochs": total_steps / steps_per_epoch,
      "train_examples": len(train_indices),
      "final": final,
      "main_metric": objective.main_metric,
      "wall_clock_seconds": time.time() - start_time,
      "train_images_per_second": train_images / train_seconds if train_seconds else None,
      "synthetic_data": bool(synthetic_note),
      "transfer": transfer_report,
      "config_fingerprint": workdir_lib.fingerprint(run_identity),
  }
  if pretraining:
    summary["collapsed_at_step"] = collapsed_at
  writers.write_text(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
  if writers.is_writer():
    plot_dir = workdir / "plots"
    plots.plot_curves(writers.read_metrics(workdir), plot_dir, title_suffix=synthetic_note)
    if examples is not None and objective.tasks:
      batch, predictions = examples
      plots.plot_examples(batch, predictions, objective.tasks,
                          plot_dir / "examples.png", title_suffix=synthetic_note)
  return summary
