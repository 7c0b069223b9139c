"""`posttrain serve` over posttrain's engine: concurrent requests share one continuously batched
engine, a failed step fails only its requests, and weight updates land between steps."""

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from helpers import make_tiny_llama, make_tokenizer  # noqa: E402
from posttrain.engine import Engine  # noqa: E402
from posttrain.server.app import create_app  # noqa: E402
from server.live import live_server  # noqa: E402

PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49], [60, 61, 62, 63, 64, 65], [70, 20]]


def _varied_llama(tok, seed):
    """A tiny Llama with larger random weights: at the default init it repeats the last token,
    and outputs that differ per prompt and per weights are what these tests compare."""
    model = make_tiny_llama(tok, seed=seed).eval()
    model.generation_config.max_length = None
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return model


def _served(seed: int = 0, **limits):
    tok = make_tokenizer()
    model = _varied_llama(tok, seed)
    engine = Engine(model, tok, max_model_len=96, block_size=4, max_num_seqs=16)
    steps = []  # (request ids in the step, is_prefill, thread name), recorded by a spy on the model runner
    run = engine.runner.run

    def spy(seqs, is_prefill):
        steps.append(({s.request_id for s in seqs}, is_prefill, threading.current_thread().name))
        return run(seqs, is_prefill)

    engine.runner.run = spy
    return model, tok, engine, steps, create_app(engine, tok, "tiny", **limits)


