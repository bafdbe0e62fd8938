"""Name -> component registries, so configs pick backbones, heads and models by name with clear errors."""

from typing import Any, Callable, Iterator

from labeleff_jax.config_checks import ConfigError


class Registry:
  """A mapping from names to builders that fails loudly, naming the config key and the allowed values.

  `what` is the config key the names come from (e.g. 'config.model.name'), so a typo in a config
  produces an error that says which key to fix and what it may be.
  """

  def __init__(self, what: str):
    self.what = what
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    """Decorator: registers the decorated class or function under `name`."""
    def decorate(entry):
      if name in self._entries:
        raise ValueError(f"{self.what}: {name!r} is registered twice")
      self._entries[name] = entry
      return entry
    return decorate

  def get(self, name: Any) -> Any:
    if name not in self._entries:
      raise ConfigError(f"Unknown {self.what} {name!r}; allowed values: {sorted(self._entries)}")
    return self._entries[name]

  def __contains__(self, name: Any) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._entries))

  def names(self) -> list[str]:
    return sorted(self._entries)


# Image backbones: builder(in_channels, *, width, dtype, rngs) -> module with `out_channels`,
# `feature_size(image_size)` and __call__(x [B,H,W,C]) -> feature map [B,h,w,out_channels].
BACKBONES = Registry("config.model.name (backbone)")
# Task heads: builder(task, *, in_channels, feature_size, image_size, default_dropout, dtype, rngs).
HEADS = Registry("task head (config.tasks[i].head)")
# Whole models: builder(config, *, rngs) -> nnx.Module.
MODELS = Registry("config.model.name")
