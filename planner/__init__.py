"""moeplan planner: profiler, model catalog, routing traces, cache simulator, cost model, tuner and CLI."""
