"""Conveniences that tie loading and the tokenizer together for library users and the CLI."""

from __future__ import annotations

from .loading import LoadedModel
from .tokenizer import Tokenizer, find_tokenizer


def load_tokenizer(loaded: LoadedModel, override: str | None = None) -> Tokenizer:
    """The tokenizer for a loaded model (its own tokenizer.json, --tokenizer, or GPT-NeoX-20B).

    Refuses a tokenizer whose vocabulary is larger than the model's embedding: its high ids
    would index past the embedding table.
    """
    config = loaded.model.config
    if loaded.tokenizer_json is not None and override is None:  # embedded in a GGUF file
        tokenizer = Tokenizer(loaded.path, config.bos_token_id, config.eos_token_id, json_text=loaded.tokenizer_json)
    else:
        tokenizer = Tokenizer(find_tokenizer(loaded.path, override), config.bos_token_id, config.eos_token_id)
    if tokenizer.vocab_size > config.vocab_size:
        from .errors import MambaError

        raise MambaError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model embeds only "
            f"{config.vocab_size}; pass the model's own tokenizer with --tokenizer"
        )
    return tokenizer
