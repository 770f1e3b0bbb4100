import copy

import pytest
import torch
from torch import nn

import loraq
from loraq import CompressionConfig, LoraLinear, compress_, footprint
from models import mlp, resnet18, tiny_bert


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- CompressionConfig -------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (dict(compression="int4"), "compression must be one of"),
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank=2.5), "rank must be an int"),
    (dict(alpha=-1.0), "alpha must be a positive"),
    (dict(alpha=float("inf")), "alpha must be a positive finite"),
    (dict(alpha=float("nan")), "alpha must be a positive finite"),
    (dict(init="kaiming"), "init must be one of"),
    (dict(compression="dense", init="svd"), "needs a compressed base"),
    (dict(loftq_iters=0), "loftq_iters"),
    (dict(dropout=1.0), "dropout"),
    (dict(group_size=0), "group_size"),
    (dict(compression="sparse4x4", group_size=16), "group_size applies"),
    (dict(scale="max"), "scale must be one of"),
    (dict(compression="sparse4x4", scale="onebit"), "applies to compression='int1'"),
    (dict(backend="tpu"), "backend must be one of"),
    (dict(target_modules=["fc("]), "neither a module name nor a valid regex"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CompressionConfig(**bad)


def test_config_round_trips_through_dict():
    cfg = CompressionConfig(compression="int1", rank=4, group_size=8, target_modules="fc", modules_to_save=["head"])
    assert cfg.target_modules == ("fc",)
    assert CompressionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown CompressionConfig fields"):
        CompressionConfig.from_dict({**cfg.to_dict(), "ranks": 3})


# -- compress_ ---------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", ["int1", "sparse4x4", "dense"])
def test_compress_replaces_all_linear_and_freezes_the_rest(compression):
    model = mlp()
    x = torch.randn(6, 19)
    report = compress_(model, CompressionConfig(compression=compression, rank=3), progress=False)
    assert [r.name for r in report.layers] == ["0", "2", "4"]
    assert all(isinstance(model[i], LoraLinear) for i in (0, 2, 4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.lora_{ab}" for i in (0, 2, 4) for ab in "AB"}
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model(x).square().mean().backward()
    assert all(model[i].lora_B.grad is not None for i in (0, 2, 4))
    assert "3 layer(s) compressed" in str(report)


def test_gaussian_start_equals_compressed_base_and_dense_start_equals_model():
    model = mlp()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 19)
    compress_(model, compression="dense", rank=2)
    torch.testing.assert_close(model(x), ref(x))


def test_target_exclude_and_regex_matching():
    model = tiny_bert()
    cfg = CompressionConfig(rank=2, target_modules=["query", r".*\.value"], exclude_modules=[r"bert\.encoder\.layer\.1\..*"])
    report = compress_(model, cfg)
    names = [r.name for r in report.layers]
    assert names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]
    assert "classifier" in report.untouched_linear


def test_modules_to_save_stay_dense_and_trainable():
    model = tiny_bert()
    report = compress_(model, CompressionConfig(rank=2, modules_to_save=["classifier"]))
    assert isinstance(model.classifier, nn.Linear)
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert report.modules_to_save == ["classifier"]
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad


def test_same_seed_same_adapters():
    a, b = mlp(), mlp()
    compress_(a, rank=3, seed=7)
    compress_(b, rank=3, seed=7)
    assert state_equal(a, b)


def test_compress_forward_matches_reference():
    model = mlp()
    dense = copy.deepcopy(model)
    compress_(model, CompressionConfig(compression="sparse4x4", rank=3, init="svd"))
    x = torch.randn(4, 19)
    h = x
    for i, layer in enumerate(model):
        if isinstance(layer, LoraLinear):
            h = loraq.reference.lora_linear_ref(h, layer.base, layer.lora_A, layer.lora_B, layer.scaling, layer.bias)
        else:
            h = layer(h)
    torch.testing.assert_close(model(x), h)
    assert not state_equal(model, dense)


# -- bad input: clear error, model unchanged ---------------------------------------------------
def _assert_unchanged(model, snapshot):
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert state_equal(model, snapshot)
    assert all(p.requires_grad for p in model.parameters())


def test_no_match_lists_linear_names_and_changes_nothing():
    model = mlp()
    snap = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"no nn.Linear layer matches.*the model's Linear layers are: 0, 2, 4"):
        compress_(model, target_modules=["attention"])
    _assert_unchanged(model, snap)


