import torch

from helpers import make_tiny_llama, make_tokenizer
from posttrain.models.logprobs import make_token_batch, response_logprobs


def _reference_logprobs(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)


def test_padded_batch_matches_unpadded_rows_and_gradients_are_finite():
    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    responses = [[20, 21], [22, 23, 24, 25, 26], [27]]
    batch = make_token_batch(prompts, responses, tok.pad_token_id)
    logprobs, entropy = response_logprobs(model, batch, temperature=0.7, with_entropy=True)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        torch.testing.assert_close(logprobs[i, : len(r)], _reference_logprobs(model, p, r, 0.7), rtol=1e-5, atol=1e-5)
    assert batch.response_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    (logprobs * batch.response_mask).sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    assert entropy.shape == logprobs.shape and (entropy[batch.response_mask.bool()] > 0).all()
