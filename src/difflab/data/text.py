"""Text data: the built-in corpus, user text, tokenizers, and packing into fixed-length sequences.

Sources (:func:`load_documents` resolves any of them from one string):

- the built-in corpus ``shakespeare``: 42 works of Shakespeare (Project Gutenberg's 1998
  modern-spelling e-texts, public domain), 5.0 M characters, shipped gzipped in
  ``difflab/data/corpus/`` and made by ``scripts/build_corpus.py``; one document per work;
- a ``.txt`` file (one document, or one per ``separator``-delimited piece) or a folder of them;
- a Hugging Face ``datasets`` dataset saved with ``save_to_disk``, or named and already in the
  local cache (looked up offline: nothing is downloaded).

Tokenizers: :class:`CharTokenizer` (one id per character) and :class:`BPETokenizer` (byte-level
BPE trained locally with Hugging Face ``tokenizers``). Both put the special tokens at the same
fixed ids, ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<mask>`` 3, ``<unk>`` 4, and share one small
interface (``encode``, ``encode_batch``, ``decode``, ``vocab_size``, the ``*_id`` attributes,
``save``/``load`` as JSON); :func:`load_tokenizer` opens either kind.

Packing (:func:`pack_documents`): each document becomes ``<bos> tokens <eos>``; these are laid
out in rows of ``length`` tokens and the unused end is ``<pad>``. ``loss_mask`` is False exactly
on padding, so padding is never trained on as text.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from difflab.errors import UserError
from difflab.files import file_error

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<mask>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, MASK_ID, UNK_ID = range(len(SPECIAL_TOKENS))

CORPORA: dict[str, str] = {"shakespeare": "shakespeare.txt.gz"}
CORPUS_DOCUMENT_SEPARATOR = "\n\n\n"
VALIDATION_FRACTION = 0.05

_TEXT_EXTRA = "pip install 'difflab[text]'"


# ---------------------------------------------------------------- sources


@functools.cache
def load_corpus(name: str = "shakespeare") -> str:
    """The whole text of a built-in corpus; works are separated by two blank lines."""
    if name not in CORPORA:
        raise UserError(f"unknown built-in corpus {name!r}: choose {', '.join(CORPORA)}")
    resource = importlib.resources.files("difflab.data") / "corpus" / CORPORA[name]
    return gzip.decompress(resource.read_bytes()).decode("utf-8")


def corpus_documents(name: str = "shakespeare") -> list[str]:
    """A built-in corpus as a list of documents (for ``shakespeare``: the 42 works)."""
    return load_corpus(name).rstrip("\n").split(CORPUS_DOCUMENT_SEPARATOR)


def split_documents(
    documents: Sequence[str], validation_fraction: float = VALIDATION_FRACTION
) -> tuple[list[str], list[str]]:
    """The fixed ``(train, validation)`` split used everywhere (no randomness).

    With ``n >= k = round(1 / validation_fraction)`` documents, documents ``k-1, 2k-1, ...``
    (every k-th, counting from 1) are held out whole. With fewer, the last ``validation_fraction``
    of every document's characters, from the start of a line, is held out instead, and the rest
    stays in training. For ``shakespeare`` at 5% this holds out Macbeth and Twelfth Night
    (218 k characters, 4.3%).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise UserError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    stride = round(1.0 / validation_fraction)
    if len(documents) >= stride:
        held_out = set(range(stride - 1, len(documents), stride))
        train = [d for i, d in enumerate(documents) if i not in held_out]
        return train, [documents[i] for i in sorted(held_out)]
    train, validation = [], []
    for document in documents:
        cut = int(len(document) * (1.0 - validation_fraction))
        line_start = document.find("\n", cut) + 1
        cut = line_start if line_start > 0 else cut
        train.append(document[:cut])
        validation.append(document[cut:])
    return [d for d in train if d], [d for d in validation if d]


def load_text_documents(path: str | Path, separator: str | None = None) -> list[str]:
    """Documents from a UTF-8 text file, or from every ``*.txt`` file under a folder (sorted).

    Each file is one document, or, with ``separator``, each non-empty piece between separators.
    """
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(root.rglob("*.txt"))
        if not files:
            raise UserError(f"folder {root} contains no .txt files")
    else:
        raise UserError(f"text path {root} does not exist")
    documents = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise file_error(e, file) from None
        pieces = text.split(separator) if separator else [text]
        documents.extend(piece for piece in pieces if piece.strip())
    if not documents:
        raise UserError(f"no text found in {root}")
    return documents


