"""Megatron-Bridge's own LoRA (``megatron.bridge.peft.lora``) on CPU, for the harness to judge.

Megatron-Bridge 0.6.2's ``import megatron.bridge.peft.lora`` fails where
Transformer Engine is not installed (every CPU-only machine):

1. ``megatron/bridge/__init__.py`` imports the whole library (every model
   bridge, diffusion, ``AutoBridge``, transformers ...), and through
   ``peft/canonical_lora.py`` reaches 2;
2. ``megatron/bridge/peft/lora_layers.py:20`` does
   ``import transformer_engine.pytorch as te`` unconditionally, although it
   only needs ``te`` for ``isinstance`` checks against ``te.Linear`` /
   ``te.LayerNormLinear`` and for ``TEFusedLoRALinear`` (the TE op-fuser
   path, chosen only when ``config.use_transformer_engine_op_fuser`` is set,
   ``lora.py:170-176``);
3. ``peft/recompute.py:25`` imports ``print_rank_0`` from
   ``megatron.bridge.utils.common_utils``, which imports all of
   ``megatron.training`` and ``megatron.bridge.training`` (about 3,100
   modules and ten seconds here) for that one function;
4. ``peft/utils.py:57-94`` and ``peft/module_matcher.py:30-40`` probe TE with
   ``safe_import_from("megatron.core.extensions.transformer_engine", ...)``.
   megatron-core 0.19.2's ``extensions/transformer_engine.py`` imports
   without TE (``HAVE_TE = False`` there, line 85) and still defines
   ``TEColumnParallelLinear`` and friends, so left alone the probes succeed
   and Bridge's ``HAVE_TE`` would read True on a machine without TE.

``import_bridge_lora()`` imports Bridge's peft LoRA anyway, changing as
little as it can and leaving things as it found them:

* ``megatron.bridge`` is entered in ``sys.modules`` as a bare package (its
  ``__path__`` only; ``megatron/bridge/__init__.py`` is not run). It stays:
  the peft modules live under it. A ``megatron.bridge`` that is already
  imported is used as it is.
* For the duration of the import only (the "window"),
  ``megatron.core.extensions.transformer_engine`` and ``transformer_engine``
  are unimportable (``None`` in ``sys.modules``), so Bridge's probes report
  what is true: TE is absent. Every megatron-core module Bridge's peft
  imports is imported *before* the window, so no megatron-core code runs
  while the extension is hidden; ``WINDOW_REPORT["foreign_modules"]`` lists
  any module outside ``megatron.bridge`` that was nevertheless first
  imported inside it (none, with megatron-core 0.19.2). The prior entries
  are put back afterwards.
* While ``lora_layers`` alone is imported, ``transformer_engine`` and
  ``transformer_engine.pytorch`` are a placeholder
  (``_AbsentTransformerEngine``): ``Linear`` and ``LayerNormLinear`` are
  classes nothing is an instance of (``_AbsentTELinear``,
  ``_AbsentTELayerNormLinear``: constructing one raises), ``ops.<name>``
  yields a class whose construction raises, ``fp8_autocast`` raises, any
  other name is an ``AttributeError``. Afterwards no ``transformer_engine``
  entry remains in ``sys.modules``; the placeholder survives only as
  ``lora_layers.te``. megatron-core's own TE detection is untouched
  (``megatron.core.utils.get_te_version()`` / ``is_te_min_version`` and its
  ``_te_version`` cache are checked unchanged).
* While ``recompute`` alone is imported, ``megatron.bridge.utils.common_utils``
  is a stub holding the one name peft uses from it, ``print_rank_0``,
  implemented as Bridge's is (print on global rank 0, the rank from
  megatron-core's ``_rank_utils.safe_get_rank``, which is what Bridge's
  ``common_utils`` imports as ``get_rank_safe``); any other name raises
  ``ImportError`` naming the stub. The stub is removed from ``sys.modules``
  afterwards, so a later real import gets the real module. Nothing of
  ``megatron.training`` is stubbed: peft needs none of it at import, and its
  two lazy uses (``peft/utils.py:407`` and ``:491``, checkpoint loading via
  ``megatron.bridge.training.checkpointing``) are left to import for real if
  ever called.

After the import ``HAVE_TE`` and every ``HAVE_TE_*`` flag of
``megatron.bridge.peft.utils`` and ``megatron.bridge.peft.module_matcher``
are checked False (``RuntimeError`` otherwise). Where Transformer Engine is
installed none of this CPU scaffolding is used: the peft modules import as
they are (still under the bare package).

For the harness, ``bridge_impl_module()`` is an implementation module
(Bridge's ``LoRA``, ``VLMLoRA``, ``LoRAMerge`` and the capability profile
``BRIDGE_CAPABILITIES``); ``harness.bridge`` itself exposes the same four
names on first access, so ``--impl harness.bridge`` loads through
``harness.contract.load_impl`` as it is.

What Bridge supports on CPU (megatron-core 0.19.2, torch 2.13 gloo, the
harness's ``harness.cpu`` layer active in every rank; observed by
``tests/bridge/test_bridge_compat.py`` or by hand, with the line of Bridge 0.6.2
that decides each; ``BRIDGE_SUPPORT`` holds the same as data):

* megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` (local
  spec) at TP=1 and TP=2: adapted, output = base + (alpha/dim) B A x
  (checked by value, forward; TP=2 also backward). ``get_adapter_attributes_from_linear``
  takes them at ``peft/utils.py:634`` / ``:638``; the TE branches before
  them (``:591``, ``:625``, ``:629``) are skipped because ``HAVE_TE`` is
  False. Column base: A is ``ColumnParallelLinear(in, dim, gather_output=True)``
  (``peft/utils.py:1019``), B ``ColumnParallelLinear(dim, out,
  gather_output=False)`` (``:1047``); row base: A ``RowParallelLinear(in, dim,
  input_is_parallel=True)`` (``:1007``), B ``ColumnParallelLinear(dim, out,
  gather_output=True)``. So at TP > 1 a column adapter's A is split along
  dim (dim must divide by TP), and every adapter's B is split along out.
* Sequence parallelism at TP=2: works (same values as without it); the
  adapter gathers the sequence before A for column bases
  (``peft/utils.py:1218``) and scatters it after B for row bases (``:1240``).
* ``a2a_experimental`` with sequence parallelism at TP=2: works on gloo.
  B of a row base then stays split along out (``peft/utils.py:1042``) and
  ``all2all_hp2sp`` (``:1238``) calls the list form
  ``torch.distributed.all_to_all`` (``:857`` forward, ``:878`` backward),
  which gloo runs: once forward, once backward, with the same values and
  gradients as the gather/scatter path. Without sequence parallelism the
  flag changes nothing.
* ``SequentialMLP`` experts (``local_experts.<i>.linear_fc1/2``, megatron
  ``ColumnParallelLinear`` / ``RowParallelLinear`` built with
  ``is_expert=True``): adapted on the expert-TP group (``is_expert_linear``,
  ``peft/utils.py:673``); forward and backward run at TP=1, EP=2
  (alltoall and allgather dispatchers) and TP=ETP=2 with sequence
  parallelism. At TP=2, ETP=1 the harness's ``forward_matches`` passed (one
  example, ``moe:tp2-ep1-etp1-pp1-sp``). At ETP=2
  the column (fc1) expert adapter computes its formula but the row (fc2)
  one does not: its A is megatron's ``RowParallelLinear(is_expert=True)``
  (``peft/utils.py:1007``), whose output megatron leaves unreduced
  (``explicit_expert_comm``, ``megatron/core/tensor_parallel/layers.py:1326``
  and ``:1472``: the dispatcher sums the base's partial outputs later), and
  its B, ``ColumnParallelLinear(gather_output=True)`` (``:1047``), gathers
  each rank's ``B_r (A_r x_r)`` where ``B_r (A x)`` is meant; summed over
  ETP that is not ``B A x`` (``tests/bridge/test_bridge_compat.py`` pins it; the
  harness's ``forward_matches`` fails at ``moe:tp2-ep1-etp2-pp1-sp`` with
  target ``linear_fc2``, max|diff| 0.55).
* The harness's grouped-expert stand-in ``harness.families.moe.model.TorchColumnParallelGroupedLinear``
  / ``TorchRowParallelGroupedLinear`` (``TEGroupedMLP`` without TE):
  refused. ``linear_fc1`` matches by name, but ``get_adapter_attributes_from_linear``
  knows only TE's grouped linears (``TECL`` / ``TERL``, ``peft/utils.py:347-348``,
  and only when ``HAVE_TE``) and megatron's ``ColumnParallelLinear`` /
  ``RowParallelLinear``; anything else ends at ``peft/utils.py:643``:
  ``raise NotImplementedError(f"Layer type is unrecognized for LoRA: {type(m)}")``.
  The stand-in is no TE class, so even with TE installed it would be
  refused: Bridge's grouped-expert LoRA cannot be checked without
  Transformer Engine.
* ``TopKRouter`` (target ``router``): adapted as ``LoRATopKRouter``
  (``lora.py:213-214``), its adapter added to the gating logits; forward and
  backward run.
* VLM (``LLaVAModel``, TP=1 and TP=2): ``VLMLoRA.freeze_model`` begins with
  ``model = unwrap_model(model)[0]`` (``lora.py:240``); megatron-core's
  ``unwrap_model`` returns a single module for a single module, so a bare
  ``LLaVAModel`` (or a wrapper holding ``.llava_model``) is a
  ``TypeError: 'LLaVAModel' object is not subscriptable``. A list of chunks,
  ``[model]``, works (and then ``.llava_model`` is followed). Bridge's own
  ``PEFT.__call__`` documents "a single model or a list of model chunks".
* ``lora_dtype`` is ignored on the parallel path: ``lora.py:185-196`` never
  passes it to ``ParallelLinearAdapter`` (``bfloat16`` asked, ``float32``
  adapters observed); only ``LinearAdapter`` (plain ``nn.Linear``,
  ``lora.py:143``) uses it.
* Init methods ``xavier`` (``xavier_normal_``), ``normal`` (std 0.2),
  ``kaiming``, ``zero`` (``peft/utils.py:1169-1176``); anything else,
  ``xavier_uniform`` included, is ``NotImplementedError`` (``:1178``).
* Non-linear targets: ``input_layernorm`` is an ``AttributeError``
  (``peft/utils.py:554``, ``m.config``), while ``self_attention``, ``mlp``
  and ``core_attention`` (modules with a ``config``) are the
  ``NotImplementedError`` of ``peft/utils.py:643``.
* ``config.use_transformer_engine_op_fuser=True`` at TP=1 selects
  ``TEFusedLoRALinear`` (``lora.py:170-176``), whose first forward raises
  ``ValueError: Unsupported class for wrapped linear (ColumnParallelLinear)``
  (``lora_layers.py:191``) before any ``te.ops`` is touched: the same with
  or without TE, for megatron's local linears.
* ``LoRAMerge().merge(base, B, A, alpha, dim, tp_group=g)`` with a 1-rank
  ``g``: base + (alpha/dim) B A (``lora_merge.py``, ``tp_size == 1`` branch).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import threading
import types
from typing import Any, Iterator, Optional
from harness.errors import BridgeImportError

__all__ = [
    "BRIDGE_MODULE",
    "BRIDGE_DISTRIBUTION",
    "BRIDGE_CAPABILITIES",
    "BRIDGE_SUPPORT",
    "BridgeImportError",
    "is_bridge",
    "bridge_version",
    "bridge_installed",
    "import_bridge_lora",
    "bridge_lora_merge",
    "bridge_impl_module",
    "te_flags",
    "WINDOW_REPORT",
]

BRIDGE_MODULE = "megatron.bridge.peft.lora"
BRIDGE_DISTRIBUTION = "megatron-bridge"
_BRIDGE_NAMES = frozenset({BRIDGE_MODULE, "megatron.bridge.peft"})
_BRIDGE_PACKAGE = "megatron.bridge"
_TE_EXTENSION = "megatron.core.extensions.transformer_engine"
_TE_NAMES = ("transformer_engine", "transformer_engine.pytorch")
_COMMON_UTILS = "megatron.bridge.utils.common_utils"

# What Bridge 0.6.2 does on CPU with megatron-core 0.19.2 and gloo, one fact a
# key (the module docstring gives the observation and Bridge's line behind each).
BRIDGE_SUPPORT: dict[str, bool] = {
    "column_row_parallel_tp1": True,
    "column_row_parallel_tp2": True,
    "sequence_parallel": True,
    "a2a_experimental": True,
    "sequential_mlp_experts": True,  # adapted at every layout tried; ETP=1 values passed the harness once
    "sequential_mlp_row_expert_etp2_values": False,  # fc2 adapter at ETP=2: not B A x (module docstring)
    "grouped_experts_torch_standin": False,  # peft/utils.py:643, NotImplementedError
    "topk_router": True,
    "vlm_list_of_chunks": True,
    "vlm_bare_model_or_llava_holder": False,  # lora.py:240, TypeError
    "lora_dtype_parallel_path": False,  # lora.py:185-196 never passes it on
    "transformer_engine_op_fuser": False,  # lora_layers.py:191, ValueError for local linears
    "lora_merge_tp1": True,
}

# The profile for the harness (harness.contract.Capabilities fields only).
# SequentialMLP experts are adapted (their ETP=2 row adapter is wrong: a
# finding the harness should report, so experts stays True); the harness's
# grouped stand-in is refused (peft/utils.py:643) for want of Transformer
# Engine, not through a fault of Bridge's, hence grouped_experts False.
BRIDGE_CAPABILITIES: dict[str, Any] = {
    "contract": "bridge",
    "init_methods": ["xavier", "kaiming", "normal", "zero"],
    "lora_dtypes": [None],
    "experts": True,
    "grouped_experts": False,
    "sequence_parallel": True,
    "a2a": True,
    "vlm": True,  # a bare LLaVAModel is Bridge's TypeError (lora.py:240); SPEC's bridge column says "a list of chunks only"
    "merge": True,
}

# megatron-core modules Bridge's peft LoRA imports at module level (and the
# two it probes with safe_import_from), imported before the window so that no
# megatron-core module first runs while the TE extension is hidden.
_CORE_DEPENDENCIES = (
    "megatron.core",
    "megatron.core._rank_utils",
    "megatron.core.activations",
    "megatron.core.parallel_state",
    "megatron.core.model_parallel_config",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.mapping",
    "megatron.core.process_groups_config",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.module",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.utils",
    _TE_EXTENSION,  # loaded (as megatron-core itself loads it) so hiding it hides a loaded module
)
_OPTIONAL_CORE_DEPENDENCIES = (
    "megatron.core.fusions.fused_bias_geglu",  # megatron/bridge/utils/activation_map.py, in a try
    "megatron.core.post_training.modelopt.layers",  # probed by peft/utils.py:345
    "packaging",
    "packaging.version",
)

# The peft modules in dependency order; each entry: (module, what it needs in the window).
_PEFT_ORDER = (
    ("megatron.bridge.utils", None),
    ("megatron.bridge.utils.import_utils", None),
    ("megatron.bridge.utils.activation_map", None),
    ("megatron.bridge.peft", None),
    ("megatron.bridge.peft.utils", None),
    ("megatron.bridge.peft.module_matcher", None),
    ("megatron.bridge.peft.walk_utils", None),
    ("megatron.bridge.peft.recompute", "common_utils"),
    ("megatron.bridge.peft.base", None),
    ("megatron.bridge.peft.adapter_wrapper", None),
    ("megatron.bridge.peft.lora_merge", None),
    ("megatron.bridge.peft.lora_layers", "te"),
    ("megatron.bridge.peft.lora", None),
)

#: What the last successful ``import_bridge_lora`` did: ``te_installed``,
#: ``bare_package`` (whether it created the bare ``megatron.bridge``),
#: ``blocked`` (names unimportable in the window), ``stubs`` (stand-ins and
#: their scope), ``foreign_modules`` (modules outside ``megatron.bridge``
#: first imported in the window; empty is what is expected).
WINDOW_REPORT: dict[str, Any] = {}

_lock = threading.RLock()
_lora_module: Optional[types.ModuleType] = None
_impl_module: Optional[types.ModuleType] = None
_MISSING = object()


def is_bridge(module_name: Any) -> bool:
    """Whether ``module_name`` names Megatron-Bridge's LoRA (``megatron.bridge.peft.lora`` or ``megatron.bridge.peft``)."""
    return isinstance(module_name, str) and module_name.strip() in _BRIDGE_NAMES


