"""Peak memory and time of the chunked KD loss against the full-logits KD loss (forward+backward).

Usage::

    python benchmarks/bench_kd_loss_memory.py [--batch 4 --seq 256 --hidden 256 --vocab 32000 ...]

Prints one JSON line with both peaks, the peak ratio (chunked / unchunked) and the time ratio.

How memory is measured, and why it is honest:

* Each variant runs in its **own fresh subprocess** (same inputs, same seed), so one variant's
  allocator caches and high-water marks cannot hide or inflate the other's.
* On **CUDA**: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  minus what was allocated before the loss: exactly the tensors the loss and its backward
  allocated.
* On **CPU**: the process's peak resident set size. The high-water mark is reset just before
  the measured step (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0) and read from
  ``VmHWM`` afterwards; the figure is that peak minus ``VmRSS`` just before the step. glibc's
  ``MALLOC_MMAP_THRESHOLD_`` is pinned to 64 KiB in the subprocess so that every tensor of any
  size is its own ``mmap`` and goes back to the OS when freed: RSS then follows the live
  tensors instead of the heap's fragmentation. ``tracemalloc`` would see none of torch's
  allocations, hence this. Inputs (hidden states, head weights) exist before the step and are
  not counted; the head-weight gradient the step creates is.

Both variants compute the same loss (``kd_loss`` on full fp32 logits vs ``chunked_kd_loss``);
the JSON also reports the largest difference of the loss, as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("unchunked", "chunked")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="student hidden size")
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--kind", default="forward-kl", choices=["forward-kl", "reverse-kl", "jsd"])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument(
        "--prompt-fraction",
        type=float,
        default=0.0,
        help="share of each sequence labelled -100 (0: every token counts, so the saving "
        "comes from chunking alone, not from skipping prompt tokens)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child(args: argparse.Namespace) -> dict:
    import torch

    from anneal.distill.losses import chunked_kd_loss, kd_loss

    device = torch.device(args.device)
    torch.manual_seed(0)
    b, t = args.batch, args.seq
    s_head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    t_head = torch.nn.Linear(args.teacher_hidden, args.vocab, bias=False, device=device)
    t_head.requires_grad_(False)
    s_hidden = torch.randn(b, t, args.hidden, device=device, requires_grad=True)
    t_hidden = torch.randn(b, t, args.teacher_hidden, device=device)
    labels = torch.randint(0, args.vocab, (b, t), device=device)
    labels[:, : int(t * args.prompt_fraction)] = -100
    loss_args = (labels, args.kind, args.temperature, args.alpha)

    def step() -> float:
        s_hidden.grad = None
        s_head.weight.grad = None
        if args.variant == "chunked":
            out = chunked_kd_loss(
                s_hidden, t_hidden, s_head, t_head, *loss_args, chunk_size=args.chunk_size
            )
        else:
            with torch.no_grad():
                t_logits = t_head(t_hidden)
            out = kd_loss(s_head(s_hidden), t_logits, *loss_args)
        out.loss.backward()
        return float(out.loss)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up on a small slice: loads kernels and lazily allocated state outside the measurement
    small = labels[:1, :8]
    if args.variant == "chunked":
        chunked_kd_loss(s_hidden[:1, :8], t_hidden[:1, :8], s_head, t_head, small, *loss_args[1:],
                        chunk_size=4).loss.backward()
    else:
        kd_loss(s_head(s_hidden[:1, :8]), t_head(t_hidden[:1, :8]), small, *loss_args[1:]).loss.backward()
    s_hidden.grad = None
    s_head.weight.grad = None
    sync()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        sync()
        peak = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated"
    else:
        s_hidden.grad = None
        before = _proc_status("VmRSS")
        _reset_cpu_peak()
        loss = step()
        peak = _proc_status("VmHWM") - before
        method = "VmHWM after clear_refs, minus VmRSS before (MALLOC_MMAP_THRESHOLD_=65536)"

    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "peak_bytes": peak,
        "seconds": statistics.median(times),
        "loss": loss,
        "method": method,
        "threads": torch.get_num_threads(),
    }


def _run_variant(variant: str, argv: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--variant", variant],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        argv += ["--device", args.device]
    if args.variant:
        print(json.dumps(_child(args)))
        return
    full, chunked = (_run_variant(v, argv) for v in VARIANTS)
    tokens = args.batch * (args.seq - 1) - args.batch * int(args.seq * args.prompt_fraction)
    mib = 1024**2
    print(
        json.dumps(
            {
                "benchmark": "kd_loss_memory",
                "device": args.device,
                "batch": args.batch,
                "seq": args.seq,
                "hidden": args.hidden,
                "teacher_hidden": args.teacher_hidden,
                "vocab": args.vocab,
                "kind": args.kind,
                "chunk_size": args.chunk_size,
                "loss_tokens": tokens,
                "full_logits_fp32_mib": round(tokens * args.vocab * 4 / mib, 1),
                "unchunked_peak_mib": round(full["peak_bytes"] / mib, 1),
                "chunked_peak_mib": round(chunked["peak_bytes"] / mib, 1),
                "peak_ratio": round(chunked["peak_bytes"] / full["peak_bytes"], 3),
                "peak_reduction": round(1 - chunked["peak_bytes"] / full["peak_bytes"], 3),
                "unchunked_s": round(full["seconds"], 4),
                "chunked_s": round(chunked["seconds"], 4),
                "time_ratio": round(chunked["seconds"] / full["seconds"], 3),
                "loss_abs_diff": abs(full["loss"] - chunked["loss"]),
                "threads": full["threads"],
                "method": full["method"],
            }
        )
    )


if __name__ == "__main__":
    main()