def _greedy(model, tok, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def _body(prompt, max_new_tokens=10, n=1):
    return {"input_ids": prompt, "sampling_params": {"n": n, "temperature": 0, "max_new_tokens": max_new_tokens}}


def _wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _post_in_threads(url, bodies):
    results = {}

    def post(i, body):
        results[i] = httpx.post(url + "/generate", json=body, timeout=60)

    threads = [threading.Thread(target=post, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    return results, threads


def test_concurrent_requests_are_batched_in_one_engine_and_match_one_by_one():
    model, tok, engine, steps, app = _served()
    bodies = [_body(p, n=2 if i == 1 else 1) for i, p in enumerate(PROMPTS)]
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        # Hold the engine until all requests are queued, so that they are certainly in flight together.
        assert http.post("/pause_generation").status_code == 200
        results, threads = _post_in_threads(url, bodies)
        _wait_for(lambda: http.get("/health").json()["requests_in_engine"] == len(bodies))
        assert http.post("/continue_generation").status_code == 200
        for t in threads:
            t.join(60)
        together = [results[i].json() for i in range(len(bodies))]
        batched_steps = list(steps)
        one_by_one = [http.post("/generate", json=b).json() for b in bodies]

    assert all(r.status_code == 200 for r in results.values())
    # One prefill step took all requests in, and decode steps mixed sequences of several requests.
    assert max(len(ids) for ids, prefill, _ in batched_steps if prefill) == len(bodies)
    assert max(len(ids) for ids, prefill, _ in batched_steps if not prefill) > 1
    assert {name for _, _, name in steps} == {"posttrain-engine-loop"}
    for prompt, batched, alone in zip(PROMPTS, together, one_by_one):
        batched = batched if isinstance(batched, list) else [batched]
        alone = alone if isinstance(alone, list) else [alone]
        reference = _greedy(model, tok, prompt, 10)
        for b, a in zip(batched, alone):
            assert b["output_ids"] == a["output_ids"] == reference
            torch.testing.assert_close(torch.tensor(b["logprobs"]), torch.tensor(a["logprobs"]), atol=1e-4, rtol=0)
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_a_failing_step_fails_its_request_with_500_and_the_next_one_succeeds():
    model, tok, engine, steps, app = _served()
    spy = engine.runner.run
    failures = []

    def flaky(seqs, is_prefill):
        if failures:
            failures.pop()
            raise RuntimeError("injected step failure")
        return spy(seqs, is_prefill)

    engine.runner.run = flaky
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        failures.append(True)
        resp = http.post("/generate", json=_body(PROMPTS[1]))
        assert resp.status_code == 500, resp.text
        err = resp.json()["error"]
        assert err["type"] == "server_error" and "injected step failure" in err["message"]
        resp = http.post("/generate", json=_body(PROMPTS[1]))
        assert resp.status_code == 200 and resp.json()["output_ids"] == _greedy(model, tok, PROMPTS[1], 10)
        # A prompt beyond the engine's max_model_len is refused before it reaches the engine.
        resp = http.post("/generate", json=_body(list(range(5, 105))))
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
        assert http.get("/health").json()["requests_in_engine"] == 0
    # The failed request's blocks went back to the cache.
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_weight_update_runs_between_steps_on_the_loop_thread(tmp_path):
    model, tok, engine, steps, app = _served(seed=0)
    trained = _varied_llama(tok, seed=1)
    save_file({n: p.detach().clone() for n, p in trained.named_parameters()}, str(tmp_path / "model.safetensors"))
    prompt = PROMPTS[2]
    before, after = _greedy(model, tok, prompt, 10), _greedy(trained, tok, prompt, 10)
    assert before != after  # otherwise the test could not tell the weights apart

    updates, reached = [], threading.Event()
    update_weights = engine.update_weights

    def spy_update(named_tensors=None):
        updates.append((threading.current_thread().name, engine.has_unfinished))
        return update_weights(named_tensors)

    engine.update_weights = spy_update
    run = engine.runner.run

    def stop_mid_request(seqs, is_prefill):
        # In the long request's first decode step: let the test pause the loop right after it.
        if 9 in {s.request_id for s in seqs} and not is_prefill and not reached.is_set():
            reached.set()
            _wait_for(lambda: app.state.server.engine_loop.paused)
        return run(seqs, is_prefill)

    engine.runner.run = stop_mid_request
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        first = http.post("/generate", json=_body(prompt)).json()
        assert first["output_ids"] == before
        assert first["meta_info"] == {"weight_version": "initial", "token_versions": [0] * len(before)}
        engine._next_request = 9  # the long request's id, for the spy
        results, threads = _post_in_threads(url, [_body(PROMPTS[1], max_new_tokens=30)])
        assert reached.wait(30)
        assert http.post("/pause_generation").status_code == 200
        resp = http.post("/update_weights_from_disk", json={"model_path": str(tmp_path), "weight_version": "2"})
        assert resp.status_code == 200 and resp.json()["success"], resp.text
        assert http.post("/continue_generation").status_code == 200
        threads[0].join(60)
        assert results[0].status_code == 200
        # Per-token versions show the switch: the prefill's token and the first decode step's came
        # from the initial weights, every later one from version 2.
        long = results[0].json()
        versions = long["meta_info"]["token_versions"]
        assert len(versions) == len(long["output_ids"]) > 2
        assert versions == [0, 0] + [2] * (len(versions) - 2)
        assert long["meta_info"]["weight_version"] == "2"
        assert http.post("/generate", json=_body(prompt)).json()["output_ids"] == after
    # The update ran on the thread that steps the engine, while the long request was in flight.
    assert updates == [("posttrain-engine-loop", True)]


def test_serve_picks_the_engine_by_model_family(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from posttrain.cli import build_parser
    from posttrain.errors import ConfigError
    from posttrain.rollout.hf_engine import HFEngine
    from posttrain.server.cli import build_serving_engine

    tok = make_tokenizer()
    llama = make_tiny_llama(tok)  # max_position_embeddings=512
    args = build_parser().parse_args(["serve", "--max-num-seqs", "4"])
    engine, max_prompt_tokens = build_serving_engine(args, llama, tok, torch.float32)
    assert isinstance(engine, Engine) and engine.max_num_seqs == 4
    assert (engine.max_model_len, max_prompt_tokens) == (512, 511)
    args = build_parser().parse_args(["serve", "--engine", "hf"])
    assert isinstance(build_serving_engine(args, llama, tok, torch.float32)[0], HFEngine)
    args = build_parser().parse_args(["serve", "--max-model-len", "64", "--max-prompt-tokens", "64"])
    with pytest.raises(ConfigError, match="--max-prompt-tokens"):
        build_serving_engine(args, llama, tok, torch.float32)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    with caplog.at_level("INFO", logger="posttrain.server"):
        engine, max_prompt_tokens = build_serving_engine(build_parser().parse_args(["serve"]), gpt2, tok, torch.float32)
    assert isinstance(engine, HFEngine) and max_prompt_tokens == 64
    assert "serving with transformers" in caplog.text


def test_shared_weights_and_flush_cache_reach_the_engine():
    from posttrain.sync.client import EngineClient
    from posttrain.sync.shared import SharedSync

    model, tok, engine, steps, app = _served(seed=0, enable_tensor_updates=True)
    trainer = _varied_llama(tok, seed=1)
    prompt = PROMPTS[2]  # a full prompt block: cached after the first request
    with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        client = EngineClient(url, http=http)
        assert http.post("/generate", json=_body(prompt)).json()["output_ids"] == _greedy(model, tok, prompt, 10)
        sync = SharedSync(engine, trainer, client)
        sync.connect()  # the engine now computes with the trainer's tensors
        assert http.post("/generate", json=_body(prompt)).json()["output_ids"] == _greedy(trainer, tok, prompt, 10)
        with torch.no_grad():
            for p in trainer.parameters():
                p.mul_(-1.0)  # an "optimizer step" in place
        assert sync.push(1, 1) == 0  # moves nothing, flushes the prefix cache
        assert http.post("/generate", json=_body(prompt)).json()["output_ids"] == _greedy(trainer, tok, prompt, 10)


def test_a_cancelled_request_is_dropped_from_the_batch():
    import asyncio

    from posttrain.sampling import SamplingParams
    from posttrain.server.engine_loop import EngineLoop

    model, tok, engine, steps, _ = _served()
    added = []
    add_request = engine.add_request
    engine.add_request = lambda prompt, params: added.append(add_request(prompt, params)) or added[-1]
    loop = EngineLoop(engine, name="test-engine-loop")

    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
        kept = asyncio.create_task(loop.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=20)))
        dropped = asyncio.create_task(loop.generate([PROMPTS[1]], params))
        while len(steps) < 3:
            await asyncio.sleep(0.001)
        dropped.cancel()
        [[completion]] = await kept
        return completion

    try:
        completion = asyncio.run(main())
        assert completion.token_ids == _greedy(model, tok, PROMPTS[0], 20)
        _wait_for(lambda: not engine.has_unfinished)
        [[kept], [dropped]] = sorted(added, key=lambda group: group[0].request_id)
        assert dropped.finish_reason == "abort" and dropped.num_completion_tokens < 80
    finally:
        loop.stop()
    assert not loop.thread.is_alive()


def _loop_stuck_in_a_step():
    """An EngineLoop whose engine's step blocks until the returned event is set."""
    from posttrain.sampling import SamplingParams
    from posttrain.server.engine_loop import EngineLoop

    release, stepping = threading.Event(), threading.Event()

    class StuckEngine:
        device = torch.device("cpu")
        has_unfinished = False

        def add_request(self, prompt, params):
            self.has_unfinished = True
            return []

        def step(self):
            stepping.set()
            release.wait(timeout=30)  # a test that forgets to release still ends
            self.has_unfinished = False
            return []

        def abort(self, seqs):
            pass

    loop = EngineLoop(StuckEngine(), name="test-stuck-loop", wait_timeout_s=0.3)
    import asyncio

    def submit():
        async def go():
            await loop.generate([[1]], SamplingParams(max_tokens=1))
        try:
            asyncio.run(asyncio.wait_for(go(), 10))
        except Exception:
            pass

    threading.Thread(target=submit, daemon=True).start()
    assert stepping.wait(timeout=10)
    return loop, release


def test_call_and_pause_time_out_with_a_message_naming_the_wait():
    from posttrain.server.engine_loop import EngineLoopTimeout

    loop, release = _loop_stuck_in_a_step()
    ran = []
    try:
        start = time.monotonic()
        with pytest.raises(EngineLoopTimeout, match=r"load_weights on the engine loop did not finish within 0.3 s \(never started"):
            loop.call(lambda: ran.append(1), what="load_weights")
        with pytest.raises(EngineLoopTimeout, match=r"pausing the engine loop: its running step did not finish within 0.2 s"):
            loop.pause(timeout_s=0.2)
        assert time.monotonic() - start < 5
        assert not loop.paused  # a pause that timed out does not leave generation stopped
        release.set()
        assert loop.call(lambda: "ok", timeout_s=10) == "ok"
        assert ran == []  # the call that timed out before it started was dropped, not run later
        loop.pause(timeout_s=10)
        assert loop.paused
        loop.resume()
    finally:
        release.set()
        loop.stop()
    assert not loop.thread.is_alive()