def bridge_version() -> Optional[str]:
    """The installed ``megatron-bridge`` distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version(BRIDGE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def bridge_installed() -> bool:
    """Whether the ``megatron-bridge`` distribution and its ``megatron/bridge`` package are present."""
    if bridge_version() is None:
        return False
    try:
        return importlib.util.find_spec(_BRIDGE_PACKAGE) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------ placeholders


def _absent(what: str) -> str:
    return (
        f"{what}: Transformer Engine is not installed; this is harness.bridge's placeholder, present only so "
        "that megatron.bridge.peft.lora_layers imports on CPU. Bridge reaches it only through TEFusedLoRALinear "
        "(config.use_transformer_engine_op_fuser=True), which needs Transformer Engine."
    )


class _AbsentTELinear:
    """Stands for ``transformer_engine.pytorch.Linear`` while Transformer Engine is absent.

    Nothing is an instance of it (it cannot be constructed), so Bridge's
    ``isinstance(m, (te.Linear, te.LayerNormLinear))`` checks are False, as
    they are for every module when TE is not installed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_absent("transformer_engine.pytorch.Linear"))


class _AbsentTELayerNormLinear:
    """Stands for ``transformer_engine.pytorch.LayerNormLinear`` while Transformer Engine is absent.

    Nothing is an instance of it (it cannot be constructed).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_absent("transformer_engine.pytorch.LayerNormLinear"))


class _AbsentTEOp:
    """Stands for a ``transformer_engine.pytorch.ops`` class while Transformer Engine is absent: constructing it raises."""

    _te_name = "ops.?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(_absent(f"transformer_engine.pytorch.{self._te_name}"))


class _AbsentTEOps(types.ModuleType):
    """Stands for ``transformer_engine.pytorch.ops``: every attribute is an ``_AbsentTEOp`` class.

    Attribute access must succeed because ``lora_layers`` evaluates
    ``te.ops.Sequential`` in method annotations when its class body runs;
    only using one (constructing it) raises.
    """

    def __init__(self) -> None:
        super().__init__("transformer_engine.pytorch.ops", _absent("transformer_engine.pytorch.ops"))
        self.__dict__["_classes"] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        classes = self.__dict__["_classes"]
        if name not in classes:
            classes[name] = type(
                f"_AbsentTEOp_{name}", (_AbsentTEOp,), {"_te_name": f"ops.{name}", "__doc__": _absent(f"transformer_engine.pytorch.ops.{name}")}
            )
        return classes[name]


def _absent_fp8_autocast(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(_absent("transformer_engine.pytorch.fp8_autocast"))


class _AbsentTransformerEngine(types.ModuleType):
    """Placeholder for ``transformer_engine`` / ``transformer_engine.pytorch`` while TE is absent.

    In ``sys.modules`` only while ``megatron.bridge.peft.lora_layers`` is
    imported; afterwards it is reachable only as ``lora_layers.te``. Names
    other than those ``lora_layers`` uses raise ``AttributeError``.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(_absent(f"{self.__name__}.{name}"))


