"""Every command's user mistakes end as one line naming the file/field and exit 1 (usage: exit 2).

One table of cases, run in-process through `planner.cli.main`; two through a real process to prove no
traceback reaches the terminal. Internal errors are not caught here: a traceback fails the test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "tests" / "planner" / "data" / "desktop-rtx4070-published.yaml"

PLAN = """version: 1
model: {{name: t, path: {path}, dtype: float32}}
hardware: {{accelerator: cpu, cpu_threads: 1}}
cache: {{slots: {slots}, policy: lru, preload: {preload}}}
miss: {{compute: cpu, transfer_min_tokens: 0, promote: true}}
"""


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory):
    """Bad inputs of every kind, made once; a dict name -> path."""
    folder, _ = checkpoint("mixtral")  # 3 MoE layers, 8 experts
    d = tmp_path_factory.mktemp("user-errors")
    config = json.loads((folder / "config.json").read_text())

    def write(name: str, data: str | bytes) -> Path:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    def model_dir(name: str, cfg: str | bytes, weights: str = "model.safetensors") -> Path:
        write(f"{name}/config.json", cfg)
        write(f"{name}/{weights}", b"not read: the config is checked first")
        return d / name

    f = {
        "ckpt": folder,
        "plan": write("plan.yaml", PLAN.format(path=folder, slots=1, preload="none")),
        "empty": write("empty.yaml", ""),
        "binary": write("binary.yaml", b"\xff\xfe\x00\x81 not text"),
        "list": write("list.yaml", "- version\n- 1\n"),
        "deep": write("deep.yaml", "version: 1\npredicted: " + "[" * 5000 + "]" * 5000 + "\n"),
        "slots-type": write("slots-type.yaml", PLAN.format(path=folder, slots='"two"', preload="none")),
        "unknown-key": write("unknown-key.yaml", PLAN.format(path=folder, slots=1, preload="none") + "extra: 1\n"),
        "preload-layers": write("preload-layers.yaml", PLAN.format(path=folder, slots=1, preload="[[0], [1]]")),
        "preload-range": write("preload-range.yaml", PLAN.format(path=folder, slots=1, preload="[[0], [1], [9]]")),
        "slots-layers": write("slots-layers.yaml", PLAN.format(path=folder, slots="[1, 1, 1, 1, 1]", preload="none")),
        "bin-only": model_dir("bin-only", json.dumps(config), weights="pytorch_model.bin"),
        "cfg-binary": model_dir("cfg-binary", b"\xff\xff{"),
        "cfg-deep": model_dir("cfg-deep", "[" * 100_000 + "]" * 100_000),
        "cfg-list": model_dir("cfg-list", "[1, 2]"),
        "cfg-zero-heads": model_dir("cfg-zero-heads", json.dumps({**config, "num_attention_heads": 0})),
        "cfg-experts-str": model_dir("cfg-experts-str", json.dumps({**config, "num_local_experts": "8"})),
        "cfg-mlp-only": model_dir("cfg-mlp-only", json.dumps(
            {"model_type": "qwen2_moe", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "vocab_size": 10, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
             "intermediate_size": 8, "mlp_only_layers": 5})),
        "profile-wrong-type": write("profile-wrong-type.yaml",
                                    PROFILE.read_text().replace("physical_cores: 8", "physical_cores: eight")),
        "trace-empty": write("trace-empty.jsonl", ""),
        "trace-yaml": write("trace-yaml.jsonl", "trace: 1\nmodel: x\n"),
        "trace-header-type": write("trace-header-type.jsonl", json.dumps(
            {"trace": 1, "model": "m", "num_layers": "3", "num_experts": 8, "top_k": 2, "source": "recorded"}) + "\n"),
        "prompts": write("prompts.txt", "def main():\n"),
        "prompts-empty": write("prompts-empty.txt", "\n  \n"),
        "journal-garbage": write("garbage.log", "this is not optuna's journal\n"),
        "folder": d / "a-folder",
    }
    (d / "a-folder").mkdir()
    assert "physical_cores: 8" in PROFILE.read_text()
    return f


def _p(name: str):
    return lambda f: str(f[name])


# (case, argv as a function of the files, text the one-line error must contain)
CASES = [
    # ---- run: the plan file
    ("run/plan missing", lambda f: ["run", str(f["folder"] / "absent.yaml")], "absent.yaml: no such plan file"),
    ("run/plan is a folder", lambda f: ["run", str(f["folder"])], "is a folder, not a plan file"),
    ("run/plan empty", lambda f: ["run", str(f["empty"])], "empty.yaml: the file is empty"),
    ("run/plan not UTF-8", lambda f: ["run", str(f["binary"])], "binary.yaml: not UTF-8 text (byte 0)"),
    ("run/plan a list", lambda f: ["run", str(f["list"])], "list.yaml: plan: must be a mapping, got a list"),
    ("run/plan nested deeply", lambda f: ["run", str(f["deep"])], "deep.yaml: not valid YAML: nested too deeply"),
    ("run/plan wrong type", lambda f: ["run", str(f["slots-type"])],
     "cache.slots: must be an integer or a list of integers, got a string"),
    ("run/plan unknown key", lambda f: ["run", str(f["unknown-key"])], "extra: unknown key"),
    # ---- run: the plan against the wrong checkpoint
    ("run/slots list of another model", lambda f: ["run", str(f["slots-layers"])],
     "cache.slots: has 5 entries but the model has 3 MoE layers"),
    ("run/preload of another model", lambda f: ["run", str(f["preload-layers"])],
     "cache.preload: has 2 lists but the model has 3 MoE layers"),
    ("run/preload expert out of range", lambda f: ["run", str(f["preload-range"])],
     "cache.preload[2][0]: expert 9 does not exist"),
    # ---- run: the model folder
    ("run/model is a file", lambda f: ["run", str(f["plan"]), "--model", str(f["plan"])], "plan.yaml: not a folder"),
    ("run/model missing", lambda f: ["run", str(f["plan"]), "--model", str(f["folder"] / "nowhere")],
     "nowhere: no such model folder"),
    ("run/pytorch_model.bin only", lambda f: ["run", str(f["plan"]), "--model", str(f["bin-only"])],
     "no *.safetensors weights (moeplan reads safetensors only)"),
    ("run/config.json not UTF-8", lambda f: ["run", str(f["plan"]), "--model", str(f["cfg-binary"])],
     "cfg-binary/config.json: not valid JSON"),
    ("run/config.json nested deeply", lambda f: ["run", str(f["plan"]), "--model", str(f["cfg-deep"])],
     "cfg-deep/config.json: not valid JSON (nested too deeply)"),
    ("run/config.json a list", lambda f: ["run", str(f["plan"]), "--model", str(f["cfg-list"])],
     "cfg-list/config.json: no model_type"),
    ("run/context too large for host memory", lambda f: ["run", str(f["plan"]), "--max-new-tokens", "1000000000"],
     "the plan does not fit: host: needs"),
    # ---- run: other files
    ("run/replay trace missing", lambda f: ["run", str(f["plan"]), "--replay-trace", str(f["folder"] / "t.jsonl")],
     "t.jsonl: no such trace file"),
    ("run/--trace-out is a folder", lambda f: ["run", str(f["plan"]), "--max-new-tokens", "1", "--trace-out",
                                               str(f["folder"])], "a-folder: is a folder; give the path of a file"),
    ("run/--trace-out under a file", lambda f: ["run", str(f["plan"]), "--max-new-tokens", "1", "--trace-out",
                                                str(f["plan"] / "t.jsonl")], "cannot write there"),
    # ---- explain
    ("explain/profile missing", lambda f: ["explain", str(f["plan"]), "--profile", str(f["folder"] / "p.yaml")],
     "p.yaml: no such profile file"),
    ("explain/profile is a folder", lambda f: ["explain", str(f["plan"]), "--profile", str(f["folder"])],
     "is a folder, not a profile file"),
    ("explain/profile not UTF-8", lambda f: ["explain", str(f["plan"]), "--profile", str(f["binary"])],
     "binary.yaml: not UTF-8 text"),
    ("explain/profile empty", lambda f: ["explain", str(f["plan"]), "--profile", str(f["empty"])],
     "empty.yaml: version: missing"),
    ("explain/profile nested deeply", lambda f: ["explain", str(f["plan"]), "--profile", str(f["deep"])],
     "deep.yaml: not valid YAML: nested too deeply"),
    ("explain/profile wrong type", lambda f: ["explain", str(f["plan"]), "--profile", str(f["profile-wrong-type"])],
     "host.physical_cores: must be an integer, got a string 'eight'"),
    ("explain/config zero heads", lambda f: ["explain", str(f["plan"]), "--profile", str(PROFILE), "--model",
                                             str(f["cfg-zero-heads"])], "num_attention_heads: must be a positive"),
    ("explain/config experts a string", lambda f: ["explain", str(f["plan"]), "--profile", str(PROFILE), "--model",
                                                   str(f["cfg-experts-str"])], "num_local_experts: must be an integer"),
    ("explain/config mlp_only_layers", lambda f: ["explain", str(f["plan"]), "--profile", str(PROFILE), "--model",
                                                  str(f["cfg-mlp-only"])], "mlp_only_layers: must be a list"),
    ("explain/config nested deeply", lambda f: ["explain", str(f["plan"]), "--profile", str(PROFILE), "--model",
                                                str(f["cfg-deep"])], "config.json: cannot read as JSON (nested"),
    ("explain/unknown model", lambda f: ["explain", str(f["plan"]), "--profile", str(PROFILE), "--model",
                                         "no-such-model"], "no-such-model: not a known model"),
    ("explain/trace empty", lambda f: ["explain", str(f["plan"]), "--profile", str(PROFILE), "--trace",
                                       str(f["trace-empty"])], "trace-empty.jsonl: empty trace file"),
    ("explain/negative vram budget", lambda f: ["explain", str(f["plan"]), "--profile", str(PROFILE),
                                                "--vram-budget", "-5"], "--vram-budget: must be >= 0"),
    ("explain/negative context", lambda f: ["explain", str(f["plan"]), "--profile", str(PROFILE), "--context", "-1"],
     "--context: must be >= 0"),
    # ---- trace stats
    ("trace stats/missing", lambda f: ["trace", "stats", str(f["folder"] / "t.jsonl")], "no such trace file"),
    ("trace stats/folder", lambda f: ["trace", "stats", str(f["folder"])], "is a folder, not a trace file"),
    ("trace stats/not UTF-8", lambda f: ["trace", "stats", str(f["binary"])], "binary.yaml:1: not UTF-8 text"),
    ("trace stats/empty", lambda f: ["trace", "stats", str(f["trace-empty"])], "empty trace file"),
    ("trace stats/YAML not JSON", lambda f: ["trace", "stats", str(f["trace-yaml"])], "trace-yaml.jsonl:1: not valid JSON"),
    ("trace stats/header wrong type", lambda f: ["trace", "stats", str(f["trace-header-type"])],
     "num_layers: must be an integer, got a string '3'"),
    # ---- trace recording
    ("trace/missing flags", lambda f: ["trace", "--model", str(f["ckpt"])], "recording needs --prompts, --out"),
    ("trace/prompts a folder", lambda f: ["trace", "--model", str(f["ckpt"]), "--prompts", str(f["folder"]), "--out",
                                          str(f["folder"] / "o.jsonl")], "--prompts"),
    ("trace/prompts not UTF-8", lambda f: ["trace", "--model", str(f["ckpt"]), "--prompts", str(f["binary"]),
                                           "--out", str(f["folder"] / "o.jsonl")], "not UTF-8 text"),
    ("trace/prompts empty", lambda f: ["trace", "--model", str(f["ckpt"]), "--prompts", str(f["prompts-empty"]),
                                       "--out", str(f["folder"] / "o.jsonl")], "no prompts"),
    ("trace/model missing", lambda f: ["trace", "--model", str(f["folder"] / "nowhere"), "--prompts",
                                       str(f["prompts"]), "--out", str(f["folder"] / "o.jsonl")], "no such model folder"),
    ("trace/--out is a folder", lambda f: ["trace", "--model", str(f["ckpt"]), "--prompts", str(f["prompts"]),
                                           "--out", str(f["folder"]), "--max-new-tokens", "1", "--dtype", "float32"],
     "is a folder; give the path of a file"),
    # ---- profile (refused before measuring)
    ("profile/bad --shape", lambda f: ["profile", "--shape", "0:1:1:1:1", "--out", str(f["folder"] / "p.yaml")],
     "--shape: sizes must be positive"),
    ("profile/bad --threads", lambda f: ["profile", "--shape", "8:8:1:1:8", "--threads", "a,b", "--out",
                                         str(f["folder"] / "p.yaml")], "--threads: expected comma-separated integers"),
    ("profile/bad --accelerator", lambda f: ["profile", "--shape", "8:8:1:1:8", "--accelerator", "tpu", "--out",
                                             str(f["folder"] / "p.yaml")], "--accelerator: expected cuda:N"),
    ("profile/config nested deeply", lambda f: ["profile", "--model", str(f["cfg-deep"]), "--out",
                                                str(f["folder"] / "p.yaml")], "cannot read as JSON (nested"),
    ("profile/unknown model", lambda f: ["profile", "--model", "no-such-model"], "not a known model"),
    # ---- tune
    ("tune/bad --vram-budget", lambda f: ["tune", "--model", str(f["ckpt"]), "--profile", str(PROFILE),
                                          "--vram-budget", "lots"], "--vram-budget: 'lots' is not a size"),
    ("tune/bad --expert-budget-fraction", lambda f: ["tune", "--model", str(f["ckpt"]), "--profile", str(PROFILE),
                                                     "--expert-budget-fraction", "2"], "must be in [0, 1]"),
    ("tune/--storage journal is garbage", lambda f: ["tune", "--model", str(f["ckpt"]), "--profile", str(PROFILE),
                                                     "--trials", "1", "--no-progress", "--storage",
                                                     str(f["journal-garbage"])], "--storage: the journal file is not an optuna journal"),
    ("tune/--storage not a URL", lambda f: ["tune", "--model", str(f["ckpt"]), "--profile", str(PROFILE),
                                            "--storage", str(f["folder"])], "neither a database URL"),
    ("tune/profile not UTF-8", lambda f: ["tune", "--model", str(f["ckpt"]), "--profile", str(f["binary"])],
     "not UTF-8 text"),
    ("tune/trace empty", lambda f: ["tune", "--model", str(f["ckpt"]), "--profile", str(PROFILE), "--trace",
                                    str(f["trace-empty"])], "empty trace file"),
]


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_is_one_line_exit_1(case, argv, expected, files, capsys):
    capsys.readouterr()
    code = main(argv(files))
    _, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line.startswith("moeplan ")]
    assert code == 1, err
    assert "Traceback" not in err
    assert len(lines) == 1 and "error: " in lines[0], err
    assert expected in lines[0], lines[0]


USAGE = [
    ["run", "plan.yaml", "--max-new-tokens", "0"],
    ["run", "plan.yaml", "--top-p", "1.5"],
    ["run", "plan.yaml", "--seed", "x"],
    ["explain", "plan.yaml", "--context", "many"],
    ["trace", "stats", "t.jsonl", "--window", "0"],
    ["trace", "--dtype", "int8"],
    ["tune", "--profile", "p.yaml"],  # --model is required
    ["no-such-command"],
]


@pytest.mark.parametrize("argv", USAGE, ids=[" ".join(a) for a in USAGE])
def test_bad_usage_is_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("key,expected", [("binary", "not UTF-8 text"), ("deep", "nested too deeply")])
def test_no_traceback_in_a_real_process(key, expected, files):
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(files[key])], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert proc.stdout == ""
