"""16-bit weight copies for generation (engine/weight_copies.py).

On a GPU the engine decodes a float32 policy from persistent bf16 copies of its matmul weights
instead of letting autocast cast them at every step. CPU autocast stands in for the GPU's here:
the same copies under the same autocast must give exactly autocast's numbers, follow weight
updates, and keep their addresses (CUDA graphs read them)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from helpers import make_tokenizer
from posttrain.engine import Engine
from posttrain.engine.weight_copies import cpu_weight_copies, gpu_weight_copies
from posttrain.rollout import SamplingParams
from test_engine import TEXTS, _tiny


def _tied_qwen2(tok) -> torch.nn.Module:
    """Qwen2 with the head tied to the embedding table (as Qwen2.5-0.5B and SmolLM2 have it)."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config.max_length = None
    return model.eval()


def _build(family, tok):
    if family == "llama-lora":  # adapters on a float32 base: both kinds of weights are copied
        from posttrain.config.schema import LoRAConfig
        from posttrain.models.lora import apply_lora

        model = apply_lora(_tiny("llama", tok), LoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"]))
        with torch.no_grad():  # non-zero B matrices, so the adapters change the output
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        return model
    return _tied_qwen2(tok) if family == "qwen2-tied" else _tiny(family, tok)


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_copies_give_exactly_autocasts_logits_and_put_the_float32_weights_back():
    tok = make_tokenizer()
    model = _tied_qwen2(tok)  # the head shares the float32 embedding table
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([tok(TEXTS[2], add_special_tokens=False).input_ids])
    with torch.no_grad(), _autocast():
        expected = model(ids).logits
    copies = gpu_weight_copies(model, model.lm_head, torch.bfloat16)
    swapped = {id(p) for p in copies.params}
    assert id(model.model.embed_tokens.weight) not in swapped  # the lookup stays float32
    assert all(p.dim() >= 2 for p in copies.params)  # norms and biases stay float32
    assert len(copies.shadows) == 1 and copies.shadows[0] is model.lm_head.weight
    masters = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    with copies.swapped(), torch.no_grad(), _autocast():
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        got = model(ids).logits
    assert torch.equal(got, expected)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.data_ptr() == masters[n][0] and torch.equal(p, masters[n][1])


def test_copies_follow_in_place_updates_at_the_same_addresses():
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    copies = gpu_weight_copies(model, model.lm_head, torch.bfloat16)
    weight = model.model.layers[0].mlp.up_proj.weight
    index = next(i for i, p in enumerate(copies.params) if p is weight)
    ptrs = [c.data_ptr() for c in copies._copies]
    with torch.no_grad():
        weight.mul_(2.0)  # the optimizer steps the float32 weights in place
    copies.refresh()
    assert [c.data_ptr() for c in copies._copies] == ptrs
    assert torch.equal(copies._copies[index], weight.detach().to(torch.bfloat16))
    # Inside the swap, new weights go into the float32 tensors and the copies are cast again.
    with copies.swapped():
        with copies.masters_exposed(), torch.no_grad():
            assert weight.dtype == torch.float32
            weight.add_(1.0)
        assert weight.dtype == torch.bfloat16 and weight.data_ptr() == ptrs[index]
        assert torch.equal(weight.detach(), copies._masters[index].to(torch.bfloat16))
    assert weight.dtype == torch.float32


def test_cpu_copies_leave_float32_routers_and_are_freed_after_the_call():
    tok = make_tokenizer()
    model = _tiny("qwen3", tok)
    copies = cpu_weight_copies(model, torch.bfloat16)
    with copies.swapped():
        assert model.model.norm.weight.dtype == torch.bfloat16  # CPU bf16 rollouts cast every weight
    assert copies._copies == [] and model.model.norm.weight.dtype == torch.float32


def _autocast_engine(model, tok, weight_copies: bool) -> Engine:
    """An engine generating a float32 model under bf16 autocast, as it does on a GPU."""
    engine = Engine(model, tok, max_model_len=96, block_size=4, weight_copies=weight_copies)
    engine.runner.use_autocast, engine.runner.compute_dtype, engine.compute_dtype = True, torch.bfloat16, torch.bfloat16
    engine._make_weight_copies()
    assert (engine.weight_copies is not None) == weight_copies
    return engine


@pytest.mark.parametrize("family", ["qwen2-tied", "llama", "llama-lora"])
def test_engine_on_copies_samples_what_autocast_samples_across_weight_updates(family):
    tok = make_tokenizer()
    model = _build(family, tok)
    prompts = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3)
    with_copies, without = _autocast_engine(model, tok, True), _autocast_engine(model, tok, False)

    def run(engine):
        return [(c.token_ids, c.logprobs) for g in engine.generate(prompts, params) for c in g]

    assert run(with_copies) == run(without)
    with torch.no_grad():  # a training step on the shared modules, then the trainer's notice
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with_copies.update_weights()
    without.update_weights()
    after = run(with_copies)
    assert after == run(without)
    assert after != run(_autocast_engine(_build(family, tok), tok, True))  # the update mattered
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_step_driven_engine_casts_new_weights_once_after_update_weights():
    """The server drives the engine with add_request()/step(), not generate(): after
    update_weights() the next step casts the copies (once), so decoding sees the new weights."""
    tok = make_tokenizer()
    model = _tiny("llama", tok)
    with_copies, without = _autocast_engine(model, tok, True), _autocast_engine(model, tok, False)

    def run(engine):
        [seq] = engine.add_request(tok(TEXTS[1], add_special_tokens=False).input_ids,
                                   SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        while engine.has_unfinished:
            engine.step()
        return seq.token_ids, seq.logprobs

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    casts = []
    original = with_copies.weight_copies.refresh
    with_copies.weight_copies.refresh = lambda: casts.append(1) or original()
    with_copies.update_weights()
    without.update_weights()
    assert casts == []  # deferred to the next step
    assert run(with_copies) == run(without)
    assert casts == [1]  # once, not at every step
