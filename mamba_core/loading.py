"""Finding and loading a model: short names, local directories, hub ids, either weight layout.

Resolution order for a name: an embedded short name (`tiny-wikitext`), an existing local path,
then a hub repo id (`org/name`) fetched with huggingface_hub into its usual cache (honouring
HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN). Weights load on the `meta` device first
and are then assigned tensor by tensor from a memory-mapped file, so no second full copy of the
model is ever held.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from .config import MambaConfig
from .errors import MambaError, MambaUsageError
from .model import MambaForCausalLM
from .quantize import quantize_model_

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"tiny-wikitext": ASSETS / "tiny-wikitext"}
DEFAULT_MODEL = "state-spaces/mamba-130m-hf"
DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
_HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "*.safetensors", "model.safetensors.index.json"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run, with where it came from (for reports and JSON output)."""

    model: MambaForCausalLM
    path: Path  # the local directory the files were read from
    name: str  # what the user asked for
    revision: str | None
    layout: str  # "hf", "original" or "gguf"
    tokenizer_json: str | None = None  # the tokenizer embedded in a GGUF file


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU and bfloat16 on CUDA; otherwise one of float32/bfloat16/float16."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise MambaUsageError(f"--dtype {name!r} is unknown; choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' is the first CUDA device if there is one, else the CPU; CUDA without CUDA is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MambaUsageError(f"--device {name!r} is unknown; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MambaUsageError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MambaUsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise MambaUsageError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_model_dir(name: str, revision: str | None = None, allow_config_only: bool = False) -> Path:
    """Turn a short name, local path or hub id into a local directory holding config.json."""
    if name in EMBEDDED:
        return EMBEDDED[name]
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not path.exists():
            raise MambaError(f"model path {name} does not exist")
        if not path.is_dir():
            raise MambaError(f"model path {name} is a file; give the directory that holds config.json")
        if not (path / "config.json").is_file():
            raise MambaError(f"model directory {name} has no config.json; is it a Hugging Face or state-spaces model directory?")
        return path
    return _download(name, revision, allow_config_only)


def _download(repo_id: str, revision: str | None, allow_config_only: bool) -> Path:
    """Fetch only the files a model needs from the hub (or find them in the local cache)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"{repo_id} (revision {revision or 'main'}) in {constants.HF_HUB_CACHE}"
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_FILES))
        if not list(path.glob("*.safetensors")) and not allow_config_only:
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["pytorch_model.bin", "config.json", "tokenizer.json"]))
    except GatedRepoError:
        raise MambaError(f"{repo_id} is gated or private: accept its terms on huggingface.co and set HF_TOKEN (or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise MambaError(f"{repo_id}: no such model on the hub (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise MambaError(
            f"model {where} is not in the local cache and the hub cannot be reached (offline); "
            f"download it first with `hf download {repo_id}` on a connected machine, or pass a local directory"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise MambaError(f"cannot fetch model {where}: {str(exc).splitlines()[0]}") from None
    if not (path / "config.json").is_file():
        raise MambaError(f"hub model {where} has no config.json")
    return path


def detect_layout(path: Path) -> str:
    """'hf' for safetensors with HF names, 'original' for a state-spaces pytorch_model.bin."""
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return "hf"
    if (path / "pytorch_model.bin").is_file():
        return "original"
    return "none"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `path`, memory-mapped, with HF names."""
    layout = detect_layout(path)
    if layout == "hf":
        return _read_safetensors(path)
    if layout == "original":
        return _read_original(path / "pytorch_model.bin")
    raise MambaError(f"model directory {path} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MambaError(f"{index}: not a valid shard index (expected a JSON object with 'weight_map')") from None
    else:
        shards = ["model.safetensors"]
    root = path.resolve()
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = (path / shard).resolve()
        if not isinstance(shard, str) or root not in file.parents:
            raise MambaError(f"{index}: shard {shard!r} points outside the model directory; refusing to read it")
        if not file.is_file():
            raise MambaError(f"{index}: shard {shard} is missing from {path}")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise MambaError(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]}); re-download or re-convert it") from None
    return tensors


