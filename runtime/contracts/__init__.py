"""What the runtime and the planner must agree on, written once, torch-free, so the planner imports it
without torch: the routing-trace format, the cache policy with its accounting rules, the model shape
and its memory accounting, the field validators behind every one-line error.

(The plan schema, runtime/plan.py, is the other such contract; it predates this package.)
"""
