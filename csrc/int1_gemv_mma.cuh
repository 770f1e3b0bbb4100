// The int1 small-batch forward on tensor cores: x·Ŵᵀ for up to 16 rows of x, the weight read once.
//
// Device code only (no torch headers), so that bench/sass_report.py-style checks can compile it
// for sm_90 in seconds: csrc/int1_gemv_mma_op.h holds the launcher and the op registration.
//
// Why: at one row of x the Triton kernels either decode a whole tile through shared memory
// (tl.dot) or look sums up in tables (int1_gemv_lut.py, L1-bound on an H100: NOTES.md). Here each
// warp decodes its weights straight into the A operand of mma.sync.m16n8k16 (16 weight rows x 16
// inputs), two signs with two integer instructions, and x, kept in shared memory in the matching
// order, is the B operand (8 columns: rows of x; 9 to 16 rows take a second mma on the same A
// registers, so the decode, the cost, is paid once for 16 rows). Nothing of Ŵ is ever stored.
//
// The decode ("pair order"): bits p and p + 16 of a word, shifted left by 15 - p, sit on bits 15
// and 31, the sign bits of a pair of 16-bit floats. ((word << (15 - p)) & 0x80008000) ^ (-1, -1)
// is then (+1 or -1, +1 or -1): one shift and one LOP3 per register of A. So register p of a word
// holds the weights of inputs k + p and k + p + 16, and x's pairs are stored the same way.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane =
// 4·g + t: A regs {a0a1, a2a3, a4a5, a6a7} = rows {g, g+8, g, g+8} at columns {2t, 2t, 2t+8, 2t+8}
// (+0, +1 in the halves); B regs {b0b1, b2b3} = column g at rows {2t, 2t+8} (+0, +1); C {c0..c3} =
// rows {g, g, g+8, g+8}, columns {2t, 2t+1, 2t, 2t+1}. Here the mma's rows are weight rows (n), its
// columns rows of x (m), its reduction inputs (k).
//
// Which input each mma column stands for is ours to choose, as long as A and B agree. Lane (g, t)
// owns 4 consecutive words (a 16-byte load) of weight rows g and g + 8: a quad reads 64 contiguous
// bytes of a row, a warp 16 rows x 512 inputs (a "task"). For word j of the four and i = 0..7, mma
// step (j, i) takes registers 2i and 2i + 1 of the words as its columns {2t, 2t+1} and {2t+8,
// 2t+9}; B must then hold x's pairs 2i and 2i + 1 of the same word, for lane t: 8 bytes that the
// shared layout below puts side by side.
//
// Work split (stream-K): a K slice per blockIdx.y; within it, the tasks (16 weight rows x 512
// inputs) in row-major order are cut into equal runs, one per warp. A warp sums its run in the
// mma accumulator and adds it (times the row scale) into the fp32 workspace with atomics whenever
// its 16 rows change. Every warp gets the same number of tasks, whatever N is.
//
// Two row groups a task (RG = 2, the launcher's "32-row tasks"): 32 weight rows x 256 inputs, lane
// (g, t) loading 2 words (8 bytes, a quad still a whole 32-byte sector) of rows g, g + 8, g + 16
// and g + 24. Each B fragment read from shared memory then feeds both row groups' mma: half the
// LDS a weight. At 9 to 16 rows of x every LDS of B is 256 distinct bytes (two wavefronts), and
// with 64 LDS and 64 HMMA a 16-row task, shared memory alone needs about 16 µs of 8192→28672's
// time on an H100 (NOTES.md, v17). Per chunk a lane owns words LW·t .. LW·t + LW - 1 (LW = 4 / RG).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "gemv_common.cuh"
#include "gemv_finish.cuh"

