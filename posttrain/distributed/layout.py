"""``ParallelLayout``: how a world of ranks splits into tensor (tp), context (cp), data (dp),
pipeline (pp) and expert (ep) parallel groups, with Megatron-LM's rank order, a printable table
and checklist, and the matching Megatron-LM flags and DeepSpeed config.

posttrain itself trains with FSDP2 data parallelism only (``trainer.num_processes``); this is the
planning helper for runs that go beyond it, and the layout the MoE checklist prints. The rank
order is Megatron core's (``order="tp-cp-ep-dp-pp"``): tensor-parallel ranks are adjacent (one
node, NVLink), then context, then data, then pipeline stages outermost. Dense weights are laid
out tp-cp-dp-pp; expert weights tp-ep-edp-pp over the same ranks, so each expert-parallel group
takes ``ep`` consecutive data/context-parallel positions (expert tensor parallelism equals tp).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from posttrain.errors import ConfigError

# Group name -> (which rank order it lives in, the dimensions it spans), printed in this order.
_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tp": ("dense", ("tp",)),
    "cp": ("dense", ("cp",)),
    "dp": ("dense", ("dp",)),
    "dp_cp": ("dense", ("cp", "dp")),
    "pp": ("dense", ("pp",)),
    "ep": ("expert", ("ep",)),
    "expert_dp": ("expert", ("expert_dp",)),
}
_GROUP_TITLES = {
    "tp": "tensor parallel", "cp": "context parallel", "dp": "data parallel",
    "dp_cp": "data x context (dense grads)", "pp": "pipeline stages",
    "ep": "expert parallel (all-to-all)", "expert_dp": "expert data parallel (expert grads)",
}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _orthogonal_groups(sizes: list[tuple[str, int]], spanned: tuple[str, ...]) -> list[list[int]]:
    """Ranks grouped over the ``spanned`` dimensions, ``sizes`` listed fastest-varying first.

    A rank's coordinates (i_0, i_1, ...) give ``rank = i_0 + s_0 * (i_1 + s_1 * (...))``; a group
    holds the ranks that share every coordinate outside ``spanned``, in rank order."""
    strides, stride = {}, 1
    for name, size in sizes:
        strides[name] = stride
        stride *= size
    inner = [(n, s) for n, s in sizes if n in spanned]
    outer = [(n, s) for n, s in sizes if n not in spanned]
    groups = []
    # itertools.product varies its last factor fastest: reverse so the first dimension is fastest.
    for outer_idx in itertools.product(*(range(s) for _, s in reversed(outer))):
        base = sum(i * strides[n] for (n, _), i in zip(reversed(outer), outer_idx))
        ranks = [base + sum(i * strides[n] for (n, _), i in zip(reversed(inner), idx))
                 for idx in itertools.product(*(range(s) for _, s in reversed(inner)))]
        groups.append(sorted(ranks))
    return sorted(groups)


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of each parallel dimension; build with :meth:`from_world_size`, which checks them."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense weights: world_size / (tp x pp x cp)."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights: the dp x cp ranks that ep does not split."""
        return self.dp * self.cp // self.ep

    @classmethod
    def from_world_size(cls, world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1) -> ParallelLayout:
        """The layout of ``world_size`` ranks; dp is what tp, pp and cp leave. Raises ConfigError
        naming the sizes that do not divide, and the values that would."""
        for name, value in [("world_size", world_size), ("tp", tp), ("pp", pp), ("ep", ep), ("cp", cp)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ParallelLayout: {name}={value!r} must be a positive integer.")
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ConfigError(
                f"ParallelLayout: tp x pp x cp = {tp} x {pp} x {cp} = {model_parallel} does not divide "
                f"world_size={world_size}, so the data-parallel size world_size / (tp x pp x cp) is not a "
                f"whole number. tp x pp x cp must be one of {_divisors(world_size)}."
            )
        dp = world_size // model_parallel
        if (dp * cp) % ep:
            raise ConfigError(
                f"ParallelLayout: ep={ep} does not divide dp x cp = {dp} x {cp} = {dp * cp}: expert "
                f"parallelism splits the data- and context-parallel ranks of one tensor/pipeline "
                f"position (Megatron-LM's rule). With tp={tp}, pp={pp}, cp={cp} on {world_size} "
                f"ranks, ep must be one of {_divisors(dp * cp)}."
            )
        return cls(world_size, tp=tp, pp=pp, cp=cp, ep=ep)

    def _sizes(self, order: str) -> list[tuple[str, int]]:
        if order == "dense":
            return [("tp", self.tp), ("cp", self.cp), ("dp", self.dp), ("pp", self.pp)]
        return [("tp", self.tp), ("ep", self.ep), ("expert_dp", self.expert_dp), ("pp", self.pp)]

    def rank_groups(self, name: str) -> list[list[int]]:
        """Every group of one kind: 'tp', 'cp', 'dp', 'dp_cp', 'pp', 'ep' or 'expert_dp'."""
        if name not in _GROUPS:
            raise ValueError(f"unknown rank group {name!r}; one of {', '.join(_GROUPS)}")
        order, spanned = _GROUPS[name]
        return _orthogonal_groups(self._sizes(order), spanned)

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index within each kind of group, e.g. {'tp': 1, 'dp': 0, ...}."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        out = {}
        for name in _GROUPS:
            group = next(g for g in self.rank_groups(name) if rank in g)
            out[name] = group.index(rank)
        return out

    def experts_per_rank(self, num_experts: int) -> int:
        """Experts each expert-parallel rank holds; raises ConfigError when ep does not divide them."""
        if num_experts < 1 or num_experts % self.ep:
            raise ConfigError(
                f"ParallelLayout: ep={self.ep} must divide the number of experts ({num_experts}): every "
                f"expert-parallel rank holds the same number of experts. ep must be one of "
                f"{[d for d in _divisors(max(num_experts, 1)) if (self.dp * self.cp) % d == 0]}."
            )
        return num_experts // self.ep

    def checklist(self, gpus_per_node: int = 8, num_experts: int = 0) -> list[str]:
        """Lines '[ok] ...' / '[!!] ...' for the usual layout rules of thumb (not hard errors)."""
        def line(ok: bool, text: str) -> str:
            return f"[{'ok' if ok else '!!'}] {text}"

        lines = [
            line(self.tp <= gpus_per_node,
                 f"tp={self.tp} fits one node of {gpus_per_node} GPUs (tensor parallelism all-reduces in every layer: keep it on NVLink)"),
            line(self.tp * self.ep <= gpus_per_node or self.ep == 1,
                 f"tp x ep = {self.tp * self.ep} fits one node (the expert all-to-all runs at NVLink speed within a node)"),
        ]
        if self.tp > 1 and self.ep > 1:
            lines.append(line(True, "tp > 1 with ep > 1: Megatron-LM needs --sequence-parallel (added by to_megatron_args)"))
        if num_experts:
            ok = num_experts % self.ep == 0
            lines.append(line(ok, f"ep={self.ep} divides {num_experts} experts"
                              + (f" ({num_experts // self.ep} per rank)" if ok else "")))
        if self.pp > 1:
            lines.append(line(True, f"pp={self.pp}: the number of layers should split evenly over {self.pp} stages"))
        return lines

    def describe(self, max_groups: int = 8, gpus_per_node: int = 8, num_experts: int = 0) -> str:
        """A table per kind of rank group (at most ``max_groups`` groups listed each), then the checklist."""
        head = (f"Parallel layout: {self.world_size} ranks = tp {self.tp} x cp {self.cp} x dp {self.dp} x pp {self.pp}; "
                f"experts: ep {self.ep} x expert-dp {self.expert_dp} (expert tensor parallel = tp)")
        rows = [head, f"  {'group':<48} {'size':>4} {'count':>5}  ranks"]
        singletons = []
        for name in _GROUPS:
            groups = self.rank_groups(name)
            if len(groups[0]) == 1 or (name == "dp_cp" and self.cp == 1):  # trivial, or the same as dp
                singletons += [name] if len(groups[0]) == 1 else []
                continue
            shown = " ".join(str(g) for g in groups[:max_groups])
            if len(groups) > max_groups:
                shown += f" ... ({len(groups) - max_groups} more)"
            rows.append(f"  {_GROUP_TITLES[name] + f' ({name})':<48} {len(groups[0]):>4} {len(groups):>5}  {shown}")
        if singletons:
            rows.append(f"  size 1 (every rank alone): {', '.join(singletons)}")
        rows += ["  " + item for item in self.checklist(gpus_per_node, num_experts)]
        return "\n".join(rows)

    def to_megatron_args(self, router: Any = None) -> list[str]:
        """Megatron-LM command-line flags for this layout (``pretrain_gpt.py`` argv fragments).

        ``router``: a :class:`~posttrain.config.schema.MoERouterConfig` with num_experts set adds
        the MoE flags (experts, top-k, aux and z-loss coefficients, capacity factor, router dtype,
        the all-to-all dispatcher when ep > 1). posttrain's aux loss is normalised like Megatron's
        (1 under uniform routing, summed over layers), so the coefficient carries over as is."""
        args = [
            "--tensor-model-parallel-size", str(self.tp),
            "--pipeline-model-parallel-size", str(self.pp),
            "--context-parallel-size", str(self.cp),
            "--expert-model-parallel-size", str(self.ep),
        ]
        if self.tp > 1 and self.ep > 1:
            args.append("--sequence-parallel")  # Megatron asserts it for MoE with tp and ep
        if router is not None and router.num_experts:
            self.experts_per_rank(router.num_experts)
            args += ["--num-experts", str(router.num_experts), "--moe-router-topk", str(router.top_k or 2),
                     "--moe-router-load-balancing-type", "aux_loss" if router.aux_loss_coef > 0 else "none",
                     "--moe-aux-loss-coeff", repr(float(router.aux_loss_coef))]
            if router.z_loss_coef > 0:
                args += ["--moe-z-loss-coeff", repr(float(router.z_loss_coef))]
            if router.capacity_factor > 0:
                args += ["--moe-expert-capacity-factor", repr(float(router.capacity_factor))]
            if router.dtype == "float32":
                args += ["--moe-router-dtype", "fp32"]
            if self.ep > 1:
                args += ["--moe-token-dispatcher-type", "alltoall"]
        return args

    def to_deepspeed_config(self, zero_stage: int = 1, router: Any = None) -> dict[str, Any]:
        """A DeepSpeed config dict for this layout: ZeRO stage, AutoTP size (``tensor_parallel``),
        pipeline stages, and under ``moe`` the arguments of ``deepspeed.moe.layer.MoE`` (DeepSpeed
        takes ep_size there, in code, not from the config file; its parser ignores the key).

        Raises ConfigError for what DeepSpeed cannot combine: ZeRO-2/3 with pipeline parallelism,
        ZeRO-3 with AutoTP, and cp > 1 (DeepSpeed has no context parallelism of this kind)."""
        if zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"to_deepspeed_config: zero_stage={zero_stage} must be 0, 1, 2 or 3.")
        if self.cp > 1:
            raise ConfigError(f"to_deepspeed_config: cp={self.cp}: DeepSpeed has no context parallelism "
                              "(its Ulysses sequence parallelism splits attention heads instead); use cp=1, "
                              "or Megatron-LM (to_megatron_args).")
        if self.pp > 1 and zero_stage > 1:
            raise ConfigError(f"to_deepspeed_config: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1, "
                              f"not {zero_stage} (pp={self.pp}); use zero_stage=1.")
        if self.tp > 1 and zero_stage > 2:
            raise ConfigError(f"to_deepspeed_config: DeepSpeed AutoTP training supports ZeRO stage 0-2, not 3 "
                              f"(tp={self.tp}); use zero_stage=2.")
        config: dict[str, Any] = {"zero_optimization": {"stage": zero_stage}}
        if self.tp > 1:
            config["tensor_parallel"] = {"autotp_size": self.tp}
        if self.pp > 1:
            config["pipeline"] = {"stages": self.pp}
        if self.ep > 1 or (router is not None and router.num_experts):
            moe: dict[str, Any] = {"ep_size": self.ep}
            if router is not None and router.num_experts:
                self.experts_per_rank(router.num_experts)
                moe.update(num_experts=router.num_experts, k=router.top_k or 2,
                           capacity_factor=router.capacity_factor if router.capacity_factor > 0 else 1.0,
                           drop_tokens=router.capacity_factor > 0)
            config["moe"] = moe
        return config
