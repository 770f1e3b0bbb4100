"""Data sets for the workflows: ``load_data(spec)`` returns deterministic train / val / test splits.

Specs (``DATASETS``):

* ``digits``: scikit-learn's bundled 8x8 digits (1797 real images, 10 classes); ``x`` is the 64
  pixels divided by 16 (float32 in [0, 1]).
* ``imagefolder:PATH``: a torchvision ``ImageFolder`` (``PATH/<class>/<image>``, e.g. an ImageNet
  validation subset; hidden folders and files are skipped) with the usual ImageNet transforms: random
  resized crop and flip for train, resize + center crop for val / test, then ImageNet mean/std
  normalisation.
* ``mnist:PATH``: torchvision's MNIST files already on disk (``PATH/MNIST/raw/*-ubyte``,
  uncompressed; nothing is downloaded). The official test set is the test split; the training
  files are split into train / val (``test_fraction`` is not used).
* ``hf:PATH``: a Hugging Face dataset saved with ``save_to_disk`` (a ``Dataset`` or a
  ``DatasetDict``, whose splits are pooled), or a csv / tsv / json / jsonl / parquet file or a folder
  of them, with a text column and a label column, tokenised with the model's tokenizer. Label names
  are numbered in sorted order; integer labels 0..k-1 are the class indices, other integer sets
  (1-5 stars) are numbered in increasing order; ``Splits.classes`` maps indices back.

Splits are deterministic: one permutation from ``torch.Generator().manual_seed(seed)``; its first
``round(test_fraction * n)`` examples are the test split, the next ``round(val_fraction * n)`` the
validation split, the rest train. ``limit`` keeps only the first ``limit`` examples of that same
permutation (a random, seed-determined subset) before splitting.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("digits", "imagefolder:PATH", "mnist:PATH", "hf:PATH")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_COLUMNS = ("label", "labels")
TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


@dataclass
class Splits:
    """Train / validation / test data sets and what a model needs to know about them.

    Attributes:
        train, val, test: map-style data sets. ``tensor`` and ``image`` ones yield ``(x, y)``
            (``x`` float32, ``y`` an int64 class index); ``text`` ones yield dicts that
            ``collate_fn`` pads into batches with ``input_ids``, ``attention_mask`` (and
            ``token_type_ids`` when the tokenizer gives them) plus ``labels``.
        num_classes: number of classes.
        kind: ``"tensor"`` (digits), ``"image"`` (imagefolder, mnist) or ``"text"`` (hf).
        input_shape: per-example input shape for tensor / image data (digits ``(64,)``, mnist
            ``(1, 28, 28)``); ``None`` for text.
        collate_fn: ``None`` for tensor / image data; the padding collator for text.
        name: the spec string.
        classes: what each class index stands for (``classes[i]`` is class ``i``): the folder
            names (imagefolder), the label names or values (hf), the digits 0-9 (digits, mnist).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    kind: str
    input_shape: Optional[tuple]
    collate_fn: Optional[Callable]
    name: str
    classes: Optional[list] = None


# ----------------------------------------------------------------------------------------- helpers

def _valid() -> str:
    return ", ".join(DATASETS)


def _parse(spec: str) -> Tuple[str, Optional[str]]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data set spec must be a non-empty string, got {spec!r}; valid specs: {_valid()}")
    spec = spec.strip()
    kind, sep, path = spec.partition(":")
    if kind == "digits":
        if sep:
            raise ValueError(f"data set {spec!r}: 'digits' takes no path; valid specs: {_valid()}")
        return kind, None
    if kind in ("imagefolder", "mnist", "hf"):
        if not path.strip():
            raise ValueError(f"data set {spec!r}: {kind} needs a path ('{kind}:PATH'); valid specs: {_valid()}")
        return kind, path.strip()
    raise ValueError(f"unknown data set {spec!r}; valid specs: {_valid()}")


