"""Hugging Face ``datasets`` as sources of :func:`deft.data.load`.

Besides files, the loader reads three kinds of source (:func:`is_dataset_source`):

* a ``datasets.Dataset`` object, or a ``DatasetDict`` holding one split;
* a ``save_to_disk`` folder: a Dataset's (``state.json`` and
  ``dataset_info.json``), or a DatasetDict's (``dataset_dict.json``) when it
  holds one split -- else pass the split's folder, ``DIR/test``;
* ``hf:NAME[:CONFIG][:SPLIT]``: a hub dataset as ``datasets.load_dataset``
  left it in the local datasets cache (``HF_DATASETS_CACHE``, else
  ``$HF_HOME/datasets``, else ``$XDG_CACHE_HOME/huggingface/datasets``, else
  ``~/.cache/huggingface/datasets``). It is read from the cache only and never
  downloaded, so grading is reproducible and works offline; a dataset that is
  not cached is a :class:`~deft.data.DataError` saying how to cache it.
  ``hf:NAME:X`` names a configuration when ``X`` is a cached one, else a
  split; ``hf:NAME::SPLIT`` leaves the configuration out. Without a
  configuration the only cached one is taken, without a split the only split:
  when there are several, the error lists them (splits are never merged, so
  train and test rows cannot mix by accident).

A dataset's rows are records like a file's lines: the same format detection,
row parsers and messages, naming the source (``hf:NAME:CONFIG:SPLIT``, the
folder, or ``NAME[SPLIT]`` for an object) and the 1-based row as the line
(row 17 is ``dataset[16]``). Its Arrow table is offered to the fast path as a
Parquet file's would be. ``datasets`` is imported only for these sources; when
it is missing the error names the extra that installs it (``deft[hf]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import polars as pl

from deft.data.results import DataError, _one_line

__all__ = [
    "HF_PREFIX", "DatasetSource", "is_dataset_source", "open_dataset_source", "parse_hf_spec", "hf_cache_dir",
    "source_label", "source_record", "require_datasets",
]

#: The prefix of a hub dataset read from the local cache.
HF_PREFIX = "hf:"

#: How to install what these sources need.
INSTALL_HINT = 'pip install "deft[hf]"'

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z")
_DATASET_CLASSES = ("Dataset", "DatasetDict", "IterableDataset", "IterableDatasetDict")
#: The name of a dataset object that has none.
UNNAMED = "dataset"


@dataclass
class DatasetSource:
    """An opened dataset source: ``display`` names it in messages and
    ``source_file``; ``name`` makes the default ids (``"{name}:{row}"``);
    ``subset_from`` the default subset (:func:`deft.data.derive_subset`);
    ``kind`` is ``"hf"``, ``"save_to_disk"`` or ``"dataset"``; ``location``
    the folder the rows were read from (None for an object in memory);
    ``unnamed``: an object without a dataset name (``Dataset.from_list``, a
    ``load_dataset("json", ...)``), named ``dataset``."""

    display: str
    name: str
    subset_from: str
    dataset: Any
    kind: str
    location: Optional[Path] = None
    unnamed: bool = False

    def numbered(self, position: int) -> "DatasetSource":
        """This unnamed source as ``dataset#POSITION`` (its default ids
        ``dataset#POSITION:ROW``): several unnamed objects in one
        :func:`deft.data.load_many` call get distinct ids."""
        assert self.unnamed
        tag = f"{UNNAMED}#{position}"
        return replace(self, display=tag + self.display[len(UNNAMED):], name=tag + self.name[len(UNNAMED):])

    def records(self) -> pl.DataFrame:
        """The rows as a Polars frame (one record per row, as Parquet's)."""
        try:
            table = self.dataset.with_format("arrow")[:]
            frame = pl.from_arrow(table)
        except Exception as e:  # Arrow extension types and the like
            raise DataError(self.display, None, None, f"cannot read the dataset's Arrow table: {_one_line(str(e))}") from e
        assert isinstance(frame, pl.DataFrame)
        return frame


def require_datasets(display: str) -> Any:
    """The ``datasets`` module, or a :class:`DataError` naming the extra."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(display, None, None,
                        f"reading a Hugging Face dataset needs the 'datasets' package: {INSTALL_HINT}") from e
    return datasets


def _is_dataset_object(obj: object) -> bool:
    cls = type(obj)
    return cls.__module__.split(".")[0] == "datasets" and cls.__name__ in _DATASET_CLASSES


def _disk_layout(path: Path) -> Optional[str]:
    """``"dataset"``, ``"dict"`` or None: what ``save_to_disk`` left in ``path``."""
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        return "dict"
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return "dataset"
    return None


def is_dataset_source(obj: object) -> bool:
    """Whether ``obj`` is a dataset source rather than a data file: a
    ``datasets`` object, an ``hf:`` string, or a ``save_to_disk`` folder.
    Never imports ``datasets``."""
    if _is_dataset_object(obj):
        return True
    if not isinstance(obj, (str, os.PathLike)):
        return False
    text = os.fspath(obj)
    return isinstance(text, str) and (text.startswith(HF_PREFIX) or _disk_layout(Path(text)) is not None)


def source_label(obj: object) -> str:
    """A short name of any source for messages: the path, the ``hf:`` string,
    or ``NAME[SPLIT]`` of a dataset object (nothing is opened)."""
    if _is_dataset_object(obj):
        return _object_label(obj)
    return os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else repr(obj)


def _object_label(obj: Any) -> str:
    info = getattr(obj, "info", None)
    name = getattr(info, "dataset_name", None) or ""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as packaged
    except ImportError:  # pragma: no cover
        packaged = {}
    if not name or name in packaged:  # "json", "parquet", ...: the builder, not the data
        name = UNNAMED
    split = getattr(obj, "split", None)
    return f"{name}[{split}]" if split else str(name)


def _one_split(dd: Any, display: str, how: str) -> Tuple[str, Any]:
    """(split, dataset) of a DatasetDict with one split, else a DataError
    listing them; ``how`` says how to name one."""
    splits = list(dd.keys())
    if len(splits) == 1:
        return splits[0], dd[splits[0]]
    if not splits:
        raise DataError(display, None, None, "the DatasetDict holds no splits")
    raise DataError(display, None, None,
                    f"a DatasetDict with the splits {', '.join(splits)}: {how} (splits are never merged)")


def open_dataset_source(obj: object) -> DatasetSource:
    """Open a dataset source (see :func:`is_dataset_source`)."""
    if _is_dataset_object(obj):
        return _open_object(obj)
    text = os.fspath(obj)  # type: ignore[arg-type]
    if text.startswith(HF_PREFIX):
        return _open_hf(text)
    return _open_folder(Path(text), text)


def _open_object(obj: Any) -> DatasetSource:
    label = _object_label(obj)
    datasets = require_datasets(label)
    if isinstance(obj, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataError(label, None, None, "a streaming (iterable) dataset cannot be loaded: load it without "
                                           "streaming=True, or save it with save_to_disk and pass the folder")
    if isinstance(obj, datasets.DatasetDict):
        split, obj = _one_split(obj, "DatasetDict", "pass one of them, e.g. dataset_dict['test']")
        name = _object_label(obj)
        label = name if name.endswith(f"[{split}]") else f"{name}[{split}]"
    base = label.split("[", 1)[0]
    return DatasetSource(label, label, base, obj, "dataset", unnamed=base == UNNAMED)


def _open_folder(path: Path, display: str) -> DatasetSource:
    datasets = require_datasets(display)
    layout = _disk_layout(path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # a damaged folder: missing or invalid state, arrow files
        raise DataError(display, None, None, f"cannot read the save_to_disk folder: {_one_line(str(e))}") from e
    name = path.name or path.resolve().name
    parent = path.resolve().parent
    subset_from = f"{parent.name}/{name}"
    if layout == "dict":
        split, loaded = _one_split(loaded, display, f"pass one split's folder, e.g. {path / 'test'}")
        name, subset_from = f"{name}/{split}", f"{name}/{split}"
    elif (parent / "dataset_dict.json").is_file():  # a split of a DatasetDict folder
        name = f"{parent.name}/{name}"
    return DatasetSource(display, name, subset_from, loaded, "save_to_disk", path)


# ---------------------------------------------------------------------------
# hf:NAME[:CONFIG][:SPLIT] from the local cache
# ---------------------------------------------------------------------------


def parse_hf_spec(spec: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``(name, config, split)`` of ``hf:NAME[:CONFIG][:SPLIT]`` (None for a
    part left out or empty); with two parts the second is returned as the
    config (:func:`open_dataset_source` takes it as the split when no such
    configuration is cached)."""
    parts = spec[len(HF_PREFIX):].split(":") if spec.startswith(HF_PREFIX) else []
    if not 1 <= len(parts) <= 3 or not _NAME.match(parts[0]) or any(p in (".", "..") or "/" in p for p in parts[1:]):
        raise DataError(spec, None, None, "expected hf:NAME[:CONFIG][:SPLIT], NAME a hub dataset id such as "
                                          "Anthropic/hh-rlhf (e.g. hf:Anthropic/hh-rlhf:default:test)")
    config = parts[1] or None if len(parts) > 1 else None
    split = parts[2] or None if len(parts) > 2 else None
    return parts[0], config, split


def hf_cache_dir() -> Path:
    """The datasets cache, as ``datasets`` finds it (read from the environment
    at each call): ``HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``, else
    ``$XDG_CACHE_HOME/huggingface/datasets``, else
    ``~/.cache/huggingface/datasets``."""
    env = os.environ.get("HF_DATASETS_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "datasets"


def _not_cached(spec: str, name: str, cache: Path, what: str) -> DataError:
    return DataError(spec, None, None, (
        f"{what} is not in the local Hugging Face datasets cache {cache} (deft reads hf: datasets from the cache "
        f"only, it never downloads); cache it once with network access and the same HF_DATASETS_CACHE/HF_HOME: "
        f"python -c \"import datasets; datasets.load_dataset('{name}')\" (add the configuration if it has "
        f"several), or save it with Dataset.save_to_disk(DIR) and pass DIR"
    ))


def _open_hf(spec: str) -> DatasetSource:
    name, config, split = parse_hf_spec(spec)
    datasets = require_datasets(spec)
    from datasets.naming import camelcase_to_snakecase

    cache = hf_cache_dir()
    namespace, _, short = name.rpartition("/")
    folder = "___".join([*([namespace] if namespace else []), camelcase_to_snakecase(short)])
    builds = [d for d in (cache / folder).glob("*/*/*") if (d / "dataset_info.json").is_file()]
    if not builds:
        raise _not_cached(spec, name, cache, name)
    configs = sorted({d.parts[-3] for d in builds})
    explicit = len(spec[len(HF_PREFIX):].split(":")) == 3
    guessed = config is not None and config not in configs and not explicit and split is None
    if guessed:
        config, split = None, config  # hf:NAME:SPLIT
    if config is None:
        if len(configs) > 1:
            raise DataError(spec, None, None, f"several configurations of {name} are cached ({', '.join(configs)}): "
                                              f"name one, hf:{name}:CONFIG[:SPLIT]")
        config = configs[0]
    elif config not in configs:
        raise _not_cached(spec, name, cache, f"configuration {config!r} of {name} (cached: {', '.join(configs)})")
    build = max((d for d in builds if d.parts[-3] == config), key=lambda d: (d.stat().st_mtime, str(d)))
    try:
        info = json.loads((build / "dataset_info.json").read_text(encoding="utf-8"))
        splits = list(info.get("splits") or {})
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(spec, None, None, f"cannot read {build / 'dataset_info.json'}: {_one_line(str(e))}") from e
    if split is None:
        if len(splits) != 1:
            listed = ", ".join(splits) or "none recorded"
            raise DataError(spec, None, None, f"{name} ({config}) has the splits {listed}: name one, "
                                              f"hf:{name}:{config}:SPLIT (splits are never merged)")
        split = splits[0]
    elif split not in splits:
        what = f"{split!r} is neither a cached configuration of {name} ({', '.join(configs)}) nor a split" if guessed \
            else f"{name} ({config}) has no split {split!r} in the cache"
        raise DataError(spec, None, None, f"{what} (cached splits of {config}: {', '.join(splits) or 'none'})")
    from datasets.packaged_modules.cache.cache import Cache

    try:
        builder = Cache(cache_dir=str(cache), dataset_name=short, repo_id=name, config_name=config,
                        version=build.parts[-2], hash=build.parts[-1])
        if Path(builder.cache_dir).resolve() != build.resolve():
            raise ValueError(f"datasets {datasets.__version__} places this build at {builder.cache_dir}, not {build}")
        dataset = builder.as_dataset(split=split)
    except DataError:
        raise
    except Exception as e:  # missing or damaged Arrow files
        raise DataError(spec, None, None, f"cannot read the cached dataset in {build}: {_one_line(str(e))}") from e
    display = f"{HF_PREFIX}{name}:{config}:{split}"
    subset_from = short if config == "default" else config
    return DatasetSource(display, display, subset_from, dataset, "hf", build)


# ---------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------


def source_record(obj: object) -> Dict[str, Any]:
    """What a manifest records of a dataset source: ``path`` (its name),
    ``kind``, ``rows``, the dataset's ``fingerprint``, ``location`` and, when
    its rows are memory-mapped Arrow files, ``sha256`` over those files (each
    file's name and SHA-256, in order) and their ``bytes``."""
    from deft.io import sha256_file_cached

    src = open_dataset_source(obj)
    ds = src.dataset
    files: List[str] = [f["filename"] for f in getattr(ds, "cache_files", []) or []]
    rec: Dict[str, Any] = {"path": src.display, "kind": src.kind, "rows": ds.num_rows,
                           "fingerprint": getattr(ds, "_fingerprint", None),
                           "location": str(src.location) if src.location is not None else None}
    if files and all(os.path.isfile(f) for f in files):
        h = hashlib.sha256()
        for f in files:
            h.update(f"{Path(f).name}\0{sha256_file_cached(f)}\n".encode())
        rec["sha256"], rec["bytes"] = h.hexdigest(), sum(os.path.getsize(f) for f in files)
    return rec
