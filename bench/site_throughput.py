"""Site training throughput: fedsky's local training loop against a bare PyTorch loop.

Both train the same model (a GPT-2 or Llama built from the sizes given, or a pretrained
directory, optionally with LoRA) on the same batches with the same optimizer (AdamW) and
gradient clipping, in the same process, alternating repeats so that machine load hits both
alike. fedsky's side is `fedsky.training.train_steps`, called exactly as a site calls it each
round (a fresh optimizer, batches sampled from the site's rows, bf16 autocast on CUDA); the
bare side is the textbook loop: forward with labels, backward, clip, step. Tokens/s counts
input tokens (batch x seq_len per step). Prints JSON with the medians, their ratio and the
median of the per-repeat ratios (target >= 0.95).

    python bench/site_throughput.py [--layers 4 --width 256 --batch 8 --seq-len 128]
        [--steps 10 --repeats 7] [--lora] [--pretrained DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedsky.config import LoraConfig, ModelConfig, TrainingConfig
from fedsky.model import build_model, pick_device
from fedsky.training import autocast_dtype, train_steps


def bare_loop(model: torch.nn.Module, data: torch.Tensor, cfg: TrainingConfig, steps: int,
              gen: torch.Generator, device: torch.device) -> float:
    """The plain PyTorch loop a user would write; returns the seconds it took."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = autocast_dtype(cfg, device)
    model.train()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (cfg.batch_size,), generator=gen)].to(device)
        with torch.autocast(device.type, amp or torch.bfloat16, enabled=amp is not None):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    sync(device)
    return time.perf_counter() - start


def fedsky_loop(model: torch.nn.Module, data: torch.Tensor, cfg: TrainingConfig, steps: int,
                gen: torch.Generator, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    train_steps(model, data, cfg, steps, gen, device)  # as site.train_round calls it
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--pretrained", default=None, help="a local causal LM directory instead")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    targets = ["c_attn", "c_fc"] if args.arch == "gpt2" else ["q_proj", "v_proj"]
    mcfg = ModelConfig(arch=args.arch, pretrained=args.pretrained, n_layer=args.layers,
                       n_embd=args.width, n_head=args.heads, context=args.seq_len,
                       lora=LoraConfig(r=8, target_modules=targets) if args.lora else None)
    cfg = TrainingConfig(batch_size=args.batch, seq_len=args.seq_len, grad_clip=1.0,
                         device=args.device)
    model = build_model(mcfg, args.vocab, 0, device)
    vocab = model.get_input_embeddings().num_embeddings
    data = torch.randint(vocab, (512, args.seq_len), generator=torch.Generator().manual_seed(0))
    tokens = args.steps * args.batch * args.seq_len
    for loop in (fedsky_loop, bare_loop):  # warm-up: allocator, kernels, lazy inits
        loop(model, data, cfg, 2, torch.Generator().manual_seed(0), device)
    runs: dict[str, list[float]] = {"fedsky": [], "bare": []}
    ratios = []  # fedsky / bare within each repeat: load drifts less within a pair
    for r in range(args.repeats):
        # The same batches for both loops in each repeat; the order alternates.
        order = [("fedsky", fedsky_loop), ("bare", bare_loop)]
        for name, loop in order if r % 2 == 0 else order[::-1]:
            secs = loop(model, data, cfg, args.steps, torch.Generator().manual_seed(r), device)
            runs[name].append(tokens / secs)
        ratios.append(runs["fedsky"][-1] / runs["bare"][-1])
    fed, bare = statistics.median(runs["fedsky"]), statistics.median(runs["bare"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({
        "bench": "site_throughput",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "model": args.pretrained or f"{args.arch} {args.layers}x{args.width}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": trainable,
        "lora": args.lora,
        "batch": args.batch, "seq_len": args.seq_len, "steps_per_repeat": args.steps,
        "repeats": args.repeats, "threads": args.threads,
        "autocast": str(autocast_dtype(cfg, device)),
        "fedsky_tokens_per_s": runs["fedsky"],
        "bare_tokens_per_s": runs["bare"],
        "median_fedsky_tokens_per_s": fed,
        "median_bare_tokens_per_s": bare,
        "ratio_of_medians": fed / bare,
        "median_paired_ratio": statistics.median(ratios),
        "target_ratio": 0.95,
    }, indent=2))


if __name__ == "__main__":
    main()
