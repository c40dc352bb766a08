"""What a checkpoint carries besides weights: architecture, vocab padding, layout, tokenizer, expansion.

Stored as `llamapro.json` at the checkpoint root, with tokenizer files under `tokenizer/`, so every
later tool and the trainer can rebuild the model from the checkpoint alone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from megatron_llamapro.arch import LlamaArch
from megatron_llamapro.checkpoint.layout import Layout
from megatron_llamapro.errors import UserError
from megatron_llamapro.fsutil import write_text_atomic

MANIFEST_NAME = "llamapro.json"
TOKENIZER_DIR = "tokenizer"
EXPANSION_JSON = "llamapro_expansion.json"  # beside config.json in HF exports
FORMAT_VERSION = 1

# Files that make up a tokenizer in an HF directory (whichever exist are carried).
# Every file a Hugging Face tokenizer (and generation defaults) may consist of, whichever
# transformers version wrote it: the chat template lives in tokenizer_config.json (transformers 4),
# chat_template.jinja / .json and additional_chat_templates/ (transformers 5); BPE vocabularies as
# tokenizer.json or vocab.json + merges.txt; sentencepiece / tiktoken models.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
TOKENIZER_PATTERNS = ("*.tiktoken", "sentencepiece*.model", "tokenizer*.model", "tokenizer*.json")
TOKENIZER_SUBDIRS = ("additional_chat_templates",)


class ManifestError(UserError):
    pass


@dataclass(frozen=True)
class Expansion:
    """One expansion step: which global layers (of the expanded model) are new, copied from where."""

    original_num_layers: int
    new_layers: list[int]
    sources: dict[int, int]  # new global layer -> source layer index in the model it was expanded from
    placement: str

    def to_dict(self) -> dict:
        return {"original_num_layers": self.original_num_layers, "new_layers": list(self.new_layers),
                "sources": {str(k): v for k, v in self.sources.items()}, "placement": self.placement}

    @classmethod
    def from_dict(cls, data: dict) -> "Expansion":
        return cls(int(data["original_num_layers"]), [int(x) for x in data["new_layers"]],
                   {int(k): int(v) for k, v in data["sources"].items()}, data["placement"])


@dataclass(frozen=True)
class Manifest:
    arch: LlamaArch
    padded_vocab_size: int
    make_vocab_size_divisible_by: int = 128
    layout: Layout = Layout()
    dtype: str = "fp32"
    format: str = "torch"  # torch | torch_dist | hf
    tokenizer_type: str | None = None  # sentencepiece | hf
    expansions: list[Expansion] = field(default_factory=list)

    @property
    def trainable_layers(self) -> list[int]:
        """New blocks of the latest expansion, as global 0-based indices of the current model.

        Earlier expansions' blocks were trained in earlier stages; only the newest are trainable.
        """
        return list(self.expansions[-1].new_layers) if self.expansions else []

    def replace(self, **changes) -> "Manifest":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "arch": self.arch.to_dict(),
            "padded_vocab_size": self.padded_vocab_size,
            "make_vocab_size_divisible_by": self.make_vocab_size_divisible_by,
            "layout": self.layout.to_dict(),
            "dtype": self.dtype,
            "format": self.format,
            "tokenizer_type": self.tokenizer_type,
            "expansions": [e.to_dict() for e in self.expansions],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = MANIFEST_NAME) -> "Manifest":
        try:
            return cls(
                arch=LlamaArch.from_dict(data["arch"]),
                padded_vocab_size=int(data["padded_vocab_size"]),
                make_vocab_size_divisible_by=int(data.get("make_vocab_size_divisible_by", 128)),
                layout=Layout.from_dict(data["layout"]),
                dtype=data.get("dtype", "fp32"),
                format=data.get("format", "torch"),
                tokenizer_type=data.get("tokenizer_type"),
                expansions=[Expansion.from_dict(e) for e in data.get("expansions", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: malformed manifest ({exc})") from None

    def write(self, directory: Path) -> None:
        """Atomically: a full disk leaves no half-written manifest behind."""
        write_text_atomic(Path(directory) / MANIFEST_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc.msg})") from None
        return cls.from_dict(data, source=str(path))


def detect_tokenizer_type(directory: Path) -> str | None:
    directory = Path(directory)
    if (directory / "tokenizer.model").is_file():
        return "sentencepiece"
    if (directory / "tokenizer.json").is_file():
        return "hf"
    return None


def tokenizer_files(src_dir: Path) -> list[str]:
    """Names (relative, sorted) of the tokenizer files in src_dir: see TOKENIZER_FILES."""
    src_dir = Path(src_dir)
    names = {name for name in TOKENIZER_FILES if (src_dir / name).is_file()}
    for pattern in TOKENIZER_PATTERNS:
        names.update(p.name for p in src_dir.glob(pattern) if p.is_file())
    for sub in TOKENIZER_SUBDIRS:
        if (src_dir / sub).is_dir():
            names.update(p.relative_to(src_dir).as_posix() for p in (src_dir / sub).rglob("*") if p.is_file())
    return sorted(names)


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy every tokenizer file of src_dir into dst_dir byte for byte; returns their names."""
    copied = tokenizer_files(src_dir)
    for name in copied:
        target = Path(dst_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(src_dir) / name, target)
    return copied


