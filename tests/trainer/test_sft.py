"""SFT: packing and accumulation equivalences, config checks, the CLI end to end, resume, learning."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from helpers import make_tiny_llama, make_tokenizer, save_tiny_model
from posttrain.cli import main
from posttrain.config.loader import load_config
from posttrain.config.sft_schema import SFTConfig
from posttrain.data.packing import build_micro_batches, position_ids_isolate_documents
from posttrain.data.sft import SFTExample
from posttrain.errors import ConfigError
from posttrain.trainer.sft import sft_update, summed_nll

NO_AUTOCAST = contextlib.nullcontext


def random_examples(lengths, seed=0, vocab=90):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        mask = [0] + torch.randint(0, 2, (n - 1,), generator=g).tolist()
        mask[-1] = 1
        out.append(SFTExample(ids, mask))
    return out


def per_token_nll(model, batch):
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False)
    nll = F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
    return nll[batch.labels.flatten() != -100]


@torch.no_grad()
def test_packed_rows_give_the_same_per_token_losses_as_documents_alone():
    tok = make_tokenizer()
    model = make_tiny_llama(tok).eval()
    examples = random_examples([7, 12, 5, 9])
    [packed] = build_micro_batches(examples, micro_batch_tokens=40, max_seq_len=40, packed=True, pad_token_id=0)
    assert packed.input_ids.shape[0] == 1 and packed.attention_mask is None  # all four in one row
    alone = [build_micro_batches([ex], micro_batch_tokens=40, max_seq_len=40, packed=False, pad_token_id=0)[0]
             for ex in examples]
    # pack_documents orders a row longest first: 12, 9, 7, 5.
    expected = torch.cat([per_token_nll(model, alone[i]) for i in (1, 3, 0, 2)])
    torch.testing.assert_close(per_token_nll(model, packed), expected, rtol=1e-5, atol=1e-5)
    # The padded layout, several rows per micro-batch, agrees as well.
    padded = build_micro_batches(examples, micro_batch_tokens=24, max_seq_len=12, packed=False, pad_token_id=0)
    total = sum(summed_nll(model, b, NO_AUTOCAST) for b in padded)
    torch.testing.assert_close(total, summed_nll(model, packed, NO_AUTOCAST), rtol=1e-5, atol=1e-5)


class _IgnoresBoundaries(torch.nn.Module):
    """A model whose attention does not honour position-id restarts (passes an all-ones mask)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def test_packing_probe_detects_whether_attention_honours_position_ids():
    model = make_tiny_llama(make_tokenizer())
    assert position_ids_isolate_documents(model)
    assert not position_ids_isolate_documents(_IgnoresBoundaries(model))
    assert model.training  # the probe restores the mode


