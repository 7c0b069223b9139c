"""Packed RL micro-batches: the same logprobs, loss and gradient as padded rows, in fewer slots."""

import contextlib
import copy

import pytest
import torch

from helpers import make_tiny_llama, make_tokenizer
from posttrain.config.schema import GRPOConfig, LoRAConfig
from posttrain.data.packing import balance_documents, pack_documents
from posttrain.models.logprobs import make_packed_token_batch, make_token_batch, response_logprobs
from posttrain.models.lora import apply_lora
from posttrain.trainer.optim import build_optimizer, build_scheduler
from posttrain.trainer.packing import packed_row_tokens, packs_samples, split_micro_batches
from posttrain.trainer.policy import policy_update
from posttrain.trainer.rollouts import fill_reference_logprobs
from posttrain.trainer.samples import Sample, collate

CPU = torch.device("cpu")


def _samples(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        prompt = torch.randint(4, 90, (3 + (i * 5) % 9,), generator=g).tolist()
        response = torch.randint(4, 90, (1 + (i * 7) % 13,), generator=g).tolist()
        old = (-torch.rand(len(response), generator=g) * 3).tolist()
        ref = (-torch.rand(len(response), generator=g) * 3).tolist()
        samples.append(Sample(prompt, response, old, advantage=float(i % 3 - 1), reward=0.0, ref_logprobs=ref))
    return samples


def test_balanced_bins_hold_every_document_once_within_capacity_and_evenly():
    lengths = [int(x) for x in torch.randint(100, 1025, (64,), generator=torch.Generator().manual_seed(3))]
    capacity = 4096
    bins = balance_documents(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert len(bins) == len(pack_documents(lengths, capacity))  # no more micro-batches than first-fit decreasing
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= capacity
    first_fit = [sum(lengths[i] for i in b) for b in pack_documents(lengths, capacity)]
    assert max(loads) - min(loads) < max(first_fit) - min(first_fit)
    # A document longer than the budget gets a micro-batch of its own.
    assert sorted(map(sorted, balance_documents([5000, 10, 20], capacity))) == [[0], [1, 2]]


@pytest.mark.parametrize("chunk_size,rows", [(0, None), (7, None),  # one row; several rows, right-padded
                                             (0, [[0, 3], [1], [2, 4, 5]]), (7, [[5, 1], [0, 2, 3, 4]])])
def test_packed_logprobs_entropy_and_gradients_equal_padded(chunk_size, rows):
    model = make_tiny_llama(make_tokenizer())
    samples = _samples(6)
    prompts, responses = [s.prompt_ids for s in samples], [s.response_ids for s in samples]

    def run(batch):
        model.zero_grad(set_to_none=True)
        logprobs, entropy = response_logprobs(model, batch, temperature=0.7, with_entropy=True, entropy_grad=True,
                                              chunk_size=chunk_size)
        mask = batch.response_mask
        weights = torch.linspace(-1.0, 2.0, mask.numel()).reshape(mask.shape)
        ((weights * logprobs * mask).sum() - 0.3 * (entropy * mask).sum()).backward()
        return logprobs * mask, entropy * mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = make_packed_token_batch(prompts, responses, 0, rows=rows)
    assert packed.attention_mask is None
    if rows is None:
        assert packed.input_ids.shape == (1, sum(s.num_tokens for s in samples))  # one row, no padding
    lp_pad, ent_pad, grads_pad = run(make_token_batch(prompts, responses, pad_token_id=0))
    lp_pack, ent_pack, grads_pack = run(packed)
    torch.testing.assert_close(lp_pack, lp_pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_pack, ent_pad, rtol=1e-5, atol=1e-5)
    for name, grad in grads_pad.items():
        torch.testing.assert_close(grads_pack[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def _update(model, micro_batch_tokens, mode, row_tokens=0):
    cfg = GRPOConfig()
    cfg.rollout.batch_size = cfg.trainer.mini_batch_size = 10
    cfg.rollout.max_new_tokens = 16
    cfg.trainer.micro_batch_size = 3 if micro_batch_tokens == 0 else 10
    cfg.trainer.micro_batch_tokens = micro_batch_tokens
    cfg.trainer.packed_row_tokens = row_tokens
    cfg.trainer.lr = 1e-2
    cfg.trainer.adam_eps = 1.0  # Adam's first step linear in the gradient (see test_policy_update)
    cfg.algorithm.loss_agg_mode = mode
    cfg.algorithm.kl_coef = 0.1
    cfg.algorithm.entropy_coef = 0.01
    cfg.model.chunked_logprobs = 5
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 1)
    return policy_update(model, optimizer, scheduler, _samples(), 0, CPU, contextlib.nullcontext,
                         algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                         moe_cfg=cfg.moe)


# row_tokens 0: rows as long as the longest sample (sdpa); 1000: one row per micro-batch; 20: rows of <= 20.
@pytest.mark.parametrize("mode,lora,row_tokens", [("token-mean", False, 0), ("seq-mean-token-mean", False, 1000),
                                                  ("token-mean", True, 1000), ("seq-mean-token-sum-norm", False, 20)])
def test_packed_update_equals_padded_update(mode, lora, row_tokens):
    base = make_tiny_llama(make_tokenizer())
    if lora:
        base = apply_lora(base, LoRAConfig(r=4, alpha=8.0))
    padded, packed = copy.deepcopy(base), copy.deepcopy(base)
    m_padded = _update(padded, 0, mode)
    m_packed = _update(packed, 40, mode, row_tokens)  # 10 samples of 4-32 tokens: several packed micro-batches
    for key in ("loss/policy", "grad_norm", "kl", "entropy", "actor/clip_fraction"):
        if key in m_padded:
            assert m_packed[key] == pytest.approx(m_padded[key], rel=1e-5, abs=1e-6), key
    changed = 0
    for (name, a), b, before in zip(padded.named_parameters(), packed.parameters(), base.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(a, before)
    assert changed > 0


def test_token_budget_micro_batches_and_padded_fallback():
    samples = _samples()
    model = make_tiny_llama(make_tokenizer())
    assert packs_samples(model, 64) and not packs_samples(model, 0)
    groups = split_micro_batches(samples, 4, 64, packed=True)
    assert sorted(id(s) for g in groups for s in g) == sorted(id(s) for s in samples)
    assert all(sum(s.num_tokens for s in g) <= 64 for g in groups)
    # Padded rows (a model that ignores position-id boundaries): rows x longest within the budget.
    for group in split_micro_batches(samples, 4, 64, packed=False):
        assert len(group) * max(s.num_tokens for s in group) <= 64 or len(group) == 1
    assert split_micro_batches(samples, 4, 0, packed=False) == [samples[:4], samples[4:8], samples[8:]]


def test_row_length_follows_the_attention_kernel(monkeypatch):
    from posttrain.models import packed_attention

    samples = _samples()
    longest = max(s.num_tokens for s in samples)
    model = make_tiny_llama(make_tokenizer())
    model.config._attn_implementation = "sdpa"
    assert packed_row_tokens(model, 0, samples) == longest  # sdpa: dense over a row, so rows no longer than padded
    assert packed_row_tokens(model, 64, samples) == 64
    for name, device_types in [("sdpa_flex", packed_attention.FLEX_DEVICE_TYPES),
                               ("sdpa_varlen", packed_attention.VARLEN_DEVICE_TYPES)]:
        model.config._attn_implementation = name
        assert packed_row_tokens(model, 0, samples) == longest  # on CPU both are sdpa: dense rows
        monkeypatch.setattr(packed_attention, "FLEX_DEVICE_TYPES" if name == "sdpa_flex" else "VARLEN_DEVICE_TYPES",
                            device_types | {"cpu"})
        monkeypatch.setattr("posttrain.trainer.packing." + ("FLEX_DEVICE_TYPES" if name == "sdpa_flex"
                                                            else "VARLEN_DEVICE_TYPES"), device_types | {"cpu"})
        assert packed_row_tokens(model, 0, samples) == 0  # a kernel that skips across documents: one row
    rows = collate(samples, 0, CPU, packed=True, row_tokens=longest).tokens.input_ids
    assert rows.shape[1] == longest and rows.shape[0] < len(samples)  # fewer rows than padding one per sample


class _IgnoresBoundaries(torch.nn.Module):
    """A model whose attention does not honour position-id restarts (passes an all-ones mask)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def test_model_that_ignores_boundaries_is_not_packed(caplog):
    model = _IgnoresBoundaries(make_tiny_llama(make_tokenizer()))
    assert not packs_samples(model, 4096)
    assert "position-id document boundaries" in caplog.text


def test_packed_reference_logprobs_keep_sample_order():
    model = make_tiny_llama(make_tokenizer())
    cfg = GRPOConfig()
    cfg.model.chunked_logprobs = 0
    got = {}
    for tokens in (0, 48):
        cfg.trainer.micro_batch_tokens = tokens
        samples = _samples()
        fill_reference_logprobs(model, samples, cfg.trainer, cfg.rollout, cfg.model, 0, CPU, contextlib.nullcontext)
        got[tokens] = [s.ref_logprobs for s in samples]
        assert [len(r) for r in got[tokens]] == [len(s.response_ids) for s in samples]
    for padded, packed in zip(got[0], got[48]):
        assert packed == pytest.approx(padded, abs=1e-5)
