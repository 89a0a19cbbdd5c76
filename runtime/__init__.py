"""moeplan runtime: loads an execution plan and runs a Mixture-of-Experts checkpoint with an expert cache.

This package never imports `planner`: it needs torch, transformers and PyYAML only.
"""
