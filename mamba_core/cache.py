"""MambaCache: the whole past of a Mamba model, a fixed-size state per layer.

Per layer:
  conv_states[i]: (batch, inner, conv_kernel)  the last `conv_kernel` inputs of the causal conv,
                  newest at index -1 (only the last conv_kernel - 1 are read back).
  ssm_states[i]:  (batch, inner, state)        the selective-scan state h, float32 by default.
Both are preallocated and updated in place, so a cache can be captured in a CUDA graph and its
memory never grows with the number of tokens seen.
"""

from __future__ import annotations

import torch

from .config import MambaConfig


class MambaCache:
    """Preallocated conv and SSM states for `batch_size` sequences."""

    def __init__(
        self,
        config: MambaConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        ssm_dtype: torch.dtype = torch.float32,
    ):
        inner, kernel, state = config.intermediate_size, config.conv_kernel, config.state_size
        layers = config.num_hidden_layers
        self.batch_size = batch_size
        # One allocation per kind; the per-layer views are what the layers update in place.
        self._conv = torch.zeros(layers, batch_size, inner, kernel, dtype=dtype, device=device)
        self._ssm = torch.zeros(layers, batch_size, inner, state, dtype=ssm_dtype, device=device)
        self.conv_states = list(self._conv.unbind(0))  # each (batch, inner, kernel)
        self.ssm_states = list(self._ssm.unbind(0))  # each (batch, inner, state)
        self.seen_tokens = 0  # tokens consumed since the last reset (informational)

    def reset(self) -> None:
        """Forget everything: the next forward starts from an empty context."""
        self._conv.zero_()
        self._ssm.zero_()
        self.seen_tokens = 0

    def copy_rows_(self, rows: torch.Tensor | list[int], source: "MambaCache") -> None:
        """Write `source`'s states (batch len(rows)) into this cache's `rows`, in place."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self._conv.device)
        self._conv.index_copy_(1, index, source._conv.to(self._conv.dtype))
        self._ssm.index_copy_(1, index, source._ssm.to(self._ssm.dtype))

    def clone(self) -> "MambaCache":
        """An independent copy (e.g. to branch several continuations from one prompt)."""
        other = object.__new__(MambaCache)
        other.batch_size = self.batch_size
        other._conv, other._ssm = self._conv.clone(), self._ssm.clone()
        other.conv_states, other.ssm_states = list(other._conv.unbind(0)), list(other._ssm.unbind(0))
        other.seen_tokens = self.seen_tokens
        return other

    @property
    def nbytes(self) -> int:
        """Memory held by the states, in bytes (constant for the life of the cache)."""
        return self._conv.nbytes + self._ssm.nbytes
