// Decoded tokens in one parallel region: `model_step` runs a whole token (tokens (b,) -> logits),
// `mixer_step` one layer's mixer (the model's forward at one token). At one token a 130M model is
// ~150 small steps (24 layers x norm, in_proj, conv, x_proj, decode step, out_proj); as separate
// kernels each paid a fork/join of the thread pool and a few torch allocations and conversions,
// ~2 ms of a 9-14 ms token on a 2-core host. Here the threads enter one OpenMP region, split each
// step's rows or channels between them, and meet at a barrier between steps. The arithmetic is
// that of the single-op kernels (the same building blocks, blocks.h), so `model_step`'s logits are
// bit-identical to the forward's.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <utility>
#include <vector>

#include "blocks.h"

namespace {

using namespace mamba_cpu;

// Part `part` of `parts` of the items 0..n: contiguous, as even as the count allows.
inline std::pair<int64_t, int64_t> share(int64_t n, int part, int parts) { return {n * part / parts, n * (part + 1) / parts}; }

// One thread's copy of an int8 projection's input rows, quantized to int16 (quantize_rows) when
// the activations are 16-bit: (rows, width) values and a scale per row.
struct QuantizedInput {
    std::vector<int16_t> q;
    std::vector<float> scale;
    QuantizedInput(int64_t rows, int64_t width) : q(rows * width), scale(rows) {}
};

// A projection's share of rows: y (m, n) = x (m, k) @ W^T, W of the model dtype T (x read as T) or
// int8 with row scales (x read as float32 when T is, else quantized into xq).
template <typename T>
void project(const T* x, QuantizedInput& xq, int64_t m, int64_t k, const torch::Tensor& w, const float* scale, const float* bias, T* y, int part, int parts) {
    const int64_t n = w.size(0);
    const auto [begin, end] = share(n, part, parts);
    if (w.scalar_type() != torch::kChar) {
        gemv_range(x, m, k, w.data_ptr<T>(), n, scale, bias, y, begin, end);
    } else if constexpr (std::is_same_v<T, float>) {
        gemv_range(x, m, k, w.data_ptr<int8_t>(), n, scale, bias, y, begin, end);
    } else {
        quantize_rows(x, m, k, xq.q.data(), xq.scale.data());
        gemv_range(xq.q.data(), m, k, w.data_ptr<int8_t>(), n, scale, bias, y, begin, end, xq.scale.data());
    }
}

template <typename T>
const T* ptr_or_null(const c10::optional<torch::Tensor>& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; }

// One layer's tensors: the norm weight, then ops.reference.StepWeights' fields in order, with the
// projection and dt biases (and D) as float32, as the single-op kernels convert them.
struct Layer {
    torch::Tensor norm, in_w, conv_w, x_w, dt_w, A, out_w;
    c10::optional<torch::Tensor> in_b, in_scale, conv_b, dt_b, D, out_b, out_scale;
};

void check(const Layer& l, at::ScalarType dtype) {
    for (const auto* m : {&l.conv_w, &l.x_w, &l.dt_w})
        TORCH_CHECK(m->scalar_type() == dtype && m->is_contiguous(), "conv, x_proj and dt_proj weights must be contiguous, in the model dtype");
    for (const auto* m : {&l.in_w, &l.out_w})
        TORCH_CHECK((m->scalar_type() == dtype || m->scalar_type() == torch::kChar) && m->is_contiguous(), "projections in the model dtype or int8");
    TORCH_CHECK(l.A.scalar_type() == torch::kFloat && l.A.is_contiguous(), "A must be contiguous float32");
    TORCH_CHECK(!l.conv_b.has_value() || l.conv_b->scalar_type() == dtype, "the conv bias must be in the model dtype");
    for (const auto* m : {&l.in_b, &l.in_scale, &l.dt_b, &l.D, &l.out_b, &l.out_scale})
        TORCH_CHECK(!m->has_value() || ((*m)->scalar_type() == torch::kFloat && (*m)->is_contiguous()), "biases, scales and D as float32");
}

// One token's activations between the steps of a mixer, rows per sequence.
template <typename T>
struct Scratch {
    int64_t h, d, rank, n, kernel;
    std::vector<T> xz, x, low, y;  // (b, 2d): x then the gate z; conv output (b, d); x_proj (b, rank + 2n): dt_low, B, C; scan output (b, d)
    Scratch(const Layer& l, int64_t batch)
        : h(l.in_w.size(1)), d(l.conv_w.size(0)), rank(l.dt_w.size(1)), n(l.A.size(1)), kernel(l.conv_w.size(1)),
          xz(batch * 2 * d), x(batch * d), low(batch * (rank + 2 * n)), y(batch * d) {
        TORCH_CHECK(rank <= 256, "the decode step supports a dt rank up to 256");
    }
};

// One decoded token through a mixer, run by every thread of a parallel region (barriers inside):
// in (b, h) -> out (b, h); conv_state (b, d, k) and ssm_state (b, d, n) advanced. xq: this
// thread's copy of an int8 projection's input (b rows of max(h, d)).
template <typename T>
void mixer_phases(const Layer& l, const T* in, T* out, Scratch<T>& s, QuantizedInput& xq, T* conv_state, float* ssm_state, int64_t batch, int part, int parts) {
    const int64_t d = s.d, n = s.n, rank = s.rank, low_width = rank + 2 * n, tiles = (d + kLanes - 1) / kLanes;
    project(in, xq, batch, s.h, l.in_w, ptr_or_null<float>(l.in_scale), ptr_or_null<float>(l.in_b), s.xz.data(), part, parts);
#pragma omp barrier
    const auto [c_begin, c_end] = share(batch * d, part, parts);
    conv_step_range(s.xz.data(), 2 * d, l.conv_w.data_ptr<T>(), ptr_or_null<T>(l.conv_b), conv_state, s.x.data(), d, s.kernel, c_begin, c_end);
#pragma omp barrier
    project(s.x.data(), xq, batch, d, l.x_w, nullptr, nullptr, s.low.data(), part, parts);
#pragma omp barrier
    const StepRows<T> rows{s.x.data(), s.xz.data() + d, s.low.data(), s.low.data() + rank, s.low.data() + rank + n, d, 2 * d, low_width, low_width, low_width};
    const auto [t_begin, t_end] = share(batch * tiles, part, parts);
    decode_tiles(t_begin, t_end, d, rank, n, rows, l.dt_w.data_ptr<T>(), ptr_or_null<float>(l.dt_b), l.A.data_ptr<float>(), ptr_or_null<float>(l.D), ssm_state,
                 s.y.data());
#pragma omp barrier
    project(s.y.data(), xq, batch, d, l.out_w, ptr_or_null<float>(l.out_scale), ptr_or_null<float>(l.out_b), out, part, parts);
}

// This thread's number in the enclosing parallel region (0 without OpenMP).
inline int thread_part() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// T: the model dtype, R: the residual stream's (float32 when residual_fp32, else T).
template <typename T, typename R>
void run_token(const torch::Tensor& tokens, const torch::Tensor& embed, const c10::optional<torch::Tensor>& embed_scale, const std::vector<Layer>& layers,
               const torch::Tensor& conv_states, const torch::Tensor& ssm_states, const torch::Tensor& norm_f, float eps, const torch::Tensor& head_w,
               const c10::optional<torch::Tensor>& head_scale, torch::Tensor& logits) {
    const int64_t batch = tokens.size(0), h = embed.size(1), vocab = head_w.size(0);
    Scratch<T> scratch(layers[0], batch);
    const int64_t d = scratch.d;
    std::vector<T> hidden(batch * h), normed(batch * h), head(batch * vocab);
    std::vector<R> residual(batch * h);
    const int64_t* ids = tokens.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; b++) {  // the embedding rows (int8 tables: q * scale in float32, then T)
        TORCH_CHECK(ids[b] >= 0 && ids[b] < embed.size(0), "model_step: token id ", ids[b], " out of range");
        if (embed_scale.has_value()) {
            const int8_t* q = embed.data_ptr<int8_t>() + ids[b] * h;
            const float scale = embed_scale->data_ptr<float>()[ids[b]];
            for (int64_t i = 0; i < h; i++) hidden[b * h + i] = static_cast<T>(static_cast<float>(q[i]) * scale);
        } else {
            std::copy_n(embed.data_ptr<T>() + ids[b] * h, h, hidden.begin() + b * h);
        }
    }
    T* conv_all = conv_states.data_ptr<T>();  // (layers, b, d, k)
    float* ssm_all = ssm_states.data_ptr<float>();  // (layers, b, d, n)
    const int parts = at::get_num_threads();
#pragma omp parallel num_threads(parts)
    {
        const int part = thread_part();
        QuantizedInput xq(batch, std::max(h, d));
        for (size_t i = 0; i < layers.size(); i++) {
            const Layer& l = layers[i];
            if (part == 0)  // s = residual + hidden (in place: each element is read before it is written)
                add_rms_norm_range(hidden.data(), i == 0 ? nullptr : residual.data(), l.norm.data_ptr<T>(), normed.data(), residual.data(), h, eps, true, 0, batch);
#pragma omp barrier
            mixer_phases(l, normed.data(), hidden.data(), scratch, xq, conv_all + i * batch * d * scratch.kernel, ssm_all + i * batch * d * scratch.n, batch,
                         part, parts);
#pragma omp barrier
        }
        if (part == 0)  // the final norm reads the sum unrounded
            add_rms_norm_range(hidden.data(), residual.data(), norm_f.data_ptr<T>(), normed.data(), residual.data(), h, eps, false, 0, batch);
#pragma omp barrier
        project(normed.data(), xq, batch, h, head_w, ptr_or_null<float>(head_scale), nullptr, head.data(), part, parts);
        const auto [v_begin, v_end] = share(vocab, part, parts);  // logits: float32 of the T-rounded products
        for (int64_t b = 0; b < batch; b++)
            for (int64_t v = v_begin; v < v_end; v++) logits.data_ptr<float>()[b * vocab + v] = static_cast<float>(head[b * vocab + v]);
    }
}

}  // namespace

