"""The contract's rules as code, in one place: what harness/SPEC.md prescribes, computed from names
and shapes, apart from any implementation (``vlm``: VLMLoRA's matching, names and freezing).
The adapter tables (names, shards, shapes per SPEC) are ``harness.sharding.adapter_table`` (dense)
and ``harness.families.moe.tasks.moe_adapter_table`` (experts)."""