def _existing(spec: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data set {spec!r}: path {str(p)!r} does not exist; valid specs: {_valid()}")
    return p


def _check_fractions(val_fraction: float, test_fraction: float, limit: Optional[int]) -> None:
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1 so that some training data is left, "
                         f"got {val_fraction} + {test_fraction}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def _count(fraction: float, n: int) -> int:
    """``round(fraction * n)``, at least 1 when ``fraction > 0`` (and ``n`` allows)."""
    k = int(math.floor(fraction * n + 0.5))
    if fraction > 0 and k == 0 and n >= 3:
        k = 1
    return k


def _permutation(n: int, seed: int, limit: Optional[int]) -> torch.Tensor:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:limit] if limit is not None else perm


def _split_indices(spec: str, perm: torch.Tensor, val_fraction: float,
                   test_fraction: float) -> Tuple[List[int], List[int], List[int]]:
    """test, then val, then the rest (train) of ``perm``."""
    n = len(perm)
    n_test, n_val = _count(test_fraction, n), _count(val_fraction, n)
    if n - n_test - n_val < 1:
        raise ValueError(f"data set {spec!r}: {n} example(s) leave no training data with "
                         f"val_fraction={val_fraction}, test_fraction={test_fraction}")
    idx = perm.tolist()
    return idx[n_test + n_val:], idx[n_test:n_test + n_val], idx[:n_test]