def _te_placeholder() -> tuple[types.ModuleType, types.ModuleType]:
    top = _AbsentTransformerEngine("transformer_engine", _absent("transformer_engine"))
    top.__path__ = []  # a package, so that "transformer_engine.pytorch" resolves
    pytorch = _AbsentTransformerEngine("transformer_engine.pytorch", _absent("transformer_engine.pytorch"))
    pytorch.__path__ = []
    pytorch.Linear = _AbsentTELinear
    pytorch.LayerNormLinear = _AbsentTELayerNormLinear
    pytorch.ops = _AbsentTEOps()
    pytorch.fp8_autocast = _absent_fp8_autocast
    top.pytorch = pytorch
    return top, pytorch


def _print_rank_0(message: str) -> None:
    """Bridge's ``common_utils.print_rank_0``: print on global rank 0 (rank from megatron-core's ``safe_get_rank``)."""
    from megatron.core._rank_utils import safe_get_rank

    if safe_get_rank() == 0:
        print(message, flush=True)


class _CommonUtilsStub(types.ModuleType):
    """Stand-in for ``megatron.bridge.utils.common_utils`` while ``peft/recompute.py`` imports.

    Holds ``print_rank_0`` only (the one name peft uses); any other name
    raises ``ImportError`` saying so.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"{_COMMON_UTILS}.{name}: harness.bridge provides only print_rank_0 while megatron.bridge.peft.recompute "
            "imports (the real module imports all of megatron.training)"
        )


def _common_utils_stub() -> types.ModuleType:
    stub = _CommonUtilsStub(_COMMON_UTILS, "harness.bridge's stand-in: print_rank_0 only, for megatron.bridge.peft.recompute")
    stub.print_rank_0 = _print_rank_0
    return stub


# ----------------------------------------------------------------- windows


@contextlib.contextmanager
def _sys_modules(entries: dict[str, Any]) -> Iterator[None]:
    """Set ``sys.modules[name] = value`` for each entry (None: unimportable); put the prior state back after."""
    saved = {name: sys.modules.get(name, _MISSING) for name in entries}
    try:
        for name, value in entries.items():
            sys.modules[name] = value
        yield
    finally:
        for name, before in saved.items():
            if before is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = before


def _bare_package() -> bool:
    """Enter ``megatron.bridge`` in sys.modules as a bare package; False if it was already there."""
    if _BRIDGE_PACKAGE in sys.modules and sys.modules[_BRIDGE_PACKAGE] is not None:
        return False
    import megatron

    found = importlib.util.find_spec(_BRIDGE_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise BridgeImportError(f"{BRIDGE_DISTRIBUTION} is not installed (no {_BRIDGE_PACKAGE} package)")
    spec = importlib.machinery.ModuleSpec(_BRIDGE_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = list(found.submodule_search_locations)
    package = importlib.util.module_from_spec(spec)
    package.__doc__ = (
        "megatron.bridge as a bare package, entered by harness.bridge: its __path__ only; "
        "megatron/bridge/__init__.py (AutoBridge, every model bridge) was not run."
    )
    sys.modules[_BRIDGE_PACKAGE] = package
    setattr(megatron, "bridge", package)
    return True


def _flags(module: types.ModuleType) -> dict[str, bool]:
    return {k: bool(v) for k, v in vars(module).items() if k == "HAVE_TE" or k.startswith("HAVE_TE_")}


def te_flags() -> dict[str, bool]:
    """Bridge's TE flags as imported: ``{"<module>.HAVE_TE...": value}`` for peft.utils and peft.module_matcher."""
    import_bridge_lora()
    out = {}
    for name in ("megatron.bridge.peft.utils", "megatron.bridge.peft.module_matcher"):
        out.update({f"{name}.{k}": v for k, v in _flags(sys.modules[name]).items()})
    return out


