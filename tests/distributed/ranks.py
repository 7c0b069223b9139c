"""Running a function on 2 gloo ranks on CPU (torch.multiprocessing, spawn), and the rank-side
jobs of the FSDP tests. Importable by the spawned children (tests/ is on their sys.path)."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
import torch.multiprocessing as mp

from helpers import make_tiny_llama, make_tokenizer
from ports import free_port
from posttrain.config.schema import GRPOConfig
from posttrain.trainer.samples import Sample


def run_on_ranks(fn, *args, world_size: int = 2, timeout_s: float = 120.0, attempts: int = 3) -> None:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes that joined one gloo group
    (torchrun's environment variables); fails if any rank fails or the whole does not end in time.
    Rank 0 listens on a port chosen here: if another process took it meanwhile (EADDRINUSE), the
    ranks start again on another one."""
    for attempt in range(attempts):
        try:
            return _run_once(fn, args, world_size, timeout_s)
        except mp.ProcessRaisedException as exc:
            text = str(exc)
            if attempt == attempts - 1 or not ("EADDRINUSE" in text or "address already in use" in text.lower()):
                raise


def _run_once(fn, args, world_size: int, timeout_s: float) -> None:
    port = free_port()
    context = mp.start_processes(_rank_main, args=(world_size, port, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} ranks did not finish in {timeout_s} s (a collective mismatch?)")


def _rank_main(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from posttrain.distributed import barrier, destroy_process_group, init_process_group

    init_process_group(torch.device("cpu"), timeout_s=60)
    try:
        fn(rank, world_size, *args)
        barrier()  # no rank tears the group down while another still talks to it
    finally:
        destroy_process_group()
    # Done and written: skip interpreter finalisation. Under pytest, about 1 run in 10 aborted there
    # ("terminate called without an active exception" in a native thread) after the job had finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- shared set-up
def make_samples(step: int) -> list[Sample]:
    """8 completions of varied lengths (the global batch of a step), different per step."""
    g = torch.Generator().manual_seed(step)
    samples = []
    for i in range(8):
        prompt = torch.randint(4, 90, (3 + i % 4,), generator=g).tolist()
        response = torch.randint(4, 90, (2 + (i * 3) % 7,), generator=g).tolist()
        old = (-torch.rand(len(response), generator=g) * 3).tolist()
        ref = (-torch.rand(len(response), generator=g) * 3).tolist()
        samples.append(Sample(prompt, response, old, advantage=float((i + step) % 3 - 1), reward=0.0, ref_logprobs=ref))
    return samples


def make_config(mode: str = "token-mean", micro_batch_tokens: int = 0, cpu_offload: bool = False) -> GRPOConfig:
    cfg = GRPOConfig()
    cfg.rollout.batch_size, cfg.trainer.mini_batch_size = 8, 4  # two optimizer steps per update
    cfg.rollout.max_new_tokens = 16
    cfg.trainer.micro_batch_size = 2
    cfg.trainer.micro_batch_tokens = micro_batch_tokens
    cfg.trainer.lr = 1e-2
    # A large eps keeps Adam's step linear in the gradient (as tests/trainer/test_policy_update.py).
    cfg.trainer.adam_eps = 1.0
    cfg.algorithm.loss_agg_mode = mode
    cfg.algorithm.kl_coef = 0.1
    cfg.algorithm.entropy_coef = 0.01
    cfg.trainer.fsdp_cpu_offload = cpu_offload  # only read when sharding (several ranks)
    return cfg


def build(cfg: GRPOConfig):
    """Tiny Llama (seed 0), prepared for training (sharded on several ranks), optimizer, scheduler."""
    from posttrain.trainer.memory import prepare_for_training
    from posttrain.trainer.optim import build_optimizer, build_scheduler

    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer)
    if cfg.model.gradient_checkpointing:  # as posttrain.models.loading does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = prepare_for_training(model, cfg.trainer, torch.device("cpu"), torch.float32)
    optimizer = build_optimizer(model, cfg.trainer)
    scheduler = build_scheduler(optimizer, cfg.trainer, 4)
    return model, tokenizer, optimizer, scheduler


def update(model, optimizer, scheduler, cfg: GRPOConfig, samples: list[Sample]) -> dict[str, float]:
    from posttrain.distributed import rank_share
    from posttrain.trainer.policy import policy_update

    # Each rank: its half of every mini-batch (as RankShardedSampler hands out prompts).
    local = rank_share(samples, block=cfg.trainer.mini_batch_size)
    return policy_update(model, optimizer, scheduler, local, 0, torch.device("cpu"), contextlib.nullcontext,
                         algo=cfg.algorithm, trainer=cfg.trainer, rollout=cfg.rollout, model_cfg=cfg.model,
                         moe_cfg=cfg.moe)


# ----------------------------------------------------------------- rank jobs
def train_checkpoint_resume(rank: int, world_size: int, workdir: str, mode: str, micro_batch_tokens: int,
                            cpu_offload: bool) -> None:
    """Step 1, full weights and metrics, the bucket iterator's output, a sharded checkpoint, step 2;
    then a fresh model and optimizer load the step-1 checkpoint and take step 2 again."""
    from posttrain.checkpoint.sharded import ShardedCheckpointManager, full_model_state_dict
    from posttrain.distributed import iter_full_weights

    cfg = make_config(mode, micro_batch_tokens, cpu_offload)
    model, tokenizer, optimizer, scheduler = build(cfg)
    metrics = update(model, optimizer, scheduler, cfg, make_samples(1))
    state = full_model_state_dict(model)
    buckets = [[(name, tensor.clone()) for name, tensor in bucket] for bucket in iter_full_weights(model, bucket_bytes=8192)]
    ShardedCheckpointManager(f"{workdir}/run", keep_last=2).save(1, model, tokenizer, {"seed": 0}, optimizer, scheduler)
    metrics2 = update(model, optimizer, scheduler, cfg, make_samples(2))
    state2 = full_model_state_dict(model)

    model, _, optimizer, scheduler = build(cfg)
    trainer_state = ShardedCheckpointManager.load(f"{workdir}/run/checkpoints/step_000001", model, optimizer, scheduler)
    resumed_metrics2 = update(model, optimizer, scheduler, cfg, make_samples(2))
    resumed_state2 = full_model_state_dict(model)
    if rank == 0:
        torch.save({"metrics": metrics, "state": state, "buckets": buckets, "metrics2": metrics2, "state2": state2},
                   f"{workdir}/straight.pt")
        torch.save({"trainer_state": trainer_state, "metrics2": resumed_metrics2, "state2": resumed_state2},
                   f"{workdir}/resumed.pt")


def generate_unequal_lengths(rank: int, world_size: int, workdir: str) -> None:
    """Ranks generate different numbers of tokens with a sharded model (no collective inside), and
    rank 0 alone generates once more (validation), then both train a step with activation
    checkpointing; then a sharded critic takes a step."""
    from posttrain.distributed import gathered_for_generation

    cfg = make_config()
    cfg.model.gradient_checkpointing = True
    model, _, optimizer, scheduler = build(cfg)
    prompt = torch.tensor([[5, 6, 7]])
    model.eval()  # as the engine generates
    with gathered_for_generation(model), torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=3 + 6 * rank, min_new_tokens=3 + 6 * rank, do_sample=False)
    with gathered_for_generation(model), torch.no_grad():
        if rank == 0:
            model.generate(prompt, max_new_tokens=5, do_sample=False)
    metrics = update(model, optimizer, scheduler, cfg, make_samples(1))
    torch.save({"tokens": tokens, "loss": metrics["loss/policy"]}, f"{workdir}/gen_rank{rank}.pt")

    from posttrain.checkpoint.sharded import full_model_state_dict

    critic_state = full_model_state_dict(critic_step(make_samples(1), world_size))
    if rank == 0:
        torch.save(critic_state, f"{workdir}/critic.pt")


def critic_step(samples: list[Sample], world_size: int = 1):
    """A PPO critic (value head on the tiny Llama), sharded on several ranks, one SGD step on this
    rank's share of ``samples`` with a loss normalised by the global token count. Returns the critic."""
    from posttrain.distributed import all_reduce_sum, rank_share
    from posttrain.models.value_model import ValueModel
    from posttrain.trainer.memory import prepare_for_training
    from posttrain.trainer.samples import collate

    critic = ValueModel.from_causal_lm(make_tiny_llama(make_tokenizer()))
    torch.manual_seed(1)
    torch.nn.init.normal_(critic.head.weight)  # zero-initialised heads pass no gradient to the backbone
    critic = prepare_for_training(critic, make_config().trainer, torch.device("cpu"), torch.float32)
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.5)
    batch = collate(rank_share(samples), 0, "cpu")
    num_tokens = all_reduce_sum([float(batch.loss_mask.sum())])[0]
    values = critic(batch.tokens)
    (((values - 1.0) ** 2 * batch.loss_mask).sum() / num_tokens * world_size).backward()
    optimizer.step()
    return critic
