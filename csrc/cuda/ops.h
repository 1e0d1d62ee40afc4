// CUDA kernels for Mamba: selective scan (prefill and one-token decode) and causal conv, with
// carried state, so chunked prefill and exact continuation work (mamba_ssm's kernel has no
// initial state).
//
// Dimension glossary: b batch, l length, d inner channels, n state size, k conv kernel, r dt rank.
// Layouts are channels-last as the projections produce them: u, delta, z (b, l, d); B, C (b, l, n)
// with any strides on b and l and unit stride on the last dimension; states are contiguous
// (b, d, n) float32 and (b, d, k) in the model dtype.
//
// Scan: kSplit adjacent lanes share a channel, each holding n / kSplit of its states in registers,
// and walk the whole sequence once; every kSplit steps they reduce-scatter their partial outputs
// with shuffles (overlapped with the next steps). Each chunk of kChunk steps of u, dt, z, B and C is
// staged in shared memory by the whole block (B and C loaded once per block of channels) from loads
// issued during the previous chunk, 16-byte vectors where rows are aligned; the chunk's outputs are
// written as vectors from shared memory too (scan_kernel.cuh). All arithmetic is float32; the decays
// use an exact polynomial exp2 for float32 inputs and the hardware's ex2 for bf16/fp16 inputs (see
// mamba_kernels.cuh).
//
// The extension is built from several translation units so that they compile in parallel: scan.cu
// (prompt scan and conv), decode.cu (a decoded token's kernels), gemm.cu (few-row products), and
// bindings.cpp, the only one that includes torch/extension.h (pybind11 and all of torch's headers:
// ~60 s of the compiler's time by themselves). This header declares what they export.
#pragma once
#include <vector>

#include <ATen/core/Tensor.h>

at::Tensor selective_scan(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C, c10::optional<at::Tensor> D,
                          c10::optional<at::Tensor> z, c10::optional<at::Tensor> delta_bias, at::Tensor state);
at::Tensor causal_conv1d(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, at::Tensor conv_state);
std::vector<at::Tensor> add_rms_norm(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight, double eps, bool residual_fp32,
                                     bool cast_input, c10::optional<at::Tensor> ahead);
at::Tensor decode_step(at::Tensor u, at::Tensor dt_low, at::Tensor dt_weight, at::Tensor A, at::Tensor B, at::Tensor C,
                       c10::optional<at::Tensor> D, c10::optional<at::Tensor> z, c10::optional<at::Tensor> delta_bias, at::Tensor state,
                       c10::optional<at::Tensor> ahead);
at::Tensor gemv(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias);
void argmax(at::Tensor x, at::Tensor out);
at::Tensor rows_gemm(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t splits, int64_t cols);
std::vector<at::Tensor> norm_in_proj_conv_step(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor norm_weight, double eps,
                                               bool residual_fp32, at::Tensor weight, c10::optional<at::Tensor> bias, at::Tensor conv_weight,
                                               c10::optional<at::Tensor> conv_bias, at::Tensor conv_state);
