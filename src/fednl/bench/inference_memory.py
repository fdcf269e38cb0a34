"""``fednl bench inference-memory``: peak memory of streaming SmolLM2-135M over long text.

Two models stream the same text chunk by chunk (``chunk`` tokens per :meth:`StreamingLM.feed`, no grad):

* ``converted`` — SmolLM2 with every attention layer converted to the Titans dual path (untrained rule: gate
  0.1, beta 0.5) and the softmax path limited to ``attn_window`` tokens plus ``sinks`` sink tokens (default 4): it
  carries a fixed-size delta-rule memory per layer plus a ``sinks + window - 1`` token KV cache, so its memory
  should not grow with the length;
* ``baseline`` — the unconverted model with HF's full KV cache (grows linearly), stopped at ``baseline_max``
  tokens or at the first length it cannot run.

Each (model, length) runs in a fresh Python process, so every figure is that process's own peak. Per record:
``{"model", "tokens", "peak_rss_mb"}`` (``ru_maxrss``: the whole process, model loading included) plus
``stream_peak_rss_mb`` (the peak *during streaming*, measured by resetting the kernel's high-water mark after
loading — ``/proc/self/clear_refs``; ``null`` where unsupported), ``rss_before_stream_mb``, ``state_mb`` (the
carried memory states and caches at the end), ``ce`` (mean next-token cross-entropy, nats), ``seconds``, and
``window`` / ``sinks`` for the converted model. The table's last lines compare the converted model's peak and
carried state at the longest length with the shortest (both should stay flat).

Threads: one intra-op thread by default — on a small shared CPU two contending threads can run an order of
magnitude slower (barrier spinning); the memory figures do not depend on it.

Text: the Gutenberg books of the shared data folder if present, else the embedded book, else a generated text;
tokens are repeated if the text is too short for a length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LENGTHS = (1024, 4096, 16384, 65536)
BASELINE_MAX = 16384
WINDOW = 512
CHUNK = 256
CHARS_PER_TOKEN = 6  # generous: SmolLM2 averages ~4 characters per token on English prose


# ---------------------------------------------------------------------------------------------- text
def bench_text(min_chars: int) -> str:
    """At least ``min_chars`` characters of natural text when available (deterministic)."""
    files: list[Path] = []
    try:
        from fednl.data.paths import EMBEDDED_BOOK, shared_subdir

        gutenberg = shared_subdir("gutenberg-nltk")
        if gutenberg is not None:
            files = sorted(gutenberg.glob("*.txt"))
        if not files and EMBEDDED_BOOK.is_file():
            files = [EMBEDDED_BOOK]
    except ImportError:  # the data package is optional for this benchmark
        files = []
    parts: list[str] = []
    total = 0
    for f in files:
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
        if total >= min_chars:
            break
    if total == 0:
        words = ("the memory keeps what the window forgets while the stream goes on and on "
                 "through rivers hills and towns of a long and patient story").split()
        sentence_count = min_chars // 40 + 1
        parts = [" ".join(words[(i * 7) % len(words):] + words[: (i * 7) % len(words)]) + ". "
                 for i in range(sentence_count)]
    return "\n".join(parts)


def _rss_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the process's resident-set high-water mark (Linux ``clear_refs`` value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- worker
def worker(model: str, tokens: int, *, window: int, chunk: int, threads: int,
           sinks: int | None = None) -> dict[str, object]:
    """Stream ``tokens`` tokens through one model in this process; return its record."""
    import torch

    from fednl.models import MemoryConfig, ModelConfig, StreamingLM, clear_backbone_cache, convert_to_titans
    from fednl.models import load_backbone

    if model not in ("converted", "baseline"):
        raise ValueError(f"model must be 'converted' or 'baseline', got {model!r}")
    torch.set_num_threads(threads)
    backbone, tok = load_backbone(ModelConfig(source="smollm2"))
    clear_backbone_cache()  # converted in place below (no second copy in memory): keep it out of the cache
    if model == "converted":
        convert_to_titans(backbone, MemoryConfig(attn_window=window, attn_sinks=sinks), seed=0)
    ids = tok.encode(bench_text(tokens * CHARS_PER_TOKEN))
    while len(ids) < tokens:
        ids = ids + ids
    stream = torch.tensor([ids[:tokens]], dtype=torch.long)
    lm = StreamingLM(backbone)
    rss_before = _rss_mb("VmRSS")
    reset = _reset_peak()
    nll = 0.0
    start = time.perf_counter()
    for s in range(0, tokens, chunk):
        lp = lm.feed(stream[:, s : s + chunk])
        nxt = stream[:, s + 1 : s + 1 + lp.shape[1]]
        nll -= float(lp[:, : nxt.shape[1]].gather(-1, nxt.unsqueeze(-1)).sum())
        del lp
    seconds = time.perf_counter() - start
    return {
        "model": model,
        "tokens": tokens,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "stream_peak_rss_mb": round(_rss_mb("VmHWM") or 0.0, 1) if reset else None,
        "rss_before_stream_mb": None if rss_before is None else round(rss_before, 1),
        "state_mb": round(lm.state_nbytes() / 2**20, 2),
        "ce": round(nll / max(1, tokens - 1), 4),
        "seconds": round(seconds, 1),
        "window": window if model == "converted" else None,
        "sinks": MemoryConfig(attn_window=window, attn_sinks=sinks).sinks if model == "converted" else None,
        "chunk": chunk,
    }


def _spawn(model: str, tokens: int, *, window: int, chunk: int, threads: int, timeout: float | None,
           sinks: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "fednl.bench.inference_memory", "--worker", model, "--tokens", str(tokens),
           "--window", str(window), "--chunk", str(chunk), "--threads", str(threads)]
    if sinks is not None:
        cmd += ["--sinks", str(sinks)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-600:]
        raise RuntimeError(f"{model} at {tokens} tokens failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- driver
def run(
    json_out: bool = False,
    *,
    lengths: Sequence[int] = LENGTHS,
    baseline_max: int = BASELINE_MAX,
    window: int = WINDOW,
    chunk: int = CHUNK,
    threads: int = 1,
    timeout: float | None = None,
    sinks: int | None = None,
) -> list[dict]:
    """Run every (model, length) in a fresh process; print a JSON list (``json_out``) or a table. ``sinks``:
    the converted model's sink tokens (``None``: 4, the default beside a window)."""
    if not lengths or min(lengths) < 2:
        raise ValueError(f"lengths must be integers >= 2; got {list(lengths)}")
    if window < 1 or chunk < 1:
        raise ValueError(f"window and chunk must be >= 1; got window={window}, chunk={chunk}")
    if sinks is not None and sinks < 0:
        raise ValueError(f"sinks must be >= 0; got {sinks}")
    from fednl.models.loading import ensure_smollm2_cache

    ensure_smollm2_cache()  # convert the GGUF once here, so no worker's peak includes the conversion
    records: list[dict] = []
    for model in ("converted", "baseline"):
        for n in lengths:
            if model == "baseline" and n > baseline_max:
                break
            try:
                rec = _spawn(model, n, window=window, chunk=chunk, threads=threads, timeout=timeout, sinks=sinks)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                if model == "converted":
                    raise
                print(f"baseline stopped at {n} tokens: {exc}", file=sys.stderr)  # it could not fit this length
                break
            records.append(rec)
            print(f"  {rec['model']:>9} {rec['tokens']:>6} tokens: peak {rec['peak_rss_mb']} MB, "
                  f"{rec['seconds']} s", file=sys.stderr, flush=True)
    if json_out:
        print(json.dumps(records))
    else:
        print(format_table(records))
    return records