def _te_installed() -> bool:
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def _import_peft(te_installed: bool, report: dict[str, Any]) -> types.ModuleType:
    if te_installed:
        for name, _ in _PEFT_ORDER:
            importlib.import_module(name)
        return sys.modules[BRIDGE_MODULE]
    before = set(sys.modules)
    blocked = {_TE_EXTENSION: None, **{n: None for n in _TE_NAMES}}
    report["blocked"] = sorted(blocked)
    with _sys_modules(blocked):
        for name, needs in _PEFT_ORDER:
            if name in sys.modules:
                continue
            if needs == "common_utils" and _COMMON_UTILS not in sys.modules:
                with _sys_modules({_COMMON_UTILS: _common_utils_stub()}):
                    importlib.import_module(name)
                report["stubs"][_COMMON_UTILS] = f"print_rank_0 only, while {name} imported"
            elif needs == "te":
                top, pytorch = _te_placeholder()
                with _sys_modules({"transformer_engine": top, "transformer_engine.pytorch": pytorch}):
                    importlib.import_module(name)
                report["stubs"]["transformer_engine.pytorch"] = f"_AbsentTransformerEngine, while {name} imported"
            else:
                importlib.import_module(name)
    report["foreign_modules"] = sorted(
        n for n in set(sys.modules) - before if not (n == _BRIDGE_PACKAGE or n.startswith(_BRIDGE_PACKAGE + "."))
    )
    return sys.modules[BRIDGE_MODULE]


