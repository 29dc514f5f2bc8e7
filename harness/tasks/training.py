"""The training loop on one rank (harness/SPEC.md, "Training loop"): megatron-core's or plain torch's.

``megatron_training`` trains the implementation's adapted model the way
megatron-core trains: wrapped in ``DistributedDataParallel`` (the case's
``TrainingLoop``: ``overlap_grad_reduce``, ``grad_reduce_in_fp32``,
``bucket_size``, ``use_distributed_optimizer``), the optimizer from
``get_megatron_optimizer`` (Adam or SGD with momentum, ``harness.training``'s
hyperparameters, no clipping, no weight decay), for each step
``zero_grad_buffer``, ``micro_batches`` forward/backward passes (all but the
last under ``no_sync``, as megatron's schedule does), ``finalize_model_grads``
and ``optimizer.step()``. Data-parallel replica ``r`` feeds its own seeded
micro-batches, each with its own loss mask (``token_mask``: replicas and
micro-batches hold different numbers of valid tokens); each micro-batch's
loss is a seeded linear functional of the logits over its valid tokens,
divided by them and the micro-batches (megatron's DDP averages over the
replicas), or, with ``per_token_loss``, the masked sum, every gradient
divided by the global batch's valid tokens in ``finalize_model_grads``.
A loop below float64 records where the adapters started; a bf16 loop
records their float32 main values (megatron's mixed-precision optimizer's
main parameters) after every step.

``reference_training`` trains the reference's model on one device with
plain torch (``torch.optim.Adam`` / ``SGD``) on the same global batch: every
replica's micro-batches with the same normalisation; a bf16 loop steps
float32 master copies and copies them into the bf16 parameters after every
step. Nothing here is shared between the two loops but the data and the
hyperparameters.

After every step each side records the held-out batch's logits and its
adapter tensors; the megatron side also records which base parameters moved
and its adapter tensors keyed by replica (``replica_key``), which the
properties compare bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from harness.evidence import TrainingExtras, TrainingStep
from harness.tasks.common import cpu64
from harness.tasks.recompute import require_grad_fn
from harness.training import ADAM_BETAS, ADAM_EPS, LR, SGD_MOMENTUM, TrainingLoop

__all__ = ["megatron_training", "reference_training", "replica_key", "loss_of", "Batches", "token_mask", "finalize",
           "schedule_hooks"]

#: (step, replica, micro-batch) -> (this rank's model input, the probe over the full logits, zero at the
#: micro-batch's masked tokens, and the number of its valid tokens).
Batches = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor, int]]


def token_mask(seed: int, tag: str, batch: int, seq: int) -> torch.Tensor:
    """A micro-batch's loss mask, (batch, seq) bool: a seeded quarter to all of its tokens are valid, so
    replicas and micro-batches hold different numbers of them (a mean over one replica's tokens is then not
    the global batch's mean: only a loop that normalises as it says matches the reference)."""
    from harness.sharding import seeded_tensor

    n = batch * seq
    share = float(seeded_tensor(seed, f"train-mask-share.{tag}", (1,)).abs().clamp(max=3.0)) / 3.0
    valid = max(1, min(n, round(n * (0.25 + 0.75 * share))))
    order = seeded_tensor(seed, f"train-mask.{tag}", (n,)).argsort()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:valid]] = True
    return keep.view(batch, seq)


def loss_of(out: torch.Tensor, probe: torch.Tensor, divisor: int) -> torch.Tensor:
    """A micro-batch's loss: the probe's linear functional of its logits over ``divisor``."""
    return (out * probe.to(dtype=out.dtype, device=out.device)).sum() / divisor


def replica_key(module: str, name: str, split: bool, rank: int, size: int) -> str:
    """An adapter tensor's replica key: ``"<module>:<name>@<shard>/<shards>"`` for a split tensor (its rank
    and size in the group it is split over), ``"<module>:<name>@full"`` for one every rank of that group
    holds whole. Two ranks with the same key must hold the same bits."""
    return f"{module}:{name}@" + (f"{rank}/{size}" if split else "full")


