"""Download catalogued weights: `python -m labeleff_jax.weights.fetch NAME [NAME...] --dir DIR`, or `--list`.

A download goes to DIR/<file>.partial, is checked against the catalogued SHA-256 prefix where one is
published, and only then renamed to DIR/<file> (one rename on the same file system, so atomic): a broken
or mismatching download never leaves a file under the final name, which is the only name `catalog.resolve`
and training read. A file already there that passes the check is not downloaded again.
"""

import argparse
import hashlib
import os
import pathlib
import sys
import urllib.request

from labeleff_jax.weights import catalog

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60  # per socket operation, not for the whole file: a slow but live download keeps going


class FetchError(RuntimeError):
  """A download that did not produce a verified file; the message is one line a person can act on."""


def _hash_matches(entry: catalog.WeightsEntry, path: pathlib.Path) -> bool:
  return entry.sha256_prefix is None or catalog.sha256_of(path).startswith(entry.sha256_prefix)


def download(entry: catalog.WeightsEntry, directory: os.PathLike | str, *, log=None) -> pathlib.Path:
  """Puts `entry`'s file into `directory` (see the module docstring) and returns its path."""
  log = log or (lambda message: print(message, file=sys.stderr))
  directory = pathlib.Path(directory).expanduser()
  final = directory / entry.file_name
  if final.is_file():
    if _hash_matches(entry, final):
      log(f"{entry.name}: {final} is already there" + ("" if entry.sha256_prefix else " (no hash to check)"))
      return final
    log(f"{entry.name}: {final} does not match SHA-256 prefix {entry.sha256_prefix}; downloading it again")
  if not entry.direct_download:
    raise FetchError(f"{entry.name}: cannot be fetched automatically; {catalog.how_to_get(entry, directory)}")
  directory.mkdir(parents=True, exist_ok=True)
  partial = directory / (entry.file_name + ".partial")
  try:
    digest = _download_to(entry.url, partial, log)
  except OSError as e:  # URLError, HTTPError, timeouts, resets and disk errors are all OSErrors
    partial.unlink(missing_ok=True)
    raise FetchError(f"{entry.name}: could not download {entry.url} ({e}); download it by hand into "
                     f"{directory} as {entry.file_name}") from e
  except BaseException:  # Ctrl-C included: a half file must not stay behind under any name
    partial.unlink(missing_ok=True)
    raise
  if entry.sha256_prefix is not None and not digest.startswith(entry.sha256_prefix):
    partial.unlink(missing_ok=True)
    raise FetchError(f"{entry.name}: the file downloaded from {entry.url} has SHA-256 {digest[:16]}..., "
                     f"not the catalogued prefix {entry.sha256_prefix}: damaged or a different file; "
                     "nothing kept")
  os.replace(partial, final)
  log(f"{entry.name}: saved {final}" + ("" if entry.sha256_prefix else " (no published hash to check)"))
  return final


def _download_to(url: str, partial: pathlib.Path, log) -> str:
  """Streams `url` into `partial`, returns the SHA-256 hex digest of what was written."""
  request = urllib.request.Request(url, headers={"User-Agent": "labeleff_jax-weights-fetch"})
  digest = hashlib.sha256()
  with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
    content_type = response.headers.get("Content-Type", "") or ""
    if content_type.startswith("text/html"):
      # A login, consent or error page served with status 200 is not a checkpoint.
      raise OSError(f"the server sent a web page ({content_type}), not the file")
    total = int(response.headers.get("Content-Length") or 0)
    log(f"downloading {url}" + (f" ({total / 2**20:.1f} MiB)" if total else ""))
    with open(partial, "wb") as f:
      for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
        f.write(chunk)
        digest.update(chunk)
      f.flush()
      os.fsync(f.fileno())  # the rename must not publish a name whose data is still only in the page cache
    if total and partial.stat().st_size != total:
      raise OSError(f"got {partial.stat().st_size} bytes of {total}")
  return digest.hexdigest()


def table(catalogue: dict[str, catalog.WeightsEntry] | None = None) -> str:
  """The catalogue as a plain-text table, one entry a line."""
  catalogue = catalog.CATALOG if catalogue is None else catalogue
  header = ("name", "arch", "mod", "ch", "method", "layout", "normalization", "sha256", "get", "licence")
  rows = [header] + [
      (e.name, e.architecture, e.modality, str(e.in_channels), e.method.split(" ")[0],
       e.layout + (f":{e.subtree}" if e.subtree else ""), e.normalization, e.sha256_prefix or "-",
       "fetch" if e.direct_download else "by hand", e.licence.split(" ")[0])
      for e in (catalogue[name] for name in sorted(catalogue))]
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None, catalogue: dict[str, catalog.WeightsEntry] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog=f"python -m {catalog.FETCH_MODULE}", description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", metavar="NAME", help="catalogue names (catalog:NAME also works)")
  parser.add_argument(
      "--dir", default=None,
      help=f"where to save (default: ${catalog.WEIGHTS_DIR_ENV} or {catalog.DEFAULT_WEIGHTS_DIR})")
  parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
  args = parser.parse_args(argv)
  if args.list:
    print(table(catalogue))
    return 0
  if not args.names:
    parser.error("name at least one entry (see --list)")
  directory = pathlib.Path(args.dir).expanduser() if args.dir else catalog.default_weights_dir()
  failed = 0
  for name in args.names:
    try:
      download(catalog.get(name, catalogue), directory)
    except KeyError as e:
      print(f"fetch: {e.args[0]}", file=sys.stderr)
      failed += 1
    except FetchError as e:
      print(f"fetch: {e}", file=sys.stderr)
      failed += 1
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
