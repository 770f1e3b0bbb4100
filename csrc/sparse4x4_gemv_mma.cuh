// The sparse4x4 small-batch forward on tensor cores: x·Ŵᵀ for up to 16 rows of x at the cost of one.
//
// Device code only (no torch headers): csrc/sparse4x4_gemv_op.h holds the launcher (one op for
// both sparse4x4 kernels, this one where rows of x a block is 16). The decode
// and the shared layout are __host__ __device__: tests/cuda/sparse4x4_emulate.cu runs this
// kernel's task on the CPU with mma.sync emulated from the PTX ISA's fragment layout.
//
// Why: the gather (sparse4x4_gemv.cuh) adds each stored value to its row's sum with four
// predicated FMAs per row of x, so 16 rows cost 16 times one. Here each warp builds, in registers,
// the dense 16 x 16 A operand of mma.sync.m16n8k16 (16 weight rows x 16 inputs: 16 tiles) from
// the stored values, and x, kept in shared memory in the matching order, is the B operand (8 rows
// of x a tile; 9 to 16 rows take a second mma on the same A registers). The decode is the cost,
// about one warp instruction per stored value whatever the rows of x.
//
// Fragments (PTX ISA, mma.m16n8k16, lane = 4·g + t): A regs {a0a1, a2a3, a4a5, a6a7} = rows {g,
// g+8, g, g+8} at columns {2t, 2t, 2t+8, 2t+8} (+0, +1 in the halves); B regs {b0b1, b2b3} = column
// g at rows {2t, 2t+8} (+0, +1); C {c0..c3} = rows {g, g, g+8, g+8}, columns {2t, 2t+1, 2t, 2t+1}.
// The mma's rows are weight rows, its columns rows of x.
//
// Which input each reduction index stands for is ours to choose, as long as A and B agree: at mma
// step s, lane t's indices {2t, 2t+1} are inputs 4·tk + {0, 1} and {2t+8, 2t+9} are 4·tk + {2, 3}
// of one tile column tk = tk0 + 32·t + s. So a lane's a0a1 and a4a5 are the four weights of one
// tile row segment (tile row g / 4 of the group, row g % 4 inside the tile), a2a3 and a6a7 those
// of tile row g / 4 + 2: a lane decodes two tiles a step, and reads 32 consecutive tiles of each
// of its two tile rows a task (64 bytes of values, 16 of positions: five 16-byte loads a row). B's b0b1, b2b3 are then the
// four inputs 4·tk .. 4·tk + 3 of row g of x: 8 bytes, side by side in shared memory.
//
// The decode of one tile for one lane (rows r = g % 4 inside the tile): with p = 4·pr + c, the
// tile's weights on row r are v at column c if pr == r, else zeros. The lo register (columns 0, 1)
// is v's 16 bits placed by a byte permute (PRMT) whose selector comes from a funnel shift of two
// constants by S = 16·c + 64·(pr xor r): S = 0 puts v in the low half, 16 in the high half, 32 or
// more (c ≥ 2 or another row) zeros. The hi register (columns 2, 3) uses S xor 32. Seven
// instructions a tile: shift and mask for S, xor, two funnel shifts, two permutes.
//
// Work split (stream-K, as int1_gemv_mma.cuh): a K slice per blockIdx.y; the slice's tasks (16
// weight rows x 128 tile columns) in row-major order are cut into equal runs, one per
// warp; sums go into the fp32 workspace by atomics whenever a warp's 16 rows change. A task is
// 16 weight rows x 128 tile columns (512 inputs): 32 steps, so that the task's own instructions
// (loads, addresses, the loop) weigh little beside the decode (with 16 steps, 1.67 instructions a
// stored value; with 32, 1.33, compiled for sm_90).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "gemv_common.cuh"
#include "gemv_finish.cuh"
#include "sparse4x4_gemv.cuh"