def _read_original(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MambaError(f"{file}: refused or unreadable as a tensors-only checkpoint (weights_only=True): {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MambaError(f"{file}: expected a dict of tensors (a state dict); found {type(state).__name__}")
    renamed = {}
    for key, value in state.items():
        renamed[key.replace("backbone.embedding.", "backbone.embeddings.")] = value
    return renamed


def check_state_dict(model: MambaForCausalLM, state: dict[str, torch.Tensor], source: Path) -> None:
    """Every expected tensor present with the expected shape, nothing unexpected; else name them."""
    tied = ("lm_head.weight", "lm_head.weight_scale") if model.config.tie_word_embeddings else ()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
    for name in tied:
        state.pop(name, None)  # tied: the embedding is the head
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise MambaError(f"{source}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; the checkpoint does not match its config.json")
    if unexpected:
        raise MambaError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}; is this a Mamba (v1) checkpoint?")
    for name, shape in expected.items():
        found = tuple(state[name].shape)
        if name.endswith("conv1d.weight") and found == (shape[0], shape[2]):  # some writers squeeze the conv weight
            state[name] = state[name].unsqueeze(1)
            found = shape
        if found != shape:
            raise MambaError(f"{source}: tensor {name} has shape {list(found)}, expected {list(shape)} from config.json")


def build_model(config: MambaConfig, state: dict[str, torch.Tensor] | None, dtype: torch.dtype, device: torch.device,
                source: Path, quantize: str | None = None) -> MambaForCausalLM:
    """A model whose parameters are the given tensors (cast/moved once), or random if state is None.

    A checkpoint written with int8 weights loads as such; `quantize="int8"` quantizes any other
    model after loading, from its stored precision.
    """
    if state is None:
        with torch.device(device):  # random init straight on the target device
            model = MambaForCausalLM(config)
    else:
        with torch.device("meta"):
            model = MambaForCausalLM(config)
            if config.quantization_config is not None:
                quantize_model_(model, quantize_values=False)
        check_state_dict(model, state, source)
        bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            warnings.warn(f"{source}: tensor(s) {', '.join(bad[:3])} contain NaN or inf values; outputs will be meaningless")
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
    if quantize not in (None, "none") and not model.quantization:
        if quantize != "int8":
            raise MambaUsageError(f"--quantize {quantize!r} is unknown; choose int8 (or none)")
        quantize_model_(model)
    model.to(device)
    model.cast_(dtype)
    return model.eval()


def load_model(
    name: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    revision: str | None = None,
    backend: str = "auto",
    random_if_no_weights: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Resolve `name`, read its config and weights, and return the model ready to run.

    `quantize="int8"` stores in_proj, out_proj and the embeddings/head as int8 (see quantize.py).

    With `random_if_no_weights`, a directory holding only a config.json gives a model with
    seeded random weights (layout "random"): right for speed measurements, useless for text.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if torch_dtype == torch.float16 and dev.type == "cpu":
        warnings.warn("float16 on the CPU is slow and less accurate than bfloat16; prefer --dtype bfloat16 (running float16 as asked)")
    if name.endswith(".gguf") and Path(name).is_file():
        from .gguf_io import read_gguf

        config, state, tokenizer_json = read_gguf(Path(name))
        model = build_model(config, state, torch_dtype, dev, Path(name), quantize)
        model.set_backend(backend)
        return LoadedModel(model=model, path=Path(name), name=name, revision=None, layout="gguf", tokenizer_json=tokenizer_json)
    path = resolve_model_dir(name, revision, allow_config_only=random_if_no_weights)
    config = MambaConfig.from_file(path / "config.json")
    layout = detect_layout(path)
    if layout == "none" and random_if_no_weights:
        torch.manual_seed(0)
        model = build_model(config, None, torch_dtype, dev, path, quantize)
        layout = "random"
    else:
        model = build_model(config, read_state_dict(path), torch_dtype, dev, path, quantize)
    model.set_backend(backend)
    return LoadedModel(model=model, path=path, name=name, revision=revision, layout=layout)
