// The CUDA extension's Python bindings (the functions are in scan.cu, decode.cu and gemm.cu).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gemv", &gemv, "x @ W^T for one row of x (CUDA)");
    m.def("argmax", &argmax, "each row's argmax into out, as torch.argmax (CUDA)");
    m.def("rows_gemm", &rows_gemm, "x @ W^T for 1..64 rows of 16-bit x, tensor cores (CUDA, sm_90+)", py::arg("x"), py::arg("weight"),
          py::arg("bias"), py::arg("splits") = 0, py::arg("cols") = 64);
    m.def("norm_in_proj_conv_step", &norm_in_proj_conv_step, "add + RMSNorm, in_proj and conv step of one decoded token (CUDA)");
    m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm (CUDA)");
    m.def("decode_step", &decode_step, "dt_proj + one selective-scan step (CUDA)");
    m.def("selective_scan", &selective_scan, "selective scan with carried state (CUDA)");
    m.def("causal_conv1d", &causal_conv1d, "causal depthwise conv + SiLU with carried state (CUDA)");
}