def _ddp_and_optimizer(model: Any, loop: TrainingLoop, dtype: torch.dtype) -> tuple[list[Any], Any]:
    """megatron's DDP around each of the model's chunks (one, or a pipeline stage's virtual chunks) and one
    optimizer over them all, as megatron's training builds them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from harness import cpu
    from harness.megatron_state import gloo_groups_as_built

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=loop.grad_reduce_in_fp32, overlap_grad_reduce=loop.overlap_grad_reduce,
        use_distributed_optimizer=loop.distributed_optimizer, bucket_size=loop.bucket_size,
    )
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    ddps = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk) for chunk in chunks]
    opt_config = OptimizerConfig(
        optimizer=loop.optimizer, lr=LR, weight_decay=0.0, adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1],
        adam_eps=ADAM_EPS, sgd_momentum=SGD_MOMENTUM, use_distributed_optimizer=loop.distributed_optimizer,
        clip_grad=0.0, bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype,
    )
    if cpu.is_active():
        cpu.patch_loaded_modules()  # megatron's optimizer and DDP modules, imported just now
    # The optimizer reads megatron's gloo copies of the data-parallel groups (on a gloo world, the groups).
    with cpu.cuda_tensor_types(), gloo_groups_as_built():
        optimizer = get_megatron_optimizer(opt_config, ddps)
    if len(ddps) > 1 or chunks[0].config.pipeline_model_parallel_size > 1:
        # What megatron's training hands its pipeline schedule: every micro-batch but a chunk's last under
        # that chunk's no_sync.
        chunks[0].config.no_sync_func = [d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync
    return ddps, optimizer


def _main_params(optimizer: Any) -> dict[int, torch.Tensor]:
    """Megatron's mixed-precision optimizer's float32 main parameter of each 16-bit model parameter, keyed
    by the model parameter's ``data_ptr()`` (``Float16OptimizerWithFloat16Params``, inside a
    ``ChainedOptimizer`` or not)."""
    out: dict[int, torch.Tensor] = {}
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for model_group, main_group in zip(getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", [])):
            for param, main in zip(model_group, main_group):
                out[param.data_ptr()] = main
    return out


def _as_main(tensors: dict[str, torch.Tensor], main: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bf16 loop's record: each adapter's float32 main value in place of its bf16 parameter."""
    out = {}
    for name, tensor in tensors.items():
        if tensor.data_ptr() not in main:
            raise RuntimeError(f"harness: no float32 main parameter for adapter {name} in megatron's optimizer "
                               f"(optimizer groups hold {len(main)} 16-bit parameters)")
        out[name] = cpu64(main[tensor.data_ptr()])
    return out


def finalize(ddp: Any, loop: TrainingLoop, valid: int) -> None:
    """megatron's ``finalize_model_grads`` after a step's micro-batches (``ddp``: one DDP module or a stage's
    list); with per-token loss it sums this replica's ``valid`` tokens over the data-parallel group and
    divides every gradient by that total."""
    from megatron.core.distributed import finalize_model_grads

    num_tokens = torch.tensor(float(valid), dtype=torch.float64) if loop.per_token_loss else None
    finalize_model_grads(list(ddp) if isinstance(ddp, (list, tuple)) else [ddp], num_tokens=num_tokens)


