"""The plain-torch ops: the numerical reference for every compiled backend.

The selective scan (Mamba's recurrence, per channel d and state index n):
    dt_t  = softplus(delta_t + delta_bias)                       # (b, l, d)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t           # (b, d, n)
    y_t   = <h_t, C_t> + D * u_t, then gated: y_t * silu(z_t)    # (b, l, d)
It is evaluated in chunks of T tokens. Inside a chunk the linear recurrence h_t = a_t h_{t-1} + b_t
is solved by a blocked doubling scan (a few vectorised steps per chunk, no Python loop per token),
which only ever multiplies decays <= 1 and adds, so it is as stable as the sequential loop. Only a
(b, T, d, n) block exists at a time, never (b, l, d, n) for the whole prompt, and the state h is
carried between chunks in float32, which is what makes chunked prefill exact.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_BLOCK_ELEMENTS = 1 << 21  # cap on b * T * d * n per chunk (8 MB per float32 temporary)
_MAX_CHUNK = 256


def scan_chunk_size(batch: int, inner: int, state: int) -> int:
    """Tokens per scan chunk: the largest power of two whose (b, T, d, n) block fits the cap."""
    chunk = 1
    while chunk < _MAX_CHUNK and batch * inner * state * chunk * 2 <= _BLOCK_ELEMENTS:
        chunk *= 2
    return chunk


class StepWeights(NamedTuple):
    """A mixer's tensors for one decoded token, in the order of the compiled `mixer_step`'s arguments.

    Projections (out, in) in the model dtype, or int8 with float32 scales (None otherwise); conv_w
    (d, k); A (d, n) float32 (already -exp(A_log)).
    """

    in_w: torch.Tensor
    in_b: torch.Tensor | None
    in_scale: torch.Tensor | None
    conv_w: torch.Tensor
    conv_b: torch.Tensor | None
    x_w: torch.Tensor
    dt_w: torch.Tensor
    dt_b: torch.Tensor | None
    A: torch.Tensor
    D: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor | None
    out_scale: torch.Tensor | None


class TorchOps:
    """Reference implementations in plain torch; any device, any dtype (float32 math inside)."""

    name = "torch"

    def linear(
        self,
        x: torch.Tensor,  # (..., in)
        weight: torch.Tensor,  # (out, in): the model dtype, or int8 with `scale`
        bias: torch.Tensor | None = None,  # (out,)
        scale: torch.Tensor | None = None,  # (out,) float32 scales of an int8 weight
    ) -> torch.Tensor:
        """x @ weight.T + bias; an int8 weight is dequantized (q * scale, per output row) first."""
        if scale is not None:
            weight = (weight.float() * scale[:, None]).to(x.dtype)  # (out, in)
        return F.linear(x, weight, bias)

    def argmax(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (b,) = each row's argmax over x (b, n), the first index of the largest (greedy draws)."""
        return torch.argmax(x, dim=-1, out=out)

    def in_proj_conv_step(self, hidden, weight, bias, scale, conv_weight, conv_bias, conv_state) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoded token's in_proj and conv step: (silu(conv(x)), z) with x, z = in_proj(hidden).

        hidden (b, 1, h); weight (2d, h) (int8 with `scale`, or the model dtype); conv_state (b, d, k)
        updated in place. A backend may fuse all of it (the conv is channel-local).
        """
        x, z = self.linear(hidden, weight, bias, scale).chunk(2, dim=-1)  # (b, 1, d) each
        return self.causal_conv1d(x, conv_weight, conv_bias, conv_state), z

    def mixer_step(self, w: StepWeights, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One decoded token through a mixer with weights `w`: hidden (b, 1, h) -> (b, 1, h).

        conv_state (b, d, k) and ssm_state (b, d, n) are updated in place. This composes the
        per-op methods (in_proj + conv step, x_proj, dt_proj + scan step, out_proj); a backend
        may run the whole layer in one call instead.
        """
        x, z = self.in_proj_conv_step(hidden, w.in_w, w.in_b, w.in_scale, w.conv_w, w.conv_b, conv_state)  # (b, 1, d) each
        return self.mixer_tail(w, x, z, ssm_state)

    def mixer_tail(self, w: StepWeights, x: torch.Tensor, z: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """A decoded token's mixer after its conv step: x_proj, dt_proj + scan step, out_proj.

        x (silu(conv) output), z (the gate) (b, 1, d) -> (b, 1, h); ssm_state updated in place.
        """
        rank, n = w.dt_w.shape[1], w.A.shape[1]
        dt, B, C = self.linear(x, w.x_w).split([rank, n, n], dim=-1)
        y = self.decode_step(x, dt, w.dt_w, w.A, B, C, w.D, z, w.dt_b, ssm_state, ahead=self.pull_ahead(w.out_w, x.shape[0]))
        return self.linear(y, w.out_w, w.out_b, w.out_scale)

    def block_step(self, x, residual, norm_w, eps, residual_fp32, w: StepWeights, conv_state, ssm_state) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoded token through a pre-norm block: (mixer(norm(s)), s) with s = residual + x.

        As `add_rms_norm` then `mixer_step`; a backend may fuse the norm into the mixer's first
        kernel (the CUDA one does).
        """
        normed, residual = self.add_rms_norm(x, residual, norm_w, eps, residual_fp32, ahead=self.pull_ahead(w.in_w, x.shape[0]))
        return self.mixer_step(w, normed, conv_state, ssm_state), residual

    def pull_ahead(self, weight: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The weight, if the kernel before the product of `rows` rows with it should pull it into
        cache meanwhile (the `ahead` of `add_rms_norm` and `decode_step`); None here: no cache to fill."""
        return None

    def add_rms_norm(
        self,
        x: torch.Tensor,  # (..., h) a block's output
        residual: torch.Tensor | None,  # (..., h) the residual stream before it; None for the first block
        weight: torch.Tensor,  # (h,)
        eps: float,
        residual_fp32: bool,
        cast_input: bool = True,
        ahead: torch.Tensor | None = None,  # a tensor a later op reads (`pull_ahead`): a backend may pull it into cache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * rmsnorm(s), s) with s = residual + x, the pre-norm block's add and norm.

        As transformers: s is float32 when residual_fp32; the norm reads s rounded to the weight's
        dtype (cast_input, every block's norm) or as it is (the final norm), computes in float32,
        and rounds before and after the multiply by the weight.
        """
        s = x if residual is None else residual + x
        if residual_fp32:
            s = s.float()
        xf = (s.to(weight.dtype) if cast_input else s).float()
        normed = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)
        return normed, s

    def decode_step(self, u, dt_low, dt_weight, A, B, C, D, z, delta_bias, ssm_state, ahead=None) -> torch.Tensor:
        """One token's SSM part after the conv: dt = dt_low @ dt_weight.T, then the scan step.

        u, z (b, 1, d); dt_low (b, 1, r); B, C (b, 1, n). A backend may fuse all of it, and pull
        `ahead` (a tensor a later op reads: `pull_ahead`) into cache meanwhile.
        """
        return self.selective_scan(u, F.linear(dt_low, dt_weight), A, B, C, D, z, delta_bias, ssm_state)

    def causal_conv1d(
        self,
        x: torch.Tensor,  # (b, l, d)
        weight: torch.Tensor,  # (d, k)
        bias: torch.Tensor | None,  # (d,)
        conv_state: torch.Tensor | None,  # (b, d, k), updated in place: last k inputs
    ) -> torch.Tensor:
        """Depthwise causal conv over the chunk x, continuing from conv_state, then SiLU."""
        batch, length, inner = x.shape
        kernel = weight.shape[1]
        if conv_state is None:
            past = x.new_zeros(batch, kernel - 1, inner)
        else:
            past = conv_state[:, :, 1:].transpose(1, 2).to(x.dtype)  # (b, k-1, d)
        padded = torch.cat([past, x], dim=1).float()  # (b, l+k-1, d)
        w = weight.float().t()  # (k, d)
        y = padded[:, 0:length] * w[0]
        for j in range(1, kernel):
            y = y + padded[:, j : j + length] * w[j]
        if bias is not None:
            y = y + bias.float()
        if conv_state is not None:
            conv_state.copy_(padded[:, -kernel:].transpose(1, 2))
        return F.silu(y).to(x.dtype)

    def selective_scan(
        self,
        u: torch.Tensor,  # (b, l, d)
        delta: torch.Tensor,  # (b, l, d), before bias and softplus
        A: torch.Tensor,  # (d, n), float32, negative
        B: torch.Tensor,  # (b, l, n)
        C: torch.Tensor,  # (b, l, n)
        D: torch.Tensor | None,  # (d,)
        z: torch.Tensor | None,  # (b, l, d) gate
        delta_bias: torch.Tensor | None,  # (d,)
        ssm_state: torch.Tensor | None,  # (b, d, n) float32, read as h_0 and overwritten with h_l
    ) -> torch.Tensor:
        """Run the selective scan over a chunk of tokens; returns y (b, l, d) in u's dtype."""
        batch, length, inner = u.shape
        state_size = A.shape[1]
        uf = u.float()
        dt = delta.float()
        if delta_bias is not None:
            dt = dt + delta_bias.float()
        dt = F.softplus(dt)  # (b, l, d)
        dtu = dt * uf  # (b, l, d)
        A = A.float()
        h = uf.new_zeros(batch, inner, state_size) if ssm_state is None else ssm_state.float()  # (b, d, n)
        chunk = scan_chunk_size(batch, inner, state_size)
        outputs = []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            a = torch.mul(dt[:, start:end, :, None], A).exp_()  # (b, T, d, n) per-step decay
            hs = dtu[:, start:end, :, None] * B[:, start:end, None, :].float()  # (b, T, d, n) input
            _linear_scan_(a, hs)  # hs[t] = sum_s<=t (prod a) * input; a[t] = prod_{s<=t} a[s]
            hs.add_(a * h[:, None])  # add the carried state's contribution
            outputs.append(torch.einsum("btdn,btn->btd", hs, C[:, start:end].float()))
            h = hs[:, -1]
        y = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]  # (b, l, d)
        if D is not None:
            y = y + uf * D.float()
        if z is not None:
            y = y * F.silu(z.float())
        if ssm_state is not None:
            ssm_state.copy_(h)
        return y.to(u.dtype)


_BLOCK = 16  # positions combined by the doubling scan before blocks are chained


def sequential_scan(u, delta, A, B, C, D, z, delta_bias, h):
    """The recurrence spelled out one token at a time (any dtype, usually float64): the definition
    every fast path (this chunked one, the CPU and CUDA kernels) is tested against.

    u, delta, z (b, l, d); A (d, n); B, C (b, l, n); D, delta_bias (d,); h (b, d, n) initial state.
    Returns y (b, l, d) and the final state.
    """
    dt = F.softplus(delta + delta_bias)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return (torch.stack(ys, 1) + u * D) * F.silu(z), h


def _linear_scan_(a: torch.Tensor, b: torch.Tensor) -> None:
    """In place along dim 1: b[t] <- a[t] b[t-1] + b[t] (from b[-1] = 0), a[t] <- a[0] ... a[t].

    Two levels, to do less work than one long doubling scan: a Hillis-Steele doubling scan
    inside blocks of 16 positions (4 vectorised steps), the same scan applied recursively to
    the block ends, then each block shifted by the state and decay carried into it.
    """
    length = a.shape[1]
    if length <= _BLOCK or length % _BLOCK:
        _doubling_scan_(a, b)
        return
    shape = (a.shape[0], length // _BLOCK, _BLOCK, *a.shape[2:])
    a4, b4 = a.view(shape), b.view(shape)  # (b, blocks, 16, d, n)
    _doubling_scan_(a4.flatten(0, 1), b4.flatten(0, 1))
    ends_a, ends_b = a4[:, :, -1].clone(), b4[:, :, -1].clone()  # (b, blocks, d, n)
    _linear_scan_(ends_a, ends_b)  # state and total decay at the end of each block
    b4[:, 1:] += a4[:, 1:] * ends_b[:, :-1, None]
    a4[:, 1:] *= ends_a[:, :-1, None]


def _doubling_scan_(a: torch.Tensor, b: torch.Tensor) -> None:
    """Hillis-Steele: after the step with offset s, position t has combined the 2s ending at t."""
    length = a.shape[1]
    offset = 1
    while offset < length:
        b[:, offset:] += a[:, offset:] * b[:, :-offset]
        a[:, offset:] = a[:, offset:] * a[:, :-offset]
        offset *= 2
