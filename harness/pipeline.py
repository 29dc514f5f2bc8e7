"""Pipeline parallelism on the ranks: a stage's model chunks, their PP=1 names, megatron-core's schedule.

At a layout with ``pp`` > 1 every rank holds one pipeline stage of the model: ``layout.chunks`` modules
(one, or ``vpp`` under virtual stages), built by megatron-core with ``pre_process`` on the chunk that
holds the embedding and ``post_process`` on the one that holds the output layer. megatron numbers a
stage's layers locally (``decoder.layers.0`` on every stage); the global number is
``TransformerLayer.layer_number`` (1-based). The harness compares by the names a PP=1 model gives,
so it reads a stage through ``global_view``: one module whose parameter names are those, holding
the chunks' own modules (nothing is copied).

The forward and backward passes are megatron-core's own schedule (``get_forward_backward_func``:
the one-forward-one-backward schedule, or the interleaved one under virtual stages), over gloo
point-to-point on CPU. ``stage_gathered`` then puts every stage's evidence together on every rank of
the pipeline group, so a rank's record reads as a PP=1 rank's does.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

__all__ = ["stage_chunks", "global_view", "pipeline_config", "run_schedule", "stage_gathered", "handed_over",
           "chunks_of", "merged", "padded", "stage_input", "stage_logits"]


def pipeline_config(layout: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The TransformerConfig fields a pipeline layout sets (none at pp=1): sizes, the dtype of the tensors
    the stages exchange, and on CPU megatron's separate ``isend``/``irecv`` instead of ``batch_isend_irecv``
    (``batch_p2p_comm``): on gloo, batched point-to-point pairs the wrong messages once several are in flight
    (the interleaved schedule with more micro-batches than stages: a deep run's four micro-batches at
    tp1-pp2-vpp2 trained on mixed-up activations, 0.07 off the reference, while two matched bit for bit)."""
    if layout.pp == 1:
        return {}
    return {
        "pipeline_model_parallel_size": layout.pp,
        "virtual_pipeline_model_parallel_size": layout.vpp,
        "pipeline_dtype": dtype,
        "batch_p2p_comm": torch.cuda.is_available(),
    }


def stage_chunks(build: Callable[[bool, bool, Optional[int]], nn.Module], layout: Any) -> list[nn.Module]:
    """This rank's model chunks: ``build(pre_process, post_process, vp_stage)`` per virtual stage, as
    megatron-core decides which chunk is first and last (``parallel_state``, already at ``layout``)."""
    from megatron.core import parallel_state

    chunks = []
    for v in range(layout.chunks):
        vp = v if layout.vpp else None
        chunks.append(build(
            parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp,
        ))
    return chunks


def handed_over(chunks: Sequence[nn.Module], layout: Any) -> Any:
    """The model as megatron hands it to a PEFT: one module per stage, or the list of chunks under virtual stages."""
    return list(chunks) if layout.vpp else chunks[0]


def chunks_of(model: Any) -> list[nn.Module]:
    """The chunks of what a PEFT returned (a module or a list of them)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _is_layer_list(name: str, module: nn.Module) -> bool:
    return name == "layers" and isinstance(module, nn.ModuleList) and len(module) > 0 and all(
        isinstance(getattr(layer, "layer_number", None), int) for layer in module)


def _has_layer_list(module: nn.Module) -> bool:
    return any(_is_layer_list(n.rsplit(".", 1)[-1], m) for n, m in module.named_modules() if n)


class GlobalView(nn.Module):
    """A stage's chunks under PP=1 names (``global_view``); never called, only read and written through."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("harness.pipeline.GlobalView is a view for names; run the chunks through the schedule")


def global_view(chunks: Sequence[nn.Module], training: Optional[bool] = None) -> nn.Module:
    """One module holding the chunks' modules under the names a PP=1 model gives them.

    Every ``layers`` list of TransformerLayers becomes a ``ModuleDict`` keyed by ``layer_number - 1``
    (megatron's global, 0-based index); containers above such a list are merged across the chunks
    (with their own parameters and buffers, such as a ViT's class token);
    any other child is the chunk's own module, under its own name (the embedding on the first stage,
    the final norm and output layer on the last). Two chunks with a same-named child that holds
    parameters is an error (no PP=1 model has that). ``training``: the view's own ``training`` flag
    (``state_findings`` reads it); it is not applied to the chunks.
    """
    view = GlobalView()

    def merge(dst: nn.Module, src: nn.Module, where: str) -> None:
        for name, child in src.named_children():
            path = f"{where}.{name}" if where else name
            if _is_layer_list(name, child):
                holder = dst._modules.get(name)
                if holder is None:
                    holder = nn.ModuleDict()
                    dst.add_module(name, holder)
                for layer in child:
                    key = str(layer.layer_number - 1)
                    if key in holder:
                        raise ValueError(f"harness.pipeline: layer number {layer.layer_number} of {path} is held by two chunks")
                    holder[key] = layer
            elif _has_layer_list(child):
                holder = dst._modules.get(name)
                if holder is None:
                    holder = nn.Module()
                    dst.add_module(name, holder)
                # The container's own tensors (a ViT's class token) under its name.
                for pname, param in child._parameters.items():
                    if param is not None:
                        holder._parameters[pname] = param
                for bname, buf in child._buffers.items():
                    if buf is not None:
                        holder._buffers[bname] = buf
                merge(holder, child, path)
            elif name in dst._modules:
                if any(True for _ in child.parameters()) and dst._modules[name] is not child:
                    raise ValueError(f"harness.pipeline: two chunks hold a module named {path} with parameters")
            else:
                dst.add_module(name, child)

    for chunk in chunks:
        merge(view, chunk, "")
    # The layers in global order, whatever the chunk order (virtual stages interleave them).
    for module in view.modules():
        for name, child in list(module._modules.items()):
            if isinstance(child, nn.ModuleDict) and name == "layers":
                module._modules[name] = nn.ModuleDict(sorted(child.items(), key=lambda kv: int(kv[0])))
    if training is not None:
        view.training = training
    return view


