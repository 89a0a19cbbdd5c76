"""Train a tiny Mixtral-architecture MoE on Python's standard library sources.

Tooling, not runtime: it produces the small *real* checkpoint beside it (models/tiny-moe/) that tests
and demos use when no large model is present. Everything it needs is on every machine: the text is the *.py
files of this interpreter's stdlib, the tokenizer is trained here, and training stops after a
wall-clock budget, then evaluates and saves a Hugging Face folder.

    .venv/bin/python models/tiny-moe/train.py --out models/tiny-moe --minutes 25

Imports only torch, transformers, tokenizers and safetensors (through save_pretrained).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# The held-out split is a deterministic function of each file's stdlib-relative path, so
# bench/diagnostics/routing_stats_tiny.py and the tests can find held-out text without sharing state.
HELDOUT_FILE = "heldout_files.txt"
TRAIN_INFO_FILE = "train_info.json"


@dataclass(frozen=True)
class Corpus:
    stdlib: str
    python_version: str
    train_files: list[str]
    val_files: list[str]
    train_bytes: int
    val_bytes: int


def is_heldout(rel_path: str, per_mille: int) -> bool:
    """A file is held out when the first two bytes of sha1(path) fall below per_mille/1000."""
    digest = hashlib.sha1(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:2], "big") % 1000 < per_mille


def collect_corpus(stdlib: Path, heldout_per_mille: int) -> Corpus:
    """All *.py files of the stdlib except third-party site-packages; some held out for validation."""
    train, val = [], []
    tb = vb = 0
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")):
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        if is_heldout(rel, heldout_per_mille):
            val.append(rel)
            vb += size
        else:
            train.append(rel)
            tb += size
    if not train or not val:
        raise SystemExit(f"stdlib {stdlib}: found {len(train)} train / {len(val)} validation files")
    # a label, not the folder: no machine path goes into the committed train_info.json
    version = sys.version.split()[0]
    return Corpus(f"sysconfig stdlib of python {version}", version, train, val, tb, vb)


def read_text(stdlib: Path, rel: str) -> str:
    # A few stdlib test files hold deliberately invalid bytes; replacement keeps them usable.
    return (stdlib / rel).read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Prepend <s> like Mixtral's tokenizer does, so encode(prompt) starts the way training docs did.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(folder)
    return fast


def encode_docs(tok, texts: list[str]) -> list[int]:
    """Sequence packing: one stream of <s> doc </s> <s> doc </s> ... cut into windows later."""
    eos = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    return stream


def lr_at(step: int, frac_time: float, peak: float, warmup: int, floor: float) -> float:
    """Linear warmup by steps, then cosine decay over the *time* budget (the step count is unknown)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(max(frac_time, 0.0), 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (machine is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--aux-coef", type=float, default=0.02, help="router load-balancing loss weight")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--heldout-per-mille", type=int, default=20)
    p.add_argument("--tokenizer-mb", type=float, default=8.0, help="text used to train the BPE")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="saved dtype")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast (measured slower here)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    p.add_argument("--log", type=Path, default=None, help="log file (default OUT/train.log)")
    args = p.parse_args(argv)

    # tokenizers uses Rayon threads; keep it to the same budget as torch on a shared machine.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    t_start = time.monotonic()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.log or args.out / "train.log"
    log_f = open(log_path, "w", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - t_start:7.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        log_f.write(line + "\n")
        log_f.flush()

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = collect_corpus(stdlib, args.heldout_per_mille)
    log(f"python {corpus.python_version} stdlib: {len(corpus.train_files)} train files "
        f"({corpus.train_bytes / 1e6:.1f} MB), {len(corpus.val_files)} held-out ({corpus.val_bytes / 1e6:.2f} MB)")
    (args.out / HELDOUT_FILE).write_text("\n".join(corpus.val_files) + "\n", encoding="utf-8")

    train_texts = [read_text(stdlib, r) for r in corpus.train_files]
    val_texts = [read_text(stdlib, r) for r in corpus.val_files]
    shuffled = train_texts[:]
    random.Random(args.seed).shuffle(shuffled)
    tok_texts, budget = [], args.tokenizer_mb * 1e6
    for t in shuffled:
        if budget <= 0:
            break
        tok_texts.append(t)
        budget -= len(t)
    tok = train_tokenizer(tok_texts, args.vocab, args.out)
    train_ids = torch.tensor(encode_docs(tok, shuffled), dtype=torch.long)
    val_ids = torch.tensor(encode_docs(tok, val_texts), dtype=torch.long)
    log(f"tokenizer vocab {len(tok)}; train stream {train_ids.numel()} tokens, val stream {val_ids.numel()} tokens")

    config = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.ctx,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=True,  # keeps the bf16 checkpoint under the 30 MB budget
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_theta=10000.0,
    )
    # transformers 5 dropped the classmethod MixtralForCausalLM.from_config; the Auto class builds
    # the same MixtralForCausalLM from a MixtralConfig.
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * args.top_k // args.experts
    log(f"model: {n_params / 1e6:.2f} M params ({expert_params / 1e6:.2f} M in experts, "
        f"{active / 1e6:.2f} M active per token)")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    win = args.ctx

    def batch_from(ids: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, ids.numel() - win - 1, (n,), generator=g)
        return torch.stack([ids[s : s + win] for s in starts.tolist()])

    # Fixed validation windows: the same text at every evaluation, so the curve is comparable.
    val_batches = [batch_from(val_ids, args.batch, torch.Generator().manual_seed(1234 + i))
                   for i in range(args.eval_batches)]

    def evaluate() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for xb in val_batches:
                out = model(input_ids=xb, labels=xb, output_router_logits=False)
                total += float(out.loss)
        model.train()
        return total / len(val_batches)

    budget_s = args.minutes * 60.0
    t_train = time.monotonic()
    step = tokens_seen = 0
    ema = None
    aux_ema = None
    history: list[dict] = []
    model.train()
    log(f"training: batch {args.batch} x ctx {win}, peak lr {args.lr}, budget {args.minutes} min, "
        f"threads {args.threads}, autocast {args.autocast}")
    while True:
        elapsed = time.monotonic() - t_train
        if elapsed >= budget_s or (args.max_steps and step >= args.max_steps):
            break
        lr = lr_at(step, elapsed / budget_s, args.lr, args.warmup, args.lr * 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        xb = batch_from(train_ids, args.batch, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
            out = model(input_ids=xb, labels=xb)
        # out.loss = LM loss + coef * aux (Mixtral's load-balancing loss); log them apart.
        aux = float(out.aux_loss.detach())
        lm = float(out.loss.detach()) - args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += xb.numel()
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        aux_ema = aux if aux_ema is None else 0.95 * aux_ema + 0.05 * aux
        if step % args.eval_every == 0:
            vl = evaluate()
            el = time.monotonic() - t_train
            history.append({"step": step, "tokens": tokens_seen, "train_loss": round(ema, 4),
                            "val_loss": round(vl, 4), "aux_loss": round(aux_ema, 4), "seconds": round(el, 1)})
            log(f"step {step:5d} tok {tokens_seen:9d} lr {lr:.2e} train {ema:.4f} val {vl:.4f} "
                f"aux {aux_ema:.3f} ({tokens_seen / el:.0f} tok/s)")
        elif step % 10 == 0:
            log(f"step {step:5d} lr {lr:.2e} train {ema:.4f} aux {aux_ema:.3f}")

    train_s = time.monotonic() - t_train
    final_val = evaluate()
    log(f"done: {step} steps, {tokens_seen} tokens in {train_s:.0f} s; final train (ema) {ema:.4f}, val {final_val:.4f}")

    # Inference does not need the aux loss; callers ask for router logits explicitly.
    model.config.output_router_logits = False
    dtype = getattr(torch, args.dtype)
    model.to(dtype).save_pretrained(args.out)
    info = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "python_version": corpus.python_version,
        "stdlib": corpus.stdlib,
        "train_files": len(corpus.train_files),
        "val_files": len(corpus.val_files),
        "train_bytes": corpus.train_bytes,
        "val_bytes": corpus.val_bytes,
        "train_stream_tokens": int(train_ids.numel()),
        "val_stream_tokens": int(val_ids.numel()),
        "params": n_params,
        "expert_params": expert_params,
        "active_params": active,
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.monotonic() - t_start, 1),
        "final_train_loss_ema": round(ema, 4) if ema is not None else None,
        "final_val_loss": round(final_val, 4),
        "history": history,
        "torch": torch.__version__,
    }
    (args.out / TRAIN_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log(f"saved {args.dtype} checkpoint to {args.out}")
    log_f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