namespace loraq_mma {

constexpr int kTaskRows = 16;     // weight rows a row group (the mma's M), and a task of one group
constexpr int kTaskInputs = 512;  // inputs a task of one row group: 4 lanes x 4 words x 32
constexpr int kTaskWords = kTaskInputs / 32;

// Inputs a K slice when K is cut in k_split slices of whole tasks of task_inputs (the op's plan;
// the host emulations use it too). int64 for the op's checks before K is known to fit an int.
__host__ __device__ __forceinline__ int64_t slice_inputs_for(int64_t K, int64_t k_split, int64_t task_inputs) {
  const int64_t per = (K + k_split - 1) / k_split;
  return (per + task_inputs - 1) / task_inputs * task_inputs;
}

// A task of RG row groups (1 or 2): 16·RG weight rows x 512 / RG inputs (its chunk), lane t
// loading kLaneWords consecutive words of each of its 2·RG rows.
template <int RG>
struct Task {
  static_assert(RG == 1 || RG == 2, "a task is one or two row groups");
  static constexpr int kLaneWords = 4 / RG;
  static constexpr int kRows = kTaskRows * RG;
  static constexpr int kWords = 4 * kLaneWords;  // words a row of the task
  static constexpr int kInputs = 32 * kWords;
};
constexpr int kTileRows = 8;      // rows of x an mma takes (its N)
constexpr int kMaxRows = 16;      // rows of x: one or two mma tiles (NT), each decoded A feeds both
constexpr int kRowPadUnits = 4;   // 32 bytes of padding per row of x in shared memory: no bank conflicts

// Scale modes, as decode.SCALE_ROW / SCALE_GROUP / SCALE_ONEBIT in kernels/decode.py.
constexpr int kScaleRow = 0, kScaleGroup = 1, kScaleOnebit = 2;
// Per-row α and onebit with the offset decode (below; LORAQ_OFFSET_DECODE=1, opt-in until its GPU
// tests have run): the op's modes 3 and 4.
constexpr int kScaleRowOffset = 3, kScaleOnebitOffset = 4;
__host__ __device__ constexpr bool is_offset(int mode) { return mode >= kScaleRowOffset; }
__host__ __device__ constexpr bool is_onebit(int mode) { return mode == kScaleOnebit || mode == kScaleOnebitOffset; }

// The offset decode: one LOP3 a register. Register p of a word takes bits p and p + 16 of the word
// shifted so that they land on mantissa bit q = kOffsetQ0 + (p & 3) of each half, ORed with 16.0
// in both halves: each half is then 16 + b·2^(p & 3) exactly (b the bit), in fp16 (mantissa bits
// 6..9) and in bf16 (3..6). x is stored times 2^-(p & 3), so the mma sums 16·x' + b·x, and
//   Σ (2b − 1)·x = 2·(Σ (16 + b·2^(p&3))·x' − C/2),  C = Σ (32 + 2^(p&3))·x',
// C a constant of each row of x and chunk of 512 inputs (fill_x computes it into a table after the
// rows of x). Each task subtracts its chunk's C/2 from the accumulators as soon as its mma steps
// are done, so that they never hold more than one task's 16·Σx': over a whole run they would grow
// with its length wherever x does not average zero, and the mma's fp32 rounding with them. The
// flush doubles. Four shifts and 16 LOP3 decode a word where pair order takes 15 and 16.
template <typename T>
struct OffsetDecode;
template <>
struct OffsetDecode<__half> {
  static constexpr int kQ0 = 6;                     // mantissa bits 6..9 of 10
  static constexpr uint32_t kSixteens = 0x4C004C00u;  // (16, 16)
};
template <>
struct OffsetDecode<__nv_bfloat16> {
  static constexpr int kQ0 = 3;                     // mantissa bits 3..6 of 7
  static constexpr uint32_t kSixteens = 0x41804180u;
};

// Copy h (0..3) of a word for the offset decode: bits 4h .. 4h + 3 (and 16 more) moved to kQ0.
template <typename T>
__host__ __device__ __forceinline__ uint32_t offset_copy(uint32_t word, int h) {
  const int shift = OffsetDecode<T>::kQ0 - 4 * h;
  return shift >= 0 ? word << shift : word >> -shift;
}

// Register p of a word, from its copy p >> 2: (16 + b·2^(p&3), 16 + b'·2^(p&3)) in T; `sixteens`
// holds (16, 16) (from a register: as an immediate the compiler would split the LOP3 in two).
template <typename T>
__host__ __device__ __forceinline__ uint32_t offset_pair(uint32_t copy, int p, uint32_t sixteens) {
  return (copy & (0x00010001u << (OffsetDecode<T>::kQ0 + (p & 3)))) | sixteens;
}

// The offset decode's C of row m of x and chunk c of the slice: a float in the table that follows
// the M rows of x (row_units 8-byte units each) in shared memory, M·chunks floats, chunk-major (the
// four lanes t of a quad read rows 2t, 2t + 1 of one chunk: adjacent words).
__host__ __device__ __forceinline__ float* offset_c(uint32_t* xs, int M, int row_units, int m, int c) {
  return reinterpret_cast<float*>(xs + 2 * M * row_units) + c * M + m;
}

template <typename T>
struct Half2Bits;  // the bits of (-1, -1) in T, and the mma instruction for T
template <>
struct Half2Bits<__half> {
  static constexpr uint32_t kMinusOnes = 0xBC00BC00u;
};
template <>
struct Half2Bits<__nv_bfloat16> {
  static constexpr uint32_t kMinusOnes = 0xBF80BF80u;
};

using loraq_gemv::bits16;
using loraq_gemv::from_float;
using loraq_gemv::mma;
using loraq_gemv::to_float;

// Register p (0..15) of a word: the signs of its bits p and p + 16 as a pair of ±s, where
// `minus2` holds (-s, -s) (s = 1, or a group's α folded in).
__host__ __device__ __forceinline__ uint32_t sign_pair(uint32_t word, int p, uint32_t minus2) {
  return ((word << (15 - p)) & 0x80008000u) ^ minus2;
}

// 8-byte units of the shared copy of x: row m of x, chunk c (a task's inputs) of the slice, word j
// of lane t's LW (Task::kLaneWords), register pair i. The four lanes t of a quad read adjacent
// units; rows of x are 32 bytes apart modulo 128, so the 16 lanes of a half warp hit 16 different
// 8-byte bank pairs.
__host__ __device__ __forceinline__ int x_unit_at(int row_base, int c, int j, int i, int t, int LW = 4) {
  return row_base + ((c * LW + j) * 8 + i) * 4 + t;
}
__host__ __device__ __forceinline__ int x_unit(int m, int row_units, int c, int j, int i, int t, int LW = 4) {
  return x_unit_at(m * row_units, c, j, i, t, LW);
}

struct Args {
  const void* x;          // [M, K] in T, contiguous
  const int32_t* packed;  // [N, KW]
  const void* scale;      // [N, G] in T (α per row or group; onebit h)
  const void* col;        // [K] in T (onebit g), else unused
  const void* lora_A;     // [R, K] in T, or null
  float* ws;              // [M, N] fp32, zeroed: the sums are added in
  float* parts;           // [slots, M, block_r] fp32: each LoRA slot's share of x·Aᵀ, or null
  int M, N, K, KW, G, group_size, R, block_r, slots;
  int slice_inputs;       // inputs a K slice (a multiple of kTaskInputs): blockIdx.y's slice
  // (-1, -1) in T, from the launcher: as an immediate, the compiler splits the decode's
  // (shifted & mask) ^ (-1, -1) into two LOP3 (one immediate each); from a register it is one
  uint32_t minus_ones;
  uint32_t sixteens;  // (16, 16) in T: the offset decode's constant, from a register likewise
  // group mode: 1 / (words a group). A word's group is floor((word + 0.5) · this), exact in fp32
  // for words < 2^22 (K < 134 M): three instructions where an integer division takes about twenty
  float inv_group_words;
  loraq_gemv::Finish fin;  // the one-launch finish (gemv_finish.cuh); fin.y null: two launches
};

// Inputs 32w .. 32w + 31 of one row of x (a word's worth), as loraq_gemv::load_x8 returns them.
struct XWord {
  uint4 q[4];
};

// Onebit: x·g for 8 inputs, each rounded to T (the reference rounds h·g; the tolerance covers the
// difference).
template <typename T>
__host__ __device__ __forceinline__ uint4 times_g(const uint4& xq, const uint4& gq) {
  uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float lo = loraq_gemv::input_of<T>(xq, 2 * e) * loraq_gemv::input_of<T>(gq, 2 * e);
    const float hi = loraq_gemv::input_of<T>(xq, 2 * e + 1) * loraq_gemv::input_of<T>(gq, 2 * e + 1);
    w[e] = (uint32_t)bits16(from_float<T>(lo)) | ((uint32_t)bits16(from_float<T>(hi)) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Two consecutive inputs (as stored: the low half is register p's, the high half register p + 1's)
// times 2^-(p & 3) and 2^-((p + 1) & 3), rounded to T (exact unless they fall below T's normal
// range); adds each scaled input times 32 + 2^(its p & 3) to csum (the offset decode's C).
template <typename T>
__host__ __device__ __forceinline__ uint32_t scaled_pair(uint32_t two, int p, float& csum) {
  uint32_t out = 0;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = (p + e) & 3;
    const uint16_t bits = (uint16_t)(e ? two >> 16 : two & 0xFFFFu);
    T v;
    memcpy(&v, &bits, 2);
    const T scaled = from_float<T>(to_float(v) * (1.f / (float)(1 << r)));
    csum += to_float(scaled) * (float)(32 + (1 << r));
    out |= (uint32_t)bits16(scaled) << (16 * e);
  }
  return out;
}

// Fill the shared copy of this block's slice of x in pair order: unit (m, c, j, i, t) holds, for
// word w = 4·LW·c + LW·t + j of the slice (LW = 4: 16c + 4t + j), the pairs (x[32w + p], x[32w + p + 16]) for p = 2i, 2i + 1.
// Inputs past K are 0 (the padding bits of the last word decode to -1 and must add nothing).
// Onebit: x·g. The offset decode: x·2^-(p & 3), and each word's share of C added into the table
// after the rows (zeroed before). Thread `tid` of `threads` (__host__ too: tests/cuda/ runs it on the CPU).
//
// An item is a word of one row of x: four 16-byte loads (where x's rows are aligned), two items a
// round in flight, then eight 8-byte stores. Item bits 0-1 are t and the next ones the row of x,
// so that a warp's stores spread over the banks (rows of x are 4 units apart modulo 16).
template <typename T, int MODE, int LW = 4>
__host__ __device__ void fill_x(const Args& a, uint32_t* xs, int k0, int chunks, int row_units, int tid,
                                int threads) {
  constexpr int kChunkWords = 4 * LW;  // words a row of a chunk
  const bool vx = loraq_gemv::rows_aligned16(a.x, a.K), vg = loraq_gemv::rows_aligned16(a.col, a.K);
  const int items = a.M * chunks * kChunkWords;
  auto word_of = [&](int item, int& m, int& w) {
    const int t = item & 3, rest = item >> 2, cj = rest / a.M;
    m = rest % a.M;
    w = (cj / LW) * kChunkWords + LW * t + cj % LW;
  };
  auto load = [&](int item) {
    int m, w;
    word_of(item, m, w);
    XWord d;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      d.q[q] = loraq_gemv::load_x8(a.x, a.M, a.K, m, k0 + 32 * w + 8 * q, vx);
      if (is_onebit(MODE)) d.q[q] = times_g<T>(d.q[q], loraq_gemv::load_x8(a.col, 1, a.K, 0, k0 + 32 * w + 8 * q, vg));
    }
    return d;
  };
  auto store = [&](int item, const XWord& d) {
    int m, w;
    word_of(item, m, w);
    const int c = w / kChunkWords, t = (w / LW) & 3, j = w % LW;
    float csum = 0.f;  // the offset decode's share of C from this word
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // pairs 2i, 2i + 1: inputs 2i, 2i + 1 with 2i + 16, 2i + 17
      const uint4& lo4 = d.q[i >> 2];
      const uint4& hi4 = d.q[2 + (i >> 2)];
      uint32_t lo = (i & 3) == 0 ? lo4.x : (i & 3) == 1 ? lo4.y : (i & 3) == 2 ? lo4.z : lo4.w;
      uint32_t hi = (i & 3) == 0 ? hi4.x : (i & 3) == 1 ? hi4.y : (i & 3) == 2 ? hi4.z : hi4.w;
      if (is_offset(MODE)) {  // register p = 2i + e takes x' = x·2^-(p & 3)
        lo = scaled_pair<T>(lo, 2 * i, csum);
        hi = scaled_pair<T>(hi, 2 * i, csum);
      }
      *reinterpret_cast<uint2*>(xs + 2 * x_unit(m, row_units, c, j, i, t, LW)) =
          make_uint2((lo & 0xFFFFu) | (hi << 16), (lo >> 16) | (hi & 0xFFFF0000u));
    }
    if (is_offset(MODE)) loraq_gemv::atomic_add_float(offset_c(xs, a.M, row_units, m, c), csum);
  };
  loraq_gemv::staged_copy<is_onebit(MODE) ? 1 : 2, XWord>(items, tid, threads, load, store);
}

