"""Mixture-of-experts policies: finding the routers of a transformers MoE model, recording their
decisions during a forward pass, the router losses (load balancing, z-loss) and expert-load
metrics as pure tensor functions, the router dtype, config and hardware checks, and the random-init
demo model. See docs/moe.md.

Routers are found through transformers' own output-capture table (``_can_record_outputs
["router_logits"]``), which every MoE family in transformers 5 fills (Mixtral, Qwen2/Qwen3-MoE,
OLMoE, GraniteMoE, DeepSeek-V3, gpt-oss, ...), so no family is special-cased here. Forward hooks
keep each router's logits and chosen experts while :meth:`RouterRecorder.recording` is open; the
trainer opens it around its forward pass only, so the recomputation of gradient checkpointing in
the backward pass records nothing.

Token weights select which tokens count: the trainer passes the loss mask at the positions whose
hidden states predict response tokens (``router_token_index``), the same positions the policy loss
sees and the ones a rollout engine routed while generating.
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from posttrain.distributed.process_group import env_world_size, launched_by_torchrun
from posttrain.errors import ConfigError, PosttrainError
from posttrain.distributed.layout import ParallelLayout
from posttrain.models.moe.expert_parallel import ep_mode_problems, gpus_per_node, resolve_ep_mode

# Minimum CUDA compute capability of each low-precision expert dtype.
EXPERT_DTYPE_CAPABILITY = {"fp8": (8, 9), "nvfp4": (10, 0)}
RANDOM_INIT_FAMILIES = ("mixtral", "qwen3_moe")


# ---------------------------------------------------------------- pure tensor functions
# logits (N, E): router logits of N tokens over E experts; selected (N, k): the experts each token
# was sent to; weights (N,): how much each token counts (the loss mask, 0 or 1).


def expert_load(selected: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) weighted number of routed assignments per expert (each token counts once per chosen expert)."""
    k = selected.shape[-1]
    load = torch.zeros(num_experts, dtype=torch.float32, device=selected.device)
    return load.index_add_(0, selected.reshape(-1), weights.float().repeat_interleave(k))


def load_max_vio(load: torch.Tensor) -> torch.Tensor:
    """max load / mean load - 1 over the last dim (0: perfectly balanced; E - 1: one expert takes all)."""
    load = load.double()
    return load.max(dim=-1).values / load.mean(dim=-1).clamp(min=1e-12) - 1


def load_balancing_loss(logits: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4), scalar.

    f_i: the fraction of routed assignments that went to expert i (no gradient, it is discrete);
    P_i: expert i's mean router probability (the gradient flows through it). Both over weighted
    tokens. Equals 1 under uniform routing for any top-k (f is normalised by k, as in Megatron)."""
    num_experts, k = logits.shape[-1], selected.shape[-1]
    total = weights.float().sum().clamp(min=1e-12)
    f = expert_load(selected, weights, num_experts) / (k * total)
    p = (torch.softmax(logits.float(), dim=-1) * weights.float()[:, None]).sum(0) / total
    return num_experts * (f.detach() * p).sum()


def router_z_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss (Zoph et al. 2022): weighted mean of logsumexp(logits)^2 per token, scalar."""
    z = torch.logsumexp(logits.float(), dim=-1)
    return (z.square() * weights.float()).sum() / weights.float().sum().clamp(min=1e-12)


