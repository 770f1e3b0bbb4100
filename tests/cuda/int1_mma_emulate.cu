// The int1 mma GEMV (csrc/int1_gemv_mma.cuh) run on the host, block by block, for
// tests/test_int1_gemv_mma.py: built with nvcc into a shared library and called with ctypes.
//
// Each K slice and block as the GPU runs them: every thread's share of the copy of x into "shared
// memory" (fill_x, with the offset decode's table of C), then every warp's run of tasks
// (warp_run), 16·RG weight rows x 512 / RG inputs a task. Per task every lane loads its words
// (load_words), takes its decode constants (minus_pair) and, per mma step, its A registers
// (a_fragment) and its B registers (x_unit_at): the kernel's own functions. What is the
// emulator's: the mma itself (mma_emulate.h, from the PTX ISA's fragment layout), and the loop of
// task_mma / run_tasks around those calls, which it follows line by line. The offset decode's C
// (subtract_half_c) and the flush into ws (flush, add_fragments: plain adds here) are the kernel's.
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "../../csrc/int1_gemv_mma.cuh"
#include "mma_emulate.h"

namespace int1_mma_emu {

using namespace loraq_mma;

using mma_emulate::mma;

template <typename T, int MODE, bool VEC, int NT, int RG>
void emulate(const Args& a, int blocks, int warps) {
  using S = Task<RG>;
  constexpr int LW = S::kLaneWords;
  constexpr bool OFFSET = is_offset(MODE);
  const int slices = (a.K + a.slice_inputs - 1) / a.slice_inputs;
  for (int slice = 0; slice < slices; ++slice) {
    const int k0 = slice * a.slice_inputs;
    const int chunks = (std::min(a.K - k0, a.slice_inputs) + S::kInputs - 1) / S::kInputs;
    const int row_units = chunks * (S::kInputs / 4) + kRowPadUnits;
    const int64_t tasks = (int64_t)((a.N + S::kRows - 1) / S::kRows) * chunks;
    for (int b = 0; b < blocks; ++b) {
      // NaNs (all ones) where nothing is filled; the table of C after the rows, zeroed as the kernel does
      std::vector<uint32_t> xs((size_t)2 * a.M * row_units + (size_t)a.M * chunks, 0xFFFFFFFFu);
      if (OFFSET)
        for (int i = 0; i < a.M * chunks; ++i) offset_c(xs.data(), a.M, row_units, 0, 0)[i] = 0.f;
      for (int tid = 0; tid < 32 * warps; ++tid)
        fill_x<T, MODE, LW>(a, xs.data(), k0, chunks, row_units, tid, 32 * warps);
      for (int w = 0; w < warps; ++w) {
        const int64_t warp = (int64_t)b * warps + w, total = (int64_t)blocks * warps;
        const loraq_gemv::WarpRun run = loraq_gemv::warp_run(warp, total, tasks);
        float acc[RG][NT][32][4] = {};
        for (int left = run.count, i = 0; left > 0; --left, ++i) {
          const int64_t task = run.first + i;
          const int rb = (int)(task / chunks), c = (int)(task % chunks);
          // every lane's words (rows g + 8h) and decode constants, as run_tasks loads them
          Words<LW> wd[32][2 * RG];
          uint32_t m[32][2 * RG][LW];
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, t = lane & 3, word0 = k0 / 32 + LW * t;
            for (int h = 0; h < 2 * RG; ++h) {
              wd[lane][h] = load_words<VEC, LW>(a, rb * S::kRows + g + 8 * h, word0 + c * S::kWords);
              for (int j = 0; j < LW; ++j)
                m[lane][h][j] = OFFSET ? a.sixteens
                                       : minus_pair<T, MODE>(a, rb * S::kRows + g + 8 * h, word0 + c * S::kWords + j);
            }
          }
          for (int j = 0; j < LW; ++j)
            for (int ii = 0; ii < 8; ++ii)
              for (int tile = 0; tile < NT; ++tile) {
                uint32_t fb[32][2];
                for (int lane = 0; lane < 32; ++lane) {  // lanes past the rows of x read row 0, as the kernel's
                  const int g = lane >> 2, t = lane & 3, xm = tile * kTileRows + g < a.M ? tile * kTileRows + g : 0;
                  const uint32_t* u = xs.data() + 2 * x_unit_at(xm * row_units, c, j, ii, t, LW);
                  fb[lane][0] = u[0];
                  fb[lane][1] = u[1];
                }
                for (int r = 0; r < RG; ++r) {
                  uint32_t fa[32][4];
                  for (int lane = 0; lane < 32; ++lane) {
                    uint32_t cu[4], cv[4];
                    for (int q = 0; q < 4; ++q) {
                      cu[q] = offset_copy<T>(word_at(wd[lane][2 * r], j), q);
                      cv[q] = offset_copy<T>(word_at(wd[lane][2 * r + 1], j), q);
                    }
                    a_fragment<T, OFFSET>(fa[lane], word_at(wd[lane][2 * r], j), word_at(wd[lane][2 * r + 1], j),
                                          m[lane][2 * r][j], m[lane][2 * r + 1][j], cu, cv, ii);
                  }
                  mma<T>(acc[r][tile], fa, fb);
                }
              }
          int nc = c + 1, nrb = rb;
          if (nc == chunks) {
            nc = 0;
            ++nrb;
          }
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane >> 2, t = lane & 3;
            for (int r = 0; r < RG; ++r) {
              float lane_acc[NT][4];
              for (int tile = 0; tile < NT; ++tile)
                for (int e = 0; e < 4; ++e) lane_acc[tile][e] = acc[r][tile][lane][e];
              if (OFFSET) subtract_half_c<NT>(a, lane_acc, xs.data(), row_units, c, t);
              if (left == 1 || nrb != rb) flush<T, MODE, NT>(a, lane_acc, rb * RG + r, g, t);
              for (int tile = 0; tile < NT; ++tile)
                for (int e = 0; e < 4; ++e) acc[r][tile][lane][e] = lane_acc[tile][e];
            }
          }
        }
      }
    }
  }
}