// tokens (b,) int64 -> logits (b, vocab) float32, every layer's conv_states[i] (b, d, k) and
// ssm_states[i] (b, d, n) advanced in place. `layers`: 14 entries per layer (see Layer); embed
// (vocab, h) in the model dtype, or int8 with embed_scale (vocab,); head_w likewise with head_scale.
torch::Tensor model_step(torch::Tensor tokens, torch::Tensor embed, c10::optional<torch::Tensor> embed_scale,
                         std::vector<c10::optional<torch::Tensor>> layer_tensors, torch::Tensor conv_states, torch::Tensor ssm_states,
                         torch::Tensor norm_f, double eps, bool residual_fp32, torch::Tensor head_w, c10::optional<torch::Tensor> head_scale) {
    constexpr size_t kPerLayer = 14;
    const auto dtype = norm_f.scalar_type();
    TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "model_step runs float32 and bfloat16 models");
    TORCH_CHECK(layer_tensors.size() == kPerLayer * static_cast<size_t>(conv_states.size(0)), "model_step: ", kPerLayer, " tensors per layer");
    TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == torch::kLong, "model_step: tokens (b,) int64");
    tokens = tokens.contiguous();
    TORCH_CHECK(conv_states.is_contiguous() && conv_states.scalar_type() == dtype && ssm_states.is_contiguous() && ssm_states.scalar_type() == torch::kFloat,
                "model_step: contiguous states, conv in the model dtype, SSM float32");
    TORCH_CHECK(embed.is_contiguous() && head_w.is_contiguous() && embed_scale.has_value() == (embed.scalar_type() == torch::kChar) &&
                    head_scale.has_value() == (head_w.scalar_type() == torch::kChar),
                "model_step: contiguous embedding and head, int8 ones with their scales");
    std::vector<Layer> layers;
    for (size_t i = 0; i < layer_tensors.size(); i += kPerLayer) {
        const auto& t = layer_tensors;
        layers.push_back({*t[i], *t[i + 1], *t[i + 4], *t[i + 6], *t[i + 7], *t[i + 9], *t[i + 11], t[i + 2], t[i + 3], t[i + 5], t[i + 8], t[i + 10], t[i + 12], t[i + 13]});
        check(layers.back(), dtype);
        TORCH_CHECK(layers.back().norm.scalar_type() == dtype && layers.back().norm.is_contiguous(), "model_step: norm weights in the model dtype");
    }
    auto logits = torch::empty({tokens.size(0), head_w.size(0)}, tokens.options().dtype(torch::kFloat));
    auto run = [&](auto tzero, auto rzero) {
        run_token<decltype(tzero), decltype(rzero)>(tokens, embed, embed_scale, layers, conv_states, ssm_states, norm_f, static_cast<float>(eps), head_w,
                                                    head_scale, logits);
    };
    if (dtype == torch::kFloat) run(0.0f, 0.0f);
    else if (residual_fp32) run(c10::BFloat16(0), 0.0f);
    else run(c10::BFloat16(0), c10::BFloat16(0));
    return logits;
}

