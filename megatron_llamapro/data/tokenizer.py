"""Tokenizers shared by preprocessing and training.

Two kinds, both loaded from local files only (never from a hub):

* ``sentencepiece``: a LLaMA-2 style ``tokenizer.model``.
* ``hf`` (alias ``huggingface``): a LLaMA-3 / Qwen style ``tokenizer.json`` (a file, or a directory
  holding one, such as an HF checkpoint), read with the ``tokenizers`` library. Special tokens come
  from ``tokenizer_config.json`` / ``special_tokens_map.json`` next to it when present, else from
  well-known token names. A config that sets ``bos_token`` to null (Qwen) has no BOS: ``bos_id`` is None.

The objects satisfy what megatron-core's ``GPTDataset`` asks of ``config.tokenizer``
(``vocab_size``, ``eod``, ``pad``, ``eos``, ``unique_identifiers``) and subclass
``megatron.core.tokenizers.MegatronTokenizerBase``.

Padding, deliberately two attributes:

* ``pad`` (megatron-core's name): the vocabulary's dedicated pad id, or ``-1`` when it has none
  (LLaMA-2 and LLaMA-3 base tokenizers have none). ``-1`` is megatron-core's own "no pad" sentinel,
  so GPTDataset never mistakes an EOS in the data for padding and does not warn about a clash.
* ``pad_id``: the id to fill padded tensor positions with: the dedicated pad id if any, else
  ``eos_id`` (the usual LLaMA practice). Always a valid embedding row.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_llamapro.errors import UserError

TOKENIZER_TYPES = ("sentencepiece", "hf")
TYPE_ALIASES = {"huggingface": "hf"}

_HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class TokenizerError(UserError):
    """A tokenizer that cannot be loaded; the message is one line."""


class Tokenizer(MegatronTokenizerBase):
    """Common interface; see the module docstring for the meaning of ``pad`` vs ``pad_id``."""

    tokenizer_type: str

    def __init__(self, path: Path, bos_id: int | None, eos_id: int, dedicated_pad_id: int | None,
                 unk_id: int | None, vocab_size: int) -> None:
        super().__init__(str(path), {})
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._dedicated_pad_id = dedicated_pad_id
        self._unk_id = unk_id
        self._vocab_size = vocab_size
        self._content_hash: str | None = None

    # tokenize(text) -> list[int] (no BOS/EOS), detokenize(ids) -> str and the vocab property
    # stay abstract (declared by MegatronTokenizerBase); each subclass implements them.

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(text) for text in texts]

    def apply_chat_template(self, *args, **kwargs):
        raise TokenizerError("chat templates are not supported: this project trains base models")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def pad_id(self) -> int:
        return self._eos_id if self._dedicated_pad_id is None else self._dedicated_pad_id

    # megatron-core attribute names
    @property
    def bos(self) -> int | None:
        return self._bos_id

    @property
    def eos(self) -> int:
        return self._eos_id

    @property
    def eod(self) -> int:
        return self._eos_id

    @property
    def pad(self) -> int:
        return -1 if self._dedicated_pad_id is None else self._dedicated_pad_id

    @property
    def files(self) -> list[Path]:
        return tokenizer_files(self.tokenizer_type, self.path)

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Part of megatron-core's dataset cache key: keyed on file contents, not on the path,
        so a tokenizer copied into a checkpoint still hits the same index cache."""
        if self._content_hash is None:
            digest = hashlib.sha256()
            for file in self.files:
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
            self._content_hash = digest.hexdigest()
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"),
             ("tokenizer_type", self.tokenizer_type),
             ("sha256", self._content_hash)]
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad})")


class SentencePieceTokenizer(Tokenizer):
    tokenizer_type = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece

        model_file = Path(model_file)
        if not model_file.is_file():
            raise TokenizerError(f"sentencepiece model not found: {model_file}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"cannot load sentencepiece model {model_file}: "
                                 f"{str(err).splitlines()[0]}") from None
        sp = self._sp
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise TokenizerError(f"sentencepiece model {model_file} lacks a BOS or EOS id")
        super().__init__(
            model_file,
            bos_id=sp.bos_id(),
            eos_id=sp.eos_id(),
            dedicated_pad_id=sp.pad_id() if sp.pad_id() >= 0 else None,
            unk_id=sp.unk_id() if sp.unk_id() >= 0 else None,
            vocab_size=sp.get_piece_size(),
        )

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}