namespace loraq_sparse_mma {

constexpr int kTaskRows = 16;                // weight rows a task (the mma's M): 4 tile rows
constexpr int kSteps = 32;                   // mma steps a task: 32 tile columns a lane
constexpr int kTaskTiles = 4 * kSteps;       // tile columns a task: 128
constexpr int kTaskInputs = 4 * kTaskTiles;  // inputs a task: 512
constexpr int kTileRows = 8;                 // rows of x an mma takes (its N)
constexpr int kMaxRows = 16;                 // rows of x: one or two mma tiles (NT)
constexpr int kRowPadUnits = 4;              // 32 bytes of padding per row of x in shared memory
constexpr int kThreads = 512;                // the launch bound

using loraq_gemv::bits16;
using loraq_gemv::byte_perm;
using loraq_gemv::from_float;
using loraq_gemv::load_ro;
using loraq_gemv::to_float;

using Args = loraq_sparse::Args;  // slice_tiles: a multiple of kTaskTiles here
// The one-launch kernel's arguments: the finish's besides (gemv_finish.cuh). A type of its own:
// grown by them, loraq_sparse::Args made ptxas give the gather up to 8 registers more.
struct MmaArgs : Args {
  loraq_gemv::Finish fin;
};

// A funnel shift right of hi:lo by min(s, 32), the low 32 bits (shf.r.clamp).
__host__ __device__ __forceinline__ uint32_t funnel_rc(uint32_t lo, uint32_t hi, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __funnelshift_rc(lo, hi, s);
#else
  const uint64_t both = ((uint64_t)hi << 32) | lo;
  return (uint32_t)(both >> (s < 32 ? s : 32));
#endif
}

// Permute selectors for v in half h of its 32-bit pair, by S / 16 = 0 (v in the low half of the
// result), 1 (high half), 2 or more (zeros: byte index 4 is the zero operand's)
constexpr uint32_t kSelLow0 = 0x10444410u, kSelLow1 = 0x32444432u, kSelZeros = 0x44444444u;

// A lane's two registers of one tile row segment: (lo, hi) = the weights of columns (0, 1) and
// (2, 3) on the lane's row inside the tile, as pairs of T's bits. pair: the 32 bits holding the
// value in half h; s: 16·c + 64·(tile's row xor lane's row), from the position.
__host__ __device__ __forceinline__ void decode_tile(uint32_t pair, int h, uint32_t s, uint32_t& lo, uint32_t& hi) {
  const uint32_t sel = h ? kSelLow1 : kSelLow0;  // h is a constant once the steps are unrolled
  lo = byte_perm(pair, 0u, funnel_rc(sel, kSelZeros, s));
  hi = byte_perm(pair, 0u, funnel_rc(sel, kSelZeros, s ^ 32u));
}

// S for position e (0..7) of a word whose nibbles were xored with the lane's row (bits 2, 3):
// the nibble times 16.
__host__ __device__ __forceinline__ uint32_t shift_of(uint32_t pwx, int e) {
  return (e >= 1 ? pwx >> (4 * e - 4) : pwx << 4) & 0xF0u;
}

// 8-byte units of the shared copy of x: row m of x, task chunk c of the slice, step s, lane t.
// The four lanes t of a quad read adjacent units; rows of x are 32 bytes apart modulo 128, so the
// 16 lanes of a half warp hit 16 different 8-byte bank pairs.
__host__ __device__ __forceinline__ int x_unit(int m, int row_units, int c, int s, int t) {
  return m * row_units + (c * kSteps + s) * 4 + t;
}

// Fill the shared copy of this block's slice of x (k0 .. k0 + inputs): unit (m, c, s, t) holds
// x[m, 4·tk + 0 .. 3] for tile column tk = 128·c + 32·t + s of the slice; zeros past K and M.
// Thread `tid` of `threads`. An item is 8 inputs (tile columns tk, tk + 1, s even) of one row:
// one 16-byte load where x's rows are aligned, two items a round in flight, two 8-byte stores.
// Item bits 0-1 are t, 2-5 s / 2, then the row of x and c: a warp reads four runs of 128 bytes,
// and half its lanes store s + 1 first, so that each store of a warp spreads over the banks.
template <typename T>
__host__ __device__ void fill_x(const Args& a, uint32_t* xs, int k0, int inputs, int row_units, int rows, int tid,
                                int threads) {
  const bool vx = loraq_gemv::rows_aligned16(a.x, a.K);
  const int chunks = inputs / kTaskInputs;
  auto where = [&](int item, int& m, int& c, int& s, int& t) {
    t = item & 3;
    s = 2 * ((item >> 2) & (kSteps / 2 - 1));
    const int rest = item / (2 * kSteps);
    m = rest % rows;
    c = rest / rows;
  };
  auto load = [&](int item) {
    int m, c, s, t;
    where(item, m, c, s, t);
    return loraq_gemv::load_x8(a.x, a.M, a.K, m, k0 + 4 * (kTaskTiles * c + kSteps * t + s), vx);
  };
  auto store = [&](int item, const uint4& q) {
    int m, c, s, t;
    where(item, m, c, s, t);
    const bool swap = (s >> 1) & 2;  // s / 2 in 2, 3 (mod 4): the second unit first
    *reinterpret_cast<uint2*>(xs + 2 * x_unit(m, row_units, c, s + swap, t)) =
        swap ? make_uint2(q.z, q.w) : make_uint2(q.x, q.y);
    *reinterpret_cast<uint2*>(xs + 2 * x_unit(m, row_units, c, s + !swap, t)) =
        swap ? make_uint2(q.x, q.y) : make_uint2(q.z, q.w);
  };
  loraq_gemv::staged_copy<2, uint4>(rows * chunks * 2 * kSteps, tid, threads, load, store);
}

// A lane's data of one task: its two tile rows (tn, tn + 2), tile columns tk .. tk + kSteps - 1.
// val[j][i] holds values 2i and 2i + 1 of tile row j; pos[j][q] positions 8q .. 8q + 7. Zeros past
// TN and TK.
template <bool VEC>
__host__ __device__ __forceinline__ void load_task(const Args& a, int tn, int tk, uint32_t (&val)[2][kSteps / 2],
                                                   uint32_t (&pos)[2][kSteps / 8]) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = tn + 2 * j;
    const bool inside = row < a.TN && tk < a.TK;
    const uint16_t* vrow = a.values + (int64_t)row * a.TK;
    const uint8_t* prow = a.positions + (int64_t)row * a.PW;
    if (VEC) {  // TK % kTaskTiles == 0, 16-byte aligned bases: the tiles lie inside the row
#pragma unroll
      for (int i = 0; i < kSteps / 8; ++i) {
        const uint4 u = inside ? load_ro(reinterpret_cast<const uint4*>(vrow + tk) + i) : make_uint4(0u, 0u, 0u, 0u);
        val[j][4 * i] = u.x, val[j][4 * i + 1] = u.y, val[j][4 * i + 2] = u.z, val[j][4 * i + 3] = u.w;
      }
      const uint4 p = inside ? load_ro(reinterpret_cast<const uint4*>(prow + tk / 2)) : make_uint4(0u, 0u, 0u, 0u);
      pos[j][0] = p.x, pos[j][1] = p.y, pos[j][2] = p.z, pos[j][3] = p.w;
    } else {
#pragma unroll
      for (int i = 0; i < kSteps / 2; ++i) val[j][i] = 0u;
#pragma unroll
      for (int q = 0; q < kSteps / 8; ++q) pos[j][q] = 0u;
      if (!inside) continue;
#pragma unroll
      for (int i = 0; i < kSteps; ++i)
        if (tk + i < a.TK) val[j][i >> 1] |= (uint32_t)load_ro(vrow + tk + i) << (16 * (i & 1));
#pragma unroll
      for (int b = 0; b < kSteps / 2; ++b)
        if (tk + 2 * b < a.TK) pos[j][b >> 2] |= (uint32_t)load_ro(prow + tk / 2 + b) << (8 * (b & 3));
    }
  }
}