def test_rank_too_large_names_layer_and_changes_nothing():
    model = mlp()
    snap = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"rank must be between 1 and min\(out, in\) = 5 for layer '4'"):
        compress_(model, rank=6)
    _assert_unchanged(model, snap)


def test_nan_weight_in_a_later_layer_changes_nothing():
    model = mlp()
    with torch.no_grad():
        model[4].weight[2, 3] = float("nan")
    snap = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"4.weight contains 1 NaN/Inf"):
        compress_(model, rank=2)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    sa, sb = model.state_dict(), snap.state_dict()
    assert all(torch.equal(sa[k], sb[k]) or k == "4.weight" for k in sa)
    assert torch.isnan(model[4].weight[2, 3])


def test_inf_and_integer_weights_are_refused():
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        compress_(model)
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="must be floating point"):
        compress_(nn.Sequential(lin))


def test_unknown_modules_to_save_and_double_compression_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="modules_to_save: no module matches 'head'"):
        compress_(model, modules_to_save=["head"])
    compress_(model, rank=2)
    with pytest.raises(ValueError, match="already holds LoraLinear"):
        compress_(model, rank=2)


# -- footprint ---------------------------------------------------------------------------------
def test_footprint_resnet18_fc_int1_is_about_a_sixteenth_of_fp16():
    model = resnet18()
    before = footprint(model)
    assert before.dense_bytes == before.stored_bytes and before.layers == []
    compress_(model, CompressionConfig(compression="int1", rank=8, target_modules=["fc"]))
    fp = footprint(model)
    (fc,) = fp.layers
    assert fc.name == "fc" and fc.shape == (1000, 512)
    assert fc.fp16_bytes == 1000 * 512 * 2
    assert fc.base_bytes == 1000 * 16 * 4 + 1000 * 4  # sign bits + fp32 row scales
    assert 14 < fc.fp16_bytes / fc.base_bytes < 17
    assert fp.dense_bytes == before.dense_bytes
    assert fp.dense_bytes - fp.stored_bytes == fc.dense_bytes - fc.base_bytes - fc.lora_bytes
    assert fp.trainable_params == 8 * (512 + 1000)
    assert fp.ratio > 1
    assert "fc" in str(fp) and "smaller" in str(fp)


def test_footprint_counts_tied_weights_once():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    assert footprint(model).dense_bytes == 10 * 6 * 4


def test_multihead_attention_out_proj_is_left_dense():
    """nn.MultiheadAttention reads out_proj.weight itself: compressing it would break the forward."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    report = compress_(model, compression="int1", rank=2)
    assert isinstance(model.linear1, LoraLinear) and isinstance(model.linear2, LoraLinear)
    assert type(model.self_attn.out_proj) is not LoraLinear and "self_attn.out_proj" in report.untouched_linear
    model(torch.randn(2, 5, 16)).sum().backward()
    with pytest.warns(UserWarning, match="self_attn.out_proj.*nn.MultiheadAttention"):
        compress_(nn.TransformerEncoderLayer(16, 2, 32), compression="int1", rank=2,
                  target_modules=["out_proj", "linear1"])


def test_meta_device_model_is_refused_clearly_and_left_unchanged():
    model = nn.Sequential(nn.Linear(13, 9, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        compress_(model, CompressionConfig(rank=2))
    assert isinstance(model[0], nn.Linear)
    with pytest.raises(ValueError, match="meta device"):
        LoraLinear.from_linear(nn.Linear(13, 9, device="meta"), "int1", rank=4)


def test_compress_keeps_the_forward_and_backward_hooks_of_a_replaced_layer():
    model = nn.Sequential(nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3))
    seen = []
    pre = model[0].register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    post = model[0].register_forward_hook(lambda m, args, out: seen.append(("out", tuple(out.shape))))
    model[0].register_full_backward_hook(lambda m, gin, gout: seen.append(("grad", tuple(gout[0].shape))))
    compress_(model, CompressionConfig(rank=2))
    model(torch.randn(5, 9, requires_grad=True)).sum().backward()
    assert seen == [("pre", "LoraLinear"), ("out", (5, 8)), ("grad", (5, 8))]
    pre.remove(), post.remove()  # the handles the user holds still work
    seen.clear()
    model(torch.randn(5, 9))
    assert seen == []
