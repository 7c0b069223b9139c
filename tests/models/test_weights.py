import pytest
import torch

from helpers import make_tiny_llama, make_tokenizer
from posttrain.models.weights import (
    WeightLoadError,
    iter_weight_buckets,
    load_named_tensors,
    named_weights,
    weights_checksum,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_load_copies_in_place_and_counts_bytes(tok):
    target, source = make_tiny_llama(tok, seed=0), make_tiny_llama(tok, seed=1)
    ptrs = {n: p.data_ptr() for n, p in target.named_parameters()}
    sent = {n: p.detach().to(torch.bfloat16) for n, p in source.named_parameters()}
    copied = load_named_tensors(target, sent)
    assert copied == sum(t.numel() * 2 for t in sent.values())
    assert {n: p.data_ptr() for n, p in target.named_parameters()} == ptrs  # no reallocation
    for name, param in target.named_parameters():
        assert param.dtype == torch.float32
        torch.testing.assert_close(param, sent[name].float())


def test_tied_weight_loads_under_either_name(tok):
    model = make_tiny_llama(tok)
    assert "lm_head.weight" in named_weights(model)
    new = torch.randn_like(model.lm_head.weight)
    load_named_tensors(model, {"lm_head.weight": new})
    torch.testing.assert_close(model.model.embed_tokens.weight, new)


def test_unknown_name_and_bad_shape_leave_the_model_untouched(tok):
    model = make_tiny_llama(tok)
    before = weights_checksum(model)
    good = ("model.norm.weight", torch.zeros_like(model.model.norm.weight))
    with pytest.raises(WeightLoadError, match="not in the model.*model.layers.0.self_attn.q_proj.weightx"):
        load_named_tensors(model, [good, ("model.layers.0.self_attn.q_proj.weightx", torch.zeros(1))])
    with pytest.raises(WeightLoadError, match=r"'model.norm.weight' has shape \(3,\)"):
        load_named_tensors(model, [("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 32)), ("model.norm.weight", torch.zeros(3))])
    assert weights_checksum(model) == before


def test_buckets_respect_the_size_and_cover_every_parameter_once(tok):
    model = make_tiny_llama(tok)
    names = [n for n, _ in model.named_parameters()]
    bucket_mb = 8 * 1024 / 2**20  # 8 KB
    buckets = list(iter_weight_buckets(model, bucket_mb, dtype=torch.float16))
    assert [n for b in buckets for n, _ in b] == names
    assert len(buckets) > 2
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= 8 * 1024 or len(bucket) == 1
        assert all(t.dtype == torch.float16 for _, t in bucket)


def test_trainable_only_and_checksum(tok):
    model = make_tiny_llama(tok)
    model.model.embed_tokens.weight.requires_grad_(False)
    trainable = [n for b in iter_weight_buckets(model, trainable_only=True) for n, _ in b]
    assert "model.embed_tokens.weight" not in trainable and len(trainable) == len(list(model.parameters())) - 1
    other = make_tiny_llama(tok)
    assert weights_checksum(model) == weights_checksum(other)
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    assert weights_checksum(model) != weights_checksum(other)


def test_share_aliases_without_copy_and_checks_dtype(tok):
    from posttrain.models.weights import share_named_tensors

    model, source = make_tiny_llama(tok, seed=0), make_tiny_llama(tok, seed=1)
    assert share_named_tensors(model, dict(source.named_parameters())) == len(list(source.parameters()))
    assert model.lm_head.weight.data_ptr() == source.model.embed_tokens.weight.data_ptr()  # tied stays tied
    with pytest.raises(WeightLoadError, match="cannot be shared.*bfloat16"):
        share_named_tensors(model, {"model.norm.weight": source.model.norm.weight.detach().bfloat16()})
