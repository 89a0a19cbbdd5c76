"""Load test of `moeplan serve`: concurrent streaming clients against the embedded model for a fixed time.

    .venv/bin/python bench/serve_load.py [--clients 8] [--seconds 60] [--paired 3] [--threads N]
                                         [--out bench/results/serve_load.md]

Starts the real server in a subprocess (plans/tiny-moe.yaml, models/tiny-moe, a free loopback port, a
queue bound above the client count), sends one warm-up request, then runs `--clients` threads that each
stream completions with the official `openai` client back to back until `--seconds` have passed (a
request under way at the deadline is finished). Prompts and lengths rotate over a fixed list, sampling is
seeded per request. Reported: requests served, generated tokens per second over the window, time to first
token (request sent to first text chunk, queue wait included: requests run one at a time) at p50/p95,
errors (exceptions, or a stream without a finish reason), and the server's resident memory (psutil)
after warm-up and at the end, sampled every second in between. Then `--paired` pairs, alternating, of
`moeplan run --json` and one streamed request alone on the server, same prompt, plan and length, compare
their decode tokens/s (the server's from /metrics), so that the server's cost over the runtime shows
apart from the machine's load. Ctrl-C stops the server at the end; its exit code is reported. Writes a
Markdown report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai
import psutil

ROOT = Path(__file__).resolve().parent.parent
PLAN, MODEL = "plans/tiny-moe.yaml", "models/tiny-moe"
PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n\n", "class Cache:\n    def __init__(self, size):",
           "# Read a CSV file and print each row\n", "def parse_args(argv):")
MAX_TOKENS = (32, 48, 64, 96)


@dataclass
class ClientLog:
    requests: int = 0
    tokens: int = 0
    first_token_seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not become ready")


def one_request(client: openai.OpenAI, name: str, index: int, log: ClientLog) -> None:
    prompt, max_tokens = PROMPTS[index % len(PROMPTS)], MAX_TOKENS[index % len(MAX_TOKENS)]
    sent = time.perf_counter()
    first = None
    finish = None
    usage = None
    try:
        for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0.8,
                                               top_p=0.95, seed=index, stream=True):
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - sent
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as exc:  # every failure is counted and reported, none ends the run
        log.errors.append(f"{type(exc).__name__}: {exc}")
        return
    if finish is None or usage is None:
        log.errors.append("stream ended without a finish reason or usage")
        return
    log.requests += 1
    log.tokens += usage.completion_tokens
    if first is not None:
        log.first_token_seconds.append(first)


def client_loop(url: str, name: str, client_id: int, clients: int, deadline: float, log: ClientLog) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    index = client_id
    while time.perf_counter() < deadline:
        one_request(client, name, index, log)
        index += clients


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def paired_decode(url: str, name: str, env: dict[str, str], pairs: int, plan: str) -> list[tuple[float, float]]:
    """(moeplan run, moeplan serve) decode tokens/s for the same greedy 64-token completion, alternating."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    prompt, tokens = PROMPTS[1], 64
    out = []
    for _ in range(pairs):
        run = subprocess.run([sys.executable, "-m", "planner.cli", "run", plan, "--model", MODEL, "--prompt", prompt,
                              "--max-new-tokens", str(tokens), "--json"], cwd=ROOT, env=env, capture_output=True,
                             text=True, check=True)
        run_speed = json.loads(run.stdout)["decode_tokens_per_s"]
        list(client.completions.create(model=name, prompt=prompt, max_tokens=tokens, temperature=0, stream=True))
        out.append((run_speed, scrape(url)["moeplan_decode_tokens_per_second"]))
    return out


