// The arguments of an int1 GEMV for one row of x, as the host emulations of the lookup GEMVs
// (int1_lut_emulate.cu, int1_lut8_emulate.cu) set them up from their ctypes arguments, and the
// checks those arguments share. dtype 0: fp16, 1: bf16; mode 0 (row α), 1 (group α, group_size a
// multiple of 32), 2 (onebit: h in scale, g in col).
#pragma once

#include <stdint.h>

#include "../../csrc/int1_gemv_mma.cuh"

// Whether the shared arguments are ones the kernels take.
inline bool one_row_args_ok(int dtype, int mode, const void* g, int N, int K, int group_size, int blocks, int warps) {
  return dtype >= 0 && dtype <= 1 && mode >= 0 && mode <= 2 && N >= 1 && K >= 1 && blocks >= 1 && warps >= 1 &&
         warps <= 32 && !(mode == loraq_mma::kScaleOnebit && g == nullptr) &&
         !(mode == loraq_mma::kScaleGroup && (group_size < 32 || group_size % 32));
}

inline loraq_mma::Args one_row_args(int mode, const void* x, const void* g, const int32_t* packed, const void* scale,
                                    int N, int K, int G, int group_size, int slice_inputs) {
  loraq_mma::Args a{};
  a.x = x;
  a.col = g;
  a.packed = packed;
  a.scale = scale;
  a.M = 1;
  a.N = N;
  a.K = K;
  a.KW = (K + 31) / 32;
  a.G = G;
  a.group_size = mode == loraq_mma::kScaleGroup ? group_size : K;
  a.inv_group_words = mode == loraq_mma::kScaleGroup ? 32.f / (float)group_size : 0.f;
  a.slice_inputs = slice_inputs;
  return a;
}