// A lane's A registers for mma step s (its tile column 16·t + s of the task): {a0a1, a2a3, a4a5,
// a6a7} = {lo of tile row 0, lo of tile row 1, hi of row 0, hi of row 1} (rows g and g + 8).
// pwx[j][q]: the position words xored with the lane's row inside the tile.
__host__ __device__ __forceinline__ void a_regs(const uint32_t (&val)[2][kSteps / 2], const uint32_t (&pwx)[2][kSteps / 8], int s,
                                                uint32_t (&fa)[4]) {
  decode_tile(val[0][s >> 1], s & 1, shift_of(pwx[0][s >> 3], s & 7), fa[0], fa[2]);
  decode_tile(val[1][s >> 1], s & 1, shift_of(pwx[1][s >> 3], s & 7), fa[1], fa[3]);
}

// The lane's row inside the tile (g % 4) in bits 2, 3 of every nibble, to xor with the positions.
__host__ __device__ __forceinline__ uint32_t row_mask(int g) { return (uint32_t)(g & 3) * 0x44444444u; }

#ifdef __CUDACC__
using loraq_gemv::mma;

// Add a warp's sums for weight rows 16·rg .. 16·rg + 15 into the workspace and zero them.
template <int NT>
__device__ __forceinline__ void flush(const Args& a, float (&acc)[NT][4], int rg, int g, int t) {
  static_assert(kTileRows == 8, "add_fragments takes m16n8 fragments");
  loraq_gemv::add_fragments<NT>(a.ws, a.M, a.N, acc, rg * kTaskRows + g, t, 1.f, 1.f);
}