def tokenizer_dir(checkpoint_dir: Path) -> Path | None:
    path = Path(checkpoint_dir) / TOKENIZER_DIR
    return path if path.is_dir() else None


# ---- checkpoints written by Megatron-LM (no llamapro.json) ------------------------------------

def resolve_tokenizer(path: Path, what: str = "--tokenizer-model") -> Path:
    """The directory holding the tokenizer `path` names: a directory with tokenizer.model or
    tokenizer.json, or one of those two files itself."""
    path = Path(path)
    if path.is_file() and path.name in ("tokenizer.model", "tokenizer.json"):
        path = path.parent
    elif path.is_file():
        raise ManifestError(f"{what} {path}: name the directory holding tokenizer.model or tokenizer.json, "
                            "or one of those files")
    if not path.is_dir():
        raise ManifestError(f"{what} {path}: no such file or directory")
    if detect_tokenizer_type(path) is None:
        raise ManifestError(f"{what} {path}: holds no tokenizer.model or tokenizer.json")
    return path.resolve()


def stored_tokenizer(args) -> Path | None:
    """Megatron-LM's `args.tokenizer_model` when it names a usable tokenizer on this machine.

    Megatron-LM pickles the string it was given; a relative one depended on that run's working
    directory and one from another machine usually does not exist here, so both are passed over
    (a tokenizer then comes from --tokenizer-model)."""
    value = getattr(args, "tokenizer_model", None)
    if not isinstance(value, str) or not Path(value).is_absolute():
        return None
    try:
        return resolve_tokenizer(Path(value), "args.tokenizer_model")
    except ManifestError:
        return None


def tokenizer_ids(tok_dir: Path) -> tuple[int, int | None, int | None]:
    """(vocabulary size, bos id, eos id) of the tokenizer in `tok_dir`."""
    from megatron_llamapro.data.tokenizer import build_tokenizer

    kind = detect_tokenizer_type(tok_dir)
    tokenizer = build_tokenizer(kind, tok_dir / "tokenizer.model" if kind == "sentencepiece" else tok_dir)
    return tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id


def manifest_from_megatron_args(args, source: str, fmt: str, tok_dir: Path | None) -> Manifest:
    """What a Megatron-LM checkpoint carries, rebuilt from its stored `args`.

    Megatron-LM stores only the padded vocabulary (`vocab_size` is set only for its NullTokenizer):
    the real size is args.vocab_size if set, else the tokenizer's; with neither, the padded size is
    kept, with a warning (an export then has `vocab_size` = the padded size)."""
    import warnings

    from megatron_llamapro.checkpoint.layout import Layout

    if args is None:
        raise ManifestError(f"{source}: no llamapro.json and no Megatron-LM args to rebuild the model")
    padded = getattr(args, "padded_vocab_size", None)
    if not padded:
        raise ManifestError(f"{source}: args lack padded_vocab_size (needed to rebuild the embedding)")
    vocab, bos, eos = getattr(args, "vocab_size", None), 1, 2
    if tok_dir is not None:
        tokenizer_vocab, bos, eos = tokenizer_ids(tok_dir)
        vocab = vocab or tokenizer_vocab
    if not vocab:
        warnings.warn(f"{source}: the checkpoint names no usable tokenizer and its args no vocab_size; "
                      f"taking the padded size {padded} as the vocabulary (pass --tokenizer-model for "
                      "the real size)", stacklevel=2)
        vocab = padded
    if vocab > padded:
        raise ManifestError(f"{source}: the tokenizer's vocabulary ({vocab}) is larger than the "
                            f"checkpoint's embedding ({padded} rows)")
    arch = LlamaArch.from_megatron_args(args, vocab, source, bos, eos)
    layout = Layout(getattr(args, "tensor_model_parallel_size", 1), getattr(args, "pipeline_model_parallel_size", 1),
                    getattr(args, "virtual_pipeline_model_parallel_size", None)) if fmt == "torch" else Layout()
    dtype = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "fp32"
    return Manifest(arch=arch, padded_vocab_size=int(padded),
                    make_vocab_size_divisible_by=int(getattr(args, "make_vocab_size_divisible_by", None) or 128),
                    layout=layout, dtype=dtype, format=fmt,
                    tokenizer_type=detect_tokenizer_type(tok_dir) if tok_dir is not None else None)
