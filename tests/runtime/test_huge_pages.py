"""CPU weights in 2 MB pages: born there when the command line asks torch's allocator first, the rest moved,
nothing moved twice, and the same tokens either way."""
from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.huge_pages import HUGE, bytes_in_huge_pages, move_to_huge_pages, supported
from model_factory import make_tokenizer


def _thp_available() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not (supported() and _thp_available()),
                                reason="transparent huge pages are a Linux feature, off on this host")


def _env_without_request() -> dict[str, str]:
    """This environment without the allocator variable an in-process CLI call of another test may have set."""
    return {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}


def _in_small_pages(values: torch.Tensor) -> torch.nn.Parameter:
    """A parameter holding `values` in a mapping advised never to use 2 MB pages (torch's allocator may give
    a new tensor 2 MB pages, when this process asked it to)."""
    region = mmap.mmap(-1, values.numel() * values.element_size(), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    data = torch.frombuffer(region, dtype=values.dtype)
    data.copy_(values)
    return torch.nn.Parameter(data, requires_grad=False)


def test_move_skips_what_is_already_in_huge_pages():
    torch.manual_seed(0)
    big = _in_small_pages(torch.randn(3 * HUGE // 4))  # 6 MB of fp32
    assert bytes_in_huge_pages([big]) == 0
    small = torch.nn.Parameter(torch.randn(1000), requires_grad=False)
    values = big.detach().clone()
    params = [big, small]
    moved = move_to_huge_pages(params)
    assert moved == 3 * HUGE
    assert big.data_ptr() % HUGE == 0 and torch.equal(big, values)
    assert bytes_in_huge_pages(params) == 3 * HUGE  # under 2 MB: not counted, not moved
    assert move_to_huge_pages(params) == 0, "a storage in 2 MB pages is not copied again"


@pytest.mark.parametrize("wanted", [True, False])
def test_tensors_allocated_after_the_request_are_born_in_huge_pages(wanted):
    script = ("from runtime.huge_pages import request_for_new_tensors, born_in_huge_pages\n"
              f"request_for_new_tensors({wanted})\n"
              "import torch\n"
              "p = torch.nn.Parameter(torch.ones(16 << 20, dtype=torch.uint8), requires_grad=False)\n"
              "print(born_in_huge_pages([p]))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=_env_without_request(),
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(wanted)


def _checkpoint_with_large_experts(folder: Path) -> int:
    """A one-layer Mixtral whose fused expert tensors are 8 MB and 4 MB (fp32); returns their bytes."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                           tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer(folder)
    return 8 * (2 * 512 * 256 + 256 * 512) * 4


def test_run_reports_weights_in_huge_pages_and_the_same_tokens(tmp_path):
    expert_bytes = _checkpoint_with_large_experts(tmp_path / "model")
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nmodel: {name: t, dtype: float32}\nhardware: {accelerator: cpu, cpu_threads: 1}\n"
                    "cache: {slots: 0, policy: lru, preload: none}\n"
                    "miss: {compute: cpu, transfer_min_tokens: 0, promote: false}\nprefetch: {lookahead: 0}\n")
    env = _env_without_request()
    reports = {}
    for flag in ("", "--no-huge-pages", "--huge-pages"):
        proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(plan), "--model", str(tmp_path / "model"),
                               "--max-new-tokens", "6", "--json", *([flag] if flag else [])],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        reports[flag] = json.loads(proc.stdout)
    assert reports[""]["weights_in_huge_pages_bytes"] >= expert_bytes  # born there, or moved
    assert reports["--huge-pages"]["weights_in_huge_pages_bytes"] >= expert_bytes
    assert reports["--no-huge-pages"]["weights_in_huge_pages_bytes"] == 0
    ids = {flag: report["generated_ids"] for flag, report in reports.items()}
    assert ids[""] == ids["--no-huge-pages"] == ids["--huge-pages"]


@pytest.mark.parametrize("wanted", [True, False])
def test_int_tables_are_born_in_huge_pages_when_asked(wanted):
    """huge_pages.empty (the quantized experts' codes and scales): a fresh 2 MB-aligned mapping in huge pages
    when the process asked for them, torch's allocator otherwise."""
    script = ("from runtime.huge_pages import request_for_new_tensors, born_in_huge_pages, empty, HUGE\n"
              f"request_for_new_tensors({wanted})\n"
              "import torch\n"
              "t = empty((3, 1 << 20, 2), torch.int8)\n"
              "t.fill_(1)\n"
              "small = empty((1000,), torch.float16)\n"
              "print(tuple(t.shape), t.dtype, t.data_ptr() % HUGE == 0, born_in_huge_pages([t]), small.numel())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=_env_without_request(), cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(3,", "1048576,", "2)", "torch.int8", str(wanted), str(wanted), "1000"]


def test_int_plan_keeps_its_quantized_experts_in_huge_pages(tmp_path):
    """int8 experts quantized at load: their codes (an 8 x 1024 x 256 table of 2 MB) count among the weights
    in 2 MB pages, as a float plan's experts do; none with --no-huge-pages; the same tokens either way."""
    _checkpoint_with_large_experts(tmp_path / "model")
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 2\nmodel: {name: t, dtype: float32, experts: int8}\n"
                    "hardware: {accelerator: cpu, cpu_threads: 1}\ncache: {slots: 0, policy: lru, preload: none}\n"
                    "miss: {compute: cpu, transfer_min_tokens: 0, promote: false}\nprefetch: {lookahead: 0}\n")
    reports = {}
    for flag in ("", "--no-huge-pages"):
        proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(plan), "--model", str(tmp_path / "model"),
                               "--max-new-tokens", "6", "--json", *([flag] if flag else [])],
                              capture_output=True, text=True, timeout=300, env=_env_without_request())
        assert proc.returncode == 0, proc.stderr
        reports[flag] = json.loads(proc.stdout)
    assert reports[""]["weights_in_huge_pages_bytes"] >= 8 * 1024 * 256
    assert reports["--no-huge-pages"]["weights_in_huge_pages_bytes"] == 0
    assert reports[""]["generated_ids"] == reports["--no-huge-pages"]["generated_ids"]
