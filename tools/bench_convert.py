"""Benchmark HF -> Megatron conversion: seconds, GB/s and peak RSS relative to the checkpoint size.

    python tools/bench_convert.py --shape 1b --work /tmp/bench [--layouts 1x1 2x2] [--export] [--keep]
    python tools/bench_convert.py --hidden 2048 --layers 16 --ffn 5504 --heads 16 --vocab 32000

Builds a random LLaMA-shaped HF checkpoint (bf16 safetensors, written tensor by tensor so building
it never holds the model in memory), then runs `tools/convert_hf_to_megatron.py` once per layout in
a fresh subprocess under GNU time, which reports that process's own peak RSS. The interpreter +
torch baseline RSS is measured the same way and reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_llamapro import cli  # noqa: E402
from megatron_llamapro.errors import UserError, entry_point, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # hidden, layers, ffn, heads, kv heads, vocab
    "tiny": dict(hidden=256, layers=4, ffn=688, heads=8, kv_heads=8, vocab=32000),
    "1b": dict(hidden=2048, layers=16, ffn=5504, heads=16, kv_heads=16, vocab=32000),
    "7b": dict(hidden=4096, layers=32, ffn=11008, heads=32, kv_heads=32, vocab=32000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="preset model shape")
    for name in ("hidden", "layers", "ffn", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{name}", type=cli.positive_int, default=None, help=f"override the preset's {name}")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x2"],
                        help="TPxPP layouts to convert to (default: 1x1 2x2)")
    parser.add_argument("--format", choices=["torch", "torch_dist"], default="torch")
    parser.add_argument("--workers", type=cli.positive_int, default=1, help="--workers for the converter")
    parser.add_argument("--export", action="store_true", help="also time Megatron -> HF for each layout")
    parser.add_argument("--shard-size", type=cli.size_arg, default=cli.parse_size("1GB"),
                        help="size of the generated HF safetensors files (default 1GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


# ---- building a random HF checkpoint -----------------------------------------------------------

def hf_config(shape: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape["hidden"], "intermediate_size": shape["ffn"],
        "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
        "num_hidden_layers": shape["layers"], "vocab_size": shape["vocab"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    }


def build_hf_checkpoint(out: Path, shape: dict, shard_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Random bf16 weights, one safetensors shard in memory at a time; returns (params, bytes)."""
    import torch

    from megatron_llamapro.arch import LlamaArch
    from megatron_llamapro.checkpoint.hf import write_safetensors
    from megatron_llamapro.checkpoint.weight_map import hf_model_shapes

    config = hf_config(shape)
    arch = LlamaArch.from_hf_config(config)
    shapes = hf_model_shapes(arch)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    files: list[dict] = []
    current: dict = {}
    current_bytes = 0
    params = 0

    def flush():
        nonlocal current, current_bytes
        if current:
            name = f"part-{len(files):05d}.safetensors"
            write_safetensors(out / name, current, {"format": "pt"})
            files.append({"name": name, "keys": list(current)})
            current, current_bytes = {}, 0

    for name, dims in shapes.items():
        if name.endswith("norm.weight"):
            tensor = (1.0 + 0.1 * torch.randn(dims, generator=gen)).to(torch.bfloat16)
        else:
            tensor = (0.02 * torch.randn(dims, generator=gen)).to(torch.bfloat16)
        size = tensor.numel() * 2
        if current and current_bytes + size > shard_bytes:
            flush()
        current[name] = tensor
        current_bytes += size
        params += tensor.numel()
    flush()
    weight_map, total = {}, 0
    for i, entry in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (out / entry["name"]).rename(out / final)
        total += (out / final).stat().st_size
        weight_map.update({k: final for k in entry["keys"]})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return params, total


# ---- measuring a subprocess --------------------------------------------------------------------