// A lane's LW consecutive words of one weight row for the task's chunk (LW = Task::kLaneWords): a
// uint4 or a uint2, so that one vector load fills it.
template <int LW>
using Words = std::conditional_t<LW == 4, uint4, uint2>;

// Word j of a lane's words.
template <typename W>
__host__ __device__ __forceinline__ uint32_t word_at(const W& u, int j) {
  if constexpr (sizeof(W) == 16) return j == 0 ? u.x : j == 1 ? u.y : j == 2 ? u.z : u.w;
  else return j == 0 ? u.x : u.y;
}

// Lane (g, t)'s LW words of one weight row for the task's chunk, zeros past the row or past N.
template <bool VEC, int LW>
__host__ __device__ __forceinline__ Words<LW> load_words(const Args& a, int n, int word) {
  Words<LW> u{};
  if (n >= a.N) return u;
  const int32_t* row = a.packed + (int64_t)n * a.KW;
  if (VEC) {  // KW % 4 == 0 and an aligned base: one 16- or 8-byte load (word is a multiple of LW)
    if (word < a.KW) u = loraq_gemv::load_ro(reinterpret_cast<const Words<LW>*>(row + word));
  } else {
    uint32_t w[LW] = {};
#pragma unroll
    for (int e = 0; e < LW; ++e)
      if (word + e < a.KW) w[e] = (uint32_t)loraq_gemv::load_ro(row + word + e);
    if constexpr (LW == 4) u = make_uint4(w[0], w[1], w[2], w[3]);
    else u = make_uint2(w[0], w[1]);
  }
  return u;
}

