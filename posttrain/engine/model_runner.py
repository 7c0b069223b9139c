"""How a step runs: flat input tensors, the KV cache, CUDA graphs for decode, sampling.

The runner gets a list of sequences from the scheduler and returns one sampled token each. It
owns the KV cache (sized from free device memory, freed by ``free_kv_cache`` while the trainer
runs) and, on CUDA, one captured graph per decode batch size: a decode step of a small model is
hundreds of tiny kernels, and replaying a graph launches them all at once. For an MoE model it
also owns the route cache, the expert ids of every cached position (``read_routes``).
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch

from posttrain.engine.attention import AttentionMetadata, attend_gathered, paged_decode_attention, triton_available
from posttrain.engine.paged_model import ROUTE_DTYPE, PagedDecoder
from posttrain.engine.sampler import Sampler, SamplerOutput
from posttrain.engine.sequence import Sequence
from posttrain.errors import PosttrainError

logger = logging.getLogger("posttrain.engine")

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        compute_dtype: torch.dtype,
        kv_cache_memory_fraction: float,
        cpu_kv_cache_gb: float,
        cuda_graphs: bool,
        compile: bool = True,
        float32_logits: bool = True,
    ) -> None:
        self.decoder = PagedDecoder(model, float32_logits=float32_logits)
        self.device = self.decoder.device
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = (max_model_len + block_size - 1) // block_size
        param_dtype = self.decoder.hidden_dtype
        # fp32 master weights trained under bf16 autocast generate under the same autocast.
        self.use_autocast = self.device.type == "cuda" and compute_dtype != param_dtype
        self.compute_dtype = compute_dtype
        self.kv_dtype = compute_dtype if self.device.type == "cuda" else param_dtype
        self.kv_cache_memory_fraction = kv_cache_memory_fraction
        self.cpu_kv_cache_gb = cpu_kv_cache_gb
        self.use_triton = triton_available(self.device) and self.decoder.head_dim in (16, 32, 64, 128, 256)
        self.use_cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.use_triton
        if self.use_cuda_graphs and not self.decoder.graphable(compute_dtype):
            logger.info("decode CUDA graphs off: this MoE model's grouped experts need torch._grouped_mm "
                        "(bf16 on compute capability 9.0+) to run without host syncs")
            self.use_cuda_graphs = False
        self.use_compile = compile and self.device.type == "cuda"
        if self.use_compile:
            self.decoder.enable_compile()
        self.sampler = Sampler()
        self.kv_cache: torch.Tensor | None = None
        self.route_cache: torch.Tensor | None = None  # MoE: (num_moe_layers, num_slots, top_k) expert ids
        self._kv_logged = False
        self.num_blocks = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_graph_captures = 0  # rounds of capture: one at start, one per move of the KV cache or weights
        self._graph_cache_ptrs = None
        with torch.no_grad():
            self.decoder.build_rope_tables(max_model_len)

    # ---- KV cache
    def allocate_kv_cache(self) -> int:
        """Allocate the cache; returns the number of blocks. One extra block receives the writes of
        the padding rows of a graph batch."""
        d = self.decoder
        bytes_per_block = self.block_size * (2 * d.num_layers * d.num_kv_heads * d.head_dim * self.kv_dtype.itemsize
                                             + d.num_moe_layers * d.top_k * ROUTE_DTYPE.itemsize)
        needed = self.max_num_seqs * self.max_blocks_per_seq
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.kv_cache_memory_fraction)
        else:
            budget = int(self.cpu_kv_cache_gb * 2**30)
        num_blocks = min(budget // bytes_per_block, needed)
        if num_blocks < self.max_blocks_per_seq:
            raise PosttrainError(
                f"the KV cache budget ({budget / 2**30:.2f} GiB) holds {num_blocks} blocks of {self.block_size} tokens, "
                f"fewer than one sequence of max_model_len={self.max_model_len} needs ({self.max_blocks_per_seq}). "
                "Raise rollout.engine.kv_cache_memory_fraction (GPU) or rollout.engine.cpu_kv_cache_gb (CPU), "
                "or lower the prompt/generation lengths."
            )
        slots = (num_blocks + 1) * self.block_size
        self.kv_cache = torch.zeros(2, d.num_layers, slots, d.num_kv_heads, d.head_dim, dtype=self.kv_dtype, device=self.device)
        if d.moe is not None:
            self.route_cache = torch.zeros(d.num_moe_layers, slots, d.top_k, dtype=ROUTE_DTYPE, device=self.device)
        self.num_blocks = num_blocks
        self.dummy_slot = num_blocks * self.block_size
        # Once at INFO; every later wake-up (one per training step) at DEBUG.
        logger.log(logging.DEBUG if self._kv_logged else logging.INFO, "KV cache: %d blocks of %d tokens (%.2f GiB)",
                   num_blocks, self.block_size, self.kv_cache.numel() * self.kv_dtype.itemsize / 2**30)
        self._kv_logged = True
        if self.use_cuda_graphs and self._cache_ptrs() != self._graph_cache_ptrs:
            self.capture_graphs()  # graphs hold the caches' addresses; a new address needs new graphs
        return num_blocks

    def parameters_moved(self) -> None:
        """The model's parameters now live in other memory (sync.mode=shared points them at the
        trainer's): graphs captured with the old addresses would read stale memory, so capture them
        again, now or at the next wake."""
        if not self.graphs:
            return
        self.graphs.clear()
        self._graph_cache_ptrs = None
        if self.kv_cache is not None:
            self.capture_graphs()

    def free_kv_cache(self) -> None:
        """The memory goes back to this process's caching allocator, not to the driver: the trainer
        in the same process reuses it, and the next ``allocate_kv_cache`` usually gets the same
        address back, so the captured graphs stay valid."""
        self.kv_cache = None
        self.route_cache = None

    def _cache_ptrs(self) -> tuple[int, int]:
        return self.kv_cache.data_ptr(), self.route_cache.data_ptr() if self.route_cache is not None else 0

    def read_routes(self, seqs: list[Sequence]) -> list[torch.Tensor]:
        """The expert ids of every position each sequence ran through the model (its prompt and
        completion but the last token, which no step consumed): one ``(num_moe_layers,
        len(seq) - 1, top_k)`` int16 CPU tensor per sequence, read in one gather and one copy."""
        size = self.block_size
        slots = []
        for seq in seqs:
            positions = np.arange(len(seq) - 1)
            slots.append(np.asarray(seq.block_table, dtype=np.int64)[positions // size] * size + positions % size)
        routes = self.route_cache.index_select(1, self._to_device(np.concatenate(slots))).cpu()
        return list(routes.split([len(s) for s in slots], dim=1))

    def _layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(self.decoder.num_layers)]

    # ---- one step
    def _autocast(self):
        if self.use_autocast:
            # No weight-cast cache: graphs must recompute the casts from the live fp32 weights.
            return torch.autocast(self.device.type, dtype=self.compute_dtype, cache_enabled=False)
        return contextlib.nullcontext()

    def _attend(self, meta: AttentionMetadata):
        scale, size = self.decoder.scale, self.block_size
        if not meta.is_prefill and self.use_triton:
            return lambda q, k, v, m: paged_decode_attention(q, k, v, m.block_tables, m.context_lens, scale, size)
        return lambda q, k, v, m: attend_gathered(q, k, v, m, scale, size)

    def _forward_logits(self, input_ids, positions, meta: AttentionMetadata, last: torch.Tensor | None) -> torch.Tensor:
        with self._autocast():
            hidden = self.decoder.forward(input_ids, positions, self._layer_caches(), meta, self._attend(meta),
                                          self.route_cache)
            if last is not None:
                hidden = hidden[last]
            return self.decoder.logits(hidden)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> SamplerOutput:
        if is_prefill:
            input_ids, positions, meta, last = self._prepare_prefill(seqs)
            logits = self._or_eager(lambda: self._forward_logits(input_ids, positions, meta, last))
        else:
            logits = self._run_decode(seqs)
        return self.sampler(logits, [s.sampling for s in seqs])

    def _to_device(self, values, dtype=torch.long) -> torch.Tensor:
        t = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _block_tables(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        tables = np.zeros((len(seqs), width), dtype=np.int64)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.block_table)] = seq.block_table
        return self._to_device(tables)

    def _prepare_prefill(self, seqs: list[Sequence]):
        size = self.block_size
        input_ids, positions, slots, rows, cols, last = [], [], [], [], [], []
        for row, seq in enumerate(seqs):
            start = seq.num_cached_tokens
            input_ids += seq.token_ids[start:]
            for p in range(start, len(seq)):
                positions.append(p)
                slots.append(seq.block_table[p // size] * size + p % size)
            n = len(seq) - start
            rows += [row] * n
            cols += range(n)
            last.append(len(input_ids) - 1)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._to_device(slots),
            context_lens=self._to_device([len(s) for s in seqs]),
            block_tables=self._block_tables(seqs, max(len(s.block_table) for s in seqs)),
            max_context_len=max(len(s) for s in seqs),
            max_query_len=max(len(s) - s.num_cached_tokens for s in seqs),
            query_lens=self._to_device([len(s) - s.num_cached_tokens for s in seqs]),
            token_rows=self._to_device(rows),
            token_cols=self._to_device(cols),
        )
        return self._to_device(input_ids), self._to_device(positions), meta, self._to_device(last)

    def _fill_decode_rows(self, seqs: list[Sequence], rows: np.ndarray) -> None:
        """Write each sequence's decode inputs into one host array: columns token, position,
        slot, context length, then the block table (entries past a sequence's blocks are stale
        and never read: the kernel stops at the context length)."""
        size = self.block_size
        n = len(seqs)
        lens = [len(s) for s in seqs]
        rows[:n, 0] = [s.token_ids[-1] for s in seqs]
        rows[:n, 1] = [k - 1 for k in lens]
        rows[:n, 2] = [s.block_table[(k - 1) // size] * size + (k - 1) % size for s, k in zip(seqs, lens)]
        rows[:n, 3] = lens
        for i, seq in enumerate(seqs):
            rows[i, 4 : 4 + len(seq.block_table)] = seq.block_table

    def _run_decode(self, seqs: list[Sequence]) -> torch.Tensor:
        num_seqs = len(seqs)
        graph_size = next((b for b in sorted(self.graphs) if b >= num_seqs), None)
        if graph_size is None:
            width = max(len(s.block_table) for s in seqs)
            rows = np.zeros((num_seqs, 4 + width), dtype=np.int64)
            self._fill_decode_rows(seqs, rows)
            inputs = self._to_device(rows)
            meta = AttentionMetadata(
                is_prefill=False, slot_mapping=inputs[:, 2].contiguous(), context_lens=inputs[:, 3].contiguous(),
                block_tables=inputs[:, 4:], max_context_len=int(rows[:, 3].max()),
            )
            return self._forward_logits(inputs[:, 0].contiguous(), inputs[:, 1].contiguous(), meta, None)
        # One host-to-device copy of all inputs; the graph itself splits them into columns.
        rows = self._host_rows
        self._fill_decode_rows(seqs, rows)
        rows[num_seqs:graph_size, :4] = (0, 0, self.dummy_slot, 0)
        self._graph_rows[:graph_size].copy_(self._host_rows_tensor[:graph_size], non_blocking=True)
        graph, logits = self.graphs[graph_size]
        graph.replay()
        return logits[:num_seqs]

    # ---- CUDA graphs
    @torch.inference_mode()
    def capture_graphs(self) -> None:
        start = time.perf_counter()
        self.graphs.clear()
        max_size = max(b for b in GRAPH_BATCH_SIZES if b <= max(self.max_num_seqs, 1))
        width = 4 + self.max_blocks_per_seq
        self._host_rows_tensor = torch.zeros(max_size, width, dtype=torch.long).pin_memory()
        self._host_rows = self._host_rows_tensor.numpy()
        self._graph_rows = torch.zeros(max_size, width, dtype=torch.long, device=self.device)
        self._graph_rows[:, 2] = self.dummy_slot
        pool = None
        for size in sorted((b for b in GRAPH_BATCH_SIZES if b <= max_size), reverse=True):
            rows = self._graph_rows[:size]

            def step():
                meta = AttentionMetadata(
                    is_prefill=False, slot_mapping=rows[:, 2].contiguous(), context_lens=rows[:, 3].contiguous(),
                    block_tables=rows[:, 4:],
                )
                return self._forward_logits(rows[:, 0].contiguous(), rows[:, 1].contiguous(), meta, None)

            self._or_eager(step)  # lazy initialisation and compilation must not happen during capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = step()
            pool = graph.pool()
            self.graphs[size] = (graph, logits)
        torch.cuda.synchronize(self.device)
        self._graph_cache_ptrs = self._cache_ptrs()
        self.num_graph_captures += 1
        logger.info("captured %d decode CUDA graphs in %.2f s", len(self.graphs), time.perf_counter() - start)

    def _or_eager(self, forward):
        """Run ``forward``; if torch.compile of the layers fails (the first compiled call compiles),
        switch compilation off for good and run it eagerly: such a model must still generate."""
        if not self.use_compile:
            return forward()
        try:
            return forward()
        except Exception as exc:
            logger.warning("torch.compile of the engine's layers failed (%s: %s); running them eagerly",
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.use_compile = False
            self.decoder.disable_compile()
            return forward()

    def release_graphs(self) -> None:
        self.graphs.clear()
        self._graph_cache_ptrs = None