GNU_TIME = Path("/usr/bin/time")


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`; its wall seconds, exit status, stdout and peak RSS in bytes.

    Peak RSS comes from GNU time (`%M`, the child's own maximum resident set). wait4() on a child of
    this process would not do: Linux folds the RSS the child had before exec() - a copy of this
    (large) process - into its maximum. Without GNU time the child reports VmHWM itself.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        if GNU_TIME.exists():
            full = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *cmd]
        else:
            probe = ("import atexit, runpy, sys\n"
                     "def _hwm():\n"
                     "    for line in open('/proc/self/status'):\n"
                     "        if line.startswith('VmHWM:'):\n"
                     f"            open({str(rss_file)!r}, 'w').write(line.split()[1])\n"
                     "atexit.register(_hwm)\n"
                     "sys.argv = sys.argv[1:]\n"
                     "runpy.run_path(sys.argv[0], run_name='__main__')\n")
            full = [cmd[0], "-c", probe, *cmd[1:]] if cmd[1] != "-c" else cmd
        start = time.perf_counter()
        proc = subprocess.run(full, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        try:
            peak_kib = int(rss_file.read_text().split()[-1])
        except (FileNotFoundError, ValueError, IndexError):
            peak_kib = 0
    return {"cmd": cmd, "rc": proc.returncode, "wall_s": seconds, "stdout": proc.stdout,
            "stderr": proc.stderr, "peak_rss": peak_kib * 1024}


def tool_seconds(stdout: str) -> float | None:
    """The conversion time the tool itself reports ("... in 12.3 s ...")."""
    for line in stdout.splitlines():
        if line.startswith("wrote:") and " in " in line:
            try:
                return float(line.split(" in ")[1].split(" s")[0])
            except (IndexError, ValueError):
                return None
    return None


def parse_layout(text: str) -> tuple[int, int]:
    try:
        tp, pp = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--layouts {text}: expected TPxPP, e.g. 2x2") from None
    return tp, pp


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = dict(SHAPES[args.shape])
    for key in shape:
        override = getattr(args, key.replace("-", "_"), None)
        if override is not None:
            shape[key] = override
    layouts = [parse_layout(text) for text in args.layouts]
    work = args.work or Path(tempfile.mkdtemp(prefix="llamapro-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "hf"
    shutil.rmtree(hf_dir, ignore_errors=True)

    timer = cli.Timer()
    params, ckpt_bytes = build_hf_checkpoint(hf_dir, shape, args.shard_size, args.seed)
    print(f"built random HF checkpoint: {params / 1e9:.3f} B params, {cli.human_bytes(ckpt_bytes)} bf16 "
          f"in {timer.seconds:.1f} s ({hf_dir})")
    print(f"shape: {json.dumps(shape)}")

    baseline = run_measured([sys.executable, "-c",
                             "import torch, megatron_llamapro.checkpoint.convert, megatron_llamapro.checkpoint.hf"])
    base_rss = baseline["peak_rss"]
    print(f"baseline (python + torch + converter imports): peak RSS {cli.human_bytes(base_rss)}, "
          f"{baseline['wall_s']:.1f} s")

    results = {"shape": shape, "params": params, "checkpoint_bytes": ckpt_bytes, "baseline_rss": base_rss,
               "runs": []}
    header = f"{'run':<22}{'tool s':>8}{'wall s':>8}{'GB/s':>7}{'peak RSS':>11}{'RSS/ckpt':>10}{'(RSS-base)/ckpt':>17}"
    rows = [header, "-" * len(header)]
    for tp, pp in layouts:
        out = work / f"meg-tp{tp}-pp{pp}"
        cmd = [sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(hf_dir),
               "--out", str(out), "--tp", str(tp), "--pp", str(pp), "--format", args.format,
               "--workers", str(args.workers), "--overwrite"]
        runs = [(f"hf->meg tp{tp} pp{pp}", cmd)]
        if args.export:
            runs.append((f"meg->hf from tp{tp} pp{pp}", [
                sys.executable, str(REPO / "tools" / "convert_megatron_to_hf.py"), "--megatron-dir", str(out),
                "--out", str(work / f"hf-back-tp{tp}-pp{pp}"), "--overwrite"]))
        for label, command in runs:
            result = run_measured(command)
            if result["rc"] != 0:
                raise RuntimeError(f"{label} failed (exit {result['rc']}): {result['stderr'].strip()[-2000:]}")
            seconds = tool_seconds(result["stdout"]) or result["wall_s"]
            entry = {"run": label, "tool_s": seconds, "wall_s": result["wall_s"],
                     "gb_per_s": ckpt_bytes / seconds / 1e9, "peak_rss": result["peak_rss"],
                     "rss_ratio": result["peak_rss"] / ckpt_bytes,
                     "rss_above_baseline_ratio": (result["peak_rss"] - base_rss) / ckpt_bytes}
            results["runs"].append(entry)
            rows.append(f"{label:<22}{seconds:>8.1f}{result['wall_s']:>8.1f}{entry['gb_per_s']:>7.2f}"
                        f"{cli.human_bytes(result['peak_rss']):>11}{entry['rss_ratio']:>10.2f}"
                        f"{entry['rss_above_baseline_ratio']:>17.2f}")
            print(f"done: {label}", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / f"hf-back-tp{tp}-pp{pp}", ignore_errors=True)
    print()
    print(f"checkpoint {cli.human_bytes(ckpt_bytes)} ({params / 1e9:.3f} B params, bf16); format {args.format}, "
          f"workers {args.workers}; GB/s = checkpoint bytes / tool seconds")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not args.keep:
        shutil.rmtree(hf_dir, ignore_errors=True)
    print(f"total {timer.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    run(main)