template <typename T, bool VEC, int NT, int RG>
int by_mode(int mode, const Args& a, int blocks, int warps) {
  switch (mode) {
    case kScaleRow: emulate<T, kScaleRow, VEC, NT, RG>(a, blocks, warps); return 0;
    case kScaleGroup: emulate<T, kScaleGroup, VEC, NT, RG>(a, blocks, warps); return 0;
    case kScaleOnebit: emulate<T, kScaleOnebit, VEC, NT, RG>(a, blocks, warps); return 0;
    case kScaleRowOffset: emulate<T, kScaleRowOffset, VEC, NT, RG>(a, blocks, warps); return 0;
    case kScaleOnebitOffset: emulate<T, kScaleOnebitOffset, VEC, NT, RG>(a, blocks, warps); return 0;
  }
  return 1;
}

template <typename T, bool VEC>
int by_shape(int mode, int rg, const Args& a, int blocks, int warps) {
  const bool two = a.M > kTileRows;
  if (rg == 1) return two ? by_mode<T, VEC, 2, 1>(mode, a, blocks, warps) : by_mode<T, VEC, 1, 1>(mode, a, blocks, warps);
  return two ? by_mode<T, VEC, 2, 2>(mode, a, blocks, warps) : by_mode<T, VEC, 1, 2>(mode, a, blocks, warps);
}

}  // namespace int1_mma_emu

// ws [M, N] fp32 (zeroed) gets x·Ŵᵀ added as the two-launch kernel adds it, times the row scale.
// dtype 0: fp16, 1: bf16 (x, scale, col); mode as the op's (0 row, 1 group, 2 onebit, 3 and 4 with
// the offset decode); rg: row groups a task (1 or 2); vec: the 16- or 8-byte weight loads (the
// launcher's condition: KW % 4 == 0 and an aligned packed); k_split: K slices as the launcher passes
// them. Returns 0, or 1 for bad arguments (nothing written).
extern "C" int int1_mma_emulate(int dtype, int mode, int rg, int vec, const void* x, const int32_t* packed,
                                const void* scale, const void* col, float* ws, int M, int N, int K, int G,
                                int group_size, int blocks, int warps, int k_split) {
  using namespace loraq_mma;
  if (dtype < 0 || dtype > 1 || mode < 0 || mode > 4 || (rg != 1 && rg != 2) || M < 1 || M > kMaxRows || N < 1 ||
      K < 1 || blocks < 1 || warps < 1 || k_split < 1 || (mode == 1 && (group_size < 32 || group_size % 32)))
    return 1;
  Args a{};
  a.x = x;
  a.packed = packed;
  a.scale = scale;
  a.col = col;
  a.ws = ws;
  a.M = M;
  a.N = N;
  a.K = K;
  a.KW = (K + 31) / 32;
  a.G = G;
  a.group_size = mode == 1 ? group_size : K;
  a.inv_group_words = mode == 1 ? 32.f / (float)group_size : 0.f;
  a.minus_ones = dtype == 0 ? Half2Bits<__half>::kMinusOnes : Half2Bits<__nv_bfloat16>::kMinusOnes;
  a.sixteens = dtype == 0 ? OffsetDecode<__half>::kSixteens : OffsetDecode<__nv_bfloat16>::kSixteens;
  a.slice_inputs = (int)slice_inputs_for(K, k_split, kTaskInputs / rg);  // the op's slice plan
  if (dtype == 0)
    return vec ? int1_mma_emu::by_shape<__half, true>(mode, rg, a, blocks, warps)
               : int1_mma_emu::by_shape<__half, false>(mode, rg, a, blocks, warps);
  return vec ? int1_mma_emu::by_shape<__nv_bfloat16, true>(mode, rg, a, blocks, warps)
             : int1_mma_emu::by_shape<__nv_bfloat16, false>(mode, rg, a, blocks, warps);
}