def format_table(records: list[dict]) -> str:
    lines = [f"{'model':<10} {'tokens':>7} {'peak_rss_mb':>12} {'stream_peak':>12} {'state_mb':>9} {'ce':>7} "
             f"{'seconds':>8}"]
    for r in records:
        lines.append(f"{r['model']:<10} {r['tokens']:>7} {r['peak_rss_mb']:>12} {str(r['stream_peak_rss_mb']):>12} "
                     f"{r['state_mb']:>9} {r['ce']:>7} {r['seconds']:>8}")
    conv = sorted((r for r in records if r["model"] == "converted"), key=lambda r: r["tokens"])
    if len(conv) >= 2:
        growth = 100.0 * (conv[-1]["peak_rss_mb"] / conv[0]["peak_rss_mb"] - 1.0)
        lines.append(f"converted peak at {conv[-1]['tokens']} tokens vs {conv[0]['tokens']}: {growth:+.2f}% "
                     f"(target <= +5%)")
        flat = "flat" if conv[-1]["state_mb"] == conv[0]["state_mb"] else "GROWS"
        lines.append(f"converted carried state at {conv[-1]['tokens']} tokens vs {conv[0]['tokens']}: "
                     f"{conv[-1]['state_mb']} MB vs {conv[0]['state_mb']} MB ({flat})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=("converted", "baseline"), help="internal: run one measurement")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--baseline-max", type=int, default=BASELINE_MAX)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--sinks", type=int, default=None)
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.tokens, window=a.window, chunk=a.chunk, threads=a.threads,
                                sinks=a.sinks)))
    else:
        run(json_out=a.json, lengths=a.lengths, baseline_max=a.baseline_max, window=a.window, chunk=a.chunk,
            threads=a.threads, sinks=a.sinks)


if __name__ == "__main__":
    main()