def _check_after(te_installed: bool, te_version_before: Any) -> None:
    import megatron.core.utils as mcore_utils

    if mcore_utils.__dict__.get("_te_version") is not te_version_before:
        raise RuntimeError(
            f"harness.bridge: megatron.core.utils._te_version changed during the import "
            f"({te_version_before!r} -> {mcore_utils.__dict__.get('_te_version')!r})"
        )
    if te_installed:
        return
    left = sorted(n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine."))
    if left:
        raise RuntimeError(f"harness.bridge: {', '.join(left)} left in sys.modules after the import")
    for name in ("megatron.bridge.peft.utils", "megatron.bridge.peft.module_matcher"):
        wrong = {k: v for k, v in _flags(sys.modules[name]).items() if v}
        if wrong:
            raise RuntimeError(
                f"harness.bridge: {name} believes Transformer Engine is present ({wrong}) but it is not installed"
            )


def import_bridge_lora() -> types.ModuleType:
    """Import ``megatron.bridge.peft.lora`` (Bridge's ``LoRA``, ``VLMLoRA``) on CPU; the same module on every call.

    See the module docstring for exactly what is stood in for, and for how
    long. ``BridgeImportError`` when megatron-bridge is not installed or its
    import fails (the message names the cause); a failed attempt removes the
    ``megatron.bridge`` modules it added.
    """
    global _lora_module
    with _lock:
        if _lora_module is not None:
            return _lora_module
        if not bridge_installed():
            raise BridgeImportError(f"{BRIDGE_DISTRIBUTION} is not installed (pip install --no-deps {BRIDGE_DISTRIBUTION})")
        te_installed = _te_installed()
        for name in _CORE_DEPENDENCIES:
            importlib.import_module(name)
        for name in _OPTIONAL_CORE_DEPENDENCIES:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        import megatron.core.utils as mcore_utils

        te_version_before = mcore_utils.__dict__.get("_te_version")
        had_bridge = {n for n in sys.modules if n == _BRIDGE_PACKAGE or n.startswith(_BRIDGE_PACKAGE + ".")}
        report: dict[str, Any] = {"te_installed": te_installed, "blocked": [], "stubs": {}, "foreign_modules": []}
        try:
            report["bare_package"] = _bare_package()
            module = _import_peft(te_installed, report)
            _check_after(te_installed, te_version_before)
        except BaseException as exc:
            import megatron

            for name in [n for n in sys.modules if (n == _BRIDGE_PACKAGE or n.startswith(_BRIDGE_PACKAGE + ".")) and n not in had_bridge]:
                sys.modules.pop(name, None)
            if _BRIDGE_PACKAGE not in had_bridge and getattr(megatron, "bridge", None) is not None:
                delattr(megatron, "bridge")
            if isinstance(exc, (BridgeImportError, RuntimeError)) or not isinstance(exc, Exception):
                raise
            raise BridgeImportError(f"{BRIDGE_MODULE} failed to import on CPU: {type(exc).__name__}: {exc}") from exc
        from harness import cpu

        if cpu.is_active():
            # megatron-core modules first imported above get the CPU stand-ins too.
            cpu.patch_loaded_modules()
        WINDOW_REPORT.clear()
        WINDOW_REPORT.update(report)
        _lora_module = module
        return module


def bridge_lora_merge() -> type:
    """Bridge's ``LoRAMerge`` class (``megatron.bridge.peft.lora_merge``), imported as ``import_bridge_lora`` does."""
    import_bridge_lora()
    return sys.modules["megatron.bridge.peft.lora_merge"].LoRAMerge


def bridge_impl_module() -> types.ModuleType:
    """A module for the harness to load as the implementation under test: Bridge's own classes and a capability profile.

    ``LoRA`` and ``VLMLoRA`` are ``megatron.bridge.peft.lora``'s, ``LoRAMerge``
    is ``megatron.bridge.peft.lora_merge``'s (the very classes, not
    wrappers); ``LORA_HARNESS_CAPABILITIES`` is ``BRIDGE_CAPABILITIES``.
    The same module object on every call; it is not entered in sys.modules.
    """
    global _impl_module
    with _lock:
        if _impl_module is not None:
            return _impl_module
        lora = import_bridge_lora()
        impl = types.ModuleType(
            "harness.bridge.impl",
            f"Megatron-Bridge {bridge_version()}'s LoRA, VLMLoRA ({BRIDGE_MODULE}) and LoRAMerge "
            "(megatron.bridge.peft.lora_merge), imported on CPU by harness.bridge.import_bridge_lora.",
        )
        impl.LoRA = lora.LoRA
        impl.VLMLoRA = lora.VLMLoRA
        impl.LoRAMerge = bridge_lora_merge()
        impl.LORA_HARNESS_CAPABILITIES = {k: (list(v) if isinstance(v, list) else v) for k, v in BRIDGE_CAPABILITIES.items()}
        impl.BRIDGE_VERSION = bridge_version()
        _impl_module = impl
        return impl


_IMPL_NAMES = ("LoRA", "VLMLoRA", "LoRAMerge", "LORA_HARNESS_CAPABILITIES")


def __getattr__(name: str) -> Any:
    """``harness.bridge.LoRA`` etc.: this module doubles as an implementation module (``--impl harness.bridge``).

    Resolved on first use only, so ``import harness.bridge`` stays cheap and
    imports nothing of Megatron-Bridge.
    """
    if name in _IMPL_NAMES:
        return getattr(bridge_impl_module(), name)
    raise AttributeError(f"module 'harness.bridge' has no attribute {name!r}")
