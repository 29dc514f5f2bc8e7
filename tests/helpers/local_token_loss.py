"""A training loop that normalises each data-parallel replica by its own valid tokens (for the harness's
own tests: the loss normalisation belongs to the loop, which the harness owns, not to a LoRA).

With megatron's per-token loss the replicas' summed gradients are divided by the global batch's valid
tokens; this loop divides each replica's by its own before they are summed, the mean of per-replica
means that a loss function computing "the mean over my tokens" gives. Replicas with different numbers of
valid tokens then train another model than the reference's. Run in a rank process; it puts the loop's
``finalize`` back afterwards, since the pool's processes run other tasks after it.
"""

from typing import Any


def run_local_token_loss(ctx: Any, case: Any) -> Any:
    import harness.tasks.training as loop_module
    from harness.families.gpt.training import run_gpt_training_case
    from megatron.core.distributed import finalize_model_grads

    def local(ddp: Any, loop: Any, valid: int) -> None:
        ddps = list(ddp) if isinstance(ddp, (list, tuple)) else [ddp]
        for chunk in ddps:
            chunk.scale_gradients(1.0 / valid)  # this replica's own tokens, before DDP sums the replicas
        finalize_model_grads(ddps)

    original = loop_module.finalize
    loop_module.finalize = local
    try:
        return run_gpt_training_case(ctx, case)
    finally:
        loop_module.finalize = original
