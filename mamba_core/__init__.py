"""mamba_core: Mamba language models in plain torch, with Hugging Face names and numerics.

    from mamba_core import MambaForCausalLM, load_tokenizer, stream
    model = MambaForCausalLM.from_pretrained("tiny-wikitext")

Attributes are imported lazily (PEP 562), so `import mamba_core.errors` stays torch-free and the
command line's --help is fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "MambaConfig": "config",
    "MambaCache": "cache",
    "MambaForCausalLM": "model",
    "MambaModel": "model",
    "MambaMixer": "model",
    "MambaError": "errors",
    "MambaUsageError": "errors",
    "load_model": "loading",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "api",
    "SamplingParams": "sampling",
    "Generation": "generation",
    "generate": "generation",
    "stream": "generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'mamba_core' has no attribute {name!r}")
