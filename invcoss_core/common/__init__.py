"""Plumbing that the method, both sides of the federation and the CLIs share — none of it is the method itself.

`protocol` (the hand-off wire schema, no Flower types), `signing` (EC P-384 keys and signatures), `events` (the
progress-event sink of long work), `eventlog` (append-only JSON event files), `progress` (progress bars or plain
lines), `processes` (supervising child processes) and `cli_support` (console, errors and logging of the CLIs).
"""