def cpu_description() -> str:
    model = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {isa}, {os.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"


def plan_with_threads(threads: int | None, folder: Path) -> str:
    """PLAN, or a copy of it with `hardware.cpu_threads` set (a shared machine: fewer threads than cores)."""
    if threads is None:
        return PLAN
    import yaml

    plan = yaml.safe_load((ROOT / PLAN).read_text())
    plan["hardware"]["cpu_threads"] = threads
    plan["model"]["path"] = str(ROOT / MODEL)
    out = folder / f"tiny-moe-t{threads}.yaml"
    out.write_text(yaml.safe_dump(plan, sort_keys=False))
    return str(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, help="override the plan's hardware.cpu_threads")
    parser.add_argument("--paired", type=int, default=3, help="run/serve decode pairs after the load (0: none)")
    parser.add_argument("--out", default="bench/results/serve_load.md")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="serve-load-"))
    plan = plan_with_threads(args.threads, scratch)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server_log = open(os.devnull, "w")
    proc = subprocess.Popen([sys.executable, "-m", "planner.cli", "serve", plan, "--model", MODEL, "--port", str(port),
                             "--max-queue", str(args.clients * 2)], cwd=ROOT, env=env, stdout=server_log,
                            stderr=server_log)
    try:
        ready_seconds = wait_ready(url, proc)
        server = psutil.Process(proc.pid)
        rss_loaded = server.memory_info().rss
        name = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=30).read())["data"][0]["id"]
        warm = ClientLog()
        one_request(openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0), name, 0, warm)
        if warm.errors:
            raise SystemExit(f"warm-up request failed: {warm.errors[0]}")
        rss_start = server.memory_info().rss
        before = scrape(url)

        logs = [ClientLog() for _ in range(args.clients)]
        start = time.perf_counter()
        deadline = start + args.seconds
        threads = [threading.Thread(target=client_loop, args=(url, name, i, args.clients, deadline, logs[i]))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        rss_samples = []
        while any(t.is_alive() for t in threads):
            rss_samples.append(server.memory_info().rss)
            time.sleep(1.0)
        for t in threads:
            t.join()
        window = time.perf_counter() - start
        rss_end = server.memory_info().rss
        after = scrape(url)
        load_after = os.getloadavg()
        pairs = paired_decode(url, name, env, args.paired, plan)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            exit_code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = None

    requests = sum(log.requests for log in logs)
    tokens = sum(log.tokens for log in logs)
    first = [s for log in logs for s in log.first_token_seconds]
    errors = [e for log in logs for e in log.errors]
    decode_tokens = after["moeplan_decode_tokens_total"] - before["moeplan_decode_tokens_total"]
    decode_seconds = after["moeplan_decode_seconds_total"] - before["moeplan_decode_seconds_total"]
    growth = (rss_end - rss_start) / rss_start
    mib = 2 ** 20
    command = (f".venv/bin/python bench/serve_load.py --clients {args.clients} --seconds {args.seconds:g} "
               f"--paired {args.paired}" + (f" --threads {args.threads}" if args.threads else "")
               + (f" --out {args.out}" if args.out != "bench/results/serve_load.md" else ""))
    lines = [
        f"# `moeplan serve` under load: {args.clients} streaming clients for {args.seconds:g} s",
        "",
        f"`{command}`",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Machine: "
        f"{cpu_description()}, no GPU; Python {platform.python_version()}. The machine was shared with other "
        f"jobs (load average {load_before[0]:.1f} before the run, {load_after[0]:.1f} at its end, on "
        f"{os.cpu_count()} CPUs), so the speeds are lower bounds of what this model does alone.",
        "",
        f"Server: `moeplan serve {PLAN} --model {MODEL} --max-queue {args.clients * 2}`"
        + (f" with the plan's cpu_threads set to {args.threads}" if args.threads else "") + " on loopback, ready "
        f"{ready_seconds:.1f} s after start. Clients: the `openai` package, `stream=True`, prompts and "
        f"max_tokens rotating over {len(PROMPTS)} prompts and {MAX_TOKENS}, temperature 0.8, top_p 0.95, "
        "a seed per request. Requests run one at a time on the server (no batching), so the time to first "
        "token includes the wait behind the other clients' requests.",
        "",
        "| measured | value | goal |",
        "|---|---|---|",
        f"| requests served | {requests} | |",
        f"| generated tokens | {tokens} | |",
        f"| generated tokens/s over the window ({window:.1f} s) | {tokens / window:.1f} | |",
        f"| server decode tokens/s (from /metrics: decode tokens / decode seconds) | "
        f"{decode_tokens / decode_seconds if decode_seconds else float('nan'):.1f} | |",
        f"| time to first token p50 | {percentile(first, 0.5):.3f} s | |",
        f"| time to first token p95 | {percentile(first, 0.95):.3f} s | |",
        f"| errors | {len(errors)} | none |",
        f"| resident memory after load | {rss_loaded / mib:.1f} MiB | |",
        f"| resident memory after warm-up (start) | {rss_start / mib:.1f} MiB | |",
        f"| resident memory at the end | {rss_end / mib:.1f} MiB | |",
        f"| growth start to end | {growth:+.2%} | within 5 % |",
        f"| largest sample during the run | {max(rss_samples, default=rss_end) / mib:.1f} MiB | |",
        f"| server exit code after Ctrl-C (drained) | {exit_code} | 0 |",
        "",
    ]
    if pairs:
        ratios = [serve / run for run, serve in pairs]
        lines += [f"Decode tokens/s of one request alone, `moeplan run --json` and the server alternating "
                  f"({len(pairs)} pairs, greedy, 64 tokens, prompt {PROMPTS[1]!r}; medians):", "",
                  "| pair | run | serve | serve / run |", "|---|---|---|---|",
                  *[f"| {i + 1} | {r:.1f} | {v:.1f} | {v / r:.2f} |" for i, (r, v) in enumerate(pairs)],
                  f"| median | {statistics.median(r for r, _ in pairs):.1f} | "
                  f"{statistics.median(v for _, v in pairs):.1f} | {statistics.median(ratios):.2f} |", ""]
    if errors:
        lines += ["Errors (first 5):", "", *[f"- {e}" for e in errors[:5]], ""]
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print("\n".join(lines))
    return 0 if not errors and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