// A warp's run of tasks in its block's K slice (tile columns from tile0, `chunks` tasks a row
// group, xs its copy of x), summed on the tensor cores and added into the workspace whenever its
// 16 rows change.
template <typename T, bool VEC, int NT>
__device__ __forceinline__ void run_warp(const Args& a, const uint32_t* xs, int tile0, int chunks, int row_units) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int warps = blockDim.x >> 5;
  const int64_t warp = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5), total = (int64_t)gridDim.x * warps;
  const int64_t tasks = (int64_t)((a.N + kTaskRows - 1) / kTaskRows) * chunks;
  const auto [first, count] = loraq_gemv::warp_run(warp, total, tasks);
  if (count <= 0) return;
  // lane g reads row g of x for tile 0, row 8 + g for tile 1
  int xrow[NT];
#pragma unroll
  for (int tile = 0; tile < NT; ++tile) xrow[tile] = (tile * kTileRows + g) * row_units;
  const uint32_t rmask = row_mask(g);
  const int lane_tk = tile0 + kSteps * t;  // lane t's first tile column of chunk 0

  float acc[NT][4] = {};
  int rg = (int)(first / chunks), c = (int)(first % chunks);
  uint32_t val[2][kSteps / 2], pos[2][kSteps / 8];
  load_task<VEC>(a, 4 * rg + g / 4, lane_tk + c * kTaskTiles, val, pos);
  for (int left = count; left > 0; --left) {
    int nc = c + 1, nrg = rg;
    if (nc == chunks) {
      nc = 0;
      ++nrg;
    }
    uint32_t nval[2][kSteps / 2], npos[2][kSteps / 8];  // the next task's loads fly while this one computes
    load_task<VEC>(a, left > 1 ? 4 * nrg + g / 4 : a.TN, lane_tk + nc * kTaskTiles, nval, npos);
    uint32_t pwx[2][kSteps / 8];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int q = 0; q < kSteps / 8; ++q) pwx[j][q] = pos[j][q] ^ rmask;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      uint32_t fa[4];
      a_regs(val, pwx, s, fa);