def routing_entropy(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean entropy (nats) of each token's routing distribution; log(E) is uniform."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return (entropy * weights.float()).sum() / weights.float().sum().clamp(min=1e-12)


def routing_confidence(logits: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean router probability mass on each token's chosen experts (k/E uniform, 1 certain)."""
    probs = torch.softmax(logits.float(), dim=-1).gather(-1, selected).sum(-1)
    return (probs * weights.float()).sum() / weights.float().sum().clamp(min=1e-12)


def expert_capacity(num_tokens: float, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens one expert takes in a forward pass: ceil(capacity_factor * tokens * top_k / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def dropped_assignments(load: torch.Tensor, top_k: int, capacity_factor: float) -> torch.Tensor:
    """Routed assignments beyond the experts' capacity, from a forward pass's (E,) load counts."""
    capacity = expert_capacity(float(load.sum()) / top_k, load.shape[-1], top_k, capacity_factor)
    return (load - capacity).clamp(min=0).sum()


def route_agreement(selected_a: torch.Tensor, selected_b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted fraction of tokens whose chosen expert *sets* agree, e.g. rollout engine vs trainer
    (order within the top-k is ignored). (N, k) each; scalar."""
    same = (selected_a.sort(-1).values == selected_b.sort(-1).values).all(-1).float()
    return (same * weights.float()).sum() / weights.float().sum().clamp(min=1e-12)


class RouteAgreement:
    """``moe/route_agreement`` over several forward passes: per MoE layer, the weighted fraction of
    tokens whose expert set in one routing (the trainer's router) equals the one in another (the
    rollout engine's). Sums stay on the device until :meth:`metrics`."""

    def __init__(self, num_layers: int) -> None:
        self.same: torch.Tensor | float = torch.zeros(num_layers, dtype=torch.float64)
        self.total: torch.Tensor | float = 0.0

    def add(self, selected_a: list[torch.Tensor], selected_b: list[torch.Tensor], index: torch.Tensor,
            weights: torch.Tensor) -> None:
        """One forward pass: per layer ``(tokens, k)`` ids of either routing, ``index`` the rows
        (tokens) that count and ``weights`` (N,) how much each counts."""
        total = weights.double().sum()
        same = torch.stack([route_agreement(a[index].long(), b[index].long(), weights).double()
                            for a, b in zip(selected_a, selected_b)]) * total
        self.same, self.total = same + self.same.to(same.device), total + self.total

    def metrics(self) -> dict[str, float]:
        """``moe/route_agreement`` (mean over layers) and ``moe/route_agreement/layer_<i>``; nothing
        when no token counted."""
        total = float(self.total)
        if total <= 0:
            return {}
        per_layer = (self.same / total).tolist()
        return {"moe/route_agreement": sum(per_layer) / len(per_layer),
                **{f"moe/route_agreement/layer_{i}": v for i, v in enumerate(per_layer)}}


# ---------------------------------------------------------------- finding and recording routers


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # peft


def find_routers(model: torch.nn.Module) -> tuple[list[torch.nn.Module], int]:
    """The router modules of ``model`` in forward (layer) order, and the index of the router logits
    in their output; ``([], 0)`` for a dense model."""
    spec = None
    for module in _causal_lm(model).modules():
        spec = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if spec is not None:
            break
    if spec is None:
        return [], 0
    target = getattr(spec, "target_class", spec)
    class_name = getattr(spec, "class_name", None)
    layer_name = getattr(spec, "layer_name", None)
    routers = [
        m for name, m in _causal_lm(model).named_modules()
        if (not isinstance(target, type) or isinstance(m, target))
        and (not class_name or type(m).__name__.endswith(class_name))
        and (not layer_name or layer_name in name)
    ]
    return routers, int(getattr(spec, "index", 0) or 0)


@dataclass
class MoEShape:
    """What the model's config says about its MoE layers."""

    num_layers: int  # router modules found
    num_experts: int
    top_k: int


def moe_shape(model: torch.nn.Module) -> MoEShape | None:
    """The model's MoE shape, or None for a dense model."""
    routers, _ = find_routers(model)
    if not routers:
        return None
    config = getattr(_causal_lm(model), "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    num_experts = next((getattr(text, key) for key in ("num_local_experts", "num_experts", "n_routed_experts")
                        if isinstance(getattr(text, key, None), int)), None)
    top_k = getattr(text, "num_experts_per_tok", None)
    num_experts = num_experts or getattr(routers[0], "num_experts", None)
    top_k = top_k or getattr(routers[0], "top_k", None)
    if not num_experts or not top_k:
        raise PosttrainError(f"{type(_causal_lm(model)).__name__} has router modules but its config names no "
                             "number of experts (num_local_experts / num_experts) or top-k (num_experts_per_tok).")
    return MoEShape(len(routers), int(num_experts), int(top_k))


@dataclass
class RouterOutput:
    logits: torch.Tensor  # (tokens, E), tokens = the forward's batch x sequence positions, row-major
    selected: torch.Tensor  # (tokens, k) long: the experts the model used


class RouterRecorder:
    """Forward hooks on every router of ``model``; see the module docstring."""

    def __init__(self, model: torch.nn.Module, shape: MoEShape) -> None:
        self.shape = shape
        routers, self._index = find_routers(model)
        self._records: list[RouterOutput] | None = None
        self._handles = [router.register_forward_hook(self._hook) for router in routers]

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._records is None:
            return
        logits = output[self._index] if isinstance(output, (tuple, list)) else output
        logits = logits.reshape(-1, logits.shape[-1])
        selected = None
        # transformers' routers return (logits, weights, indices): the indices are the decision the
        # model used (DeepSeek's grouped, biased choice included), better than re-deriving them.
        if isinstance(output, (tuple, list)) and len(output) >= 3 and isinstance(output[2], torch.Tensor) \
                and not output[2].is_floating_point() and output[2].numel() == logits.shape[0] * self.shape.top_k:
            selected = output[2].reshape(logits.shape[0], self.shape.top_k)
        if selected is None:
            selected = logits.detach().topk(self.shape.top_k, dim=-1).indices
        self._records.append(RouterOutput(logits, selected.long()))

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[RouterOutput]]:
        """A list that fills with one RouterOutput per router call of the forward passes inside."""
        self._records = []
        try:
            yield self._records
        finally:
            self._records = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def router_token_index(batch: Any, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flattened router logits that the loss sees, and their weights.

    ``batch``: the forward's ``TokenBatch`` (padded or packed); ``loss_mask`` (B, R). Row ``r *
    width + p`` is input position p of row r: the positions whose hidden states predict response
    tokens. Returns ``(index (N,), weights (N,))``."""
    rows, cols, seq_rows, positions = batch.prediction_index()
    width = batch.input_ids.shape[1]
    return seq_rows * width + positions, loss_mask[rows, cols].float()


class RouterStats:
    """Router losses of each micro-batch and the expert-load metrics of a whole policy update.

    Sums stay on the device and are read once by :meth:`metrics` (a read per micro-batch would
    make the host wait for every backward pass, see trainer/policy.py)."""

    def __init__(self, shape: MoEShape, router_cfg: Any, device: torch.device) -> None:
        self.shape, self.cfg = shape, router_cfg
        zeros = lambda *size: torch.zeros(*size, dtype=torch.float64, device=device)  # noqa: E731
        self.load = zeros(shape.num_layers, shape.num_experts)
        self.entropy, self.confidence, self.dropped = zeros(shape.num_layers), zeros(shape.num_layers), zeros(shape.num_layers)
        self.tokens, self.aux, self.z = zeros(()), zeros(()), zeros(())

    def add(self, records: list[RouterOutput], index: torch.Tensor,
            weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Account one forward pass; returns its per-layer ``(load_balancing_loss (L,), z_loss (L,))``
        with gradient (the objective weighs and sums them: ``algorithms.Objective.router_loss``)."""
        if len(records) != self.shape.num_layers:
            raise PosttrainError(f"expected router outputs of {self.shape.num_layers} MoE layers in one forward "
                                 f"pass, got {len(records)} (a router called more than once per layer?)")
        total = weights.sum().double()
        aux_terms, z_terms = [], []
        for layer, record in enumerate(records):
            logits, selected = record.logits[index], record.selected[index]
            aux_terms.append(load_balancing_loss(logits, selected, weights))
            z_terms.append(router_z_loss(logits, weights))
            with torch.no_grad():
                load = expert_load(selected, weights, self.shape.num_experts)
                self.load[layer] += load.double()
                self.entropy[layer] += routing_entropy(logits, weights).double() * total
                self.confidence[layer] += routing_confidence(logits, selected, weights).double() * total
                if self.cfg.capacity_factor > 0:
                    self.dropped[layer] += dropped_assignments(load, self.shape.top_k, self.cfg.capacity_factor).double()
        aux, z = torch.stack(aux_terms), torch.stack(z_terms)
        self.tokens += total
        self.aux += aux.detach().mean().double() * total
        self.z += z.detach().mean().double() * total
        return aux, z

    def metrics(self, reduce_sum: Any = None) -> dict[str, float]:
        """Per-layer and layer-mean metrics; ``reduce_sum``: sums a list of floats over ranks."""
        L, E = self.shape.num_layers, self.shape.num_experts
        values = torch.cat([self.load.flatten(), self.entropy, self.confidence, self.dropped,
                            torch.stack([self.tokens, self.aux, self.z])]).tolist()
        if reduce_sum is not None:
            values = reduce_sum(values)
        load = torch.tensor(values[: L * E], dtype=torch.float64).view(L, E)
        entropy, confidence, dropped = (torch.tensor(values[L * E + i * L: L * E + (i + 1) * L]) for i in range(3))
        tokens, aux, z = values[-3:]
        denom = max(tokens, 1e-12)
        per_layer = {"load_max_vio": load_max_vio(load), "routing_entropy": entropy / denom,
                     "routing_confidence": confidence / denom}
        if self.cfg.capacity_factor > 0:
            per_layer["dropped_fraction"] = dropped / (load.sum(-1).clamp(min=1e-12))
        out = {"loss/moe_aux": aux / denom, "loss/moe_z": z / denom}
        for name, value in per_layer.items():
            out[f"moe/{name}"] = float(value.mean())
            out.update({f"moe/{name}/layer_{i}": float(v) for i, v in enumerate(value.tolist())})
        return out


class MoEUpdate:
    """The MoE side of one policy update (trainer/policy.py): record the routers around each
    micro-batch's forward, add their loss term, and report the update's router metrics."""

    def __init__(self, model: torch.nn.Module, shape: MoEShape, router_cfg: Any, device: torch.device) -> None:
        self.recorder = RouterRecorder(model, shape)
        self.stats = RouterStats(shape, router_cfg, device)

    @classmethod
    def for_model(cls, model: torch.nn.Module, router_cfg: Any, device: torch.device) -> MoEUpdate | None:
        """None for a dense model: the update then has no MoE work at all."""
        shape = moe_shape(model)
        return None if shape is None else cls(model, shape, router_cfg, device)

    def recording(self) -> contextlib.AbstractContextManager[list[RouterOutput]]:
        return self.recorder.recording()

    def loss_terms(self, records: list[RouterOutput], batch: Any, loss_mask: torch.Tensor, num_tokens: float,
                   selected: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's per-layer router losses ``(load balancing (L,), z (L,))``, each
        weighted by the micro-batch's share of the mini-batch's ``num_tokens`` loss tokens, so
        accumulated gradients equal those of the mini-batch's token-weighted mean; the objective
        applies the coefficients (``Objective.router_loss``). ``selected``: per layer the
        ``(tokens, k)`` experts actually used when they are not the routers' own choice (router
        replay); the load metrics and the aux loss count those."""
        if selected is not None:
            records = [RouterOutput(r.logits, s.long()) for r, s in zip(records, selected)]
        index, weights = router_token_index(batch, loss_mask)
        aux, z = self.stats.add(records, index, weights)
        share = weights.sum() / num_tokens
        return aux * share, z * share

    def metrics(self, reduce_sum: Any = None) -> dict[str, float]:
        """The update's metrics; removes the hooks (call once, at the end)."""
        self.recorder.remove()
        return self.stats.metrics(reduce_sum)


# ---------------------------------------------------------------- router dtype


def _float32_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    # Autocast would run the router's matmul in bf16 again; float32 in, float32 logits out.
    with torch.autocast(hidden_states.device.type, enabled=False):
        return type(self).forward(self, hidden_states.float(), *args, **kwargs)


def apply_router_dtype(model: torch.nn.Module, dtype: str) -> int:
    """``moe.router.dtype=float32``: every router computes in float32 under any autocast. Bound per
    module (``types.MethodType``), so ``copy.deepcopy`` (the KL reference) binds the copy's. Returns
    the number of routers changed."""
    if dtype != "float32":
        return 0
    routers, _ = find_routers(model)
    for router in routers:
        router.forward = types.MethodType(_float32_router_forward, router)
    return len(routers)


def float32_router_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The parameters of the routers ``apply_router_dtype`` made float32: a caller that casts the
    model's weights to 16 bits (the engine's bf16 CPU rollouts) leaves these in float32, so routing
    computes as the trainer's does."""
    routers, _ = find_routers(model)
    return {p for r in routers if getattr(r.forward, "__func__", None) is _float32_router_forward
            for p in r.parameters()}


# ---------------------------------------------------------------- checks


def moe_config_problems(cfg: Any) -> list[str]:
    """Checks of the ``moe`` section that need no model; one line per problem."""
    r, init = cfg.moe.router, cfg.moe.random_init
    problems = []
    for key, value, zero in [("num_experts", r.num_experts, "the model's own"), ("top_k", r.top_k, "the model's own"),
                             ("capacity_factor", r.capacity_factor, "dropless"), ("aux_loss_coef", r.aux_loss_coef, "off"),
                             ("z_loss_coef", r.z_loss_coef, "off")]:
        if value < 0:
            problems.append(f"moe.router.{key}={value} must be >= 0 (0: {zero}).")
    if r.num_experts and r.top_k > r.num_experts:
        problems.append(f"moe.router.top_k={r.top_k} must be <= moe.router.num_experts={r.num_experts}.")
    if init.family:  # a random-init MoE policy: known to have routers before anything loads
        problems += router_dtype_problems(cfg)
    world = env_world_size() if launched_by_torchrun() else getattr(cfg.trainer, "num_processes", 1)
    problems += ep_mode_problems(cfg.moe.ep_mode, world, (r.num_experts or 8) if init.family else None)
    if cfg.moe.ep_mode != "single" and world > 1 and getattr(cfg.trainer, "fsdp_cpu_offload", False):
        problems.append(f"moe.ep_mode={cfg.moe.ep_mode} with trainer.fsdp_cpu_offload=true is not supported yet; "
                        "set moe.ep_mode=single or trainer.fsdp_cpu_offload=false.")
    if init.family:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(init, key) < 1:
                problems.append(f"moe.random_init.{key}={getattr(init, key)} must be >= 1.")
        if init.num_attention_heads >= 1 and init.hidden_size % init.num_attention_heads:
            problems.append(f"moe.random_init.num_attention_heads={init.num_attention_heads} must divide "
                            f"moe.random_init.hidden_size={init.hidden_size}.")
        if init.num_key_value_heads >= 1 and init.num_attention_heads % init.num_key_value_heads:
            problems.append(f"moe.random_init.num_key_value_heads={init.num_key_value_heads} must divide "
                            f"moe.random_init.num_attention_heads={init.num_attention_heads}.")
        if (r.num_experts or 8) < (r.top_k or 2):
            problems.append(f"moe.random_init builds {r.num_experts or 8} experts, fewer than top_k={r.top_k or 2}.")
        if cfg.model.lora.r > 0:
            problems.append("moe.random_init with model.lora.r > 0: adapters on a random model train nothing "
                            "meaningful; set model.lora.r=0.")
    return problems


def check_moe_config(cfg: Any, device: torch.device | None) -> None:
    """Raise one ConfigError listing every problem of the ``moe`` section (before anything loads).
    ``device`` None: not ``moe.expert_dtype`` against the GPU (the launcher of
    ``trainer.num_processes`` workers checks the rest once, before starting them; each worker checks
    its own GPU)."""
    problems = moe_config_problems(cfg)
    if len(problems) == 1:  # one line, as validate_config words a single problem
        raise ConfigError(f"Invalid configuration: {problems[0]}")
    if problems:
        raise ConfigError(f"Invalid configuration ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems))
    if device is not None:
        check_expert_dtype(cfg.moe.expert_dtype, device)


def check_expert_dtype(expert_dtype: str, device: torch.device,
                       capability: tuple[int, int] | None = None, gpu_name: str | None = None, *,
                       option: str = "moe.expert_dtype=") -> None:
    """Raise ConfigError unless ``moe.expert_dtype`` can run here. ``capability``/``gpu_name``
    default to the device's (given explicitly in tests). ``option``: how the messages name the
    setting before its value (``posttrain serve``: ``"--expert-dtype "``)."""
    if expert_dtype == "auto":
        return
    need = EXPERT_DTYPE_CAPABILITY[expert_dtype]
    if device.type != "cuda":
        raise ConfigError(f"{option}{expert_dtype} needs {_capable_gpus(need)}; this run is on the "
                          f"{device.type.upper()}. Use {option}auto.")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
        gpu_name = torch.cuda.get_device_name(device)
    check_expert_dtype_capability(expert_dtype, capability, f"this GPU ({gpu_name})", option=option)
    if expert_dtype == "nvfp4":
        raise ConfigError(f"{option}nvfp4: {gpu_name} (capability {capability[0]}.{capability[1]}) supports "
                          f"it, but posttrain's nvfp4 experts are not implemented yet; use {option}fp8.")


def check_expert_dtype_capability(expert_dtype: str, capability: tuple[int, int], gpu_name: str = "this GPU", *,
                                  option: str = "moe.expert_dtype=") -> None:
    """Raise ConfigError when a GPU of compute ``capability`` cannot hold ``moe.expert_dtype``
    experts (fp8: 8.9, Ada/Hopper/Blackwell; nvfp4: 10.0, Blackwell), naming its capability and
    what to use instead. ``auto`` always passes. Pure: the capability is given."""
    need = EXPERT_DTYPE_CAPABILITY.get(expert_dtype)
    if need is None or tuple(capability) >= need:
        return
    fallback = "fp8" if expert_dtype == "nvfp4" and tuple(capability) >= EXPERT_DTYPE_CAPABILITY["fp8"] else "auto"
    raise ConfigError(f"{option}{expert_dtype} needs {_capable_gpus(need)}; {gpu_name} has compute "
                      f"capability {capability[0]}.{capability[1]}. Use {option}{fallback}.")


def _capable_gpus(need: tuple[int, int]) -> str:
    family = "Blackwell" if need >= (10, 0) else "Ada, Hopper or Blackwell"
    return f"an NVIDIA GPU of compute capability {need[0]}.{need[1]} or newer ({family})"


def check_moe_model(model: torch.nn.Module, cfg: Any) -> MoEShape | None:
    """The policy's MoE shape after checking it against ``cfg.moe``; None for a dense model (then
    a moe section that asks for MoE-only things is an error)."""
    moe = cfg.moe
    shape = moe_shape(model)
    name = type(_causal_lm(model)).__name__
    if shape is None:
        asked = [k for k, v in [("moe.router.num_experts", moe.router.num_experts), ("moe.router.top_k", moe.router.top_k),
                                ("moe.expert_dtype", moe.expert_dtype != "auto"),
                                ("moe.ep_mode", moe.ep_mode in ("ipc", "hybrid"))] if v]
        if asked:
            raise ConfigError(f"{', '.join(asked)} set, but the policy ({name}, model.path={cfg.model.path}) is not a "
                              f"mixture-of-experts model; remove {'them' if len(asked) > 1 else 'it'} or load an MoE model.")
        return None
    for key, mine, theirs in [("num_experts", moe.router.num_experts, shape.num_experts),
                              ("top_k", moe.router.top_k, shape.top_k)]:
        if mine and mine != theirs:
            raise ConfigError(f"moe.router.{key}={mine}, but the policy ({name}) has {theirs}; set moe.router.{key}=0 "
                              f"(the model's own) or {theirs}.")
    return shape


def router_dtype_problems(cfg: Any) -> list[str]:
    """moe.router.dtype=float32 with 16-bit parameters (an MoE policy's problem only: a dense model
    has no router, and its runs ignore moe.router.dtype)."""
    if cfg.moe.router.dtype == "float32" and getattr(cfg.trainer, "param_dtype", "float32") != "float32":
        return [f"moe.router.dtype=float32 needs float32 router weights, but trainer.param_dtype="
                f"{cfg.trainer.param_dtype} stores them in 16 bits; set moe.router.dtype=auto or "
                "trainer.param_dtype=float32."]
    return []


def prepare_moe_policy(model: torch.nn.Module, cfg: Any) -> MoEShape | None:
    """Check a freshly loaded policy against ``cfg.moe`` and apply the router dtype (before the
    KL reference is copied from it, so the reference routes the same way). None: a dense model."""
    shape = check_moe_model(model, cfg)
    if shape is not None:
        problems = router_dtype_problems(cfg)
        if problems:
            raise ConfigError(f"Invalid configuration: {problems[0]}")
        apply_router_dtype(model, cfg.moe.router.dtype)
    return shape


# ---------------------------------------------------------------- the random-init demo model


def build_random_moe_model(moe: Any, tokenizer: Any, attn_implementation: str) -> torch.nn.Module:
    """A randomly initialised MoE causal LM of ``moe.random_init.family`` sized by ``moe.random_init``
    and ``moe.router``, with ``tokenizer``'s vocabulary and special tokens (float32, on the CPU)."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    init, router = moe.random_init, moe.router
    if init.family not in RANDOM_INIT_FAMILIES:
        raise ConfigError(f"moe.random_init.family={init.family!r}: choose one of {', '.join(RANDOM_INIT_FAMILIES)}.")
    common = dict(
        vocab_size=len(tokenizer), hidden_size=init.hidden_size, num_hidden_layers=init.num_layers,
        num_attention_heads=init.num_attention_heads, num_key_value_heads=init.num_key_value_heads,
        num_experts_per_tok=router.top_k or 2, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    if init.family == "mixtral":
        config = MixtralConfig(**common, intermediate_size=init.intermediate_size,
                               num_local_experts=router.num_experts or 8)
    else:
        config = Qwen3MoeConfig(**common, intermediate_size=init.intermediate_size,
                                moe_intermediate_size=init.intermediate_size, num_experts=router.num_experts or 8,
                                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    with torch.random.fork_rng(devices=[]):  # the run's own RNG stream is left as it was
        torch.manual_seed(init.seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model


# ---------------------------------------------------------------- the checklist printed at start-up


def moe_checklist(shape: MoEShape, cfg: Any, layout: Any, model_name: str) -> str:
    """The layout and router checklist a GRPO run on an MoE policy prints before training."""
    r = cfg.moe.router
    backend = cfg.rollout.backend
    if layout.world_size > 1 and layout.ep == 1 and cfg.moe.ep_mode != "single":  # the EP size the run uses
        _, ep = resolve_ep_mode(cfg.moe.ep_mode, layout.world_size, gpus_per_node(layout.world_size), shape.num_experts)
        layout = ParallelLayout.from_world_size(layout.world_size, tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=ep)
    lines = [
        f"MoE policy: {model_name}, {shape.num_layers} MoE layers x {shape.num_experts} experts, top-{shape.top_k}"
        + (f" (random init, seed {cfg.moe.random_init.seed})" if cfg.moe.random_init.family else ""),
        layout.describe(num_experts=shape.num_experts),
        "Router checklist:",
        f"  [ok] router dtype: {r.dtype}" + (" (router logits in float32 under any autocast)" if r.dtype == "float32" else ""),
        f"  [ok] load-balancing loss coef {r.aux_loss_coef:g}, z-loss coef {r.z_loss_coef:g} (on the loss tokens, summed over layers)",
        "  [ok] capacity: " + (f"factor {r.capacity_factor:g}: moe/dropped_fraction logs what it would drop "
                               "(the transformers experts are dropless)" if r.capacity_factor > 0 else "dropless"),
        f"  [ok] expert dtype: {cfg.moe.expert_dtype}"
        + (" (rollouts: e4m3 experts, per-output-channel scales, requantized at every weight sync)"
           if cfg.moe.expert_dtype == "fp8" else ""),
        f"  [ok] expert parallelism: moe.ep_mode={cfg.moe.ep_mode}"
        + (f" ({shape.num_experts // layout.ep} experts per process, all-to-all over EP groups of {layout.ep})"
           if layout.ep > 1 else " (every process holds all experts)"),
        f"  [ok] rollout.backend={backend}"
        + (": posttrain's engine for Mixtral, Qwen2/Qwen3-MoE, OLMoE and GraniteMoE (grouped experts, routes "
           "recorded); transformers for other families" if backend == "engine" else ""),
        router_replay_line(cfg.moe.router_replay, backend),
    ]
    return "\n".join(lines)


def router_replay_line(replay: bool, backend: str) -> str:
    """The checklist's router replay (R3) line."""
    if replay and backend == "engine":
        return ("  [ok] router replay (R3): the old-logprob and training forwards replay the engine's routes "
                "(moe.router_replay=true); moe/route_agreement: how often the trainer's router agrees")
    if replay:
        return (f"  [!!] router replay (R3): rollout.backend={backend} records no routes, so nothing is replayed; "
                "watch rollout/logprob_mismatch_* (docs/moe.md)")
    return ("  [!!] router replay (R3): off (moe.router_replay=false); rollout and trainer route independently: "
            "watch moe/route_agreement and rollout/logprob_mismatch_* (docs/moe.md)")
