// The tensors of a residual add + RMSNorm call, checked and allocated the same way for the CPU
// (cpu/decode_cpu.cpp) and CUDA (cuda/decode.cu) kernels; ATen headers only, so that CUDA units compile fast.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

struct NormTensors {
    at::Tensor x, residual, weight;  // contiguous inputs; residual undefined for the first block
    at::Tensor out, res_out;         // normed (x's dtype), and the new residual stream s
    int64_t h, rows;
};

// s = residual + x is float32 when residual_fp32, else x's dtype; the weight must have x's dtype.
// with_out false: no `out` (a caller that keeps the normed row to itself).
inline NormTensors norm_tensors(const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight,
                                bool residual_fp32, bool with_out = true) {
    TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "the norm weight must have x's dtype");
    const auto res_type = residual_fp32 ? at::kFloat : x.scalar_type();
    NormTensors t;
    t.h = x.size(-1);
    t.rows = x.numel() / t.h;
    t.x = x.contiguous();
    t.weight = weight.contiguous();
    if (residual.has_value()) {
        TORCH_CHECK(residual->scalar_type() == res_type && residual->sizes() == x.sizes(), "residual must match x's shape, in the residual dtype");
        t.residual = residual->contiguous();
    }
    if (with_out) t.out = at::empty_like(t.x);
    t.res_out = at::empty(t.x.sizes(), t.x.options().dtype(res_type));
    return t;
}
