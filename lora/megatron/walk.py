"""The walk over a model's modules, and ``LoRABase``, which applies a LoRA by it: freeze, match, transform, adapters trainable, warn.

``walk_and_replace`` (pre-order, replacing modules in place) serves both
applying a LoRA (``LoRABase``) and merging it (``lora.megatron.merge``).
Which adapter a matched module gets is the subclass's ``transform``
(``lora.megatron.lora.LoRA``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torch import nn

from lora.megatron.config import LoRAFields, find_moe_router_topk, moe_adapter_rank
from lora.megatron.freeze import adapter_parameters, freeze_parameters, model_chunks
from lora.megatron.matching import ModuleMatcher, is_expert_linear_name
from lora.megatron.recompute import enable_recompute_input_grad
from lora.megatron.wrapper import is_adapter_wrapper

__all__ = ["join_name", "walk_and_replace", "LoRABase", "global_layer_names"]


def join_name(prefix: str, name: str) -> str:
    """Full dotted name of child `name` under the module whose full name is `prefix` ('' at the top)."""
    return f"{prefix}.{name}" if prefix else name


def global_layer_names(chunk: nn.Module) -> dict[str, str]:
    """For a pipeline chunk: each transformer layer's local name -> the name it has in the whole model.

    megatron-core builds a pipeline stage's block with local indices (``decoder.layers.0`` on every
    stage); the layer's global, 1-based number is its ``layer_number``. Patterns are matched against
    the whole model's names (harness/SPEC.md, "Pipeline stages"), so ``*.layers.0.*`` means the
    model's first layer at every pipeline layout. Empty without pipeline parallelism (no module of the
    chunk has a ``config`` with ``pipeline_model_parallel_size`` > 1), where local and global names are
    the same. Any module's config, not only the chunk's: a chunk may be a wrapper around the model (a
    VLM provider's ``.llava_model``), and a LLaVA's vision tower is built without the pipeline sizes its
    language model has.
    """
    if not any(int(getattr(getattr(m, "config", None), "pipeline_model_parallel_size", 1) or 1) > 1
               for m in chunk.modules()):
        return {}
    out = {}
    for name, module in chunk.named_modules():
        head, _, index = name.rpartition(".")
        number = getattr(module, "layer_number", None)
        if index.isdigit() and (head == "layers" or head.endswith(".layers")) and isinstance(number, int):
            out[name] = f"{head}.{number - 1}"
    return out


def _renamed(names: dict[str, str], prefix: str, name: str) -> tuple[str, str]:
    """(prefix, name) of a walked module, under its whole-model name (``global_layer_names``)."""
    if not names:
        return prefix, name
    full = join_name(prefix, name)
    for local, whole in names.items():
        if full == local or full.startswith(local + "."):
            full = whole + full[len(local):]
            break
    head, _, leaf = full.rpartition(".")
    return head, leaf


def walk_and_replace(
    root: nn.Module,
    visit: Callable[[nn.Module, str, str], tuple[nn.Module, bool]],
    leave: Callable[[nn.Module, str, str], None] | None = None,
) -> nn.Module:
    """Pre-order walk over `root` and its descendants, replacing modules in place.

    `visit(module, name, prefix)` returns `(replacement, descend)`; names are
    as in `root.named_modules()` (the root itself is visited with name '' and
    prefix ''). A module reachable under several names is visited once, at its
    first name, and every occurrence gets the same replacement. When
    `descend` is true and `leave` is given, `leave(replacement, name, prefix)`
    runs once the replacement's whole subtree has been walked (a post-order
    hook). Returns the (possibly replaced) root.
    """
    done: dict[int, nn.Module] = {}

    def go(module: nn.Module, name: str, prefix: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new, descend = visit(module, name, prefix)
        done[id(module)] = new
        done[id(new)] = new
        if descend:
            full = join_name(prefix, name)
            for child_name, child in list(new._modules.items()):
                if child is None:
                    continue
                replacement = go(child, child_name, full)
                if replacement is not child:
                    new._modules[child_name] = replacement
            if leave is not None:
                leave(new, name, prefix)
        return new

    return go(root, "", "")


@dataclass
class LoRABase(LoRAFields):
    """Applying a LoRA to a model: walk, match, wrap, freeze. Subclasses build the adapters.

    `__call__(model, training=True)`:
      1. `freeze_model(model, training)`: by default every parameter is
         frozen (VLM variants freeze only chosen subtrees);
      2. pre-order walk calling `transform(module, name, prefix)` and putting
         what it returns in place of the module; an existing adapter wrapper is
         neither transformed again nor descended into, so a second call changes
         nothing;
      3. training: every adapter parameter is made trainable, train mode.
         Not training (inference, as in Megatron-Bridge): `freeze_model` runs
         again, so every parameter it covers ends frozen, adapters included,
         and the model is put in eval mode;
      4. a warning for each pattern that matched nothing.
    Freezing comes before wrapping (as in Megatron-Bridge) so that adapters
    added inside a frozen subtree start trainable and a subtree left unfrozen
    by a VLM flag stays fully trainable under its adapters.

    `model` may be a module or a list of model chunks (the result has the same
    shape). Adapters are drawn from torch's default CPU generator, A then B,
    one module at a time in walk order.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self._matcher: ModuleMatcher | None = None
        self._walk_roots: list[nn.Module] = []

    @property
    def matcher(self) -> ModuleMatcher:
        """The matcher of the current (or last) walk; built from the fields when first needed."""
        if self.__dict__.get("_matcher") is None:
            self._matcher = ModuleMatcher(self.target_modules, self.exclude_modules)
        return self._matcher

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
        """The adapted module, or `module` itself when it is not selected."""
        raise NotImplementedError(f"{type(self).__name__} must implement transform()")

    def freeze_model(self, model: nn.Module | list[nn.Module], training: bool = True) -> None:
        """Freeze every parameter (adapters included); train mode when `training`."""
        chunks = model_chunks(model)
        freeze_parameters(chunks)
        if training:
            for chunk in chunks:
                chunk.train(True)

    def adapter_rank(self, module: nn.Module, full_name: str) -> int:
        """The rank for this module: dim, or dim // moe_router_topk for an expert linear under normalize_moe_lora."""
        if not (self.normalize_moe_lora and is_expert_linear_name(full_name)):
            return self.dim
        topk = find_moe_router_topk(module, *self.__dict__.get("_walk_roots", []))
        return moe_adapter_rank(self.dim, topk, full_name)

    def enter_subtree(self, module: nn.Module, full_name: str) -> None:
        """Called before the walk descends into `module` (already transformed); a hook for subclasses."""

    def leave_subtree(self, module: nn.Module, full_name: str) -> None:
        """Called once the walk has finished `module`'s subtree; a hook for subclasses."""

    def _visit(self, module: nn.Module, name: str, prefix: str) -> tuple[nn.Module, bool]:
        prefix, name = _renamed(self.__dict__.get("_names", {}), prefix, name)
        if is_adapter_wrapper(module):
            # Already adapted (a previous call): count it as matched so the
            # second call warns about nothing, and leave it untouched.
            # Match on the wrapped base: in exclude mode the wrapper itself is
            # not a linear type and would wrongly count as "matched nothing".
            self.matcher.matches(module.to_wrap, join_name(prefix, name))
            return module, False
        new = self.transform(module, name, prefix)
        descend = not is_adapter_wrapper(new)
        if descend:
            self.enter_subtree(new, join_name(prefix, name))
        return new, descend

    def _leave(self, module: nn.Module, name: str, prefix: str) -> None:
        prefix, name = _renamed(self.__dict__.get("_names", {}), prefix, name)
        self.leave_subtree(module, join_name(prefix, name))

    def _walk_chunk(self, chunk: nn.Module) -> nn.Module:
        """One chunk, its modules named as in the whole model (``global_layer_names``)."""
        self._names = global_layer_names(chunk)
        try:
            return walk_and_replace(chunk, self._visit, self._leave)
        finally:
            self._names = {}

    def __call__(self, model: nn.Module | list[nn.Module], training: bool = True) -> Any:
        chunks = model_chunks(model)
        self._matcher = ModuleMatcher(self.target_modules, self.exclude_modules)
        self._walk_roots = chunks
        try:
            self.freeze_model(model, training)
            result = [self._walk_chunk(chunk) for chunk in chunks]
        finally:
            self._walk_roots = []
        if training:
            for p in adapter_parameters(result):
                p.requires_grad_(True)
            enable_recompute_input_grad(result)
        else:
            self.freeze_model(type(model)(result) if isinstance(model, (list, tuple)) else result[0], False)
        for chunk in result:
            chunk.train(training)
        self.matcher.warn_unmatched()
        if isinstance(model, (list, tuple)):
            return type(model)(result)
        return result[0]

    # ------------------------------------------------------ checkpointing
    def set_params_to_save(self, model: Any) -> None:
        """Remember what an adapter checkpoint holds: every trainable parameter's name (the adapters, and
        whatever a VLM variant left unfrozen) and the buffers of modules that track running statistics."""
        names: set[str] = set()
        for chunk in _unwrapped(model):
            names.update(n for n, p in chunk.named_parameters() if p.requires_grad)
            for module_name, module in chunk.named_modules():
                if hasattr(module, "track_running_stats"):
                    names.update(f"{module_name}.{b}" if module_name else b for b, _ in module.named_buffers())
        self.params_to_save = names

    def adapter_key_filter(self, key: Any) -> bool:
        """Whether a state-dict key belongs in an adapter checkpoint: a name ``set_params_to_save`` kept, or
        an adapter's (``.adapter.`` in it); a ``(name, tensor)`` pair by whether the tensor trains."""
        if isinstance(key, tuple):
            return bool(key[1].requires_grad)
        return key in getattr(self, "params_to_save", set()) or ".adapter." in key or key.endswith(".adapters")

    # ------------------------------------------------------ switching off
    def enable_adapter_layers(self, model: Any) -> None:
        """Every adapter of `model` (module, list of chunks, or a DDP wrapper) on: base + adapter."""
        for wrapper in _wrappers(model):
            wrapper.enable_adapter_layers()

    def disable_adapter_layers(self, model: Any) -> None:
        """Every adapter of `model` off: each adapted module computes its base module alone."""
        for wrapper in _wrappers(model):
            wrapper.disable_adapter_layers()

    @contextlib.contextmanager
    def disable_adapter(self, model: Any) -> Iterator[None]:
        """Adapters off inside the block, on again when it ends (also when it raises)."""
        self.disable_adapter_layers(model)
        try:
            yield
        finally:
            self.enable_adapter_layers(model)


def _unwrapped(model: Any) -> list[Any]:
    chunks = []
    for chunk in model_chunks(model):
        # torch's and megatron-core's DistributedDataParallel keep the model in `.module`.
        while type(chunk).__name__.endswith("DistributedDataParallel") and isinstance(getattr(chunk, "module", None), nn.Module):
            chunk = chunk.module
        chunks.append(chunk)
    return chunks


def _wrappers(model: Any) -> list[Any]:
    return [m for chunk in _unwrapped(model) for m in chunk.modules() if is_adapter_wrapper(m)]
