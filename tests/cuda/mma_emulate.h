// mma.sync.m16n8k16 on the host, for the emulations of the tensor-core GEMVs (int1_mma_emulate.cu,
// sparse4x4_emulate.cu): the 32 lanes' registers placed by the PTX ISA's fragment layout (A rows
// {g, g+8, g, g+8} at columns {2t, 2t, 2t+8, 2t+8}, +0 and +1 in a register's halves; B column g
// at rows {2t, 2t+8}; C rows {g, g, g+8, g+8} at columns {2t, 2t+1, 2t, 2t+1}; lane = 4·g + t),
// the product summed in fp32.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../../csrc/gemv_common.cuh"

namespace mma_emulate {

// Half h (0: low) of a register of two 16-bit values of type T, as a float.
template <typename T>
float half_at(uint32_t pair, int h) {
  const uint16_t bits = (uint16_t)(h ? pair >> 16 : pair & 0xFFFFu);
  T v;
  memcpy(&v, &bits, 2);
  return loraq_gemv::to_float(v);
}

// acc[lane] (one m16n8 tile's C fragments) += A·B from the 32 lanes' A (fa) and B (fb) registers.
template <typename T>
void mma(float (&acc)[32][4], const uint32_t (&fa)[32][4], const uint32_t (&fb)[32][2]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 8; ++e) {  // a0..a7: register e / 2, half e % 2
      const int row = g + ((e == 2 || e == 3 || e == 6 || e == 7) ? 8 : 0);
      const int col = 2 * t + (e & 1) + (e >= 4 ? 8 : 0);
      A[row][col] = half_at<T>(fa[lane][e >> 1], e & 1);
    }
    for (int e = 0; e < 4; ++e) B[2 * t + (e & 1) + (e >= 2 ? 8 : 0)][g] = half_at<T>(fb[lane][e >> 1], e & 1);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      acc[lane][e] += s;
    }
  }
}

}  // namespace mma_emulate