// Lane (g, t)'s lines of task `task` (rows g + 8h of its 16·RG rows, its words of the chunk) on
// their way into L2.
template <int RG>
__device__ __forceinline__ void prefetch_task(const Args& a, int64_t task, int chunks, int g, int word0) {
  const int rb = (int)(task / chunks), word = word0 + (int)(task % chunks) * Task<RG>::kWords;
  if (word >= a.KW) return;
#pragma unroll
  for (int h = 0; h < 2 * RG; ++h) {
    const int n = rb * Task<RG>::kRows + g + 8 * h;
    if (n < a.N) loraq_gemv::prefetch_l2(a.packed + (int64_t)n * a.KW + word);
  }
}

// (-α, -α) in T for the group of word `word` of row n (group mode), else (-1, -1).
template <typename T, int MODE>
__host__ __device__ __forceinline__ uint32_t minus_pair(const Args& a, int n, int word) {
  if (MODE != kScaleGroup || n >= a.N || word >= a.KW) return a.minus_ones;
  const T* s = static_cast<const T*>(a.scale);
  const int group = loraq_gemv::trunc_to_int(((float)word + 0.5f) * a.inv_group_words);
  const uint32_t b = bits16(s[(int64_t)n * a.G + group]) ^ 0x8000u;
  return b | (b << 16);
}