def _base_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def megatron_training(
    model: torch.nn.Module, loop: TrainingLoop, dtype: torch.dtype, replica: int,
    batches: Batches, heldout: torch.Tensor, forward: Callable[[Any, torch.Tensor], torch.Tensor],
    adapters: Callable[[], dict[str, torch.Tensor]], keys: dict[str, str],
    raw: Optional[Callable[[], dict[str, torch.Tensor]]] = None,
    pipeline: Optional[Callable[..., Any]] = None,
    whole: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda d: d,
) -> TrainingExtras:
    """The loop under megatron-core's DDP and optimizer on this rank (see the module's doc).

    ``adapters()`` gives what the steps record (a collective for a family that assembles full tensors:
    every rank calls it); ``raw()`` (default ``adapters``) this rank's own tensors by parameter name,
    which ``keys`` map to replica keys, recorded after every step too.

    ``pipeline``: for a pipeline stage (``model`` its chunks, as megatron hands them over), runs megatron's
    schedule: ``pipeline(ddps, micro_batches)`` with ``[(input, probe, divisor)]`` runs forward and backward
    of the step's micro-batches, ``pipeline(ddps, None, heldout)`` returns the held-out logits (every rank
    of the pipeline group gets the last stage's); ``whole(recorded)`` turns a stage's recorded adapters into
    the whole model's (a collective over the pipeline group: every rank calls it)."""
    from harness import cpu

    named = model if pipeline is None else None
    if named is None:
        from harness.pipeline import chunks_of, global_view

        named = global_view(chunks_of(model))
    before = _base_snapshot(named)
    steps: list[TrainingStep] = []
    kind = ""
    error: Optional[str] = None
    initial: dict[str, torch.Tensor] = {}
    try:
        if loop.dtype_name != "float64":
            initial = whole({n: cpu64(t) for n, t in adapters().items()})
        ddps, optimizer = _ddp_and_optimizer(model, loop, dtype)
        ddp = ddps[0]
        kind = type(optimizer).__name__
        main = _main_params(optimizer) if loop.bf16 else {}
        for step in range(loop.steps):
            for d in ddps:
                d.zero_grad_buffer()
            optimizer.zero_grad()
            valid = 0
            step_batches = []
            for mb in range(loop.micro_batches):
                x, probe, tokens = batches(step, replica, mb)
                valid += tokens
                # Per-token loss: the masked sum, divided by the global batch's valid tokens in
                # finalize_model_grads; otherwise the micro-batch's mean, which DDP averages over replicas.
                step_batches.append((x, probe, 1 if loop.per_token_loss else loop.micro_batches * tokens))
            if pipeline is not None:
                pipeline(ddps, step_batches)
            for mb, (x, probe, divisor) in enumerate(step_batches if pipeline is None else []):
                last = mb == loop.micro_batches - 1
                with (contextlib.nullcontext() if last else ddp.no_sync()):
                    out = forward(ddp, x)
                    require_grad_fn(out)
                    loss_of(out, probe, divisor).backward()
            finalize(ddps, loop, valid)
            with cpu.cuda_tensor_types():
                ok, _, _ = optimizer.step()
            if not ok:
                raise RuntimeError(f"megatron's optimizer skipped step {step} (found inf/nan in the gradients)")
            with torch.no_grad():
                logits = cpu64(forward(ddp, heldout) if pipeline is None else pipeline(ddps, None, heldout))
            tensors = adapters()
            recorded = whole(_as_main(tensors, main) if loop.bf16 else {n: cpu64(t) for n, t in tensors.items()})
            own = {n: cpu64(t) for n, t in (tensors if raw is None else raw()).items()}
            steps.append(TrainingStep(logits=logits, adapters=recorded,
                                      replicas={keys[n]: t for n, t in own.items() if n in keys}))
    except Exception as exc:  # noqa: BLE001 - the implementation's, reported with the step it reached
        error = f"{type(exc).__name__}: {exc}"
    changed = sorted(n for n, p in named.named_parameters() if n in before and not torch.equal(before[n], p.detach()))
    return TrainingExtras(steps=steps, base_changed=changed, optimizer=kind, error=error, initial=initial)