class _TransformSubset(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the input (a top-level class, so picklable)."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Optional[Callable]):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.base[self.indices[i]]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(y)


class _ImageFiles(Dataset):
    """``(PIL RGB image, class index)`` for each ``(path, class index)`` of ``samples``."""

    def __init__(self, samples: Sequence[Tuple[str, int]]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader

        path, y = self.samples[i]
        return default_loader(path), y


class _MnistDataset(Dataset):
    """uint8 MNIST images kept as they are, normalised per example to a float32 ``[1, H, W]`` (28x28 for MNIST)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].unsqueeze(0).to(torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
        return x, self.labels[i]


class TextDataset(Dataset):
    """Tokenised examples: ``{"input_ids": LongTensor, "attention_mask": ..., "labels": int64 scalar}``."""

    def __init__(self, encodings: Dict[str, List[List[int]]], labels: Sequence[int]):
        self.encodings = encodings
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        for k, v in encodings.items():
            if len(v) != len(self.labels):
                raise ValueError(f"encoding {k!r} has {len(v)} rows for {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: torch.as_tensor(v[i], dtype=torch.int64) for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


class PadCollator:
    """Pads a list of :class:`TextDataset` items into a dict batch of int64 tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` and ``token_type_ids`` with
    0, on the tokenizer's padding side; ``labels`` are stacked.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id, self.padding_side = int(pad_token_id), padding_side

    def __call__(self, items: List[dict]) -> Dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(it["input_ids"]) for it in items)
        batch = {}
        for key in items[0]:
            if key == "labels":
                batch[key] = torch.stack([torch.as_tensor(it[key], dtype=torch.int64) for it in items])
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            out = torch.full((len(items), length), fill, dtype=torch.int64)
            for row, it in enumerate(items):
                v = torch.as_tensor(it[key], dtype=torch.int64)
                if self.padding_side == "right":
                    out[row, :len(v)] = v
                else:
                    out[row, length - len(v):] = v
            batch[key] = out
        return batch


# ---------------------------------------------------------------------------------------- loaders

def _digits(spec, seed, val_fraction, test_fraction, limit) -> Splits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(f"data set {spec!r} needs scikit-learn: pip install 'loraq[sweep]' ({e})") from None
    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.int64)
    tr, va, te = _split_indices(spec, _permutation(len(y), seed, limit), val_fraction, test_fraction)
    parts = [TensorDataset(x[i], y[i]) for i in (tr, va, te)]
    return Splits(*parts, num_classes=10, kind="tensor", input_shape=(64,), collate_fn=None, name=spec,
                  classes=list(range(10)))


def _imagefolder(spec, path, seed, val_fraction, test_fraction, limit, image_size) -> Splits:
    try:
        from torchvision import transforms as T
        from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset
    except ImportError as e:
        raise ImportError(f"data set {spec!r} needs torchvision: pip install 'loraq[vision]' ({e})") from None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    root = _existing(spec, path)
    if not root.is_dir():
        raise FileNotFoundError(f"data set {spec!r}: {str(root)!r} is not a folder; imagefolder:PATH expects "
                                f"PATH/<class>/<image> (valid specs: {_valid()})")
    # as torchvision's ImageFolder, but hidden folders and files (.ipynb_checkpoints, macOS "._x.png"
    # resource forks) are neither classes nor images: they would add a class or duplicate / broken images
    classes = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))

    def visible_image(file: str) -> bool:
        rel = Path(file).relative_to(root).parts
        return has_file_allowed_extension(file, IMG_EXTENSIONS) and not any(q.startswith(".") for q in rel)

    try:
        if not classes:
            raise FileNotFoundError(f"no class folder in {str(root)!r}")
        base = _ImageFiles(make_dataset(str(root), {c: i for i, c in enumerate(classes)}, is_valid_file=visible_image))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data set {spec!r}: no images found under {str(root)!r} in the layout "
                                f"PATH/<class>/<image> ({e})") from None
    if len(classes) < 2:
        raise ValueError(f"data set {spec!r}: classification needs at least 2 class folders, {str(root)!r} has "
                         f"{classes} (PATH must be the folder that holds one folder per class)")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size), T.ToTensor(), norm])
    tr, va, te = _split_indices(spec, _permutation(len(base), seed, limit), val_fraction, test_fraction)
    return Splits(_TransformSubset(base, tr, train_tf), _TransformSubset(base, va, eval_tf),
                  _TransformSubset(base, te, eval_tf), num_classes=len(classes), kind="image",
                  input_shape=(3, image_size, image_size), collate_fn=None, name=spec, classes=classes)


def _mnist_root(spec: str, path: str) -> Path:
    """The folder torchvision's MNIST wants as ``root`` (it reads ``root/MNIST/raw``); PATH may also
    be the ``MNIST`` folder or the ``raw`` folder itself."""
    p = _existing(spec, path).resolve()
    if (p / "MNIST" / "raw").is_dir():
        root = p
    elif p.name == "MNIST" and (p / "raw").is_dir():
        root = p.parent
    elif p.name == "raw" and p.parent.name == "MNIST":
        root = p.parent.parent
    else:
        root = None
    if root is not None:
        raw = root / "MNIST" / "raw"
        missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"data set {spec!r}: {str(raw)!r} lacks {missing} (uncompressed IDX files; gunzip the "
                f"*.gz downloads there; nothing is downloaded at run time)")
        return root
    raise FileNotFoundError(
        f"data set {spec!r}: no MNIST files under {str(p)!r}; expected PATH/MNIST/raw/ holding "
        f"{', '.join(MNIST_FILES)} (valid specs: {_valid()})")


def _mnist(spec, path, seed, val_fraction, test_fraction, limit) -> Splits:
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:
        raise ImportError(f"data set {spec!r} needs torchvision: pip install 'loraq[vision]' ({e})") from None
    root = _mnist_root(spec, path)
    raw = root / "MNIST" / "raw"
    try:
        train_set = MNIST(str(root), train=True, download=False)
        test_set = MNIST(str(root), train=False, download=False)
    except Exception as e:  # noqa: BLE001 - torchvision's errors on truncated / non-IDX files name no file
        raise ValueError(f"data set {spec!r}: cannot read the IDX files in {str(raw)!r} "
                         f"({type(e).__name__}: {e})") from None
    for prefix, ds in (("train", train_set), ("t10k", test_set)):
        if len(ds.targets) == 0:
            raise ValueError(f"data set {spec!r}: {prefix}-labels-idx1-ubyte in {str(raw)!r} holds no examples")
        if len(ds.data) != len(ds.targets) or ds.data.dim() != 3:
            raise ValueError(f"data set {spec!r}: {prefix}-images-idx3-ubyte holds {tuple(ds.data.shape)} images "
                             f"but {prefix}-labels-idx1-ubyte {len(ds.targets)} labels in {str(raw)!r}; "
                             f"need [n, H, W] images and n labels")
    if train_set.data.shape[1:] != test_set.data.shape[1:]:
        raise ValueError(f"data set {spec!r}: train images are {tuple(train_set.data.shape[1:])} but test images "
                         f"{tuple(test_set.data.shape[1:])} in {str(raw)!r}")
    if min(int(train_set.targets.min()), int(test_set.targets.min())) < 0:
        raise ValueError(f"data set {spec!r}: negative labels in {str(raw)!r}")
    # 10 for MNIST, Fashion-MNIST, KMNIST; more for IDX sets such as EMNIST (labels past 9 would
    # otherwise index past the model's outputs)
    num_classes = max(10, int(train_set.targets.max()) + 1, int(test_set.targets.max()) + 1)
    n_pool, n_test = len(train_set), len(test_set)
    g = torch.Generator().manual_seed(seed)
    pool_perm = torch.randperm(n_pool, generator=g)
    test_idx = torch.randperm(n_test, generator=g)
    if limit is not None and limit < n_pool + n_test:
        # keep the official train/test proportions in the capped total
        keep_test = min(n_test, max(1, int(round(limit * n_test / (n_pool + n_test)))))
        keep_test = min(keep_test, limit - 1)
        pool_perm, test_idx = pool_perm[:limit - keep_test], test_idx[:keep_test]
    n_val = _count(val_fraction, len(pool_perm))
    if len(pool_perm) - n_val < 1:
        raise ValueError(f"data set {spec!r}: {len(pool_perm)} training example(s) leave no training data with "
                         f"val_fraction={val_fraction}")
    val_idx, tr_idx = pool_perm[:n_val], pool_perm[n_val:]
    test_idx = test_idx.sort().values
    return Splits(_MnistDataset(train_set.data[tr_idx], train_set.targets[tr_idx]),
                  _MnistDataset(train_set.data[val_idx], train_set.targets[val_idx]),
                  _MnistDataset(test_set.data[test_idx], test_set.targets[test_idx]),
                  num_classes=num_classes, kind="image", input_shape=(1, *train_set.data.shape[1:]),
                  collate_fn=None, name=spec, classes=list(range(num_classes)))


# ------------------------------------------------------------------------------------------ text

def _read_table(spec: str, file: Path):
    import pandas as pd

    suffix = file.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(file)
        if suffix == ".tsv":
            return pd.read_csv(file, sep="\t")
        if suffix == ".parquet":
            return pd.read_parquet(file)
        if suffix == ".jsonl":
            return pd.read_json(file, lines=True)
        # .json: a list of records, {"data": [records]}, or JSON lines
        text = file.read_text(encoding="utf-8")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return pd.read_json(file, lines=True)
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):  # {column: [values]}
            return pd.DataFrame(obj)
        if isinstance(obj, dict):  # one record (a file per example)
            return pd.DataFrame.from_records([obj])
        return pd.DataFrame.from_records(obj)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"data set {spec!r}: cannot read {str(file)!r} ({type(e).__name__}: {e})") from None


def _load_table(spec: str, path: Path):
    """A pandas DataFrame of every row under ``path`` and, if the data set says so, the class names."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(f"data set {spec!r} needs pandas and datasets: pip install 'loraq[hf]' ({e})") from None
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"data set {spec!r} is a saved Hugging Face dataset and needs the datasets "
                              f"package: pip install 'loraq[hf]' ({e})") from None
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            order = [s for s in ("train", "validation", "test") if s in loaded]
            order += sorted(s for s in loaded if s not in order)
            parts = [loaded[s] for s in order]
        else:
            parts = [loaded]
        names = None
        for ds in parts:  # the names of the column that _text_and_label_columns will pick
            feat = ds.features.get(_column(LABEL_COLUMNS, [str(c) for c in ds.features]) or "")
            if feat is not None and hasattr(feat, "names") and getattr(feat, "num_classes", None):
                names = list(feat.names)
                break
        frame = pd.concat([ds.to_pandas() for ds in parts], ignore_index=True)
        return frame, names
    if path.is_dir():
        # hidden files and folders (.ipynb_checkpoints copies, ...) would duplicate rows across the splits
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in TABLE_SUFFIXES
                       and not any(q.startswith(".") for q in f.relative_to(path).parts))
    elif path.suffix.lower() in TABLE_SUFFIXES:
        files = [path]
    else:
        raise ValueError(f"data set {spec!r}: {str(path)!r} is not a saved dataset (save_to_disk) nor a file of type "
                         f"{', '.join(TABLE_SUFFIXES)}")
    if not files:
        raise FileNotFoundError(f"data set {spec!r}: {str(path)!r} holds neither a dataset saved with save_to_disk "
                                f"(state.json / dataset_dict.json) nor {', '.join(TABLE_SUFFIXES)} files")
    frames = [_read_table(spec, f) for f in files]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0], None


def _column(names: Sequence[str], cols: List[str]) -> Optional[str]:
    """The first of ``names`` among ``cols``; then the same ignoring case ("Text", "LABEL")."""
    exact = next((c for c in names if c in cols), None)
    if exact is not None:
        return exact
    lower = {}
    for c in cols:
        lower.setdefault(c.lower(), c)
    return next((lower[c] for c in names if c in lower), None)


def _text_and_label_columns(spec: str, frame) -> Tuple[str, str]:
    import pandas as pd

    cols = [str(c) for c in frame.columns]
    label = _column(LABEL_COLUMNS, cols)
    if label is None:
        raise ValueError(f"data set {spec!r}: no label column among {list(LABEL_COLUMNS)}; columns are {cols}")
    strings = [c for c in cols if c != label and pd.api.types.infer_dtype(frame[c], skipna=True) == "string"]
    if len(strings) == 1:
        return strings[0], label
    text = _column(TEXT_COLUMNS, cols)
    if text is None:
        raise ValueError(f"data set {spec!r}: cannot tell the text column: none of {list(TEXT_COLUMNS)} and "
                         f"{len(strings)} string columns {strings}; columns are {cols}")
    return text, label


_INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def _labels(spec: str, values, names: Optional[List[str]]) -> Tuple[List[Optional[int]], list]:
    """Class indices (``None`` for unlabeled rows) and the classes (``classes[i]`` is what index ``i`` stands for).

    Integer labels (or strings that all spell integers, as JSON often holds them) ``0..k-1`` are the class
    indices themselves (with the data set's class names if it has them); other integer sets (1-5 stars,
    {3, 7}) are numbered in increasing order, so that no class index is left without examples (it
    would count as a class in macro metrics). Other strings are numbered in sorted order.
    """
    import pandas as pd

    series = pd.Series(values)
    present = series[series.notna()]
    if len(present) == 0:
        raise ValueError(f"data set {spec!r}: the label column holds no labels")
    kind = pd.api.types.infer_dtype(present, skipna=True)
    if kind in ("string", "mixed") or kind.startswith("mixed"):
        if all(_INT_TEXT.fullmatch(str(v)) for v in present):
            series = pd.Series([None if pd.isna(v) else int(str(v)) for v in series], dtype=object)
            present, kind = series[series.notna()], "integer"
    if kind in ("string", "mixed") or kind.startswith("mixed"):
        classes = sorted({str(v) for v in present})
        mapping = {s: i for i, s in enumerate(classes)}
        out = [None if pd.isna(v) else mapping[str(v)] for v in series]
    elif kind in ("integer", "boolean", "floating", "decimal"):
        as_float = present.astype("float64")
        if not (as_float == as_float.round()).all():
            raise ValueError(f"data set {spec!r}: labels must be class indices or class names, got non-integer "
                             f"numbers (regression is not supported)")
        out = [None if pd.isna(v) or int(v) < 0 else int(v) for v in series]  # < 0: unlabeled (GLUE test sets)
        kept = sorted({v for v in out if v is not None})
        if not kept:
            raise ValueError(f"data set {spec!r}: every label is negative (unlabeled)")
        if names and len(names) > kept[-1]:
            classes = list(names)
        elif kept == list(range(len(kept))) or names:
            classes = list(range(kept[-1] + 1))
        else:
            mapping = {v: i for i, v in enumerate(kept)}
            out = [None if v is None else mapping[v] for v in out]
            classes = kept
    else:
        raise ValueError(f"data set {spec!r}: labels of type {kind!r} are not supported (need ints or strings)")
    if len(classes) < 2:
        raise ValueError(f"data set {spec!r}: classification needs at least 2 classes, the labels give "
                         f"{len(classes)}")
    return out, classes


def _hf(spec, path, seed, val_fraction, test_fraction, limit, tokenizer, max_length) -> Splits:
    if tokenizer is None:
        raise ValueError(f"data set {spec!r} is text: it needs a text model's tokenizer (tokenizer=None was given); "
                         f"use a text model such as 'minilm' or 'hf:NAME_OR_PATH' (loraq.models.load_tokenizer)")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    root = _existing(spec, path)
    frame, names = _load_table(spec, root)
    text_col, label_col = _text_and_label_columns(spec, frame)
    labels, classes = _labels(spec, frame[label_col].tolist(), names)
    keep = [i for i, v in enumerate(labels) if v is not None]
    if len(keep) < len(labels):
        warnings.warn(f"data set {spec!r}: dropped {len(labels) - len(keep)} unlabeled row(s) "
                      f"(missing or negative label)", stacklevel=3)
    texts_all = frame[text_col].tolist()
    perm = _permutation(len(keep), seed, limit)
    chosen = [keep[i] for i in perm.tolist()]  # permutation order: test, val, train
    texts = ["" if t is None or (isinstance(t, float) and math.isnan(t)) else str(t) for t in
             (texts_all[i] for i in chosen)]
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    if "input_ids" not in keys:
        raise ValueError(f"data set {spec!r}: the tokenizer returned no input_ids (keys: {list(enc.keys())})")
    if "attention_mask" not in keys:
        enc["attention_mask"] = [[1] * len(ids) for ids in enc["input_ids"]]
        keys.insert(1, "attention_mask")
    full = TextDataset({k: list(enc[k]) for k in keys}, [labels[i] for i in chosen])
    tr, va, te = _split_indices(spec, torch.arange(len(chosen)), val_fraction, test_fraction)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        raise ValueError(f"data set {spec!r}: the tokenizer has neither a pad nor an eos token to pad with")
    collate = PadCollator(pad_id, getattr(tokenizer, "padding_side", "right") or "right")
    return Splits(Subset(full, tr), Subset(full, va), Subset(full, te), num_classes=len(classes), kind="text",
                  input_shape=None, collate_fn=collate, name=spec, classes=classes)


def load_data(spec: str, *, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
              tokenizer=None, max_length: int = 128, image_size: int = 224,
              limit: Optional[int] = None) -> Splits:
    """Load the data set ``spec`` (one of ``DATASETS``) as deterministic train / val / test splits.

    Args:
        spec: ``"digits"``, ``"imagefolder:PATH"``, ``"mnist:PATH"`` or ``"hf:PATH"``.
        seed: seeds the permutation that makes the splits (and the ``limit`` subset).
        val_fraction, test_fraction: shares of the whole data (mnist: its official test set is the
            test split, ``val_fraction`` of its training files the validation split).
        tokenizer: the text model's tokenizer; required for ``hf:`` data.
        max_length: text is truncated to this many tokens.
        image_size: side of the square crops of ``imagefolder:`` images.
        limit: use at most this many examples (a seeded random subset, taken before splitting).

    Raises:
        ValueError: an unknown or malformed spec, bad arguments, unusable columns or labels.
        FileNotFoundError: a path that does not exist or lacks the expected files.
    """
    kind, path = _parse(spec)
    _check_fractions(val_fraction, test_fraction, limit)
    spec = spec.strip()
    if kind == "digits":
        return _digits(spec, seed, val_fraction, test_fraction, limit)
    if kind == "imagefolder":
        return _imagefolder(spec, path, seed, val_fraction, test_fraction, limit, image_size)
    if kind == "mnist":
        return _mnist(spec, path, seed, val_fraction, test_fraction, limit)
    return _hf(spec, path, seed, val_fraction, test_fraction, limit, tokenizer, max_length)


__all__ = ["DATASETS", "Splits", "load_data", "TextDataset", "PadCollator"]
