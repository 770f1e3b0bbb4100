"""loraq.data: every data set spec on real (digits) or freshly written tiny data, splits, errors."""

import collections
import math
import struct

import pytest
import torch
from torch.utils.data import DataLoader

from loraq.data import DATASETS, Splits, load_data


def _sizes(s: Splits):
    return len(s.train), len(s.val), len(s.test)


def _all_rows(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))])


# ----------------------------------------------------------------------------------------- digits

def test_digits_shapes_sizes_and_content():
    from sklearn.datasets import load_digits

    s = load_data("digits")
    assert (s.kind, s.input_shape, s.num_classes, s.collate_fn, s.name) == ("tensor", (64,), 10, None, "digits")
    assert _sizes(s) == (1797 - 270 - 270, 270, 270)  # round(0.15 * 1797) = 270
    x, y = next(iter(DataLoader(s.train, batch_size=17, shuffle=True)))
    assert x.shape == (17, 64) and x.dtype == torch.float32 and y.shape == (17,) and y.dtype == torch.int64
    # the three splits are a partition of the real data set, pixels / 16, labels kept
    d = load_digits()
    full = collections.Counter((tuple(r), int(t)) for r, t in zip(d.data.astype(int).tolist(), d.target.tolist()))
    got = collections.Counter()
    for part in (s.train, s.val, s.test):
        xs, ys = _all_rows(part)
        assert 0.0 <= float(xs.min()) and float(xs.max()) <= 1.0
        assert torch.equal(xs * 16, (xs * 16).round())
        got.update((tuple(r), int(t)) for r, t in zip((xs * 16).round().int().tolist(), ys.tolist()))
    assert got == full


def test_digits_deterministic_by_seed_and_seeds_differ():
    a, b, c = load_data("digits", seed=3), load_data("digits", seed=3), load_data("digits", seed=4)
    for part in ("train", "val", "test"):
        xa, ya = _all_rows(getattr(a, part))
        xb, yb = _all_rows(getattr(b, part))
        xc, _ = _all_rows(getattr(c, part))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == xc.shape and not torch.equal(xa, xc)


def test_digits_fractions_and_limit():
    s = load_data("digits", val_fraction=0.1, test_fraction=0.2)
    assert _sizes(s) == (1797 - 359 - 180, 180, 359)
    lim = load_data("digits", limit=100, seed=5)
    assert _sizes(lim) == (70, 15, 15)
    again = load_data("digits", limit=100, seed=5)
    assert torch.equal(_all_rows(lim.train)[0], _all_rows(again.train)[0])
    assert torch.equal(_all_rows(lim.test)[0], _all_rows(again.test)[0])
    # a random (seeded) subset, not the first 100 rows of the file: it holds many classes
    assert len(set(_all_rows(lim.train)[1].tolist())) >= 8
    other = load_data("digits", limit=100, seed=6)
    assert not torch.equal(_all_rows(lim.train)[0], _all_rows(other.train)[0])


