"""Quality of quantized experts: perplexity of the embedded model on its held-out text, moeplan bf16 / int8 /
int4 experts beside llama.cpp's bf16 / Q8_0 / Q4_0 of the same weights, over the same tokens and windows.

    .venv/bin/python bench/perplexity.py --llama-python /path/to/llvenv/bin/python \
        --llama-cpp /path/to/llama_cpp_python-X/vendor/llama.cpp [--max-tokens 65536] [--out bench/results/x.md]

The text: the held-out files of models/tiny-moe (heldout_files.txt), read from this interpreter's standard
library (`sysconfig.get_paths()["stdlib"]`; the model was trained on Python 3.11.7's) in the listed order,
joined by a newline. moeplan: `moeplan perplexity` on that text under plans/tiny-moe.yaml with
`model.experts` set (int8 and int4 quantized at load), 1 CPU thread (2 OpenMP threads on this shared 2-vCPU
machine spin against other jobs; the number does not depend on threads). llama.cpp: models/tiny-moe converted
to GGUF bf16 (bench/llama_cpp/convert_gguf.py), quantized to Q8_0 and Q4_0 by llama.cpp's own quantizer
(bench/llama_cpp/quantize_gguf.py, `llama_model_quantize`), scored from llama.cpp's logits over the very token
ids and windows moeplan scored (bench/llama_cpp/perplexity.py), so tokenization cannot differ.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "tiny-moe"
PLAN = ROOT / "plans" / "tiny-moe.yaml"
FORMATS = ("bfloat16", "int8", "int4")
GGUF_TYPES = ("q8_0", "q4_0")


def heldout_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = [n for n in (MODEL / "heldout_files.txt").read_text().splitlines() if n]
    # as the trainer reads them (models/tiny-moe/train.py): invalid bytes replaced
    return "\n".join((stdlib / n).read_text(encoding="utf-8", errors="replace") for n in names)


def moeplan_perplexity(fmt: str, text_file: Path, context: int, max_tokens: int, work: Path) -> dict:
    plan = yaml.safe_load(PLAN.read_text())
    plan["version"] = 2
    plan["model"]["path"] = str(MODEL)
    if fmt != plan["model"]["dtype"]:
        plan["model"]["experts"] = fmt
    plan["hardware"]["cpu_threads"] = 1
    plan_file = work / f"plan-{fmt}.yaml"
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    cmd = [sys.executable, "-m", "planner.cli", "perplexity", str(plan_file), "--text", str(text_file),
           "--context", str(context), "--max-tokens", str(max_tokens), "--json"]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    return result


def llama_perplexity(python: str, gguf: Path, windows: Path) -> dict:
    start = time.perf_counter()
    out = subprocess.run([python, str(ROOT / "bench" / "llama_cpp" / "perplexity.py"), str(gguf), str(windows)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    return result


def make_ggufs(python: str, llama_cpp: Path, folder: Path) -> dict[str, Path]:
    files = {"bf16": folder / "tiny-moe-bf16.gguf", **{t: folder / f"tiny-moe-{t}.gguf" for t in GGUF_TYPES}}
    subprocess.run([sys.executable, str(ROOT / "bench" / "llama_cpp" / "convert_gguf.py"), str(llama_cpp), str(MODEL),
                    "--outtype", "bf16", "--outfile", str(files["bf16"])], check=True, capture_output=True)
    for t in GGUF_TYPES:
        subprocess.run([python, str(ROOT / "bench" / "llama_cpp" / "quantize_gguf.py"), str(files["bf16"]),
                        str(files[t]), t], check=True, capture_output=True)
    return files


def main() -> int:
    from runtime.perplexity import load_tokenizer, model_context, prepare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-python", required=True, help="python of the environment with llama-cpp-python")
    p.add_argument("--llama-cpp", required=True, type=Path, help="vendor/llama.cpp of the llama-cpp-python sdist")
    p.add_argument("--context", type=int, default=256, help="window (256: the model's context)")
    p.add_argument("--max-tokens", type=int, default=65536, help="first tokens of the held-out text to score")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "perplexity_avx2.md")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text_file = work / "heldout.txt"
        text_file.write_text(heldout_text(), encoding="utf-8")
        tokenizer = load_tokenizer(MODEL)
        ids, windows = prepare(tokenizer, text_file.read_text(encoding="utf-8"), args.context, model_context(MODEL),
                               args.max_tokens)
        all_tokens = len(prepare(tokenizer, text_file.read_text(encoding="utf-8"), args.context,
                                 model_context(MODEL))[0])
        windows_file = work / "windows.json"
        windows_file.write_text(json.dumps({"ids": ids, "context": windows.context, "chunks": windows.chunks,
                                            "bos_id": windows.bos_id}))
        rows: list[tuple[str, str, dict]] = []
        for fmt in FORMATS:
            r = moeplan_perplexity(fmt, text_file, args.context, args.max_tokens, work)
            print(f"moeplan {fmt}: {r['perplexity']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr)
            rows.append(("moeplan", fmt, r))
        ggufs = make_ggufs(args.llama_python, args.llama_cpp, work)
        for name, path in ggufs.items():
            r = llama_perplexity(args.llama_python, path, windows_file)
            r["file_bytes"] = path.stat().st_size
            print(f"llama.cpp {name}: {r['perplexity']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr)
            rows.append(("llama.cpp", name, r))
    write_report(args, rows, windows, all_tokens)
    return 0


def write_report(args, rows, windows, all_tokens: int) -> None:
    base = {impl: next(r for i, f, r in rows if i == impl and f in ("bfloat16", "bf16")) for impl in ("moeplan", "llama.cpp")}
    by = {(i, f): r for i, f, r in rows}
    lines = [
        "# Perplexity of quantized experts: the embedded model on its held-out text",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.processor() or platform.machine()}, {_cpu_name()}, ISA: AVX2 (no AVX-512); shared "
        f"with other jobs (2 vCPUs)",
        f"- command: `.venv/bin/python bench/perplexity.py --llama-python LLVENV/bin/python --llama-cpp "
        f"LLSRC/vendor/llama.cpp --context {args.context} --max-tokens {args.max_tokens}`",
        f"- text: the 33 held-out files of models/tiny-moe (heldout_files.txt) from Python "
        f"{platform.python_version()}'s standard library, joined by newlines: {all_tokens} tokens; the first "
        f"{args.max_tokens} of them scored",
        f"- windows: llama-perplexity's ({windows.chunks} chunks of {windows.context} tokens, BOS first, second "
        f"half scored: {windows.chunks * windows.scored_per_chunk} tokens); llama.cpp scored the same token ids",
        "- moeplan: `moeplan perplexity` under plans/tiny-moe.yaml with `model.experts` set (int8/int4 quantized at "
        "load, group 32; dense part bf16), 1 CPU thread. llama.cpp (llama-cpp-python 0.3.36, built with "
        "GGML_NATIVE=ON): GGUF bf16 from bench/llama_cpp/convert_gguf.py, Q8_0 / Q4_0 from llama.cpp's own "
        "quantizer with default parameters. Q8_0 quantizes every matrix (attention and embeddings too) to Q8_0; "
        "Q4_0 quantizes the experts and attention q/o to Q4_0, attention k/v to Q8_0 and the tied embedding to "
        "Q6_K (llama.cpp's choice); moeplan quantizes the routed experts only.",
        "",
        "| implementation | experts | perplexity | +/- | mean nll | vs its bf16 | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl, fmt, r in rows:
        rel = r["perplexity"] / base[impl]["perplexity"] - 1
        lines.append(f"| {impl} | {fmt} | {r['perplexity']:.4f} | {r['perplexity_error']:.4f} | {r['nll']:.5f} | "
                     f"{rel:+.3%} | {r['seconds']:.0f} |")
    m8, m4, b = by[("moeplan", "int8")], by[("moeplan", "int4")], base["moeplan"]
    q4 = by[("llama.cpp", "q4_0")]
    d8, d4 = m8["perplexity"] / b["perplexity"] - 1, m4["perplexity"] / b["perplexity"] - 1
    lines += [
        "",
        "Goals:",
        f"- int8 within 0.5 % of bf16: {d8:+.3%}: {'met' if abs(d8) <= 0.005 else 'NOT met'}",
        f"- int4 within 3 % of bf16: {d4:+.3%}: {'met' if abs(d4) <= 0.03 else 'NOT met'}",
        f"- moeplan int4 no worse than llama.cpp Q4_0: {m4['perplexity']:.4f} against {q4['perplexity']:.4f}: "
        f"{'met' if m4['perplexity'] <= q4['perplexity'] else 'NOT met'} (Q4_0 quantizes more than the experts; "
        f"against its own bf16 it moves {q4['perplexity'] / base['llama.cpp']['perplexity'] - 1:+.3%})",
        f"- moeplan bf16 against llama.cpp bf16, same weights and tokens: "
        f"{b['perplexity'] / base['llama.cpp']['perplexity'] - 1:+.3%}",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