// Lane (g, t)'s A registers for mma step (j, i) of one row group: registers 2i (columns 2t, 2t+1)
// and 2i + 1 (columns 2t+8, 2t+9) of its words j of rows g (wu) and g + 8 (wv), with the decode's
// (-α, -α) of each (mu, mv); the offset decode (OFFSET) takes the words' copies (cu, cv:
// offset_copy's, h = 0..3) and (16, 16) in mu. i is a constant once unrolled, so each shift is an
// immediate. (__host__ too: tests/cuda/int1_mma_emulate.cu builds the fragments with it.)
template <typename T, bool OFFSET>
__host__ __device__ __forceinline__ void a_fragment(uint32_t (&fa)[4], uint32_t wu, uint32_t wv, uint32_t mu,
                                                    uint32_t mv, const uint32_t (&cu)[4], const uint32_t (&cv)[4],
                                                    int i) {
  if (OFFSET) {
    fa[0] = offset_pair<T>(cu[i >> 1], 2 * i, mu);
    fa[1] = offset_pair<T>(cv[i >> 1], 2 * i, mu);
    fa[2] = offset_pair<T>(cu[i >> 1], 2 * i + 1, mu);
    fa[3] = offset_pair<T>(cv[i >> 1], 2 * i + 1, mu);
  } else {
    fa[0] = sign_pair(wu, 2 * i, mu);
    fa[1] = sign_pair(wv, 2 * i, mv);
    fa[2] = sign_pair(wu, 2 * i + 1, mu);
    fa[3] = sign_pair(wv, 2 * i + 1, mv);
  }
}