// One decoded token through a mixer: hidden (b, 1, h) -> (b, 1, h), conv_state (b, d, k) and
// ssm_state (b, d, n) advanced in place; the weights in the order of ops.reference.StepWeights
// (biases in the model dtype, D float32, int8 projections with their scales).
torch::Tensor mixer_step(torch::Tensor hidden, torch::Tensor conv_state, torch::Tensor ssm_state, torch::Tensor in_w,
                         c10::optional<torch::Tensor> in_b, c10::optional<torch::Tensor> in_scale, torch::Tensor conv_w,
                         c10::optional<torch::Tensor> conv_b, torch::Tensor x_w, torch::Tensor dt_w, c10::optional<torch::Tensor> dt_b,
                         torch::Tensor A, c10::optional<torch::Tensor> D, torch::Tensor out_w, c10::optional<torch::Tensor> out_b,
                         c10::optional<torch::Tensor> out_scale) {
    const auto dtype = hidden.scalar_type();
    TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "mixer_step runs float32 and bfloat16 models");
    TORCH_CHECK(conv_state.is_contiguous() && conv_state.scalar_type() == dtype && ssm_state.is_contiguous() && ssm_state.scalar_type() == torch::kFloat,
                "mixer_step: contiguous states, conv in the model dtype, SSM float32");
    auto f32 = [](const c10::optional<torch::Tensor>& t) -> c10::optional<torch::Tensor> {
        return t.has_value() ? c10::optional<torch::Tensor>(t->to(torch::kFloat).contiguous()) : c10::nullopt;
    };
    const Layer l{torch::Tensor(), in_w, conv_w, x_w, dt_w, A, out_w, f32(in_b), in_scale, conv_b, f32(dt_b), f32(D), f32(out_b), out_scale};
    check(l, dtype);
    auto x = hidden.contiguous();
    auto out = torch::empty_like(x);
    const int64_t batch = x.size(0);
    auto run = [&](auto tzero) {
        using T = decltype(tzero);
        Scratch<T> scratch(l, batch);
        const int parts = at::get_num_threads();
#pragma omp parallel num_threads(parts)
        {
            QuantizedInput xq(batch, std::max(scratch.h, scratch.d));
            mixer_phases(l, x.data_ptr<T>(), out.data_ptr<T>(), scratch, xq, conv_state.data_ptr<T>(), ssm_state.data_ptr<float>(), batch, thread_part(), parts);
        }
    };
    if (dtype == torch::kFloat) run(0.0f); else run(c10::BFloat16(0));
    return out;
}
