"""Result tables of the label-efficiency experiments: mean, std and n over seeds, as CSV, markdown and plots.

A record is one finished run: its identifying keys (e.g. method, fraction, seed) plus its metrics. Cells
aggregate the records that share the grouping keys. `std` is the sample standard deviation over seeds
(ddof=1, what "mean +- std over 3 seeds" means in papers); with a single seed it is undefined and left
empty rather than reported as 0.
"""

import csv
import math
import pathlib
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top


def cell(values: Sequence[float]) -> dict:
  """{'mean', 'std', 'n'} of the finite values of one table cell (std NaN below two values)."""
  finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
  if finite.size == 0:
    return {"mean": math.nan, "std": math.nan, "n": 0}
  std = float(np.std(finite, ddof=1)) if finite.size > 1 else math.nan
  return {"mean": float(np.mean(finite)), "std": std, "n": int(finite.size)}


def aggregate(records: Sequence[Mapping], by: Sequence[str], metrics: Sequence[str]) -> list[dict]:
  """One row per distinct value of the `by` keys (first-seen order): the keys plus a cell per metric.

  A record that lacks a metric contributes nothing to that cell, so `n` counts the seeds that really
  produced it (a complete table has n equal to the number of seeds everywhere).
  """
  groups: dict[tuple, list[Mapping]] = {}
  for record in records:
    missing = [key for key in by if key not in record]
    if missing:
      raise KeyError(f"record {dict(record)} lacks the grouping key(s) {missing}")
    groups.setdefault(tuple(record[key] for key in by), []).append(record)
  rows = []
  for values, members in groups.items():
    row = dict(zip(by, values))
    for metric in metrics:
      row[metric] = cell([member[metric] for member in members if metric in member])
    rows.append(row)
  return rows


def _number(value: float) -> str:
  return "" if value is None or not math.isfinite(value) else repr(float(value))


def write_csv(rows: Sequence[Mapping], by: Sequence[str], metrics: Sequence[str],
              path: str | pathlib.Path) -> pathlib.Path:
  """Long-format CSV: the grouping keys, then `METRIC_mean`, `METRIC_std`, `METRIC_n` per metric."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  header = list(by) + [f"{metric}_{part}" for metric in metrics for part in ("mean", "std", "n")]
  with path.open("w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(header)
    for row in rows:
      line = [row[key] for key in by]
      for metric in metrics:
        line += [_number(row[metric]["mean"]), _number(row[metric]["std"]), row[metric]["n"]]
      writer.writerow(line)
  return path


def read_csv(path: str | pathlib.Path) -> list[dict]:
  """The rows of a `write_csv` file as dicts of strings (for tests and for re-plotting)."""
  with pathlib.Path(path).open(newline="") as handle:
    return list(csv.DictReader(handle))


def format_cell(value: Mapping, *, scale: float = 100.0, digits: int = 1) -> str:
  """'mean ± std' in the table's unit (percent by default); 'mean' alone when std is undefined."""
  if value["n"] == 0:
    return "–"
  text = f"{value['mean'] * scale:.{digits}f}"
  if math.isfinite(value["std"]):
    text += f" ± {value['std'] * scale:.{digits}f}"
  return text


def markdown_table(rows: Sequence[Mapping], by: Sequence[str], metrics: Sequence[str], *,
                   headers: Mapping[str, str] | None = None, scale: float = 100.0, digits: int = 1) -> str:
  """A markdown table with one line per row: the grouping keys, then 'mean ± std' per metric, then n."""
  headers = dict(headers or {})
  names = [headers.get(key, key) for key in list(by) + list(metrics)] + ["n"]
  lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
  for row in rows:
    counts = sorted({row[metric]["n"] for metric in metrics})
    cells = [str(row[key]) for key in by] + [format_cell(row[metric], scale=scale, digits=digits)
                                             for metric in metrics]
    cells.append("/".join(map(str, counts)))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def records_markdown(records: Sequence[Mapping], keys: Sequence[str], metrics: Sequence[str], *,
                     headers: Mapping[str, str] | None = None, scale: float = 100.0, digits: int = 1) -> str:
  """Single runs as a markdown table: the identifying keys, then each metric's value (no aggregation)."""
  headers = dict(headers or {})
  names = [headers.get(key, key) for key in list(keys) + list(metrics)]
  lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
  for record in records:
    cells = [str(record[key]) for key in keys]
    for metric in metrics:
      value = record.get(metric)
      cells.append("–" if value is None else f"{value * scale:.{digits}f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def pivot_markdown(rows: Sequence[Mapping], row_key: str, column_key: str, metric: str, *,
                   headers: Mapping[str, str] | None = None, scale: float = 100.0, digits: int = 1) -> str:
  """One metric as a grid: a line per `row_key` value, a column per `column_key` value ('mean ± std')."""
  headers = dict(headers or {})
  row_values = list(dict.fromkeys(row[row_key] for row in rows))
  column_values = list(dict.fromkeys(row[column_key] for row in rows))
  lookup = {(row[row_key], row[column_key]): row[metric] for row in rows}
  names = [headers.get(row_key, row_key)] + [headers.get(str(v), str(v)) for v in column_values]
  lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
  for value in row_values:
    cells = [headers.get(str(value), str(value))]
    for column in column_values:
      entry = lookup.get((value, column))
      cells.append("–" if entry is None else format_cell(entry, scale=scale, digits=digits))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_against_fraction(rows: Sequence[Mapping], metric: str, path: str | pathlib.Path, *,
                          fraction_key: str = "fraction", series_key: str = "method",
                          labels: Mapping[str, str] | None = None, ylabel: str | None = None,
                          title: str = "", scale: float = 100.0) -> pathlib.Path:
  """Metric against label fraction (log x, percent), one line per series, error bars = std over seeds."""
  labels = dict(labels or {})
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  for series in dict.fromkeys(row[series_key] for row in rows):
    points = sorted((float(row[fraction_key]), row[metric]) for row in rows if row[series_key] == series)
    x = np.array([fraction * 100 for fraction, _ in points])
    mean = np.array([value["mean"] * scale for _, value in points])
    std = np.array([value["std"] * scale if math.isfinite(value["std"]) else 0.0 for _, value in points])
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=labels.get(series, series))
  ax.set_xscale("log")
  fractions = sorted({float(row[fraction_key]) * 100 for row in rows})
  ax.set_xticks(fractions)
  ax.set_xticklabels([f"{value:g}" for value in fractions])
  ax.minorticks_off()
  ax.set_xlabel("labelled training examples (%)")
  ax.set_ylabel(ylabel or metric)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