// One task: 16·RG rows x 512 / RG inputs, 32 / RG mma steps a tile of x and row group. wd[h]: the
// words of row g + 8h (h = 2r + half: row group r); m[h][j]: the decode's (-α, -α) for word j of
// row h (the offset decode: m[0][0] holds (16, 16)); xrow[tile]: the first unit of the row of x
// that lane g reads for each tile. Each B fragment is read once and feeds every row group.
template <typename T, int NT, int RG, bool OFFSET>
__device__ __forceinline__ void task_mma(float (&acc)[RG][NT][4], const Words<Task<RG>::kLaneWords> (&wd)[2 * RG],
                                         const uint32_t (&m)[2 * RG][Task<RG>::kLaneWords], const uint32_t* xs,
                                         const int (&xrow)[NT], int c, int t) {
  constexpr int LW = Task<RG>::kLaneWords;
#pragma unroll
  for (int j = 0; j < LW; ++j) {
    uint32_t cp[2 * RG][4];  // the offset decode's four copies of each word
#pragma unroll
    for (int h = 0; h < 2 * RG; ++h)
#pragma unroll
      for (int q = 0; q < 4; ++q) cp[h][q] = OFFSET ? offset_copy<T>(word_at(wd[h], j), q) : 0u;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      uint2 b[NT];  // x's pairs 2i, 2i + 1 of word j for this lane, each tile
#pragma unroll
      for (int tile = 0; tile < NT; ++tile) b[tile] = *reinterpret_cast<const uint2*>(xs + 2 * x_unit_at(xrow[tile], c, j, i, t, LW));
#pragma unroll
      for (int r = 0; r < RG; ++r) {
        const int u = 2 * r, v = 2 * r + 1;
        uint32_t fa[4];
        a_fragment<T, OFFSET>(fa, word_at(wd[u], j), word_at(wd[v], j), OFFSET ? m[0][0] : m[u][j],
                              OFFSET ? m[0][0] : m[v][j], cp[u], cp[v], i);
#pragma unroll
        for (int tile = 0; tile < NT; ++tile) mma(acc[r][tile], fa, b[tile].x, b[tile].y, T());
      }
    }
  }
}

