"""Rank-side code every family's tasks share (``common``: set-up, contract findings, merge evidence;
``merge``: merge evidence; ``init``: the init run's fixed model). Each family's own tasks live in its
folder (``harness.families.<name>.tasks``) and reach the harness through its ``Family`` record.

Tasks run on every rank of a pool (``harness.pool``); they only execute:
the example was drawn in the parent and the comparison is made there.
"""