def load_hf_documents(
    name_or_path: str, split: str = "train", text_field: str = "text"
) -> list[str]:
    """The ``text_field`` column of a local Hugging Face dataset, one document per row.

    ``name_or_path`` is a folder written by ``save_to_disk`` or a dataset name already in the
    local ``datasets`` cache; the lookup runs with ``HF_DATASETS_OFFLINE=1``, so nothing is
    downloaded.
    """
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"loading the Hugging Face dataset {name_or_path!r} needs the `datasets` package: "
            f"{_TEXT_EXTRA}"
        ) from None
    datasets.config.HF_HUB_OFFLINE = True  # in case `datasets` was imported before
    source = Path(name_or_path)
    try:
        if source.is_dir():
            loaded = datasets.load_from_disk(str(source))
        else:
            loaded = datasets.load_dataset(name_or_path, split=split)
    except Exception as e:  # `datasets` raises many types; all mean "not available offline"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load Hugging Face dataset {name_or_path!r} offline from a saved folder or "
            f"the local cache: {reason}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(
                f"dataset {name_or_path!r} has no split {split!r} (it has {', '.join(loaded)})"
            )
        loaded = loaded[split]
    if text_field not in loaded.column_names:
        raise UserError(
            f"dataset {name_or_path!r} has no column {text_field!r} "
            f"(columns: {', '.join(loaded.column_names)})"
        )
    documents = [text for text in loaded[text_field] if text and text.strip()]
    if not documents:
        raise UserError(f"dataset {name_or_path!r} has no non-empty {text_field!r} rows")
    return documents


def load_documents(source: str, hf_split: str = "train", text_field: str = "text") -> list[str]:
    """Documents from a built-in corpus name, a text file or folder, or a local HF dataset.

    Resolution order: built-in name; existing file; folder saved by ``datasets.save_to_disk``
    (it holds ``dataset_dict.json`` or ``state.json``); other folder (its ``*.txt`` files);
    otherwise a dataset name in the local Hugging Face cache. A missing path that cannot be a
    dataset name (it starts with ``.``, ``/`` or ``~``, or ends in ``.txt``) is reported as such.
    """
    if source in CORPORA:
        return corpus_documents(source)
    path = Path(source)
    if path.is_file():
        return load_text_documents(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return load_hf_documents(source, hf_split, text_field)
        return load_text_documents(path)
    if source.startswith((".", "/", "~")) or path.suffix == ".txt":
        raise UserError(f"text path {source} does not exist")
    return load_hf_documents(source, hf_split, text_field)


# ---------------------------------------------------------------- tokenizers


class CharTokenizer:
    """One id per character: the five special tokens at ids 0..4, then the vocabulary's
    characters sorted by code point at ids 5, 6, .... Characters outside it encode to ``<unk>``.

    Encoding and decoding are vectorised over the text (code points via UTF-32 and a sorted
    lookup), so a corpus of millions of characters encodes in well under a second.
    """

    pad_id, bos_id, eos_id, mask_id, unk_id = PAD_ID, BOS_ID, EOS_ID, MASK_ID, UNK_ID

    def __init__(self, characters: Iterable[str]):
        chars = sorted(set(characters))
        if not chars or any(len(c) != 1 for c in chars):
            raise ValueError("a character vocabulary is a non-empty set of single characters")
        self.characters: tuple[str, ...] = tuple(chars)
        self._code_points = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._strings = np.array([*SPECIAL_TOKENS, *chars], dtype=object)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """The vocabulary is every character that occurs in ``texts``."""
        return cls(set().union(*(set(text) for text in texts)))

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.characters)

    def encode(self, text: str) -> list[int]:
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        rank = np.searchsorted(self._code_points, code_points)
        known = self._code_points[np.minimum(rank, len(self._code_points) - 1)] == code_points
        return np.where(known, rank + len(SPECIAL_TOKENS), UNK_ID).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(
        self, ids: Sequence[int] | Tensor | np.ndarray, skip_special_tokens: bool = True
    ) -> str:
        """Text of a 1-D id sequence; special tokens are dropped, or written as ``<name>``."""
        ids = np.asarray(ids.tolist() if isinstance(ids, Tensor) else ids, dtype=np.int64)
        if skip_special_tokens:
            ids = ids[ids >= len(SPECIAL_TOKENS)]
        return "".join(self._strings[ids])

    def save(self, path: str | Path) -> None:
        payload = {
            "type": "difflab-char",
            "special_tokens": SPECIAL_TOKENS,
            "characters": self.characters,
        }
        Path(path).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        payload = _read_json(path)
        if payload.get("type") != "difflab-char":
            raise UserError(f"{path} is not a difflab character tokenizer")
        _check_specials(payload.get("special_tokens", []), path)
        return cls(payload["characters"])


