"""``python -m vlhub.check``: does this machine train every objective correctly, and how fast.

One command for a new machine or cluster allocation: it runs on what is there (CPU, one GPU,
several), prints one table and writes ``check.json`` and ``check.md`` into a folder it names.
A failing row makes the exit code non-zero. Importing this package is cheap: torch, open_clip
and Hydra load only when the check runs (``vlhub.check.cli``).
"""
