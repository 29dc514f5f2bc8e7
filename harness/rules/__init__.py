"""The contract's rules as code, in one place: what harness/SPEC.md prescribes, computed from names,
shapes and the base layers, apart from any implementation.

``adapters``: the adapter tables (which adapter parameters each rank holds, their names, shards and
full shapes; dense and MoE). ``vlm``: VLMLoRA's matching, parameter names and freezing rules.
"""
