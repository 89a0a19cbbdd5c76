"""`moeplan explain PLAN`: predicted speed and memory per device of a plan, item by item, before loading anything.

It reads the plan, a hardware profile, a model shape (catalog or config.json) and a routing trace,
replays the trace through the cache simulator under the plan, and prints the cost model's breakdown.
It never loads weights, so it works for a plan of any accelerator on any host.
"""
from __future__ import annotations

import argparse
import json
import socket
from typing import TYPE_CHECKING, Any

from runtime.errors import UserError

from ..paths import PROFILES

if TYPE_CHECKING:
    from runtime.plan import Plan



def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain", help="predicted tokens/s and memory per device of a plan, item by item",
                              description=__doc__.splitlines()[0])
    p.add_argument("plan", help="plan file (YAML)")
    p.add_argument("--profile", help="hardware profile (default: profiles/<hostname>.yaml)")
    p.add_argument("--trace", help="routing trace (default: the recorded trace of the model, else synthetic)")
    p.add_argument("--model", help="catalog name or checkpoint folder (default: from the plan)")
    p.add_argument("--context", type=int, default=512, help="tokens in the KV cache at a decode step (512)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the prefill (128)")
    p.add_argument("--vram-budget", type=int, default=None, help="accelerator bytes to fit in (default: the profile's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def main(args: argparse.Namespace) -> int:
    from ..routing import workload
    from ..cost_model import predict
    from runtime.plan import Plan

    if args.context < 0:
        raise UserError(f"--context: must be >= 0, got {args.context}")
    if args.prompt_tokens < 1:
        raise UserError(f"--prompt-tokens: must be >= 1, got {args.prompt_tokens}")
    if args.vram_budget is not None and args.vram_budget < 0:
        raise UserError(f"--vram-budget: must be >= 0 bytes, got {args.vram_budget}")
    plan = Plan.load(args.plan)
    profile, profile_source = _load_profile(args.profile, plan)
    shape = workload.resolve_model(plan, args.model)
    work = workload.resolve_workload(shape, args.trace, args.prompt_tokens)
    trace, trace_source = work.trace, work.source
    accuracy, accuracy_source = workload.prefetch_accuracy(trace)  # measured once: the replay and the report
    sim = workload.replay(trace, plan, shape, accuracy)
    prediction = predict(profile, shape, plan, sim, context=args.context, prompt_tokens=args.prompt_tokens,
                         vram_budget=args.vram_budget)
    # assumed routing: the same plan on the ends of the plausible spread of locality
    spread = {name: predict(profile, shape, plan, workload.replay(t, plan, shape, accuracy), context=args.context,
                            prompt_tokens=args.prompt_tokens, vram_budget=args.vram_budget)
              for name, t in work.scenarios.items()}
    decodes = [prediction.decode_tokens_per_s, *(p.decode_tokens_per_s for p in spread.values())]
    if args.json:
        out = {"plan": str(args.plan), "model": shape.name, "profile": getattr(profile, "name", ""),
               "profile_source": profile_source,
               "accelerator": plan.hardware.accelerator, "context": args.context,
               "prompt_tokens": args.prompt_tokens, "trace_source": trace_source,
               "prefetch_accuracy": workload.overall_accuracy(accuracy), **prediction.as_dict()}
        if work.calibration is not None:
            out["routing"] = work.routing_dict()
        if spread:
            out["spread"] = {name: {"decode_tokens_per_s": p.decode_tokens_per_s, "hit_rate": p.hit_rate}
                             for name, p in spread.items()}
            out["decode_tokens_per_s_range"] = [min(decodes), max(decodes)]
        print(json.dumps(out))
    else:
        from .tune import routing_report

        text = render(plan, shape, prediction, trace_source, args.context, args.prompt_tokens, accuracy_source,
                      profile_source)
        extra = routing_report(work)
        if spread:
            extra.append(f"routing assumed: decode {min(decodes):.2f} to {max(decodes):.2f} tokens/s over the plausible "
                         f"spread (" + ", ".join(f"{n} {p.decode_tokens_per_s:.2f} at hit rate {p.hit_rate:.3f}"
                                                 for n, p in spread.items()) + ")")
        print(text + ("\nrouting    " + "\n           ".join(extra) if extra else ""))
    return 0


def _load_profile(path: str | None, plan: Plan) -> tuple[Any, str]:
    """The profile to predict on, and a line saying which: `--profile`; else the one the plan was tuned on
    where the project has it (`hardware.profile` names it: a shipped GPU plan is explained on its GPU host,
    not on the laptop planning for it); else this host's."""
    from ..profile import Profile

    if path is not None:
        return Profile.load(path), f"{path} (--profile)"
    named = plan.hardware.profile
    if named and (PROFILES / f"{named}.yaml").is_file():
        return Profile.load(PROFILES / f"{named}.yaml"), f"profiles/{named}.yaml (the one the plan was tuned on)"
    default = PROFILES / f"{socket.gethostname()}.yaml"
    if not default.is_file():
        raise UserError(f"{default}: no profile for this host; run `moeplan profile` first or pass --profile FILE")
    return Profile.load(default), f"profiles/{default.name} (this host's)"


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def render(plan, shape, p, trace_source: str, context: int, prompt_tokens: int, prefetch_source: str,
           profile_source: str) -> str:
    d, f = p.decode, p.prefill
    lines = [
        f"model      {shape.name}: {shape.num_layers} layers ({shape.num_moe_layers} MoE), {shape.num_experts} "
        f"experts, top-{shape.top_k}, {shape.dtype}; experts stored as {shape.expert_format}, "
        f"{shape.expert_bytes / 2**20:.1f} MiB each",
        f"plan       accelerator {plan.hardware.accelerator}, {plan.hardware.cpu_threads} CPU threads, "
        f"slots {plan.cache.slots}, policy {plan.cache.policy}, miss on {plan.miss.compute}, "
        f"transfer_min_tokens {plan.miss.transfer_min_tokens}, promote {plan.miss.promote}, "
        f"lookahead {plan.prefetch.lookahead}",
        f"profile    {profile_source}",
        f"workload   context {context}, prompt {prompt_tokens} tokens; trace: {trace_source}",
        f"prefetch   guess accuracy {prefetch_source}",
        "",
        f"{'time':28s}{'decode ms/token':>18s}{'prefill ms/prompt':>20s}",
    ]
    labels = [("dense_s", "dense + KV + overhead"), ("hit_s", "hits (cache slots)"),
              ("cpu_miss_s", "misses on CPU"), ("copy_contention_s", "  + DRAM shared with copies"),
              ("transfer_s", "transfers (copy+compute)"), ("host_sync_s", "host syncs (MoE layers)"),
              ("policy_s", "cache bookkeeping"), ("background_copy_s", "background copies"), ("copy_excess_s", "  of which on the path"),
              ("overlap_s", "overlap (saved)"), ("total_s", "total")]
    for key, label in labels:
        lines.append(f"  {label:26s}{getattr(d, key) * 1e3:18.3f}{getattr(f, key) * 1e3:20.3f}")
    lines += [
        "",
        f"decode   {p.decode_tokens_per_s:10.2f} tokens/s   hit rate {p.hit_rate:.3f}",
        f"prefill  {p.prefill_tokens_per_s:10.2f} tokens/s",
        "",
        "memory",
    ]
    for device, items in p.memory_items.items():
        need, have = p.memory_bytes[device], p.memory_limit_bytes[device]
        verdict = "fits" if need <= have else "DOES NOT FIT"
        lines.append(f"  {device:12s}{_gib(need)} of {_gib(have)}  {verdict}")
        for item, n in items.items():
            lines.append(f"    {item:28s}{_gib(n)}")
    lines.append(f"verdict  {'fits' if p.fits else 'does not fit'}")
    lines += [f"note     {n}" for n in p.notes]
    return "\n".join(lines)
