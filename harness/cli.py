"""``lora-harness``: run the property checks outside pytest.

    lora-harness verify --tp 2 [--ep 1] [--impl lora.megatron] [--profile fast|deep]
                        [--property forward_matches ...] [--examples N] [--json FILE]
    lora-harness layouts --tp 2 --ep 2

``verify`` prints one line per property and layout and exits 1 when any
property fails (2 for bad usage), printing each failure's minimal example.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-harness", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="check every property at every layout of the set")
    v.add_argument("--tp", type=int, default=2, help="largest tensor-parallel size (default 2)")
    v.add_argument("--ep", type=int, default=1, help="largest expert-parallel size (default 1)")
    v.add_argument("--impl", default="lora.megatron", help="module under test (default lora.megatron)")
    v.add_argument("--profile", default=None, help="hypothesis profile: fast (default) or deep")
    v.add_argument("--examples", type=int, default=None, help="examples per property and layout (overrides the profile)")
    v.add_argument("--property", dest="properties", action="append", default=None, help="only this property (repeatable)")
    v.add_argument("--seed", type=int, default=None, help="hypothesis seed, for a reproducible run")
    v.add_argument("--rank-timeout", type=float, default=None, help="ceiling in seconds for one rank task")
    v.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON to this file")

    l = sub.add_parser("layouts", help="list the layouts a --tp/--ep set checks")
    l.add_argument("--tp", type=int, default=2)
    l.add_argument("--ep", type=int, default=1)
    return p


def _verify(args: argparse.Namespace) -> int:
    from hypothesis import settings

    from harness.properties import PROPERTIES, check_property
    from harness.runner import shutdown_all
    from harness.settings import DEFAULT_PROFILE, PROFILES, layout_set, register_profiles
    from harness.tasks import load_impl

    register_profiles()
    profile = args.profile or DEFAULT_PROFILE
    if profile not in PROFILES:
        print(f"lora-harness: unknown --profile {profile!r}; known: {', '.join(PROFILES)}", file=sys.stderr)
        return 2
    props = args.properties or list(PROPERTIES)
    unknown = [p for p in props if p not in PROPERTIES]
    if unknown:
        print(f"lora-harness: unknown --property {', '.join(unknown)}; known: {', '.join(PROPERTIES)}", file=sys.stderr)
        return 2
    try:
        layouts = layout_set(args.tp, args.ep)
        load_impl(args.impl)
    except (ValueError, TypeError, ImportError) as exc:
        print(f"lora-harness: {exc}", file=sys.stderr)
        return 2
    if args.rank_timeout:
        os.environ["LORA_HARNESS_RANK_TIMEOUT"] = str(args.rank_timeout)
    run_settings = settings.get_profile(profile)
    if args.examples is not None:
        run_settings = settings(run_settings, max_examples=args.examples)

    print(f"lora-harness verify: impl {args.impl}, profile {profile}, layouts {', '.join(map(str, layouts))}")
    outcomes = []
    try:
        for layout in layouts:
            for prop in props:
                outcome = check_property(prop, layout, args.impl, settings=run_settings, seed=args.seed)
                outcomes.append(outcome)
                print(outcome.summary_line(), flush=True)
                if not outcome.passed:
                    print("    " + outcome.error.replace("\n", "\n    "))
                    if outcome.falsifying_example:
                        print("    " + outcome.falsifying_example.replace("\n", "\n    "))
    finally:
        shutdown_all()
    failed = [o for o in outcomes if not o.passed]
    print(f"{len(outcomes) - len(failed)} passed, {len(failed)} failed")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(
                [
                    {k: v for k, v in o.__dict__.items() if k != "exception"}
                    for o in outcomes
                ],
                fh,
                indent=2,
            )
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # Like `python -m`: an --impl module in the current directory imports
    # (rank processes adopt this sys.path too).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args.command == "layouts":
        from harness.settings import layout_set

        for layout in layout_set(args.tp, args.ep):
            print(f"{layout}  world {layout.min_world_size}")
        return 0
    return _verify(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
