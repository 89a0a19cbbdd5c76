"""`moeplan tune`: the search space (space), one point turned into a plan and predicted (evaluation), the
per-layer split of a slot budget (allocation), the Optuna study (study) and its report (report)."""
