"""Routing workloads: statistics of a trace, synthetic traces fitted to them, the cache simulator that
replays a trace under a plan, and the workload `explain` and `tune` predict for. Pure Python (no torch).

The trace format itself is a contract shared with the runtime: `runtime.contracts.traces`.
"""
