"""AdamW over float32 master copies of bf16 model parameters (trainer.master_weights).

bf16 parameters make the forward and backward passes cheaper (no autocast casts of every weight,
half the weight reads), but a bf16 weight ``w`` only changes when an update exceeds half its
spacing, about ``|w| / 256``: at fine-tuning learning rates most AdamW steps round away and the
policy stops learning (docs/benchmarks.md). This optimizer keeps what learning needs in float32
(the Megatron/Apex "main params" pattern):

- each trained bf16 parameter has a float32 master copy, and the AdamW moments are float32;
- gradients are accumulated in float32 on the masters: a hook moves each parameter's bf16
  gradient into its master's ``.grad`` as soon as the backward pass has produced it (and frees
  the bf16 one), so micro-batch accumulation is as exact as with float32 parameters;
- the step updates the masters, then copies them (rounded) into the bf16 parameters in place, so
  the engine and anything else holding the parameters sees the new weights.

The masters are part of :meth:`state_dict`, so a checkpoint resumes exactly (the bf16 weights in
the checkpoint's model files have lost the masters' low bits)."""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor

MASTERS_KEY = "float32_master_params"  # the extra state_dict entry: the masters, in param_groups order
_HOOK_ATTR = "_posttrain_master_hook"  # on each model parameter: the handle of its gradient hook


def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for each pair (casting), in one for-each kernel where this torch has one for
    mixed dtypes, else one copy per tensor."""
    try:
        torch._foreach_copy_(destinations, sources)
    except (RuntimeError, NotImplementedError):
        for d, s in zip(destinations, sources):
            d.copy_(s)


def _accumulate_into_master(master: torch.Tensor, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: add ``param``'s fresh bf16 gradient to ``master.grad`` in float32."""
    grad = param.grad
    if grad is None:
        return
    if master.grad is None:
        master.grad = grad.to(torch.float32)
    else:
        master.grad.add_(grad)  # in-place float32 += bf16: promoted, rounded once to float32
    param.grad = None  # frees the bf16 gradient now, and keeps it from being counted twice


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW whose ``param_groups`` hold float32 masters of ``params`` (16-bit, trainable). Call
    :meth:`step` and :meth:`zero_grad` as usual; ``clip_and_step`` clips :meth:`master_params`'
    gradients, where the model's gradients end up."""

    def __init__(self, params, **adamw_kwargs) -> None:
        self.model_params: list[torch.Tensor] = list(params)
        if any(isinstance(p, DTensor) for p in self.model_params):
            # Sharded checkpoints map optimizer state to the model's own parameters (get_state_dict),
            # which the masters are not; FSDP2's MixedPrecisionPolicy already is this recipe.
            raise ValueError("MasterWeightAdamW does not support FSDP-sharded parameters; use trainer.param_dtype="
                             "float32 under FSDP (float32 shards, bf16 all-gathers and compute).")
        masters = [p.detach().to(torch.float32, copy=True) for p in self.model_params]
        super().__init__(masters, **adamw_kwargs)
        for param, master in zip(self.model_params, masters):
            # One optimizer owns a parameter's gradient: the hook of an earlier MasterWeightAdamW over
            # the same model would take every gradient first and leave this one none.
            old = getattr(param, _HOOK_ATTR, None)
            if old is not None:
                old.remove()
            setattr(param, _HOOK_ATTR, param.register_post_accumulate_grad_hook(
                functools.partial(_accumulate_into_master, master)))

    def master_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _collect_stray_grads(self) -> None:
        """Gradients that reached the bf16 parameters without the hook (assigned, not accumulated by
        autograd) join the masters' too, so no gradient is dropped."""
        for param, master in zip(self.model_params, self.master_params()):
            if param.grad is not None:
                _accumulate_into_master(master, param)

    def clip_grad_candidates(self) -> list[torch.Tensor]:
        """The tensors whose ``.grad`` hold this step's gradients (the masters)."""
        self._collect_stray_grads()
        return self.master_params()

    @torch.no_grad()
    def step(self, closure=None):
        self._collect_stray_grads()
        loss = super().step(closure)  # a fused step skipped through found_inf leaves the masters as they were
        self._copy_masters_to_params()
        return loss

    @torch.no_grad()
    def _copy_masters_to_params(self) -> None:
        _copy_all(self.model_params, self.master_params())  # rounds to bf16, in place

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param in self.model_params:
            param.grad = None

    def state_dict(self) -> dict:
        state = super().state_dict()
        state[MASTERS_KEY] = self.master_params()
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Moments, step counts and masters from ``state_dict``; the bf16 parameters are then set from
        the masters. A state without masters (saved with float32 or pure bf16 parameters) keeps the
        masters made from the model's loaded weights, and its moments are cast to float32."""
        state_dict = dict(state_dict)
        saved = state_dict.pop(MASTERS_KEY, None)
        super().load_state_dict(state_dict)
        masters = self.master_params()
        if saved is None:
            _copy_all(masters, self.model_params)
        else:
            if len(saved) != len(masters) or any(s.shape != m.shape for s, m in zip(saved, masters)):
                raise ValueError(f"the optimizer state holds {len(saved)} float32 master parameters that do not match "
                                 f"this model's {len(masters)} trained parameters (another model or LoRA setting?)")
            _copy_all(masters, [s.to(m.device) for s, m in zip(saved, masters)])
        self._copy_masters_to_params()
