"""Speed on this machine: `python tests/bench.py [--repeats 5] [--quick] [--generation] [--profile] [--int8 CHECKPOINT] [--device cuda]`.

Prints medians of several repeats: the matmul peaks (fp32, bf16), training tokens/s and model FLOPs
utilisation (MFU) of the fast path against a plain fp32 eager path, generation with and without the
KV cache, tokenizer speed, and the peak memory of training on big ASCII and non-ASCII files. A
benchmark prints numbers; the tests never time anything."""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tinyllm as T  # noqa: E402


def timed(fn, n, warm=2):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def train_speed(cfg, batch, dtype, peak, steps, compile=False, profile=False, device="cpu", fused_adamw=None):
    model = T.GPT(cfg).to(device)
    fwd = torch.compile(model) if compile else model
    opt = T.make_optimizer(model, 1e-3, 0.1, device if fused_adamw is None else ("cuda" if fused_adamw else "cpu"))
    x = torch.randint(cfg.vocab_size, (batch, cfg.block_size), device=device)

    def step():
        for _ in range(10 if device == "cuda" else 1):   # a GPU step is short: time ten, then wait for them
            with T.autocast(device, dtype):
                _, loss = fwd(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    if profile:   # where a step's time goes, by operator (self time: not counting the ops it calls)
        from torch.profiler import profile as prof, ProfilerActivity
        timed(step, 1)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(steps):
                step()
        events = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        print("\n| operator | share of step time |\n| --- | --- |")
        for e in events[:15]:
            print(f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% |")
        return None
    tok_s = batch * cfg.block_size * (10 if device == "cuda" else 1) / timed(step, steps)
    n = sum(p.numel() for p in model.parameters())
    flops = 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size   # per token, forward + backward
    return tok_s, flops * tok_s / (peak[dtype] * 1e9)


def base_shapes():
    """The default thinking-corpus model at its default batch, and the issue's reference shape."""
    d = T.Config()
    return [(f"thinking corpus ({d.n_layer}x{d.n_embd}, {d.n_head} heads, block {d.block_size}, batch 8)",
             T.Config(vocab_size=512), 8),
            ("reference (6x160, 4 heads, block 128, batch 32)",
             T.Config(vocab_size=83, block_size=128, n_layer=6, n_head=4, n_embd=160), 32)]


def generation_table(model, lengths, r, dtype="fp32"):
    """Batch-1 greedy generation through each path, the paths taking turns within every repeat (a
    shared machine's speed drifts within a minute), medians of r. "FastDecoder" forces PyTorch's
    fast step; the default is what generate chooses (NumPy's for fp32 on a CPU)."""
    paths = {"no cache": dict(use_cache=False, fast=False), "KV cache, GPT.forward": dict(fast=False),
             "KV cache, FastDecoder": dict(decoder=lambda m, d, b: T.FastDecoder(m)),
             "KV cache, the default": dict()}
    print("\n| generation, batch 1, 64 new tokens, greedy | " + " tok/s | ".join(paths) + " tok/s | default / "
          "FastDecoder |\n" + "| --- " * (len(paths) + 2) + "|")
    chosen = T.fast_decoder
    for plen in lengths:
        prompt, speeds = [[1 + i % 100 for i in range(plen)]], {k: [] for k in paths}
        for _ in range(r):
            for name, kw in paths.items():
                T.fast_decoder = kw.get("decoder", chosen)
                flags = {k: v for k, v in kw.items() if k != "decoder"}
                speeds[name].append(64 / timed(lambda: T.generate(model, prompt, 64, dtype=dtype, **flags), 1, warm=1))
                T.fast_decoder = chosen
        med = [statistics.median(v) for v in speeds.values()]
        print(f"| context {plen} -> {plen + 64} | " + " | ".join(f"{m:,.0f}" for m in med) + f" | {med[-1] / med[2]:.2f}x |")
    print(f"(the default here: {type(T.fast_decoder(model, dtype, 1)).__name__})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller measurements, for a smoke test")
    ap.add_argument("--int8", metavar="CHECKPOINT", help="only compare a trained checkpoint with its int8 version")
    ap.add_argument("--profile", action="store_true", help="only profile the fast path at the reference shape")
    ap.add_argument("--generation", action="store_true", help="only the generation table")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the GPU path instead")
    a = ap.parse_args()
    if a.device == "cuda":
        return cuda_bench(a.repeats)
    if a.int8:
        return int8_table(a.int8, a.repeats)
    if a.generation:
        return generation_table(T.GPT(T.Config(vocab_size=512)).eval(), [32, 128], a.repeats)
    if a.profile:
        _, ref, batch = base_shapes()[1]
        return train_speed(ref, batch, T.pick_dtype("auto", "cpu"), {}, a.repeats, profile=True)
    r = a.repeats
    print(f"device cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, medians of {r} repeats")

    peak = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = torch.randn(4096, 192, dtype=dt), torch.randn(192, 768, dtype=dt)
        peak[name] = 2 * 4096 * 192 * 768 / timed(lambda: x @ y, max(r, 50)) / 1e9   # 5 ms each: many, for a stable median
    fast = T.pick_dtype("auto", "cpu")
    print(f"matmul (4096x192)@(192x768): fp32 {peak['fp32']:,.0f} GFLOP/s, bf16 {peak['bf16']:,.0f} GFLOP/s; "
          f"the fast path uses {fast}")

    print("\n| training shape | path | tokens/s | MFU | speed-up |\n| --- | --- | --- | --- | --- |")
    shapes = base_shapes()
    steps = 3 if a.quick else r
    for label, cfg, batch in shapes:
        plain = train_speed(T.Config(**{**T.asdict(cfg), "fused_attention": True}), batch, "fp32", peak, steps)
        quick = train_speed(cfg, batch, fast, peak, steps)
        print(f"| {label} | plain fp32 eager, fused attention | {plain[0]:,.0f} | {100 * plain[1]:.1f}% | 1.00x |")
        print(f"| {label} | fast: {fast} autocast, explicit attention | {quick[0]:,.0f} | {100 * quick[1]:.1f}% "
              f"| {quick[0] / plain[0]:.2f}x |")
        comp = train_speed(cfg, batch, fast, peak, steps, compile=True)
        print(f"| {label} | fast + torch.compile (`--compile`) | {comp[0]:,.0f} | {100 * comp[1]:.1f}% "
              f"| {comp[0] / plain[0]:.2f}x |")

    generation_table(T.GPT(T.Config(vocab_size=512)).eval(), [32, 128], r)   # up to the block, 192

    problems = T.make_training_problems(2000, 0, set())
    text = "".join("".join(T.problem_text(p)) + "\n\n" for p in problems)
    text = text * max(1, (4 if a.quick else 32) * 2 ** 20 // len(text))
    mb = len(text.encode()) / 2 ** 20
    char = T.CharTokenizer(set(text))
    bpe = T.BPETokenizer.train([text[:2_000_000]], 512)
    lines = text.split("\n")
    t_char = timed(lambda: char.encode_array(text), 3, warm=1)
    t_bpe = timed(lambda: bpe.encode_batch(lines), 1, warm=0)
    print(f"\ntokenizing {mb:.0f} MB: char {mb / t_char:,.0f} MB/s, bpe (batch encoder) {mb / t_bpe:,.1f} MB/s")

    with tempfile.TemporaryDirectory() as d:   # peak memory of a real training run, in a child process
        chunk = text[:4 * 2 ** 20]
        for kind, part in (("ASCII", chunk), ("non-ASCII", chunk.replace("a", "\u00e4").replace("o", "\u00f6"))):
            path = os.path.join(d, f"big-{kind}.txt")
            with open(path, "w", encoding="utf-8") as f:
                for _ in range(max(1, (3 if a.quick else 100) * 2 ** 20 // len(part.encode()))):
                    f.write(part)
            # the child reports its own high-water mark (VmHWM): ru_maxrss of a child would also count
            # this process's memory, which the child shares until it starts Python afresh
            args = ["train", "--data", path, "--max-iters", "5", "--eval-interval", "5",
                    "--out", os.path.join(d, "m.pt"), "--cache-dir", d, "--overwrite"]
            code = ("import runpy, sys\nsys.argv = [%r] + %r\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
                    "finally:\n    print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
                    % (os.path.join(ROOT, "tinyllm.py"), args))
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            hwm = [l for l in p.stdout.splitlines() if l.startswith("VmHWM")]
            if p.returncode or not hwm:
                print(p.stdout[-2000:], p.stderr[-2000:])
            else:
                mib = int(hwm[0].split()[1]) / 1024
                print(f"peak memory of training on a {os.path.getsize(path) / 2 ** 20:.0f} MB {kind} file: {mib:,.0f} MiB")


def cuda_bench(r):
    """The GPU path (bf16 autocast, fused AdamW, torch.compile) against plain fp32 eager on the same card."""
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, medians of {r} repeats")
    peak, n = {}, 8192
    for name, dt, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                           ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x, y = torch.randn(n, n, dtype=dt, device="cuda"), torch.randn(n, n, dtype=dt, device="cuda")

        def mm():
            for _ in range(5):
                x @ y
            torch.cuda.synchronize()
        peak[name] = 5 * 2 * n ** 3 / timed(mm, r) / 1e9
    torch.backends.cuda.matmul.allow_tf32 = False   # PyTorch's default: "fp32" below is true fp32
    print(f"matmul {n}^3: fp32 {peak['fp32'] / 1e3:,.0f} TFLOP/s, tf32 {peak['tf32'] / 1e3:,.0f}, "
          f"bf16 {peak['bf16'] / 1e3:,.0f}")

    print("\n| training shape | path | tokens/s | MFU | speed-up |\n| --- | --- | --- | --- | --- |")
    shapes = base_shapes()
    shapes.append(("reference, batch 512", shapes[1][1], 512))
    for label, cfg, batch in shapes:
        fused = T.Config(**{**T.asdict(cfg), "fused_attention": True})
        rows = [("plain fp32 eager, fused attention, AdamW (foreach)",
                 train_speed(fused, batch, "fp32", peak, r, device="cuda", fused_adamw=False)),
                ("bf16 autocast, fused attention, fused AdamW (the default)",
                 train_speed(fused, batch, "bf16", peak, r, device="cuda")),
                ("... + torch.compile",
                 train_speed(fused, batch, "bf16", peak, r, device="cuda", compile=True))]
        for path, (tok_s, mfu) in rows:
            print(f"| {label} | {path} | {tok_s:,.0f} | {100 * mfu:.2f}% | {tok_s / rows[0][1][0]:.2f}x |")

    generation_table(T.GPT(T.Config(vocab_size=512)).cuda().eval(), [32, 128], r, "bf16")


def int8_table(path, r):
    """Size, batch-1 generation speed, validation loss and accuracy of a checkpoint in fp32 and int8."""
    import io
    ck = T.load_checkpoint(path)
    model, tok = T.model_from_checkpoint(ck, path)
    model.eval()
    models = {"fp32": model, "int8 (dynamic, linear layers)": T.quantize_int8(model)}
    _, val = T.build_corpus(10, seed=ck["meta"]["settings"]["seed"])
    ids, weights, starts = T.corpus_arrays(val, tok)
    data = {"ids": ids, "weights": weights, "starts": starts}
    problems = T.make_split("questions", 300, seed=0)
    prompt = [tok.encode("Q: " + problems[0]["question"] + "\nA:")]
    print(f"{path}: {torch.get_num_threads()} threads, medians of {r} repeats\n")
    print("| weights | state dict size | generation tok/s (batch 1) | val loss | accuracy (300 questions) |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in models.items():
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        tok_s = 100 / timed(lambda: T.generate(m, prompt, 100), r, warm=1)
        loss = T.estimate_loss(m, {"val": data}, T.TrainSettings(batch_size=16, seed=0), "cpu", "fp32")["val"]
        acc = T.evaluate(m, tok, problems)["accuracy"]
        print(f"| {name} | {buf.tell() / 2 ** 20:.2f} MiB | {tok_s:,.0f} | {loss:.4f} | {100 * acc:.1f}% |")


if __name__ == "__main__":
    main()
