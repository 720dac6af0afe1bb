// What this compilation of the kernels targets, and the namespace it lives in.
//
// setup.py compiles every kernel file once per CPU variant (generic, avx2, avx512, amx) through a generated wrapper
// that defines SOT_ISA_NS and the SOT_HAS_* of the variant, includes the file's system and torch headers, and only
// then turns on `#pragma GCC target(...)`: so our code is compiled for the variant, every header's inline function
// and template for the baseline (one definition across the variants), and each variant's code sits in its own
// namespace (sot_cpu::avx2::...). module.cpp binds the best variant the CPU runs at import. A file compiled on its
// own (no wrapper: a non-GCC compiler, a non-x86 machine, SOT_CSRC_NATIVE=1) targets what the compiler does.
#pragma once

#ifndef SOT_ISA_NS
#define SOT_ISA_NS native
#define SOT_NATIVE 1
#if defined(__AVX2__) && defined(__FMA__)
#define SOT_HAS_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define SOT_HAS_AVX512 1
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define SOT_HAS_AMX 1
#endif
#endif

#define SOT_STR2(x) #x
#define SOT_STR(x) SOT_STR2(x)
#define SOT_VARIANT_NAME SOT_STR(SOT_ISA_NS)

#define SOT_NAMESPACE_BEGIN \
  namespace sot_cpu {       \
  inline namespace SOT_ISA_NS {
#define SOT_NAMESPACE_END \
  }                       \
  }