class BPETokenizer:
    """Byte-level BPE from Hugging Face ``tokenizers``, trained locally.

    Byte-level pre-tokenization makes every string encodable and decoding exact; the special
    tokens sit at ids 0..4 and are never produced from text (a literal ``"<eos>"`` in the text
    is encoded as ordinary bytes). Saved as the library's own ``tokenizer.json`` format.
    """

    pad_id, bos_id, eos_id, mask_id, unk_id = PAD_ID, BOS_ID, EOS_ID, MASK_ID, UNK_ID

    def __init__(self, tokenizer: Any):
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise UserError(
                    f"tokenizer must have {token!r} at id {expected_id} "
                    f"(difflab's special tokens are {', '.join(SPECIAL_TOKENS)} at ids 0..4)"
                )
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
    ) -> BPETokenizer:
        """Learn merges on ``texts`` up to ``vocab_size`` ids (specials and 256 bytes included)."""
        tokenizers = _import_tokenizers()
        if vocab_size < len(SPECIAL_TOKENS) + 256:
            raise UserError(f"BPE vocab_size must be at least {len(SPECIAL_TOKENS) + 256}")
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def decode(
        self, ids: Sequence[int] | Tensor | np.ndarray, skip_special_tokens: bool = True
    ) -> str:
        """Text of a 1-D id sequence; special tokens are dropped, or written as ``<name>``."""
        ids = ids.tolist() if isinstance(ids, (Tensor, np.ndarray)) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust library reports parse errors as plain Exception
            raise UserError(f"cannot read tokenizer {path}: {e}") from None


Tokenizer = CharTokenizer | BPETokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer saved by either class (the JSON says which)."""
    payload = _read_json(path)
    if payload.get("type") == "difflab-char":
        return CharTokenizer.load(path)
    if isinstance(payload.get("model"), dict):
        return BPETokenizer.load(path)
    raise UserError(f"{path} is neither a difflab character tokenizer nor a tokenizers JSON file")


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokenizer file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"tokenizer file {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise file_error(e, path) from None
    if not isinstance(payload, dict):
        raise UserError(f"tokenizer file {path} does not hold a JSON object")
    return payload


def _check_specials(specials: Sequence[str], path: str | Path) -> None:
    if tuple(specials) != SPECIAL_TOKENS:
        raise UserError(f"{path}: special tokens must be {', '.join(SPECIAL_TOKENS)}")


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UserError(
            f"BPE tokenization needs the Hugging Face `tokenizers` package: {_TEXT_EXTRA}"
        ) from None
    return tokenizers


# ---------------------------------------------------------------- packing


@dataclass
class PackedText(Dataset):
    """Fixed-length token rows ``(N, L)`` and their ``loss_mask`` (False exactly on ``<pad>``).

    Item ``i`` is ``(tokens[i], loss_mask[i])``.
    """

    tokens: Tensor
    loss_mask: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.tokens[index], self.loss_mask[index]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


def pack_documents(
    documents: Sequence[Sequence[int]],
    length: int,
    *,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    wrap: bool = True,
) -> PackedText:
    """Lay out ``<bos> doc <eos>`` for every tokenized document in rows of ``length`` tokens.

    ``wrap=True``: one continuous stream cut into rows (a document may straddle rows); only the
    last row is padded. ``wrap=False``: a document that does not fit in the rest of the current
    row starts a new row and the rest of the row is padded; a document longer than a row fills
    whole rows and continues in the next. ``loss_mask`` is True on every document, BOS and EOS
    token and False on padding.
    """
    if length < 2:
        raise UserError(f"sequence length must be at least 2, got {length}")
    if not documents:
        raise UserError("no documents to pack")
    arrays = [np.asarray(doc, dtype=np.int64).reshape(-1) for doc in documents]
    sizes = np.array([a.size + 2 for a in arrays], dtype=np.int64)
    if wrap:
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    else:
        starts = np.empty_like(sizes)
        position = 0
        for i, size in enumerate(sizes.tolist()):
            room = -position % length
            if 0 < room < size:
                position += room
            starts[i] = position
            position += size
    end = int(starts[-1] + sizes[-1])
    total = -(-end // length) * length
    stream = np.concatenate([np.concatenate([[bos_id], a, [eos_id]]) for a in arrays])
    offsets = np.arange(stream.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    positions = np.repeat(starts, sizes) + offsets
    tokens = np.full(total, pad_id, dtype=np.int64)
    loss_mask = np.zeros(total, dtype=bool)
    tokens[positions] = stream
    loss_mask[positions] = True
    return PackedText(
        torch.from_numpy(tokens.reshape(-1, length)),
        torch.from_numpy(loss_mask.reshape(-1, length)),
    )


def pack_texts(
    texts: Sequence[str], tokenizer: Tokenizer, length: int, wrap: bool = True
) -> PackedText:
    """Tokenize ``texts`` and :func:`pack_documents` them with the tokenizer's special ids."""
    return pack_documents(
        tokenizer.encode_batch(texts),
        length,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        wrap=wrap,
    )
