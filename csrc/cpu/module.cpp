// The module `sot_engine.kernels._cpp`: compiled once, for the baseline, not per variant (setup.py). Binds each
// compiled variant of the kernels (target.h) that this CPU runs into a submodule (`_cpp.variant("avx2")`: the tests
// run every one) and copies the best one's functions into the module itself, so that one build runs on an AVX2-only
// machine and uses AVX-512 (and AMX) where the CPU has it. SOT_CPU_VARIANT=generic|avx2|avx512 picks a lower one.
// setup.py defines SOT_WITH_<VARIANT> for each variant it compiled.
#include <torch/extension.h>

#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace py = pybind11;

// each compiled variant's declarations and bindings, in its namespace (target.h)
#ifdef SOT_WITH_GENERIC
#define SOT_ISA_NS generic
#include "ops.h"
#include "bindings.h"
#undef SOT_OPS_H
#undef SOT_ISA_NS
#endif
#ifdef SOT_WITH_AVX2
#define SOT_ISA_NS avx2
#include "ops.h"
#include "bindings.h"
#undef SOT_OPS_H
#undef SOT_ISA_NS
#endif
#ifdef SOT_WITH_AVX512
#define SOT_ISA_NS avx512
#include "ops.h"
#include "bindings.h"
#undef SOT_OPS_H
#undef SOT_ISA_NS
#endif
#ifdef SOT_WITH_AMX
#define SOT_ISA_NS amx
#include "ops.h"
#include "bindings.h"
#undef SOT_OPS_H
#undef SOT_ISA_NS
#endif
#ifdef SOT_WITH_NATIVE
#define SOT_ISA_NS native
#include "ops.h"
#include "bindings.h"
#undef SOT_OPS_H
#undef SOT_ISA_NS
#endif

namespace {

struct Variant {
  std::string name;
  void (*bind)(py::module_&);
  bool runs;
};

#if defined(__x86_64__) || defined(_M_X64)
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

bool has_avx512() {  // the subsets the avx512 variant is compiled for (libgcc checks that the OS saves the state)
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512cd");
}

bool has_amx() {  // CPUID leaf 7: AMX-BF16 (EDX bit 22), AMX-TILE (EDX 24); sub-leaf 1: AVX512_BF16 (EAX 5)
  unsigned a, b, c, d;
  if (!has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tiles = (d >> 22 & 1) && (d >> 24 & 1);
  return tiles && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1);
}
#endif

// the compiled variants, lowest first, with whether this CPU runs them
std::vector<Variant> variants() {
  std::vector<Variant> v;
#ifdef SOT_WITH_NATIVE
  v.push_back({"native", &sot_cpu::native::bind, true});  // built for this machine (-march=native)
#endif
#ifdef SOT_WITH_GENERIC
  v.push_back({"generic", &sot_cpu::generic::bind, true});
#endif
#if defined(__x86_64__) || defined(_M_X64)
#ifdef SOT_WITH_AVX2
  v.push_back({"avx2", &sot_cpu::avx2::bind, has_avx2()});
#endif
#ifdef SOT_WITH_AVX512
  v.push_back({"avx512", &sot_cpu::avx512::bind, has_avx512()});
#endif
#ifdef SOT_WITH_AMX
  v.push_back({"amx", &sot_cpu::amx::bind, has_amx()});
#endif
#endif
  return v;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sot-engine C++ CPU kernels (csrc/cpu): the best variant this CPU runs; every variant it runs under "
            "variant(name)";
  py::list compiled, runnable;
  py::dict subs;
  std::string name;
  for (const Variant& v : variants()) {
    compiled.append(v.name);
    if (!v.runs) continue;
    runnable.append(v.name);
    py::module_ sub = m.def_submodule(v.name.c_str(), "one variant of the kernels");
    v.bind(sub);
    subs[py::str(v.name)] = sub;
    name = v.name;  // the last one this CPU runs is the widest
  }
  if (name.empty()) throw std::runtime_error("sot_engine.kernels._cpp: no compiled variant runs on this CPU");
  if (const char* want = std::getenv("SOT_CPU_VARIANT"); want && *want) {
    if (subs.contains(want))
      name = want;
    else if (PyErr_WarnEx(PyExc_RuntimeWarning,
                          ("SOT_CPU_VARIANT=" + std::string(want) + ": not a kernel variant this CPU runs; using " +
                           name).c_str(),
                          1) < 0)
      throw py::error_already_set();  // warnings turned into errors
  }
  py::module_ chosen = subs[py::str(name)];
  for (auto item : chosen.attr("__dict__").cast<py::dict>())
    if (item.first.cast<std::string>().rfind("__", 0) != 0) m.attr(item.first) = item.second;
  m.attr("VARIANT") = name;
  m.attr("VARIANTS") = runnable;  // what this CPU runs, lowest first
  m.attr("COMPILED_VARIANTS") = compiled;
  m.def("variant", [subs](const std::string& name) -> py::object {
    if (!subs.contains(name))
      throw py::value_error("no kernel variant '" + name + "' that this CPU runs (it runs " +
                            py::str(py::list(subs.attr("keys")())).cast<std::string>() + ")");
    return subs[py::str(name)];
  }, "the submodule of one variant the CPU runs", py::arg("name"));
}