#pragma unroll
      for (int tile = 0; tile < NT; ++tile) {
        const uint2 b = *reinterpret_cast<const uint2*>(xs + 2 * (xrow[tile] + (c * kSteps + s) * 4 + t));
        mma(acc[tile], fa, b.x, b.y, T());
      }
    }
    if (left == 1 || nrg != rg) flush<NT>(a, acc, rg, g, t);
    rg = nrg;
    c = nc;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < kSteps / 2; ++i) val[j][i] = nval[j][i];
#pragma unroll
      for (int q = 0; q < kSteps / 8; ++q) pos[j][q] = npos[j][q];
    }
  }
}

// The one-launch finish after a warp's run (gemv_finish.cuh): row groups of 16 weight rows; the
// wait for x·Aᵀ inlined (this kernel may take up to 128 registers).
template <typename T>
__device__ __forceinline__ void finish_after_run(const MmaArgs& a) {
  const loraq_gemv::Indices at = loraq_gemv::fresh_indices();
  const int tile0 = at.block_y * a.slice_tiles;
  const int chunks = (min(a.TK - tile0, a.slice_tiles) + kTaskTiles - 1) / kTaskTiles;
  loraq_gemv::finish_row_groups<T, true>(a, at, chunks, kTaskRows);
}

// ONE: the one-launch finish (a.fin.y set), a separate instantiation (the two-launch kernel's
// registers and loop stay as they were). Its launch bound asks for one block an SM at least: left to
// its own heuristic, ptxas held the one-launch kernel to 64 registers and spilled 440-1284 bytes
// (with it, 112 and none; the configs put 16 warps at most on an SM, which 128 registers allow).
template <typename T, bool VEC, int NT, bool ONE>
__global__ void __launch_bounds__(kThreads, ONE ? 1 : 0)
    sparse4x4_gemv_mma_kernel(const std::conditional_t<ONE, MmaArgs, Args> a) {
  extern __shared__ uint4 smem_u4[];
  uint32_t* xs = reinterpret_cast<uint32_t*>(smem_u4);
  const int tile0 = blockIdx.y * a.slice_tiles;
  const int tiles = min(a.TK - tile0, a.slice_tiles);
  const int chunks = (tiles + kTaskTiles - 1) / kTaskTiles;
  const int row_units = chunks * kSteps * 4 + kRowPadUnits;  // 8-byte units a row of x
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  if constexpr (ONE) {
    if (a.parts != nullptr) {  // this warp's batch of x·Aᵀ's items
      const int warps = blockDim.x >> 5;
      const int64_t total = (int64_t)gridDim.x * warps;
      loraq_gemv::own_xa_batch<T>(a, (int)(blockIdx.y * total + (int64_t)blockIdx.x * warps + (threadIdx.x >> 5)),
                                  loraq_gemv::xa_batch(a, (int)(total * gridDim.y)), threadIdx.x & 31);
    }
  } else if (a.parts != nullptr && block < a.slots) {
    loraq_gemv::store_xa_share<T>(a, block);
  }
  fill_x<T>(a, xs, 4 * tile0, chunks * kTaskInputs, row_units, NT * kTileRows, threadIdx.x, blockDim.x);
  __syncthreads();
  run_warp<T, VEC, NT>(a, xs, tile0, chunks, row_units);
  if constexpr (ONE) finish_after_run<T>(a);
}
#endif  // __CUDACC__

// Tile columns a K slice for at most k_split slices of whole tasks.
__host__ __device__ __forceinline__ int slice_tiles_for(int TK, int k_split) {
  const int per = (TK + k_split - 1) / k_split;
  return (per + kTaskTiles - 1) / kTaskTiles * kTaskTiles;
}

}  // namespace loraq_sparse_mma