def run_schedule(
    chunks: Sequence[nn.Module],
    micro_batches: Sequence[Any],
    forward: Callable[[nn.Module, Any], torch.Tensor],
    loss: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[torch.Tensor]:
    """megatron-core's pipeline schedule over this stage's chunks; each micro-batch's output on the
    last stage, in order (an empty list on the other stages).

    ``forward(chunk, batch)`` runs one chunk on one micro-batch (a chunk without ``pre_process``
    takes its input from the previous stage, set by the schedule); ``loss(output, batch)`` is the
    scalar whose gradient the backward pass propagates. megatron divides each micro-batch's loss
    by the number of micro-batches; the loss handed to it is multiplied by that number first, so
    the gradients are those of ``sum(loss(output_i))``, as a PP=1 run that calls ``backward`` once
    per micro-batch accumulates them (the factor is 1 or 2: exact in every dtype).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs: list[torch.Tensor] = []
    count = len(micro_batches)

    def step(data_iterator: Any, model: nn.Module) -> tuple[torch.Tensor, Callable[..., Any]]:
        batch = next(data_iterator)
        output = forward(model, batch)

        def loss_func(out: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            outputs.append(out.detach())
            return loss(out, batch) * count, {}

        return output, loss_func

    iterators = [iter(list(micro_batches)) for _ in chunks]
    schedule = get_forward_backward_func()
    schedule(
        forward_step_func=step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=list(chunks) if len(chunks) > 1 else chunks[0],
        num_microbatches=count,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return outputs


def padded(batches: Sequence[dict[str, Any]], layout: Any) -> list[dict[str, Any]]:
    """megatron's interleaved schedule (virtual stages) takes a multiple of pp micro-batches (its groups of
    ``microbatch_group_size_per_vp_stage`` = pp; a remainder below pp is refused): the micro-batches (dicts
    with an input ``x`` and a ``probe`` the loss weighs the output with) padded with ones whose input and
    probe are zero, so they add exact zeros to every gradient (their outputs are never read)."""
    out = list(batches)
    while layout.vpp and len(out) % layout.pp:
        out.append({"x": torch.zeros_like(out[0]["x"]).requires_grad_(out[0]["x"].requires_grad),
                    "probe": torch.zeros_like(out[0]["probe"])})
    return out


def stage_input(*args: Any) -> Callable[[nn.Module, dict[str, Any]], torch.Tensor]:
    """``forward(chunk, batch)`` for ``run_schedule``: ``chunk(*args, decoder_input=batch["x"])`` on the chunk
    that holds the embedding (``pre_process``), ``decoder_input=None`` on the others, whose input the schedule
    sets (a DDP-wrapped chunk is read through its ``module``)."""
    def forward(chunk: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        first = getattr(getattr(chunk, "module", chunk), "pre_process", True)
        return chunk(*args, decoder_input=batch["x"] if first else None)

    return forward


def stage_logits(chunks: Sequence[nn.Module], forward: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
                 x: torch.Tensor, output_shape: tuple[int, ...], layout: Any) -> torch.Tensor:
    """The logits of input ``x`` through a forward-only schedule, the last stage's on every rank of the
    pipeline group (float64 CPU)."""
    batches = padded([{"x": x, "probe": torch.zeros(output_shape)}], layout)
    seq, micro_batch = output_shape[1], output_shape[0]
    with torch.no_grad():
        outs = run_schedule(chunks, batches, forward, lambda out, batch: out.sum(), seq_length=seq,
                            micro_batch_size=micro_batch, forward_only=True)
    mine = outs[0].detach().to(device="cpu", dtype=torch.float64) if outs else None
    return next(o for o in stage_gathered(mine) if o is not None)


def stage_gathered(value: Any) -> list[Any]:
    """``value`` from every rank of this rank's pipeline group, in stage order (``[value]`` at pp=1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    size = parallel_state.get_pipeline_model_parallel_world_size()
    if size == 1:
        return [value]
    group = parallel_state.get_pipeline_model_parallel_group()
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def merged(dicts: Sequence[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """The union of the stages' dicts (their keys are disjoint global names); None when every stage sent None."""
    if all(d is None for d in dicts):
        return None
    out: dict[str, Any] = {}
    for d in dicts:
        out.update(d or {})
    return out