class HFTokenizer(Tokenizer):
    tokenizer_type = "hf"

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        json_file = _hf_tokenizer_json(Path(path))
        try:
            self._tok = RustTokenizer.from_file(str(json_file))
        except Exception as err:  # the Rust side raises a bare Exception
            raise TokenizerError(f"cannot load {json_file}: {str(err).splitlines()[0]}") from None
        specials = _hf_special_tokens(json_file.parent)
        bos = None if specials.get("bos_token", "") is None \
            else self._special_id(specials.get("bos_token"), _BOS_CANDIDATES, "BOS", json_file)
        eos = self._special_id(specials.get("eos_token"), _EOS_CANDIDATES, "EOS", json_file)
        pad = self._special_id(specials.get("pad_token"), _PAD_CANDIDATES, None, json_file)
        unk = self._special_id(specials.get("unk_token"), (), None, json_file)
        if pad == eos:
            pad = None  # a config that aliases pad to eos has no dedicated pad token
        super().__init__(Path(path), bos_id=bos, eos_id=eos, dedicated_pad_id=pad, unk_id=unk,
                         vocab_size=self._tok.get_vocab_size(with_added_tokens=True))

    def _special_id(self, configured: str | None, candidates: Sequence[str], role: str | None,
                    json_file: Path) -> int | None:
        names = [configured] if configured else list(candidates)
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if role is not None:
            raise TokenizerError(f"{json_file}: cannot find the {role} token (tried {names}); "
                                 f"put {role.lower()}_token in tokenizer_config.json")
        return None

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


def _hf_tokenizer_json(path: Path) -> Path:
    json_file = path / "tokenizer.json" if path.is_dir() else path
    if not json_file.is_file():
        raise TokenizerError(f"hf tokenizer file not found: {json_file}")
    return json_file


def _hf_special_tokens(directory: Path) -> dict[str, str | None]:
    """bos/eos/pad/unk token strings from tokenizer_config.json, then special_tokens_map.json.
    tokenizer_config.json's explicit `"bos_token": null` (Qwen: no BOS) is kept as None."""
    specials: dict[str, str] = {}
    for name in reversed(_HF_CONFIG_FILES):  # tokenizer_config.json wins
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise TokenizerError(f"malformed {file}: {err}") from None
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = data.get(key)
            if isinstance(value, dict):  # AddedToken serialisation
                value = value.get("content")
            if isinstance(value, str) and value:
                specials[key] = value
            elif key == "bos_token" and key in data and value is None and name == "tokenizer_config.json":
                specials[key] = None
    return specials


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | Path) -> Tokenizer:
    """Load a tokenizer from local files. ``tokenizer_type``: 'sentencepiece' or 'hf' ('huggingface')."""
    tokenizer_type = TYPE_ALIASES.get(tokenizer_type, tokenizer_type)
    if tokenizer_type == "sentencepiece":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "hf":
        return HFTokenizer(tokenizer_model)
    raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r}; expected one of "
                         f"{', '.join(TOKENIZER_TYPES)}")


def tokenizer_files(tokenizer_type: str, tokenizer_model: str | Path) -> list[Path]:
    """The files a checkpoint must copy to carry this tokenizer (existing ones only)."""
    tokenizer_type = TYPE_ALIASES.get(tokenizer_type, tokenizer_type)
    path = Path(tokenizer_model)
    if tokenizer_type == "sentencepiece":
        if not path.is_file():
            raise TokenizerError(f"sentencepiece model not found: {path}")
        return [path]
    if tokenizer_type == "hf":
        json_file = _hf_tokenizer_json(path)
        configs = [json_file.parent / name for name in _HF_CONFIG_FILES]
        return [json_file] + [file for file in configs if file.is_file()]
    raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r}; expected one of "
                         f"{', '.join(TOKENIZER_TYPES)}")


def tokenizer_in_directory(directory: str | Path) -> tuple[str, Path]:
    """(type, model path) of the tokenizer a directory of tokenizer files holds (an HF checkpoint,
    or the tokenizer folder of a Megatron one): tokenizer.model first, as LLaMA-2 ships both."""
    directory = Path(directory)
    if (directory / "tokenizer.model").is_file():
        return "sentencepiece", directory / "tokenizer.model"
    if (directory / "tokenizer.json").is_file():
        return "hf", directory
    raise TokenizerError(f"{directory}: no tokenizer.model or tokenizer.json")
