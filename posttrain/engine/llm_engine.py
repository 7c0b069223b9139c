"""The engine: requests in, completions out. ``step()`` is schedule, run, postprocess.

It implements the ``RolloutEngine`` protocol on the trainer's own modules. Between rollouts the
trainer calls ``sleep()`` (the KV cache is freed, so training gets the memory back) and
``wake()``; after an optimizer step ``update_weights()`` drops cached prefixes, whose keys and
values the old weights computed.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from typing import Any, Callable
from typing import Sequence as Seq

import torch

from posttrain.engine.block_manager import BlockManager
from posttrain.engine.model_runner import ModelRunner
from posttrain.engine.scheduler import Scheduler
from posttrain.engine.sequence import Sequence, SequenceSampling, SequenceStatus
from posttrain.engine.weight_copies import WeightCopies, cpu_weight_copies, gpu_weight_copies
from posttrain.errors import PosttrainError
from posttrain.models.loading import autocast_context
from posttrain.models.lora import hot_swap_adapter
from posttrain.models.weights import load_named_tensors
from posttrain.sampling import Completion, SamplingParams, eos_token_ids, stop_string_end, tail_has_stop

logger = logging.getLogger("posttrain.engine")


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_model_len: int,
        compute_dtype: torch.dtype = torch.float32,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 16384,
        kv_cache_memory_fraction: float = 0.5,
        cpu_kv_cache_gb: float = 2.0,
        cuda_graphs: bool = True,
        enable_prefix_caching: bool = True,
        compile: bool = True,
        cpu_dtype: torch.dtype = torch.float32,
        float32_logits: bool = True,
        expert_dtype: str = "auto",
        weight_copies: bool = True,
    ) -> None:
        if expert_dtype not in ("auto", "fp8"):
            raise PosttrainError(f"expert_dtype={expert_dtype!r}: the engine runs MoE experts in the model's dtype "
                                 "('auto') or in fp8 ('fp8'); nvfp4 experts are not implemented yet.")
        self.model = model
        self.expert_dtype = expert_dtype
        self.tokenizer = tokenizer
        self.compute_dtype = compute_dtype
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.eos_token_ids = eos_token_ids(tokenizer, model)
        self.runner = ModelRunner(
            model, block_size=block_size, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
            compute_dtype=compute_dtype, kv_cache_memory_fraction=kv_cache_memory_fraction,
            cpu_kv_cache_gb=cpu_kv_cache_gb, cuda_graphs=cuda_graphs and expert_dtype == "auto", compile=compile,
            float32_logits=float32_logits,
        )
        # expert_dtype=fp8: the MoE layers run on e4m3 copies of the experts (per-output-channel
        # scales), made here and again whenever new weights arrive (update_weights, parameters_moved).
        # A segment loop with a host sync per layer, so decode runs without CUDA graphs.
        self.fp8_experts = None
        if expert_dtype == "fp8":
            if self.runner.decoder.moe is None:
                raise PosttrainError(f"expert_dtype=fp8 quantizes MoE experts, but {type(model).__name__} has none; "
                                     "use expert_dtype=auto.")
            self.quantize_experts()
        # float32 weights generate from 16-bit copies (engine/weight_copies.py): on a GPU under
        # autocast (weight_copies=True), cast once per weight change instead of at every decode
        # step; on a CPU with cpu_dtype=bfloat16, cast per generate() call.
        self.cpu_bf16 = self.runner.device.type == "cpu" and cpu_dtype == torch.bfloat16
        self.use_weight_copies = weight_copies
        self.weight_copies: WeightCopies | None = None
        if self.cpu_bf16:
            self.runner.kv_dtype = torch.bfloat16
        self._make_weight_copies()
        self.scheduler: Scheduler | None = None
        self._next_request = 0
        # The policy version of the current weights (set by whoever loads them); every sampled
        # token records it, so a completion that spans a weight update says which tokens came from which.
        self.weight_version = 0
        self.num_kv_recomputes = 0  # sequences re-prefilled after a mid-generation weight update
        self.wake()

    # ---- RolloutEngine
    @property
    def device(self) -> torch.device:
        return self.runner.device

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.compute_dtype)()

    @property
    def is_awake(self) -> bool:
        return self.scheduler is not None

    def wake(self) -> None:
        if self.is_awake:
            return
        with self._copies_swapped():  # CUDA graphs are captured here: on the copies' addresses
            num_blocks = self.runner.allocate_kv_cache()
        self.scheduler = Scheduler(
            BlockManager(num_blocks, self.block_size, self.enable_prefix_caching),
            self.max_num_seqs, self.max_num_batched_tokens,
        )

    def sleep(self) -> None:
        """Free the KV cache. CUDA graphs are kept: they reference the cache's address and are
        recaptured only if the cache comes back elsewhere."""
        if not self.is_awake:
            return
        if not self.scheduler.is_finished:
            raise RuntimeError("sleep() with requests in flight")
        self.scheduler = None
        self.runner.free_kv_cache()

    def update_weights(self, named_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """New weights: ``named_tensors`` loaded into the model, or None when the trainer stepped
        the shared modules in place (sync.mode=shared). Either way the 16-bit copies, fp8 experts
        and cached prefixes are made again from them."""
        copies = self.weight_copies
        with copies.masters_exposed() if copies is not None else contextlib.nullcontext():
            if named_tensors:  # mid-generate, into the float32 weights; recast on the way out
                load_named_tensors(self.model, named_tensors)
            self.quantize_experts()
        if copies is not None and not copies.active:
            copies.stale = True  # cast once, by the next generate() or step(): not here and again there
        self.flush_cache()

    def quantize_experts(self) -> None:
        """expert_dtype=fp8: (re)quantize the experts from the current weights, once per weight
        sync; a no-op otherwise."""
        if self.expert_dtype == "fp8":
            self.fp8_experts = self.runner.decoder.moe.quantize_fp8()

    def generate(self, prompts: Seq[list[int]], params: SamplingParams,
                 before_step: Callable[[], None] | None = None) -> list[list[Completion]]:
        """``params.n`` completions per prompt; the samples of a prompt share its KV blocks.
        ``before_step`` runs before every step (e.g. to load new weights between two decode steps)."""
        if self.weight_copies is not None and not self.weight_copies.active:
            # Always, also when the weights changed without update_weights(): one cast per call.
            self.weight_copies.refresh()
        with self._copies_swapped(), self._eval_mode():
            groups = [self.add_request(p, params) for p in prompts]
            self.run_until_done(before_step)
        return [[self.completion(s) for s in group] for group in groups]

    def _make_weight_copies(self) -> None:
        """(Re)build the 16-bit copies for the model's current parameters. CPU, cpu_dtype=bfloat16:
        bf16 matmuls run 2-3x faster on CPUs with AVX-512 BF16 or AMX. GPU under autocast: the
        decode steps read 2 bytes per weight instead of casting 4 (see engine/weight_copies.py)."""
        self.weight_copies = self.runner.decoder.head_weight = None  # the old copies' memory goes first
        if self.cpu_bf16:
            self.weight_copies = cpu_weight_copies(self.model, torch.bfloat16)
        elif self.use_weight_copies and self.runner.use_autocast:
            self.weight_copies = gpu_weight_copies(self.model, self.runner.decoder.lm_head, self.compute_dtype)
            if self.weight_copies is not None:
                logger.info("engine: %.2f GiB of %s copies of the float32 weights for decoding",
                            self.weight_copies.nbytes / 2**30, str(self.compute_dtype).removeprefix("torch."))
        shadows = self.weight_copies.shadow_copies if self.weight_copies is not None else []
        self.runner.decoder.head_weight = shadows[0] if shadows else None

    def _copies_swapped(self) -> contextlib.AbstractContextManager:
        return self.weight_copies.swapped() if self.weight_copies is not None else contextlib.nullcontext()

    # ---- requests and steps
    def add_request(self, prompt: list[int], params: SamplingParams) -> list[Sequence]:
        """Queue ``params.n`` sequences for one prompt; returns them (filled in as steps run)."""
        if not self.is_awake:
            self.wake()
        if not prompt:
            raise PosttrainError("empty prompt: give at least one token")
        if len(prompt) >= self.max_model_len:
            raise PosttrainError(
                f"prompt of {len(prompt)} tokens does not fit the engine's max_model_len={self.max_model_len}; "
                "shorten it (data.max_prompt_tokens) or raise rollout.engine.max_model_len."
            )
        max_tokens = min(params.max_tokens, self.max_model_len - len(prompt))
        request_id = self._next_request
        self._next_request += 1
        seqs = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + i)
            sampling = SequenceSampling(
                temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p,
                max_tokens=max_tokens, ignore_eos=params.ignore_eos,
                stop_token_ids=tuple(params.stop_token_ids) if params.stop_token_ids else (),
                stop=tuple(params.stop), top_logprobs=params.top_logprobs, generator=generator,
            )
            seq = Sequence(list(prompt), sampling, request_id=request_id)
            self.scheduler.add(seq)
            seqs.append(seq)
        return seqs

    def step(self) -> list[Sequence]:
        """One prefill or decode step; returns the sequences that finished in it."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        if self.weight_copies is not None and self.weight_copies.stale:  # step()-driven callers (the server)
            self.weight_copies.refresh()
        with self._eval_mode(), self._experts():  # inside generate() the modules are in eval mode already
            out = self.runner.run(seqs, is_prefill)
        return self._postprocess(seqs, out)

    @contextlib.contextmanager
    def _eval_mode(self):
        """The trainer leaves its modules in train mode; dropout (e.g. LoRA's) must not sample
        rollouts. Switched once per generate() call, not per step: ``train()``/``eval()`` walk
        every module (about 1.4 ms for a 24-layer model on this project's CPU), which at a few
        milliseconds per decode step was a large share of it."""
        training = self.model.training
        if training:
            self.model.eval()
        try:
            yield
        finally:
            if training:
                self.model.train()

    def _experts(self) -> contextlib.AbstractContextManager:
        if self.fp8_experts is None:
            return contextlib.nullcontext()
        return self.runner.decoder.moe.using_fp8(self.fp8_experts)

    def run_until_done(self, before_step: Callable[[], None] | None = None) -> None:
        while not self.scheduler.is_finished:
            if before_step is not None:
                before_step()
            self.step()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler is not None and not self.scheduler.is_finished

    def abort(self, seqs: Seq[Sequence]) -> None:
        """Stop these sequences where they are (a failed step, a client that went away): their
        blocks are freed and they finish with reason 'abort'."""
        dropped = [s for s in seqs if not s.is_finished]
        if not dropped or self.scheduler is None:
            return
        for seq in dropped:
            self.scheduler.finish(seq, "abort")
        self.scheduler.waiting = deque(s for s in self.scheduler.waiting if not s.is_finished)
        self.scheduler.remove_finished()

    def load_lora_adapter(self, adapter_dir: str) -> None:
        """Apply the peft adapter saved in ``adapter_dir`` without a restart. The first adapter
        changes the model's modules (peft wraps its linear layers), so the decode graphs are
        captured again; later ones are copied in place and only drop cached prefixes."""
        self.model, modules_changed = hot_swap_adapter(self.model, adapter_dir)
        if modules_changed:
            self.parameters_moved()
        else:  # copied into the adapters' tensors
            self.update_weights()

    def parameters_moved(self) -> None:
        """Called after the model's parameters were pointed at other tensors (not copied into)."""
        self._make_weight_copies()
        self.quantize_experts()
        self.flush_cache()
        with self._copies_swapped():  # graphs are captured again on the copies
            self.runner.parameters_moved()

    def recompute_kv_cache(self) -> int:
        """After new weights were loaded mid-generation (``rollout.partial_recompute_kv``): the
        keys and values of the running sequences were computed by the old weights. Free them and
        re-prefill each sequence (prompt and generated tokens) at its next step, so every later
        token is sampled exactly as the new weights would sample it after that prefix. Cached
        prefixes are dropped too, else the re-prefill would find the old blocks again. Costs one
        prefill of every running sequence per weight update. Returns how many were sent back."""
        if self.scheduler is None:
            return 0
        count = self.scheduler.recompute_running()
        self.flush_cache()
        self.num_kv_recomputes += count
        return count

    def flush_cache(self) -> None:
        """Forget cached prefixes, e.g. after weights changed under the engine (sync.mode=shared)
        or a step failed after registering blocks it never wrote."""
        if self.scheduler is not None:
            self.scheduler.block_manager.reset_prefix_cache()

    def _postprocess(self, seqs: list[Sequence], out) -> list[Sequence]:
        finished = []
        block_manager = self.scheduler.block_manager
        eos = set(self.eos_token_ids)
        version = self.weight_version
        ending: list[tuple[Sequence, str]] = []
        for i, seq in enumerate(seqs):
            block_manager.register_filled_block(seq)  # this step wrote every current position
            token = out.token_ids[i]
            seq.token_ids.append(token)
            seq.logprobs.append(out.logprobs[i])
            seq.token_versions.append(version)
            if out.top_logprobs is not None:
                seq.top_logprobs.append(out.top_logprobs[i])
            s = seq.sampling
            reason = None
            if (token in eos and not s.ignore_eos) or token in s.stop_token_ids:
                reason = "stop"
            elif s.stop and tail_has_stop(self.tokenizer, seq.completion_token_ids, s.stop):
                self._cut_at_stop(seq)
                reason = "stop"
            elif seq.num_completion_tokens >= s.max_tokens:
                reason = "length"
            if reason is not None:
                ending.append((seq, reason))
        if ending and self.runner.route_cache is not None:  # MoE: the routes, before the blocks are freed
            for (seq, _), routes in zip(ending, self.runner.read_routes([seq for seq, _ in ending])):
                seq.routed_experts = routes
        for seq, reason in ending:
            self.scheduler.finish(seq, reason)
            finished.append(seq)
        if finished:
            self.scheduler.remove_finished()
        return finished

    def _cut_at_stop(self, seq: Sequence) -> None:
        completion = seq.completion_token_ids
        end = stop_string_end(self.tokenizer, completion, seq.sampling.stop)
        if end is not None and end < len(completion):
            drop = len(completion) - end
            del seq.token_ids[-drop:]
            del seq.logprobs[-drop:]
            del seq.token_versions[-drop:]
            if seq.top_logprobs:
                del seq.top_logprobs[-drop:]

    def completion(self, seq: Sequence) -> Completion:
        assert seq.status == SequenceStatus.FINISHED
        tokens = seq.completion_token_ids
        return Completion(
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            logprobs=list(seq.logprobs),
            finish_reason=seq.finish_reason,
            top_logprobs=list(seq.top_logprobs) if seq.sampling.top_logprobs else None,
            token_versions=list(seq.token_versions),
            routed_experts=seq.routed_experts,
        )

    # ---- metrics
    def stats(self) -> dict[str, float]:
        if self.scheduler is None:
            return {}
        bm = self.scheduler.block_manager
        return {
            "engine/preemptions": float(self.scheduler.num_preemptions),
            "engine/kv_recomputes": float(self.num_kv_recomputes),
            "engine/prefix_cache_hit_tokens": float(bm.num_prefix_hits),
            "engine/kv_blocks": float(bm.num_blocks),
            # Since the engine was built: more than one means the KV cache came back at another
            # address after a sleep (or the weights moved) and the decode graphs were captured again.
            "engine/cuda_graph_captures": float(self.runner.num_graph_captures),
        }
