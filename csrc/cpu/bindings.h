// Python bindings of one variant of the C++ CPU kernels (target.h): module.cpp includes this once per variant, after
// that variant's ops.h, and binds each variant the CPU runs into a submodule of `sot_engine.kernels._cpp`, the best
// one into the module itself (wrapped by sot_engine/kernels/cpp.py). The glue is compiled once, for the baseline:
// it only converts arguments and calls into the variant.
SOT_NAMESPACE_BEGIN

inline std::string build_info() {
  std::string s = std::string("sot_csrc: ") + SOT_VARIANT_NAME + " (" + simd_name() + ")";
  if (amx_compiled()) s += amx_ready() ? " amx-bf16" : " amx-bf16(off)";
#ifdef _OPENMP
  s += " openmp";
#endif
  return s;
}

inline void bind(pybind11::module_& m) {
  namespace py = pybind11;
  m.doc() = "sot-engine C++ CPU kernels (csrc/cpu), variant " SOT_VARIANT_NAME;
  m.def("linear", &linear,
        "x [M, K] float32 @ w [N, K]^T; w float32 / bfloat16 / int8 (int8 needs scale [N, G]: K / G weights each). "
        "The kernel for M <= MAX_ROWS, else at::linear on the widened weights",
        py::arg("x"), py::arg("w"), py::arg("scale") = py::none());
  m.def("linear_bf16", &linear_bf16,
        "bf16(x) [M, K] @ w [N, K]^T for bfloat16 w: x rounded to bfloat16, products exact, float32 sums; on AMX "
        "when amx and the CPU and OS allow it (AMX_READY), else the float32 kernel on the rounded x",
        py::arg("x"), py::arg("w"), py::arg("amx") = true);
  m.def("linear_int8", &linear_int8,
        "x [M, K] float32 @ w [N, K]^T at int8 precision: int8 w with scale [N, K / 32] (or [N, K / 16]), x quantized per 32 of a row "
        "(scale amax / 127, round half to even), int32 dot products per group, float32 scales and sums",
        py::arg("x"), py::arg("w"), py::arg("scale"));
  m.def("linear_q4", &linear_q4,
        "x [M, K] float32 @ w^T for 4-bit w [N, K / 2] uint8 (per 32-group: byte b holds weight b low, b + 16 high) "
        "with scale_min [N, 2, K / 32] float32 (w = scale * nibble + min); x quantized as in linear_int8",
        py::arg("x"), py::arg("w"), py::arg("scale_min"));
  m.def("quantize_int8_activations", &quantize_int8_activations,
        "x [M, K] float32 -> (int8 values [M, K], float32 scales [M, K / 32], scales times the group's sum of "
        "values) as linear_int8 quantizes it",
        py::arg("x"));
  m.def("int8_isa", &int8_isa, "the instruction set linear_int8 runs on: avx512vnni, avx2 or scalar");
  m.def("set_int8_isa", &set_int8_isa, "force avx512vnni / avx2 / scalar (one this CPU runs) or auto; returns the "
        "previous", py::arg("name"));
  m.def("linear_rows", &linear_rows, "the linear kernel for any M", py::arg("x"), py::arg("w"),
        py::arg("scale") = py::none());
  m.def("paged_decode_attention", &paged_decode_attention, "float32 paged decode attention (GQA)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("max_context_len") = py::none(), py::arg("window") = 0);
  m.def("attention_plan", &attention_plan,
        "the parts decode attention cuts a batch into (rep, kv head, lo, hi, member sequences): shared prefixes "
        "once for their group, long contexts in chunks; [] where it runs one task per (sequence, kv head)",
        py::arg("block_tables"), py::arg("context_lens"), py::arg("block_size"), py::arg("kv_heads"),
        py::arg("heads"), py::arg("threads"));
  m.def("paged_prefill_attention", &paged_prefill_attention,
        "float32 causal attention of packed new tokens over their sequences' paged contexts (GQA)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("cu_seqlens_q"),
        py::arg("context_lens"), py::arg("scale"), py::arg("window") = 0);
  m.def("rope_store_decode_attention", &rope_store_decode_attention,
        "RoPE on the q/k heads of qkv [B, (H + 2 kv_heads) * D], k/v stored at slot_mapping, then paged decode "
        "attention -> [B, H * D]",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("window") = 0);
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, "(norm(x + residual), x + residual)", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"));
  m.def("apply_rope", &apply_rope, "rotate-half RoPE, x [T, H, D], cos/sin [T, D/2]", py::arg("x"),
        py::arg("cos"), py::arg("sin"));
  m.def("store_kv", &store_kv, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"));
  m.def("silu_mul", &silu_mul, "silu(x[:, :F]) * x[:, F:]", py::arg("x"));
  py::class_<DecodeLayers>(m, "DecodeLayers",
                           "a decode step's whole layer loop in one call (csrc/cpu/decode.cpp), for one model "
                           "and KV pool")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<std::optional<at::Tensor>>, at::Tensor, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, int64_t, double, double, bool, std::vector<int64_t>, bool>(),
           py::arg("ln1"), py::arg("ln2"), py::arg("mats"), py::arg("scales"), py::arg("final_norm"),
           py::arg("k_caches"), py::arg("v_caches"), py::arg("num_heads"), py::arg("eps"), py::arg("scale"),
           py::arg("bf16_act") = false, py::arg("windows") = std::vector<int64_t>{}, py::arg("int8_act") = false)
      .def("__call__", &DecodeLayers::forward,
           "x [B, hidden] embeddings -> final-normed hidden [B, hidden]; stores the new K/V (GIL released)",
           py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("slot_mapping"), py::arg("block_tables"),
           py::arg("context_lens"), py::call_guard<py::gil_scoped_release>())
      .def_readwrite("matmul_seconds", &DecodeLayers::matmul_seconds,
                     "wall time in the weight-matmul phases, summed over calls (benchmarks)")
      .def_readwrite("attention_seconds", &DecodeLayers::attention_seconds,
                     "wall time in the RoPE + KV store + attention phases, summed over calls (benchmarks)");
  m.def("build_info", &build_info);
  m.attr("MAX_ROWS") = linear_max_rows();
  m.attr("AMX_COMPILED") = amx_compiled();
  m.attr("AMX_READY") = amx_ready();
}
SOT_NAMESPACE_END