def one_step(micro_batch_tokens, packed):
    tok = make_tokenizer()
    model = make_tiny_llama(tok)
    examples = random_examples([7, 12, 5, 9, 3, 11], seed=1)
    batches = build_micro_batches(examples, micro_batch_tokens=micro_batch_tokens, max_seq_len=12, packed=packed,
                                  pad_token_id=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    before = copy.deepcopy(model.state_dict())
    metrics = sft_update(model, optimizer, scheduler, batches, 0.0, torch.device("cpu"), NO_AUTOCAST)
    update = {k: before[k] - v for k, v in model.state_dict().items()}
    return len(batches), metrics, update


def test_any_micro_batch_split_gives_the_same_step():
    n_whole, whole, update_whole = one_step(micro_batch_tokens=100, packed=True)
    n_split, split, update_split = one_step(micro_batch_tokens=12, packed=True)
    n_padded, padded, update_padded = one_step(micro_batch_tokens=12, packed=False)
    assert (n_whole, n_split, n_padded) == (1, 4, 5)  # rows 12|11|9+3|7+5; padded: 5 and 3 share one
    for metrics, update in [(split, update_split), (padded, update_padded)]:
        assert metrics["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
        for name, delta in update.items():
            torch.testing.assert_close(delta, update_whole[name], rtol=1e-4, atol=1e-6)


def test_config_checks(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = load_config(SFTConfig, None, [f"data.train_path={data}"])
    assert cfg.trainer.lr == 2e-5 and cfg.data.packing and cfg.trainer.max_steps == 0
    with pytest.raises(ConfigError, match="data.train_path is required"):
        load_config(SFTConfig)
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, None, ["data.train_path=nope.jsonl", "data.max_seq_len=1", "trainer.micro_batch_tokens=0",
                                      "trainer.max_steps=0", "trainer.num_epochs=0"])
    message = str(info.value)
    for part in ("data.train_path='nope.jsonl' does not exist", "data.max_seq_len=1 must be >= 2",
                 "trainer.micro_batch_tokens=0 must be a positive", "trainer.num_epochs=0.0 must be > 0"):
        assert part in message, part
    with pytest.raises(ConfigError, match="trainer.batch_tokens=100 must be >= data.max_seq_len=2048"):
        load_config(SFTConfig, None, [f"data.train_path={data}", "trainer.batch_tokens=100"])
    cfg = load_config(SFTConfig, "sft_chat", [f"data.train_path={data}"])
    assert cfg.trainer.lr_scheduler == "cosine" and cfg.trainer.warmup_steps > 0


def write_chats(path, n=24):
    rows = []
    for i in range(n):
        if i % 3:
            rows.append({"prompt": f"say {i}", "completion": f"{i}{i}"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
                                      {"role": "user", "content": "again"}, {"role": "assistant", "content": f"b{i}"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def sft_args(model_dir, data, out_dir, max_steps, *extra):
    return ["sft", f"model.path={model_dir}", f"data.train_path={data}", f"trainer.output_dir={out_dir}",
            f"trainer.max_steps={max_steps}", "data.validation_size=4", "data.max_seq_len=48",
            "trainer.batch_tokens=160", "trainer.micro_batch_tokens=96", "trainer.lr=1e-3", "trainer.warmup_steps=1",
            "trainer.eval_every=2", "checkpoint.every=1", "checkpoint.keep_last=2", "logging.progress_bar=false",
            *extra]


def read_metrics(run_dir, key="loss"):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if key in m}


def test_cli_trains_checkpoints_and_resumes_exactly(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl")
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"

    # A constant schedule (after warmup), so a 2-step run's steps are those of a 3-step run.
    constant = "trainer.lr_scheduler=constant"
    assert main(sft_args(model_dir, data, interrupted, 2, constant)) == 0
    metrics = read_metrics(interrupted)
    assert sorted(metrics) == [1, 2]
    for key in ("loss", "grad_norm", "lr", "perf/tokens_per_s", "data/padding_fraction", "data/loss_tokens"):
        assert key in metrics[2], key
    assert sorted(read_metrics(interrupted, "val/loss")) == [0, 2]
    ckpt = interrupted / "checkpoints" / "step_000002"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert loaded(torch.tensor([[5, 6, 7]])).logits.isfinite().all()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2

    assert main(sft_args(model_dir, data, interrupted, 3, constant, "--resume")) == 0
    assert main(sft_args(model_dir, data, straight, 3, constant)) == 0
    resumed, uninterrupted = read_metrics(interrupted), read_metrics(straight)
    assert sorted(resumed) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "grad_norm", "lr", "data/tokens"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-5), (step, key)
    final_a = AutoModelForCausalLM.from_pretrained(interrupted / "checkpoints" / "step_000003").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(straight / "checkpoints" / "step_000003").state_dict()
    for name in final_a:
        torch.testing.assert_close(final_a[name], final_b[name], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_000002", "step_000003"]


def test_cli_reports_bad_rows_with_exit_1(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"question": "a"}\n')
    assert main(sft_args(model_dir, data, tmp_path / "run", 1, "data.validation_size=0")) == 1
    err = capsys.readouterr().err
    assert "row 2" in err and "columns found: ['question']" in err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_learns_a_toy_mapping_and_validation_loss_falls(tmp_path):
    """The tiny random model learns 8 prompts -> answers (letter -> letter three on); the held-out
    loss falls by more than half and below what knowing only the answer format gives (ln 8 / 2)."""
    model_dir = save_tiny_model(tmp_path / "model")
    letters = "abcdefgh"
    rows = [{"prompt": f"{c}=", "completion": letters[(i + 3) % len(letters)]} for i, c in enumerate(letters)] * 8
    data = tmp_path / "toy.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "learn"
    args = sft_args(model_dir, data, out, 40, "data.validation_size=8", "trainer.lr=1e-2", "trainer.batch_tokens=512",
                    "trainer.micro_batch_tokens=512", "trainer.eval_every=40", "checkpoint.every=0",
                    "trainer.lr_scheduler=constant", "logging.console_every=0", "model.use_chat_template=false")
    assert main(args) == 0
    val = read_metrics(out, "val/loss")
    first, last = val[0]["val/loss"], val[40]["val/loss"]
    assert last < 0.5 * first and last < 0.5, (first, last)


def _dry_run_out(args, capsys):
    capsys.readouterr()
    assert main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("epochs,cross", [(1, False), (2, False), (1, True)])
def test_num_epochs_on_a_file_smaller_than_a_step_and_dry_run_agrees(tmp_path, capsys, caplog, epochs, cross):
    """8 conversations, far fewer tokens than trainer.batch_tokens: num_epochs passes, one step each,
    no conversation repeated within a step unless trainer.steps_cross_epochs=true asks for it."""
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl", n=8)
    run_dir = tmp_path / "run"
    args = ["sft", f"model.path={model_dir}", "model.device=cpu", f"data.train_path={data}",
            f"trainer.output_dir={run_dir}", "data.validation_size=0", "data.max_seq_len=48", "trainer.batch_tokens=4096",
            "trainer.micro_batch_tokens=96", f"trainer.num_epochs={epochs}", f"trainer.steps_cross_epochs={cross}",
            "logging.progress_bar=false"]
    out = _dry_run_out(args, capsys)
    with caplog.at_level("INFO"):
        assert main(args) == 0
    metrics = read_metrics(run_dir)
    if cross:  # asked for: the one step fills its budget by repeating the file
        assert sorted(metrics) == [1] and metrics[1]["data/conversations"] > 8 and metrics[1]["data/epoch"] > 2
        assert "every step trains about" in caplog.text
    else:
        assert sorted(metrics) == list(range(1, epochs + 1))
        assert all(m["data/conversations"] == 8 for m in metrics.values())
        assert [m["data/epoch"] for m in metrics.values()] == [float(e) for e in range(1, epochs + 1)]
        assert "each step is one pass over them" in caplog.text
    # --dry-run said what the run did: its steps and the tokens of a step.
    assert f"for {len(metrics)} steps" in out
    trained = float(out.split("\n  trained ", 1)[1].split("(")[0].replace(",", ""))
    if cross:  # the budget; the step stops at the last whole conversation that fits
        assert trained - 48 <= metrics[1]["data/tokens"] <= trained
    else:
        assert trained == metrics[1]["data/tokens"]


def test_the_lr_logged_is_the_lr_the_step_used(tmp_path, monkeypatch):
    """Read before scheduler.step(): after it, each step would show the next step's lr."""
    import posttrain.trainer.sft as sft

    used = []
    real_step = sft.clip_and_step

    def recording_step(optimizer, *args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(sft, "clip_and_step", recording_step)
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_chats(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"
    assert main(sft_args(model_dir, data, run_dir, 4, "trainer.warmup_steps=2", "trainer.eval_every=0",
                         "checkpoint.every=0")) == 0
    logged = [m["lr"] for _, m in sorted(read_metrics(run_dir).items())]
    assert len(used) == 4 and used[0] != used[1]  # the lr after each step would be off by one
    assert logged == pytest.approx(used, rel=1e-12)
    assert logged[0] == pytest.approx(1e-3 / 2)  # warmup: step 1 of 2 trains at half the peak