// Add a warp's sums for rows 16·rg .. 16·rg + 15 into the workspace, times the row scale (α or
// onebit h, rounded to T as the reference rounds Ŵ; group mode folded it into the decode), and
// times 2 with the offset decode (its tasks subtracted C/2 already).
template <typename T, int MODE, int NT>
__host__ __device__ __forceinline__ void flush(const Args& a, float (&acc)[NT][4], int rg, int g, int t) {
  static_assert(kTileRows == 8, "add_fragments takes m16n8 fragments");
  const T* s = static_cast<const T*>(a.scale);
  const int n0 = rg * kTaskRows + g, n1 = n0 + 8;
  const float twice = is_offset(MODE) ? 2.f : 1.f;
  const float s0 = (MODE != kScaleGroup && n0 < a.N) ? twice * to_float(s[(int64_t)n0 * a.G]) : 1.f;
  const float s1 = (MODE != kScaleGroup && n1 < a.N) ? twice * to_float(s[(int64_t)n1 * a.G]) : 1.f;
  loraq_gemv::add_fragments<NT>(a.ws, a.M, a.N, acc, n0, t, s0, s1);
}

// The offset decode, after a task of chunk c: its C/2 off the accumulators of lane (g, t)'s rows of
// x (2t, 2t + 1 of each tile; rows past M read nothing, their columns are never stored).
template <int NT>
__host__ __device__ __forceinline__ void subtract_half_c(const Args& a, float (&acc)[NT][4], uint32_t* xs, int row_units,
                                                int c, int t) {
#pragma unroll
  for (int tile = 0; tile < NT; ++tile)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m = tile * kTileRows + 2 * t + e;
      const float half_c = m < a.M ? 0.5f * *offset_c(xs, a.M, row_units, m, c) : 0.f;
      acc[tile][e] -= half_c;
      acc[tile][2 + e] -= half_c;
    }
}

// A warp's run of tasks [first, first + count) of its K slice, summed on the tensor cores and
// added into the workspace whenever its 16·RG rows change.
template <typename T, int MODE, bool VEC, int NT, int RG>
__device__ __forceinline__ void run_tasks(const Args& a, uint32_t* xs, int64_t first, int count, int chunks,
                                          int row_units, int word0, int g, int t) {
  using S = Task<RG>;
  constexpr int LW = S::kLaneWords;
  // lane g reads row g of x for tile 0, row 8 + g for tile 1; lanes past the rows of x read row 0
  // (their columns of the product are never stored)
  int xrow[NT];
#pragma unroll
  for (int tile = 0; tile < NT; ++tile) xrow[tile] = (tile * kTileRows + g < a.M ? tile * kTileRows + g : 0) * row_units;

  float acc[RG][NT][4] = {};
  int rb = (int)(first / chunks), c = (int)(first % chunks);  // the task: block of 16·RG rows, chunk
  Words<LW> wd[2 * RG];
#pragma unroll
  for (int h = 0; h < 2 * RG; ++h) wd[h] = load_words<VEC, LW>(a, rb * S::kRows + g + 8 * h, word0 + c * S::kWords);
  for (int left = count; left > 0; --left) {
    // the next task's words first: their loads fly while this task decodes
    int nc = c + 1, nrb = rb;
    if (nc == chunks) {
      nc = 0;
      ++nrb;
    }
    Words<LW> next[2 * RG] = {};
    if (left > 1)
#pragma unroll
      for (int h = 0; h < 2 * RG; ++h) next[h] = load_words<VEC, LW>(a, nrb * S::kRows + g + 8 * h, word0 + nc * S::kWords);
    uint32_t m[2 * RG][LW];
    if (is_offset(MODE)) m[0][0] = a.sixteens;
#pragma unroll
    for (int h = 0; h < 2 * RG && !is_offset(MODE); ++h)
#pragma unroll
      for (int j = 0; j < LW; ++j) m[h][j] = minus_pair<T, MODE>(a, rb * S::kRows + g + 8 * h, word0 + c * S::kWords + j);
    task_mma<T, NT, RG, is_offset(MODE)>(acc, wd, m, xs, xrow, c, t);
    if (is_offset(MODE))
#pragma unroll
      for (int r = 0; r < RG; ++r) subtract_half_c<NT>(a, acc[r], xs, row_units, c, t);
    if (left == 1 || nrb != rb)
#pragma unroll
      for (int r = 0; r < RG; ++r) flush<T, MODE, NT>(a, acc[r], rb * RG + r, g, t);
    rb = nrb;
    c = nc;
#pragma unroll
    for (int h = 0; h < 2 * RG; ++h) wd[h] = next[h];
  }
}

