"""The tokenizer: `tokenizer.json` through the `tokenizers` library, plus UTF-8-safe streaming.

Prompts are encoded exactly as their tokenizer.json defines (its post-processor decides whether
a BOS is added; GPT-NeoX's adds none), which is what transformers' pipeline does for these models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MambaError


class Tokenizer:
    """Encode/decode text, and know the special ids generation and evaluation need."""

    def __init__(self, path: str | Path, bos_token_id: int | None = None, eos_token_id: int | None = None, json_text: str | None = None):
        """Read `path` (a tokenizer.json), or `json_text` (its content, e.g. from a GGUF file)."""
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        try:
            self._tok = _HFTokenizer.from_str(json_text) if json_text is not None else _HFTokenizer.from_file(str(self.path))
        except FileNotFoundError:
            raise MambaError(f"tokenizer {self.path} does not exist; pass --tokenizer PATH_OR_ID") from None
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise MambaError(f"{self.path}: not a valid tokenizer.json ({str(exc).splitlines()[0][:120]})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id if bos_token_id is not None else eos_token_id
        # Does the post-processor add a BOS of its own (llama-style), or nothing (GPT-NeoX)?
        probe = self._tok.encode("a").ids
        self.adds_bos = len(probe) > 1 and probe[0] != self._tok.encode("a", add_special_tokens=False).ids[0]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, special tokens added only if the tokenizer's post-processor does."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_stream(self, pieces: Iterable[str], add_special_tokens: bool = False, block_chars: int = 1 << 16) -> Iterator[tuple[str, list[int], list[tuple[int, int]]]]:
        """Encode a long text given as pieces, block by block: (block text, ids, character spans).

        With a GPT-2-style byte-level pre-tokenizer (every Mamba tokenizer), the text is encoded in
        blocks of about `block_chars` characters, cut only where that pre-tokenizer always splits
        the same way: after a newline followed by a space and a non-space (the space belongs to
        the next word), or between a non-space, a newline and a non-space. The ids then equal a
        single encode (tested on WikiText-2 with both shipped tokenizers), while neither the text
        nor the tokenizer's temporary memory (hundreds of bytes per token) grows with its length.
        Other pre-tokenizers get one encode of the whole text.
        """
        blockwise = _byte_level_regex(self._tok.pre_tokenizer)
        buffer, searched, first = "", block_chars, True
        for piece in pieces:
            buffer += piece
            while blockwise and len(buffer) > block_chars:
                match = _SAFE_CUT.search(buffer, searched)
                if match is None:
                    searched = max(len(buffer) - 2, block_chars)  # the lookahead may need the next piece
                    break
                block, buffer, searched = buffer[: match.end()], buffer[match.end() :], block_chars
                yield self._encode_block(block, add_special_tokens and first)
                first = False
        if buffer or first:
            yield self._encode_block(buffer, add_special_tokens and first)

    def _encode_block(self, text: str, add_special_tokens: bool) -> tuple[str, list[int], list[tuple[int, int]]]:
        encoding = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return text, encoding.ids, encoding.offsets

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ids outside the vocabulary decode to nothing)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id (None outside the vocabulary)."""
        return self._tok.id_to_token(token_id)

    def stream(self) -> "StreamDecoder":
        """A decoder that turns ids, one at a time, into text pieces that are valid UTF-8."""
        return StreamDecoder(self)


_SAFE_CUT = re.compile(r"\n(?= \S)|(?<=\S)\n(?=\S)")


def _byte_level_regex(pre_tokenizer) -> bool:
    """True for a ByteLevel pre-tokenizer that splits with the GPT-2 regex."""
    return type(pre_tokenizer).__name__ == "ByteLevel" and bool(getattr(pre_tokenizer, "use_regex", True))


class StreamDecoder:
    """Incremental detokenizer: emits text only once the bytes decoded so far form whole characters.

    Byte-level BPE splits multi-byte characters across tokens; decoding a prefix then shows U+FFFD.
    We re-decode a short window of recent ids and emit only the new, complete suffix.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window re-decoded each time
        self.read = 0  # ids before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix : self.read])
        full_text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            piece = full_text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """The remaining text at the end of generation (may include U+FFFD for a cut character)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix : self.read])
        full_text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return full_text[len(prefix_text) :]


def find_tokenizer(model_dir: Path, override: str | None = None) -> Path:
    """The tokenizer.json to use: --tokenizer if given, the model's own, else GPT-NeoX-20B's."""
    from .loading import DEFAULT_TOKENIZER  # here, not at the top: loading imports torch

    if override is None:
        own = model_dir / "tokenizer.json"
        if own.is_file():
            return own
        override = DEFAULT_TOKENIZER
    candidate = Path(override).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        if (candidate / "tokenizer.json").is_file():
            return candidate / "tokenizer.json"
        raise MambaError(f"--tokenizer {override}: directory has no tokenizer.json")
    return _download_tokenizer(override)


def _download_tokenizer(repo_id: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "tokenizer.json"))
    except LocalEntryNotFoundError:
        raise MambaError(
            f"tokenizer {repo_id} is not in the local cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached; "
            f"pass --tokenizer with a local tokenizer.json"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise MambaError(f"cannot fetch tokenizer {repo_id}: {str(exc).splitlines()[0]}; pass --tokenizer PATH") from None