def reference_training(
    model: torch.nn.Module, loop: TrainingLoop, batches: Batches, heldout: torch.Tensor,
    forward: Callable[[Any, torch.Tensor], torch.Tensor], adapters: Callable[[], dict[str, torch.Tensor]],
) -> TrainingExtras:
    """The same loop on one device with plain torch over the whole global batch, ``loop.replicas`` replicas'
    micro-batches (see the module's doc)."""
    replicas = loop.replicas or 1
    params = [p for p in model.parameters() if p.requires_grad]
    # A bf16 loop keeps float32 master copies: the optimizer steps them, and the model's bf16 parameters
    # take their rounded values after every step (mixed precision, written here without megatron's code).
    masters = [p.detach().float() for p in params] if loop.bf16 else params
    if loop.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(masters, lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(masters, lr=LR, momentum=SGD_MOMENTUM, weight_decay=0.0)
    steps = []
    initial = {n: cpu64(t) for n, t in adapters().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    main_of = {names[id(p)]: m for p, m in zip(params, masters)}
    for step in range(loop.steps):
        for p in params:
            p.grad = None
        batch = [[batches(step, replica, mb) for mb in range(loop.micro_batches)] for replica in range(replicas)]
        total = sum(tokens for row in batch for _, _, tokens in row)
        for row in batch:
            for x, probe, tokens in row:
                # Per-token loss: the masked sums, their gradients divided by the global batch's valid tokens
                # after backward (as megatron does: the model's float32 pieces, such as an MoE router's
                # probabilities, then round the same gradients); otherwise each micro-batch's mean over its
                # own tokens, averaged over micro-batches and replicas.
                divisor = 1 if loop.per_token_loss else replicas * loop.micro_batches * tokens
                loss_of(forward(model, x), probe, divisor).backward()
        if loop.per_token_loss:
            scale = torch.tensor(1.0 / total, dtype=torch.float64)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        if loop.bf16:
            for p, master in zip(params, masters):
                master.grad = None if p.grad is None else p.grad.float()
        optimizer.step()
        if loop.bf16:
            with torch.no_grad():
                for p, master in zip(params, masters):
                    p.copy_(master)
        with torch.no_grad():
            logits = cpu64(forward(model, heldout))
        recorded = {n: cpu64(main_of[n] if loop.bf16 else t) for n, t in adapters().items()}
        steps.append(TrainingStep(logits=logits, adapters=recorded))
    return TrainingExtras(steps=steps, optimizer=type(optimizer).__name__, initial=initial)


def schedule_hooks(layout: Any, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                   logits_shape: tuple[int, ...]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(whole, pipeline)`` for ``megatron_training`` at a pipeline layout (a GPTModel's stages, dense or MoE).

    ``whole(recorded)``: the whole model's adapters on every rank of a pipeline group (a stage holds its own);
    ``pipeline(ddps, micro_batches, held)``: megatron's schedule over this stage's DDP-wrapped chunks, a step's
    forward and backward (each micro-batch's own loss divisor rides with it; padding micro-batches under
    virtual stages add zeros), or with ``micro_batches`` None the held-out logits (the last stage's, on every
    rank)."""
    from harness.pipeline import merged, padded, run_schedule, stage_gathered, stage_input, stage_logits

    b, s = logits_shape[0], logits_shape[1]

    def whole(recorded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return recorded if layout.pp == 1 else merged(stage_gathered(recorded)) or {}

    def pipeline(ddps: list[Any], micro_batches: Any, held: Any = None) -> Any:
        stage_forward = stage_input(ids, pos, mask)
        if micro_batches is None:
            return stage_logits(ddps, stage_forward, held, tuple(logits_shape), layout)
        rows = [{"x": x, "probe": probe, "divisor": divisor} for x, probe, divisor in micro_batches]
        run_schedule(ddps, padded(rows, layout), stage_forward,
                     lambda o, batch: loss_of(o, batch["probe"], batch.get("divisor", 1)), seq_length=s,
                     micro_batch_size=b)
        return None

    return whole, pipeline
