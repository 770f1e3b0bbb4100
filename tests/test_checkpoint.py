import copy
import json

import pytest
import torch
from torch import nn

from loraq import CheckpointError, CompressionConfig, LoraLinear, compress_, load, save
from loraq.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from models import mlp, resnet18, tiny_bert


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def _train_one_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    out.square().mean().backward()
    opt.step()


@pytest.mark.parametrize("cfg", [
    CompressionConfig(compression="int1", rank=8, target_modules=["fc"], init="svd"),
    CompressionConfig(compression="int1", rank=4, target_modules=["fc"], group_size=96, init="loftq", loftq_iters=2),
    CompressionConfig(compression="int1", rank=4, target_modules=["fc"], scale="onebit"),
    CompressionConfig(compression="sparse4x4", rank=4, target_modules=["fc"]),
])
def test_resnet18_round_trip_is_exact(tmp_path, cfg):
    model = resnet18()
    compress_(model, cfg)
    x = torch.randn(2, 3, 48, 48)
    model.train()
    _train_one_step(model, x)  # adapters and batch-norm statistics move away from their init
    model.eval()
    save(model, tmp_path / "ckpt")
    fresh = resnet18(seed=99)  # different random weights: everything must come from the checkpoint
    load(fresh, tmp_path / "ckpt")
    fresh.eval()
    assert isinstance(fresh.fc, LoraLinear) and fresh.fc.rank == cfg.rank
    assert state_equal(model, fresh)
    assert torch.equal(model(x), fresh(x))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {"fc.lora_A", "fc.lora_B"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bert_round_trip_is_exact(tmp_path, dtype):
    model = tiny_bert().to(dtype)
    compress_(model, CompressionConfig(compression="sparse4x4", rank=3, init="svd", modules_to_save=["classifier"]))
    ids = torch.randint(0, 101, (2, 11))
    _train_one_step(model, ids)
    save(model, tmp_path)
    fresh = tiny_bert(seed=5).to(dtype)
    load(fresh, tmp_path)
    assert state_equal(model, fresh)
    assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert isinstance(fresh.classifier, nn.Linear) and fresh.classifier.weight.requires_grad
    trainable = sum(p.numel() for p in fresh.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_checkpoint_files_and_description(tmp_path):
    model = mlp()
    compress_(model, CompressionConfig(compression="int1", rank=2, group_size=8))
    save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary leftovers
    desc = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert desc["layers"]["0"]["group_size"] == 8 and desc["layers"]["0"]["compression"] == "int1"
    assert desc["config"]["rank"] == 2 and len(desc["sha256"]) == 64


def test_compressed_checkpoint_is_small(tmp_path):
    model = nn.Sequential(nn.Linear(512, 512, bias=False))
    compress_(model, compression="int1", rank=1)
    save(model, tmp_path)
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    assert size < 512 * 512 * 4 / 20


def test_load_into_an_already_compressed_model(tmp_path):
    model = mlp()
    compress_(model, rank=2)
    save(model, tmp_path)
    other = mlp(seed=3)
    compress_(other, rank=2, seed=4)
    load(other, tmp_path)
    assert state_equal(model, other)


def test_load_gives_the_layers_the_backend_asked_for(tmp_path):
    """The backend is the loading machine's choice: ``load(..., backend=)`` sets it on every
    rebuilt layer (None: LORAQ_BACKEND/auto); a bad name is refused before the model changes.
    A numpy integer group size is taken as an int (the config is saved as JSON)."""
    import numpy as np

    model = mlp()
    compress_(model, CompressionConfig(compression="int1", rank=2, group_size=np.int64(8), backend="triton"))
    save(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["group_size"] == 8
    fresh = load(mlp(), tmp_path, backend="reference")
    layers = [m for m in fresh.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m.backend == "reference" for m in layers) and state_equal(model, fresh)
    assert all(m.backend is None for m in load(mlp(), tmp_path).modules() if isinstance(m, LoraLinear))
    untouched = mlp()
    with pytest.raises(ValueError, match="backend must be one of"):
        load(untouched, tmp_path, backend="tpu")
    assert not any(isinstance(m, LoraLinear) for m in untouched.modules())


# -- bad checkpoints: clear error, model untouched ---------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = mlp()
    compress_(model, CompressionConfig(rank=2))
    save(model, tmp_path / "ck")
    return tmp_path / "ck"


def _load_fails(model_fn, path, match):
    model = model_fn()
    snap = copy.deepcopy(model)
    with pytest.raises(CheckpointError, match=match):
        load(model, path)
    assert type(model) is type(snap) and state_equal(model, snap)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_truncated_weights(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    _load_fails(mlp, saved, "corrupt or truncated")


def test_flipped_byte_in_weights(saved):
    data = bytearray((saved / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0xFF
    (saved / WEIGHTS_NAME).write_bytes(bytes(data))
    _load_fails(mlp, saved, "corrupt or truncated")


def test_unreadable_weights_with_matching_hash(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    desc = json.loads((saved / CONFIG_NAME).read_text())
    import hashlib
    desc["sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    (saved / CONFIG_NAME).write_text(json.dumps(desc))
    _load_fails(mlp, saved, "cannot be read")


def test_corrupt_or_missing_description(saved, tmp_path):
    text = (saved / CONFIG_NAME).read_text()
    (saved / CONFIG_NAME).write_text(text[:40])
    _load_fails(mlp, saved, "corrupt or truncated")
    (saved / CONFIG_NAME).unlink()
    _load_fails(mlp, saved, "has no loraq_config.json")
    _load_fails(mlp, tmp_path / "nowhere", "is not a loraq checkpoint folder")


def test_other_architecture(saved):
    _load_fails(lambda: nn.Sequential(nn.Linear(19, 45), nn.ReLU(), nn.Linear(45, 34), nn.ReLU(), nn.Linear(34, 5)),
                saved, r"'2' is \[34, 45\] here but \[33, 45\]")
    _load_fails(lambda: nn.Sequential(nn.Linear(19, 45)), saved, "compresses '2', which is nothing in this model")
    _load_fails(resnet18, saved, "compresses '0', which is nothing")


def test_extra_parameters_in_model(saved):
    def wider():
        m = mlp()
        m.add_module("5", nn.LayerNorm(5))
        return m
    _load_fails(wider, saved, "another architecture; missing: 5.bias, 5.weight")


def test_wrong_format_version(saved):
    desc = json.loads((saved / CONFIG_NAME).read_text())
    desc["format_version"] = 99
    (saved / CONFIG_NAME).write_text(json.dumps(desc))
    _load_fails(mlp, saved, "format version 99 is not supported")


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 6))


def test_fp32_adapters_on_a_half_base_come_back_bit_exact(tmp_path):
    """Mixed precision: a bf16 model whose adapters (the trained masters) and bias are fp32."""
    model = _small_model().to(torch.bfloat16)
    compress_(model, compression="int1", rank=4, init="svd")
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.data = m.lora_A.data.float() + 1e-4 * torch.randn_like(m.lora_A.data.float())
            m.lora_B.data = m.lora_B.data.float() + 1e-4 * torch.randn_like(m.lora_B.data.float())
    save(model, tmp_path)
    fresh = _small_model().to(torch.bfloat16)
    load(fresh, tmp_path)
    assert fresh[0].lora_A.dtype == torch.float32 and fresh[0].base.dtype == torch.bfloat16
    assert state_equal(model, fresh)
    assert fresh[0].lora_A.requires_grad and not fresh[0].base_scale.requires_grad


def test_files_get_the_umask_mode_and_no_temporary_file_stays(tmp_path):
    import os
    import stat
    old = os.umask(0o022)
    try:
        model = _small_model()
        compress_(model, compression="sparse4x4", rank=2)
        save(model, tmp_path)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_an_interrupted_resave_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import loraq.checkpoint as ckpt
    model = _small_model()
    compress_(model, compression="int1", rank=2)
    save(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model[0].lora_B.add_(1.0)

    def interrupted(*_, **__):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the new description is being written
    monkeypatch.setattr(ckpt.json, "dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temporary file left
    load(_small_model(), tmp_path)


def test_buffers_sharing_memory_are_saved(tmp_path):
    """Two overlapping views of one storage (not the same tensor): safetensors refuses them unless copied."""
    model = _small_model()
    store = torch.randn(10)
    model.register_buffer("a", store[:6])
    model.register_buffer("b", store[4:])
    compress_(model, compression="int1", rank=2)
    save(model, tmp_path)
    fresh = _small_model()
    fresh.register_buffer("a", torch.zeros(6))
    fresh.register_buffer("b", torch.zeros(6))
    load(fresh, tmp_path)
    assert torch.equal(fresh.a, store[:6]) and torch.equal(fresh.b, store[4:])


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    model = _small_model()
    compress_(model, compression="int1", rank=2)
    assert save(model, "~/ckpt") == tmp_path / "ckpt"
    assert (tmp_path / "ckpt" / WEIGHTS_NAME).is_file() and not (tmp_path / "~").exists()
    load(_small_model(), "~/ckpt")


def test_a_compiled_model_saves_and_loads_under_its_own_names(tmp_path):
    model = _small_model()
    compress_(model, compression="int1", rank=2, backend="reference")
    compiled = torch.compile(model, backend="eager")
    save(compiled, tmp_path)
    assert set(json.loads((tmp_path / CONFIG_NAME).read_text())["layers"]) == {"0", "2"}
    fresh = torch.compile(_small_model(), backend="eager")
    assert load(fresh, tmp_path) is fresh
    assert state_equal(model, fresh._orig_mod)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(16, 16)
        self.dec = self.enc  # one layer used twice

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_a_layer_registered_under_two_names_stays_one_layer(tmp_path):
    model = _Tied()
    report = compress_(model, compression="int1", rank=2)
    assert isinstance(model.enc, LoraLinear) and model.dec is model.enc
    assert report.untouched_linear == []
    save(model, tmp_path)
    fresh = _Tied()
    load(fresh, tmp_path)
    assert fresh.dec is fresh.enc and isinstance(fresh.enc, LoraLinear)
    x = torch.randn(3, 16)
    assert torch.equal(model(x), fresh(x))


def test_a_checkpoint_saved_without_layer_metadata_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before LoraLinear's state dict carried ``_extra_state``."""
    model = _small_model()
    compress_(model, compression="int1", rank=2, group_size=8)
    with monkeypatch.context() as m:  # the state dict as it was then
        m.setattr(LoraLinear, "get_extra_state", nn.Module.get_extra_state)
        m.setattr(LoraLinear, "set_extra_state", nn.Module.set_extra_state)
        save(model, tmp_path)
    assert not any(k.endswith("_extra_state") for k in json.loads((tmp_path / CONFIG_NAME).read_text())["tensors"])
    fresh = load(_small_model(), tmp_path)
    x = torch.randn(3, 40)
    assert torch.equal(fresh(x), model(x))


def test_torch_distributed_checkpoint_state_dicts():
    """FSDP2 / DCP take and set state dicts by attribute path: the layer metadata must be extra state."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = _small_model()
    compress_(model, compression="sparse4x4", rank=2)
    sd = get_model_state_dict(model)
    assert "0._extra_state" in sd
    fresh = _small_model()
    compress_(fresh, compression="sparse4x4", rank=2)
    with torch.no_grad():
        model[0].lora_B.normal_()
    set_model_state_dict(fresh, get_model_state_dict(model))
    x = torch.randn(3, 40)
    assert torch.equal(fresh(x), model(x))