// The one-launch finish after a warp's run (gemv_finish.cuh): row groups of 16 weight rows; the
// wait for x·Aᵀ out of line (inlined, at this kernel's 64 registers, it spilled 200-300 bytes).
template <typename T>
__device__ __forceinline__ void finish_after_run(const Args& a) {
  loraq_gemv::finish_input_slices<T, false>(a, kTaskInputs, kTaskRows);
}

// ONE: the one-launch finish (gemv_finish.cuh; a.fin.y set), a separate instantiation so that the
// two-launch kernel's registers and loop stay as they were; one row group a task only (its units
// are 16 rows x 512 inputs). RG: row groups a task (above).
// Blocks of up to 1024 threads (64 registers: 32 warps an SM) with one row group a task; with two,
// 768 (80 registers, 24 warps an SM: their second group's accumulators and words spilled at 64).
template <typename T, int MODE, bool VEC, int NT, bool ONE, int RG = 1>
__global__ void __launch_bounds__(RG == 1 ? 1024 : 768) int1_gemv_mma_kernel(const Args a) {
  static_assert(!ONE || RG == 1, "the one-launch finish takes tasks of one row group");
  using S = Task<RG>;
  extern __shared__ uint4 smem_raw[];
  uint32_t* xs = reinterpret_cast<uint32_t*>(smem_raw);
  const int slice = blockIdx.y;
  const int k0 = slice * a.slice_inputs;
  const int chunks = (min(a.K - k0, a.slice_inputs) + S::kInputs - 1) / S::kInputs;
  const int row_units = chunks * (S::kInputs / 4) + kRowPadUnits;  // 8-byte units a row of x (4 inputs each)

  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int warps = blockDim.x >> 5;
  const int64_t warp = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5), total = (int64_t)gridDim.x * warps;
  const int64_t tasks = (int64_t)((a.N + S::kRows - 1) / S::kRows) * chunks;
  const int word0 = k0 / 32 + S::kLaneWords * t;  // lane t's first word of chunk 0
  {  // the first two tasks start for L2 before the copy of x (the plan is made again after it: held
     // across the copy, it would take registers)
    const auto [first, count] = loraq_gemv::warp_run(warp, total, tasks);
    for (int i = 0; i < 2 && i < count; ++i) prefetch_task<RG>(a, first + i, chunks, g, word0);
  }
  if (is_offset(MODE)) {  // the table of C: zero before fill_x adds into it
    for (int i = threadIdx.x; i < a.M * chunks; i += blockDim.x) offset_c(xs, a.M, row_units, 0, 0)[i] = 0.f;
    __syncthreads();
  }
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  if (ONE && a.parts != nullptr)  // this warp's batch of x·Aᵀ's items
    loraq_gemv::own_xa_batch<T>(a, (int)(blockIdx.y * total + warp), loraq_gemv::xa_batch(a, (int)(total * gridDim.y)), lane);
  if (!ONE && a.parts != nullptr && block < a.slots) loraq_gemv::store_xa_share<T>(a, block);
  fill_x<T, MODE, S::kLaneWords>(a, xs, k0, chunks, row_units, threadIdx.x, blockDim.x);
  __syncthreads();
  const loraq_gemv::WarpRun run = loraq_gemv::warp_run(warp, total, tasks);  // this warp's run of tasks
  const int64_t first = run.first;
  const int count = run.count;
  if (count > 0) run_tasks<T, MODE, VEC, NT, RG>(a, xs, first, count, chunks, row_units, word0, g, t);
  if (ONE) finish_after_run<T>(a);
}

}  // namespace loraq_mma