@pytest.mark.parametrize("kwargs, match", [
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"limit": 0}, "limit"),
    ({"limit": 3, "val_fraction": 0.4, "test_fraction": 0.5}, "no training data"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_data("digits", **kwargs)


@pytest.mark.parametrize("spec, err, match", [
    ("cifar10", ValueError, "unknown data set 'cifar10'"),
    ("", ValueError, "non-empty"),
    ("digits:/tmp", ValueError, "takes no path"),
    ("mnist:", ValueError, "needs a path"),
    ("imagefolder:", ValueError, "needs a path"),
    ("hf:  ", ValueError, "needs a path"),
    ("mnist:/definitely/not/here", FileNotFoundError, "does not exist"),
    ("imagefolder:/definitely/not/here", FileNotFoundError, "does not exist"),
    ("hf:/definitely/not/here.csv", FileNotFoundError, "does not exist"),
])
def test_bad_specs_name_the_spec_and_list_valid_ones(spec, err, match):
    with pytest.raises(err, match=match) as info:
        load_data(spec, tokenizer=object())
    msg = str(info.value)
    assert repr(spec.strip()) in msg or spec == ""
    assert all(v in msg for v in DATASETS)


# ------------------------------------------------------------------------------------------ mnist

def _write_idx(path, array: torch.Tensor):
    """An uncompressed IDX file (big-endian header, uint8 data) as torchvision reads it."""
    dims = list(array.shape)
    header = struct.pack(">BBBB", 0, 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.to(torch.uint8).contiguous().numpy().tobytes())


def _fake_mnist(root, n_train=40, n_test=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.int64).to(torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = (images, labels)
    return data


def _unnormalize_mnist(x):
    return (x * 0.3081 + 0.1307) * 255


def _image_label_set(ds):
    return collections.Counter(
        (tuple(_unnormalize_mnist(ds[i][0]).round().to(torch.int64).flatten().tolist()), int(ds[i][1]))
        for i in range(len(ds)))


def test_mnist_from_raw_idx_files(tmp_path):
    data = _fake_mnist(tmp_path)
    s = load_data(f"mnist:{tmp_path}", seed=1)
    assert (s.kind, s.input_shape, s.num_classes, s.collate_fn) == ("image", (1, 28, 28), 10, None)
    assert _sizes(s) == (34, 6, 10)  # val: round(0.15 * 40); test: the official test files
    x, y = next(iter(DataLoader(s.train, batch_size=5)))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # test = exactly the t10k files; train + val = exactly the train files
    img, lab = data["t10k"]
    expect_test = collections.Counter((tuple(i.flatten().tolist()), int(t)) for i, t in zip(img.long(), lab))
    assert _image_label_set(s.test) == expect_test
    img, lab = data["train"]
    expect_pool = collections.Counter((tuple(i.flatten().tolist()), int(t)) for i, t in zip(img.long(), lab))
    assert _image_label_set(s.train) + _image_label_set(s.val) == expect_pool
    # deterministic, and another seed gives another train/val split
    again, other = load_data(f"mnist:{tmp_path}", seed=1), load_data(f"mnist:{tmp_path}", seed=2)
    assert torch.equal(_all_rows(again.val)[0], _all_rows(s.val)[0])
    assert not torch.equal(_all_rows(other.val)[0], _all_rows(s.val)[0])


def test_mnist_path_variants_limit_and_missing_files(tmp_path):
    _fake_mnist(tmp_path)
    for path in (tmp_path / "MNIST", tmp_path / "MNIST" / "raw"):
        assert _sizes(load_data(f"mnist:{path}")) == (34, 6, 10)
    lim = load_data(f"mnist:{tmp_path}", limit=20)
    assert sum(_sizes(lim)) == 20 and len(lim.test) == 4  # the official 40:10 proportion kept
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_data(f"mnist:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        load_data(f"mnist:{empty}")


# ------------------------------------------------------------------------------------ imagefolder

COLORS = {"cat": (200, 30, 90), "dog": (20, 180, 240)}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _fake_imagefolder(root, per_class=6):
    from PIL import Image

    for cls, color in COLORS.items():
        (root / cls).mkdir(parents=True)
        for i in range(per_class):  # odd sizes and aspect ratios; one solid colour per class
            Image.new("RGB", (37 + 3 * i, 29 + 5 * i), color).save(root / cls / f"{i}.png")


def test_imagefolder_tiny_pngs(tmp_path):
    _fake_imagefolder(tmp_path)
    s = load_data(f"imagefolder:{tmp_path}", image_size=32, seed=0)
    assert (s.kind, s.input_shape, s.num_classes, s.collate_fn) == ("image", (3, 32, 32), 2, None)
    assert _sizes(s) == (8, 2, 2)
    x, y = next(iter(DataLoader(s.train, batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    classes = sorted(COLORS)  # ImageFolder sorts the class folders
    for part in (s.train, s.val, s.test):
        xs, ys = _all_rows(part)
        for xi, yi in zip(xs, ys):
            color = COLORS[classes[int(yi)]]
            expect = torch.tensor([(c / 255 - m) / sd for c, m, sd in zip(color, MEAN, STD)])
            torch.testing.assert_close(xi.mean(dim=(1, 2)), expect, atol=2e-2, rtol=0)
    assert sorted(_all_rows(s.train)[1].tolist() + _all_rows(s.val)[1].tolist() + _all_rows(s.test)[1].tolist()) == [0] * 6 + [1] * 6
    again = load_data(f"imagefolder:{tmp_path}", image_size=32, seed=0)
    assert torch.equal(_all_rows(again.test)[0], _all_rows(s.test)[0])


def test_imagefolder_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images found"):
        load_data(f"imagefolder:{tmp_path}")
    f = tmp_path / "x.png"
    f.write_bytes(b"not a folder")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_data(f"imagefolder:{f}")


# ------------------------------------------------------------------------------------------- text

LABEL_NAMES = ("neg", "neutral", "pos")


@pytest.fixture(scope="module")
def tokenizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        from loraq.models import load_tokenizer

        return load_tokenizer("minilm")


def _rows(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g).tolist()
    words = ["apple", "river", "quiet", "storm", "golden", "paper", "window", "seven"]
    rows = []
    for i, lab in enumerate(labels):
        extra = " ".join(words[j] for j in torch.randint(0, len(words), (1 + i % 9,), generator=g).tolist())
        rows.append((f"a {LABEL_NAMES[lab]} example {extra}", LABEL_NAMES[lab]))
    return rows


def _check_text_splits(s, tokenizer, n, num_classes, label_of_text):
    assert (s.kind, s.input_shape, s.num_classes) == ("text", None, num_classes)
    assert _sizes(s) == (n - 2 * round(0.15 * n), round(0.15 * n), round(0.15 * n))
    loader = DataLoader(s.train, batch_size=7, shuffle=True, collate_fn=s.collate_fn)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    b, length = batch["input_ids"].shape
    assert b == 7 and batch["attention_mask"].shape == (7, length) and batch["labels"].shape == (7,)
    assert batch["labels"].dtype == torch.int64 and batch["input_ids"].dtype == torch.int64
    assert int(batch["attention_mask"].sum(1).max()) == length  # padded to the longest
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all())
    for part in (s.train, s.val, s.test):  # every example's label is the one its text names
        for i in range(len(part)):
            item = part[i]
            text = tokenizer.decode(item["input_ids"], skip_special_tokens=True)
            assert int(item["labels"]) == label_of_text(text), text


def _label_in_text(text):
    return next(i for i, name in enumerate(LABEL_NAMES) if f" {name} " in f" {text} ")


def test_hf_csv_string_labels(tmp_path, tokenizer):
    import csv

    f = tmp_path / "reviews.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "text", "label"])
        w.writerows([(i, t, lab) for i, (t, lab) in enumerate(_rows())])
    s = load_data(f"hf:{f}", tokenizer=tokenizer, seed=2)
    _check_text_splits(s, tokenizer, 40, 3, _label_in_text)  # sorted names: neg 0, neutral 1, pos 2
    again, other = load_data(f"hf:{f}", tokenizer=tokenizer, seed=2), load_data(f"hf:{f}", tokenizer=tokenizer, seed=3)
    assert [again.test[i]["input_ids"].tolist() for i in range(6)] == [s.test[i]["input_ids"].tolist() for i in range(6)]
    assert [other.test[i]["input_ids"].tolist() for i in range(6)] != [s.test[i]["input_ids"].tolist() for i in range(6)]
    short = load_data(f"hf:{f}", tokenizer=tokenizer, max_length=6, limit=20)
    assert sum(_sizes(short)) == 20
    assert max(len(short.train[i]["input_ids"]) for i in range(len(short.train))) == 6


def test_hf_folder_of_jsonl_with_one_string_column(tmp_path, tokenizer):
    import json

    rows = _rows(n=24, seed=1)
    for k in range(2):  # a folder of two files; the only string column is "review"
        with open(tmp_path / f"part{k}.jsonl", "w") as fh:
            for t, lab in rows[12 * k:12 * (k + 1)]:
                fh.write(json.dumps({"review": t, "labels": LABEL_NAMES.index(lab), "score": 0.5}) + "\n")
    s = load_data(f"hf:{tmp_path}", tokenizer=tokenizer)
    _check_text_splits(s, tokenizer, 24, 3, _label_in_text)


def test_hf_save_to_disk_dataset_and_datasetdict(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = _rows(n=40, seed=4)
    features = datasets.Features({"sentence": datasets.Value("string"), "source": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(LABEL_NAMES))})
    ds = datasets.Dataset.from_dict({"sentence": [t for t, _ in rows], "source": ["web"] * 40,
                                     "label": [LABEL_NAMES.index(lab) for _, lab in rows]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    s = load_data(f"hf:{tmp_path / 'ds'}", tokenizer=tokenizer)  # two string columns: "sentence" wins
    _check_text_splits(s, tokenizer, 40, 3, _label_in_text)
    # a DatasetDict: splits pooled, unlabeled (-1) rows dropped with a warning
    unlabeled = datasets.Dataset.from_dict({"sentence": ["who knows"] * 5, "source": ["web"] * 5, "label": [-1] * 5})
    dd = datasets.DatasetDict({"train": ds.select(range(30)), "validation": ds.select(range(30, 40)),
                               "test": unlabeled.cast(features)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.warns(UserWarning, match="dropped 5 unlabeled"):
        s2 = load_data(f"hf:{tmp_path / 'dd'}", tokenizer=tokenizer)
    _check_text_splits(s2, tokenizer, 40, 3, _label_in_text)


def test_hf_errors(tmp_path, tokenizer):
    f = tmp_path / "d.csv"
    f.write_text("text,label\nhello there,a\ngood bye,b\nwell then,a\n")
    with pytest.raises(ValueError, match="needs a text model's tokenizer"):
        load_data(f"hf:{f}")
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("text,target\nhello,1\nbye,0\n")
    with pytest.raises(ValueError, match="no label column among \\['label', 'labels'\\]; columns are \\['text', 'target'\\]"):
        load_data(f"hf:{nolabel}", tokenizer=tokenizer)
    notext = tmp_path / "notext.csv"
    notext.write_text("title,body,label\nhi,there,1\nbye,now,0\n")
    with pytest.raises(ValueError, match="cannot tell the text column"):
        load_data(f"hf:{notext}", tokenizer=tokenizer)
    regression = tmp_path / "reg.csv"
    regression.write_text("text,label\nhi,0.25\nbye,0.5\n")
    with pytest.raises(ValueError, match="regression"):
        load_data(f"hf:{regression}", tokenizer=tokenizer)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="save_to_disk"):
        load_data(f"hf:{empty}", tokenizer=tokenizer)
    other = tmp_path / "d.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="not a saved dataset"):
        load_data(f"hf:{other}", tokenizer=tokenizer)


def test_split_sizes_round_half_up():
    s = load_data("digits", limit=30)  # 0.15 * 30 = 4.5 -> 5 each
    assert _sizes(s) == (20, 5, 5) and math.isclose(0.15 * 30, 4.5)


# ------------------------------------------------------------------------- edge cases of real files

def _labels_by_text(s, tokenizer):
    return {tokenizer.decode(part[i]["input_ids"], skip_special_tokens=True): int(part[i]["labels"])
            for part in (s.train, s.val, s.test) for i in range(len(part))}


def test_hf_integer_labels_are_numbered_without_gaps(tmp_path, tokenizer):
    import json

    # 1-5 stars: 5 classes (not 6 with an empty class 0 that macro metrics would average in)
    stars = tmp_path / "stars.csv"
    stars.write_text("text,label\n" + "".join(f"review {i},{1 + i % 5}\n" for i in range(30)))
    s = load_data(f"hf:{stars}", tokenizer=tokenizer)
    assert s.num_classes == 5 and s.classes == [1, 2, 3, 4, 5]
    assert all(y == int(t.split()[-1]) % 5 for t, y in _labels_by_text(s, tokenizer).items())  # star 1 -> 0
    sparse = tmp_path / "sparse.csv"
    sparse.write_text("text,label\n" + "".join(f"row {i},{(3, 7)[i % 2]}\n" for i in range(20)))
    s = load_data(f"hf:{sparse}", tokenizer=tokenizer)
    assert s.num_classes == 2 and s.classes == [3, 7]
    # 0..k-1 stay the class indices
    dense = tmp_path / "dense.csv"
    dense.write_text("text,label\n" + "".join(f"row {i},{i % 3}\n" for i in range(20)))
    s = load_data(f"hf:{dense}", tokenizer=tokenizer)
    assert s.classes == [0, 1, 2] and all(y == int(t.split()[-1]) % 3 for t, y in _labels_by_text(s, tokenizer).items())
    # a ClassLabel's names fix the indices even when a class has no example ({0, 2} of 3 names)
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(LABEL_NAMES))})
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(20)], "label": [2 * (i % 2) for i in range(20)]},
                               features=feats).save_to_disk(str(tmp_path / "ds"))
    s = load_data(f"hf:{tmp_path / 'ds'}", tokenizer=tokenizer)
    assert s.num_classes == 3 and s.classes == list(LABEL_NAMES)
    assert all(y == 2 * (int(t.split()[-1]) % 2) for t, y in _labels_by_text(s, tokenizer).items())
    # JSON labels "0".."11" as strings: numeric order ("10" is class 10, as from a csv), not "0" < "1" < "10"
    f = tmp_path / "strnum.json"
    f.write_text(json.dumps([{"text": f"row {i}", "label": str(i % 12)} for i in range(48)]))
    s = load_data(f"hf:{f}", tokenizer=tokenizer)
    assert s.num_classes == 12 and s.classes == list(range(12))
    assert all(y == int(t.split()[-1]) % 12 for t, y in _labels_by_text(s, tokenizer).items())


def test_hf_folder_of_single_record_json_files(tmp_path, tokenizer):
    import json

    for i in range(12):  # one example per file
        (tmp_path / f"{i:03d}.json").write_text(json.dumps({"text": f"note {i}", "label": ("a", "b")[i % 2]}))
    s = load_data(f"hf:{tmp_path}", tokenizer=tokenizer)
    assert sum(_sizes(s)) == 12 and s.classes == ["a", "b"]
    assert all(y == int(t.split()[-1]) % 2 for t, y in _labels_by_text(s, tokenizer).items())


def test_hf_folder_skips_hidden_copies(tmp_path, tokenizer):
    body = "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20))
    (tmp_path / "train.csv").write_text(body)
    (tmp_path / ".ipynb_checkpoints").mkdir()  # Jupyter's copy: would put every row twice, across splits
    (tmp_path / ".ipynb_checkpoints" / "train-checkpoint.csv").write_text(body)
    s = load_data(f"hf:{tmp_path}", tokenizer=tokenizer)
    assert sum(_sizes(s)) == 20 and len(_labels_by_text(s, tokenizer)) == 20


def test_hf_column_names_in_other_case(tmp_path, tokenizer):
    f = tmp_path / "caps.csv"
    f.write_text("Id,Title,Text,Label\n" + "".join(f"{i},t{i},row {i},{('x', 'y')[i % 2]}\n" for i in range(20)))
    s = load_data(f"hf:{f}", tokenizer=tokenizer)
    assert s.classes == ["x", "y"] and all(y == int(t.split()[-1]) % 2 for t, y in _labels_by_text(s, tokenizer).items())


def test_mnist_malformed_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _fake_mnist(tmp_path)
    _write_idx(raw / "train-labels-idx1-ubyte", torch.zeros(30, dtype=torch.uint8))  # 40 images, 30 labels
    with pytest.raises(ValueError, match="40, 28, 28\\) images but train-labels-idx1-ubyte 30 labels"):
        load_data(f"mnist:{tmp_path}")
    (raw / "train-labels-idx1-ubyte").write_bytes(b"")  # truncated download
    with pytest.raises(ValueError, match="cannot read the IDX files"):
        load_data(f"mnist:{tmp_path}")


def test_mnist_like_idx_with_more_classes_or_other_sizes(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _fake_mnist(tmp_path)
    labels = torch.arange(40) % 26  # EMNIST-letters-like labels past 9: the model needs 26 outputs
    _write_idx(raw / "train-labels-idx1-ubyte", labels)
    s = load_data(f"mnist:{tmp_path}")
    assert s.num_classes == 26 and max(int(s.train[i][1]) for i in range(len(s.train))) < 26
    for prefix, n in (("train", 40), ("t10k", 10)):  # 32x32 images: input_shape follows the files
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", torch.randint(0, 256, (n, 32, 32)))
    s = load_data(f"mnist:{tmp_path}")
    assert s.input_shape == (1, 32, 32) == tuple(s.train[0][0].shape)


def test_imagefolder_skips_hidden_and_reads_any_mode(tmp_path):
    from PIL import Image

    for cls, mode in (("gray", "L"), ("rgba", "RGBA"), ("palette", "P")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new(mode, (11 + 4 * i, 9 + i)).save(tmp_path / cls / f"{i}.png")
        (tmp_path / cls / "._0.png").write_bytes(b"macOS resource fork, not an image")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # not a class
    s = load_data(f"imagefolder:{tmp_path}", image_size=8, val_fraction=0, test_fraction=0)
    assert s.classes == ["gray", "palette", "rgba"] and s.num_classes == 3 and len(s.train) == 9
    x, y = next(iter(DataLoader(s.train, batch_size=9)))
    assert x.shape == (9, 3, 8, 8) and sorted(y.tolist()) == [0] * 3 + [1] * 3 + [2] * 3


def test_imagefolder_one_class_folder_is_refused(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()  # PATH one level too high: a single "class"
    for i in range(4):
        Image.new("RGB", (10, 10)).save(tmp_path / "images" / f"{i}.png")
    with pytest.raises(ValueError, match="at least 2 class folders.*\\['images'\\]"):
        load_data(f"imagefolder:{tmp_path}", image_size=8)
