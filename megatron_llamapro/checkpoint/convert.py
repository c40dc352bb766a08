"""Write any checkpoint source in any format and layout.

One driver serves convert (HF -> Megatron), export (Megatron -> HF), reshard and expansion: they
differ only in the source they hand it.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from pathlib import Path
from typing import Callable

from megatron_llamapro.arch import torch_dtype
from megatron_llamapro.checkpoint.hf import write_hf
from megatron_llamapro.checkpoint.integrity import record_checksums
from megatron_llamapro.checkpoint.layout import Layout
from megatron_llamapro.checkpoint.legacy import write_legacy_file
from megatron_llamapro.checkpoint.manifest import (
    TOKENIZER_DIR,
    Manifest,
    copy_tokenizer_files,
)
from megatron_llamapro.checkpoint.source import TensorSource
from megatron_llamapro.checkpoint.tracker import iteration_dir, write_tracker
from megatron_llamapro.errors import UserError
from megatron_llamapro.fsutil import atomic_output_dir, progress

FORMATS = ("torch", "torch_dist", "hf")


def target_manifest(source: TensorSource, fmt: str, layout: Layout, dtype: str | None,
                    divisible_by: int | None) -> Manifest:
    """The manifest of the output: same model, new format/layout/dtype/padding."""
    src = source.manifest
    arch = src.arch
    arch.check_parallel(layout.tp, layout.pp, layout.vpp)
    divisible_by = divisible_by or src.make_vocab_size_divisible_by
    padded = arch.vocab_size if fmt == "hf" else arch.padded_vocab_size(layout.tp, divisible_by)
    return src.replace(padded_vocab_size=padded, make_vocab_size_divisible_by=divisible_by,
                       layout=layout if fmt == "torch" else Layout(), dtype=dtype or src.dtype, format=fmt)


def _write_legacy_unit(make_source: Callable[[], TensorSource], out: str, manifest: Manifest,
                       tp_rank: int, stage: int, iteration, allow_non_finite: bool) -> tuple[str, list[str]]:
    with make_source() as source:
        file = write_legacy_file(source, Path(out), manifest, tp_rank, stage, iteration,
                                 torch_dtype(manifest.dtype), allow_non_finite=allow_non_finite)
        return str(file), [str(f) for f in getattr(source, "files_opened", [])]


def write_checkpoint(make_source: Callable[[], TensorSource], out: Path, fmt: str, layout: Layout,
                     dtype: str | None = None, divisible_by: int | None = None,
                     overwrite: bool = False, workers: int = 1,
                     manifest_update: Callable[[Manifest], Manifest] | None = None,
                     max_shard_bytes: int = 5 * 1024**3, allow_non_finite: bool = False) -> dict:
    """Write the checkpoint `make_source()` describes to `out` atomically; returns a summary.

    `make_source` is called once per worker (it must be picklable for workers > 1), so each
    process reads only what its output files need. `max_shard_bytes` applies to the hf format.
    A NaN/Inf tensor is refused by name unless `allow_non_finite`. The Megatron formats get a
    checksums.json (integrity.py) that every later reader verifies.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    with make_source() as source:
        manifest = target_manifest(source, fmt, layout, dtype, divisible_by)
        if manifest_update is not None:
            manifest = manifest_update(manifest)
        tok_dir = source.tokenizer_dir()
    summary = {"format": fmt, "layout": manifest.layout.describe(), "files": {}}
    with atomic_output_dir(out, overwrite) as tmp:
        if fmt == "hf":
            with make_source() as source, progress(None, "export", "B") as bar:
                if manifest_update is not None:
                    source.manifest = manifest_update(source.manifest)
                write_hf(source, tmp, manifest.dtype, max_shard_bytes=max_shard_bytes, bar=bar,
                         allow_non_finite=allow_non_finite)
        else:
            it_dir = iteration_dir(tmp, "release")
            if fmt == "torch":
                units = [(t, s) for s in range(manifest.layout.pp) for t in range(manifest.layout.tp)]
                if workers > 1 and len(units) > 1:
                    ctx = mp.get_context("spawn")
                    with cf.ProcessPoolExecutor(min(workers, len(units)), mp_context=ctx) as pool:
                        futures = [pool.submit(_write_legacy_unit, make_source, str(it_dir), manifest, t, s,
                                               "release", allow_non_finite) for t, s in units]
                        results = [f.result() for f in futures]
                else:
                    results = []
                    with progress(len(units), "shards", "file") as bar:
                        for t, s in units:
                            results.append(_write_legacy_unit(make_source, str(it_dir), manifest, t, s, "release",
                                                              allow_non_finite))
                            bar.update(1)
                summary["files"] = {Path(f).relative_to(tmp).as_posix(): opened for f, opened in results}
            else:
                from megatron_llamapro.checkpoint.dist import write_dist

                with make_source() as source:
                    write_dist(source, it_dir, manifest, allow_non_finite=allow_non_finite)
            record_checksums(it_dir)
            write_tracker(tmp, "release")
            manifest.write(tmp)
            if tok_dir is not None:
                copy_tokenizer_files(tok_dir, tmp / TOKENIZER_DIR)
    summary["manifest"] = manifest
    return summary
