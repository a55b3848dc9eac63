// Small-M (1..16) NVFP4 x BF16/FP16 linear for Hopper (sm_90): y[M, N] = x[M, K] @ W[N, K]^T.
//
// W is compressed-tensors NVFP4 (packed uint8 [N, K/2], even element in the low nibble; e4m3 block
// scales [N, K/16]; fp32 tensor scale g, a divisor), repacked once at load (tile_nvfp4 in cuda.py) into
// [16-row tile][128-k chunk][1024 B nibbles in lane order | 128 B scales in lane order]: the bytes are
// unchanged, only their order, so every warp load is 512 contiguous bytes and each tile streams
// sequentially through DRAM (the row-major layout had each 64 B piece open its own DRAM page).
//
// Swap-AB tensor-core GEMV: the weight is the mma A operand (16 rows x 16 k), the tokens are B
// (k16 x n8), so one m16n8k16 covers M <= 8 and two cover M <= 16. FP4 is decoded in registers:
// a nibble moved to bits 6..8 (15 = sign) of a bf16 half is exactly value * 2^-126 (fp16: bits 9..11,
// value * 2^-14); one HMUL2 by the block scale pre-multiplied by 2^119 (fp16: 2^7, from a shared LUT)
// gives value * scale * 2^-7, exact in bf16/fp16 (<= 6 significant bits, |.| <= 21); the epilogue
// multiplies by 2^7 / g. Products accumulate in fp32.
//
// Each lane gets 16 bytes (32 elements) of a row per 128-element chunk, so the four lanes t of a
// quad hold 128 consecutive k. Inside a 32-bit word, nibbles i and i+4 become one bf16x2 (Marlin's
// shift/mask decode); the k order inside an mma is therefore permuted, and the activation fragment
// is permuted the same way with byte permutes, which leaves the dot product unchanged.
//
// Weights and scales go global->shared through a per-warp cp.async ring (4 stages by default; no CTA
// barriers, and no warp barrier either: every lane copies and reads back only its own 32 + 4 bytes, so a
// lane's cp.async.wait_group is all the ordering it needs); activations are read through L1 one chunk ahead
// into registers. A CTA is 4 warps x RT row
// tiles (RT = 1: 64 rows, the M <= 8 default; RT = 2: 128 rows, M > 8), sharing activations through
// L1. Optional programmatic dependent launch: the first weight stages are requested before
// griddepcontrol.wait, activations / workspace / output only after it. Split-K over gridDim.y:
// partial sums go to an fp32 workspace with vector reductions; the last CTA of a row block (arrival
// counter) writes the output and zeroes the workspace and counter again, so nothing needs resetting
// between calls and the launch is CUDA-graph safe.
//
// Gated (SwiGLU) epilogue: for a fused gate/up weight tiled with gated=True (each 16-row tile holds gate
// rows 8j..8j+7, then up rows 8j..8j+7), the kernel writes silu(gate) * up [M, N/2] instead of [M, N], so
// the MLP needs no separate activation kernel: a lane's accumulators already hold rows g and g+8.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int WARPS = 4;
constexpr int CHUNK = 128;  // k elements per lane-quad per step
constexpr int WS_LD = 16;   // workspace row stride (tokens)
constexpr int TILE_BYTES = 16 * 64 + 16 * 8;  // one 16-row x 128-k tile: weights + scales

// shared memory through 32-bit shared-window addresses: generic pointers made ptxas recompute each address
// (and the CTA's window base) inside the loop, ~4 instructions per weight word at 123 registers
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem));
}
__device__ __forceinline__ void cp4(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem), "l"(gmem));
}
// the same, issued only where on (a predicate, not a branch: the loop body stays one straight block)
__device__ __forceinline__ void cp16_if(uint32_t smem, const void* gmem, bool on) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %2, 0; @p cp.async.cg.shared.global [%0], [%1], 16; }" ::"r"(smem),
               "l"(gmem), "r"((int)on));
}
__device__ __forceinline__ void cp4_if(uint32_t smem, const void* gmem, bool on) {
  asm volatile("{ .reg .pred p; setp.ne.b32 p, %2, 0; @p cp.async.ca.shared.global [%0], [%1], 4; }" ::"r"(smem),
               "l"(gmem), "r"((int)on));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ uint4 lds128(uint32_t a) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a) : "memory");
  return v;
}
// Activations: a coherent load, not __ldg. ld.global.nc promises the data is read-only for the kernel's
// lifetime, so ptxas hoisted the first chunk's loads above griddepcontrol.wait (the PTX order was right),
// i.e. under programmatic dependent launch the kernel read its input before the kernel writing it was done
// (W4A4 decode: NaN from stale activations). volatile keeps NVVM from moving it above the wait's asm.
__device__ __forceinline__ uint4 ldg_coherent(const void* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t a) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory");
  return v;
}

template <bool BF16>
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// One repacked 32-bit word (8 consecutive k, see tile_nvfp4's WORD_MAG_LO / WORD_SIGN) -> four 16-bit
// float pairs (k0,k1), (k2,k3), (k4,k5), (k6,k7), each value * 2^-126 (bf16) / 2^-14 (fp16). The bit layout
// puts pair 0 where bf16 wants it (magnitudes at bits 6..8, signs at 15, +16 for the second element)
// and pair 1 one shift away, so bf16 decodes a word in 11 logic ops instead of 15.
template <bool BF16>
__device__ __forceinline__ void decode_word(uint32_t q, uint32_t (&p)[4]) {
  constexpr uint32_t S = 0x80008000u;
  if constexpr (BF16) {
    constexpr uint32_t M = 0x01C001C0u;
    p[0] = q & (S | M);
    p[1] = (q << 6) & (S | M);
    p[2] = ((q << 3) & M) | ((q << 2) & S);
    p[3] = ((q >> 4) & M) | ((q << 1) & S);
  } else {
    constexpr uint32_t M = 0x0E000E00u;
    p[0] = ((q << 3) & M) | (q & S);
    p[1] = ((q << 9) & M) | ((q << 6) & S);
    p[2] = ((q << 6) & M) | ((q << 2) & S);
    p[3] = ((q >> 1) & M) | ((q << 1) & S);
  }
}

template <bool BF16>
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t d;
  if constexpr (BF16) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    d = *reinterpret_cast<uint32_t*>(&r);
  } else {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    d = *reinterpret_cast<uint32_t*>(&r);
  }
  return d;
}

__device__ __forceinline__ float e4m3_to_float(uint32_t b) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, __NV_E4M3)));
}

template <bool BF16>
__device__ __forceinline__ float out_to_float(const void* p, int i) {
  if constexpr (BF16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]);
  else return __half2float(reinterpret_cast<const __half*>(p)[i]);
}

template <bool BF16>
__device__ __forceinline__ void store_out(void* p, size_t i, float v) {
  if constexpr (BF16) reinterpret_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else reinterpret_cast<__half*>(p)[i] = __float2half_rn(v);
}

template <bool BF16>
__device__ __forceinline__ float round_out(float v) {
  if constexpr (BF16) return __bfloat162float(__float2bfloat16_rn(v));
  else return __half2float(__float2half_rn(v));
}

// silu(gate) * up rounded where eager PyTorch rounds a bf16/fp16 MLP: the projection outputs, silu's output,
// then the product (by store_out)
// (__expf and a fast divide: the accurate expf's range reduction raised the register peak of the whole kernel,
// i.e. fewer CTAs per SM; the difference is ~1 float ulp, under the bf16/fp16 rounding that follows)
template <bool BF16>
__device__ __forceinline__ float silu_mul(float gate, float up) {
  float gr = round_out<BF16>(gate);
  return round_out<BF16>(__fdividef(gr, 1.0f + __expf(-gr))) * round_out<BF16>(up);
}

// NORM (variants 12 / 13): the residual add and RMSNorm of the projection's input, rounded where eager
// PyTorch rounds HF's RMSNorm: h = x + delta, then (h * rstd) in the model dtype, then times the weight
template <bool BF16>
__device__ __forceinline__ float half_at(uint32_t w, int i) {  // element i (0 = low) of a bf16x2 / f16x2
  if constexpr (BF16) return __uint_as_float(i ? (w & 0xFFFF0000u) : (w << 16));
  else return __half2float(__ushort_as_half((unsigned short)(w >> (16 * i))));
}
template <bool BF16>
__device__ __forceinline__ uint32_t pack_round(float lo, float hi) {
  if constexpr (BF16) {
    __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    __half2 r = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
}
template <bool BF16>
__device__ __forceinline__ uint4 add8(uint4 a, uint4 b) {  // round(a + b), 8 elements
  uint32_t* pa = reinterpret_cast<uint32_t*>(&a);
  const uint32_t* pb = reinterpret_cast<const uint32_t*>(&b);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    pa[i] = pack_round<BF16>(half_at<BF16>(pa[i], 0) + half_at<BF16>(pb[i], 0),
                             half_at<BF16>(pa[i], 1) + half_at<BF16>(pb[i], 1));
  return a;
}
template <bool BF16>
__device__ __forceinline__ float sumsq8(uint4 a, float s) {  // s + the 8 squares, in element order
  const uint32_t* pa = reinterpret_cast<const uint32_t*>(&a);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float v = half_at<BF16>(pa[i >> 1], i & 1);
    s = fmaf(v, v, s);
  }
  return s;
}
template <bool BF16>
__device__ __forceinline__ uint4 norm8(uint4 h, float rstd, uint4 w) {  // round(w * round(h * rstd))
  uint32_t* ph = reinterpret_cast<uint32_t*>(&h);
  const uint32_t* pw = reinterpret_cast<const uint32_t*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t n = pack_round<BF16>(half_at<BF16>(ph[i], 0) * rstd, half_at<BF16>(ph[i], 1) * rstd);
    ph[i] = pack_round<BF16>(half_at<BF16>(n, 0) * half_at<BF16>(pw[i], 0), half_at<BF16>(n, 1) * half_at<BF16>(pw[i], 1));
  }
  return h;
}
__device__ __forceinline__ void sts128(uint32_t a, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// Activation chunk in shared memory (XS variants): token row of 256 B = 16 units of 16 B, unit u = t*4 + w
// (quad lane t, word w); the low two bits are XORed with (row parity, t / 2) so the 8 lanes of a
// quarter-warp (two rows x four t) read eight different bank groups.
__device__ __forceinline__ int xs_unit(int row, int u) { return u ^ (((row & 1) << 1) | (u >> 3)); }

// DENSE: 0 = the NVFP4 weight above; 1 = a dense bf16/fp16 weight [N, K] row-major, read as stored (a lane's
// 16 B of row g (+8) at k = t*32 + w*8 .. +7 are already the pairs (k0,k1) .. (k6,k7) an mma A register
// wants); 2 = the same weight in tile_dense's order ([tile][chunk][h][w][lane][16 B], so each warp copy is
// 512 contiguous bytes). Dense drops the decode, the scales and the LUT; ring, mma, split-K and epilogues
// are shared. Gated + row-major: lane rows g / g + 8 read gate row tile*8 + g / up row N/2 + tile*8 + g, so the
// fused [gate; up] weight needs no reordering.
//
// XF: the segment's activations, all its chunks, copied once into shared memory after the PDL wait (one
// barrier per segment); the loop then reads them with LDS: no activation load in flight behind the weight
// stream (v13: 23 % of gate_up's M = 1 stalls waited on them) and no per-chunk barrier (the XS ring's).
//
// NORM (with XF): the input is the residual stream x (+ delta, the previous projection's output) and the
// kernel applies the RMSNorm itself: every CTA stages the whole rows h = x + delta, sums their squares in a
// fixed order (so every CTA gets the same rstd, bit for bit), normalizes them in place with the norm weight
// gamma (copied before the PDL wait: no kernel writes it), and the CTA that streams unit 0 writes h to h_out
// (the next residual): one add + RMSNorm kernel fewer before qkv and gate_up.
template <bool BF16, int NT, int STAGES, int RT, bool XS, int WK, bool GATED, int DENSE = 0, bool XF = false,
          bool NORM = false>
__global__ void __launch_bounds__(WARPS * 32)
    nvfp4_gemv_kernel(const uint16_t* __restrict__ x, const uint8_t* __restrict__ tiled,
                      const float* __restrict__ gscale,
                      const void* __restrict__ bias, void* __restrict__ out, float* __restrict__ work,
                      int* __restrict__ counters, int M, int N, int K, const uint16_t* __restrict__ delta,
                      const uint16_t* __restrict__ gamma, uint16_t* __restrict__ h_out, float eps) {
  extern __shared__ __align__(16) uint8_t dyn_smem[];
  __shared__ __align__(1024) uint32_t lut[256];  // aligned: a lookup's address is one LOP3, index | base
  __shared__ int s_last;
  for (int i = threadIdx.x; i < (DENSE ? 0 : 256); i += blockDim.x) {
    float v = e4m3_to_float(i);
    uint32_t h;
    if constexpr (BF16) {
      __nv_bfloat16 b = __float2bfloat16_rn(v * 0x1p119f);
      h = *reinterpret_cast<uint16_t*>(&b);
    } else {
      __half b = __float2half_rn(v * 128.0f);
      h = *reinterpret_cast<uint16_t*>(&b);
    }
    lut[i] = h | (h << 16);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  static_assert(WK == 1 || !XS, "warps splitting k read their own activations");
  static_assert(!(XS && XF), "one way to stage the activations");
  static_assert(!NORM || (XF && !DENSE), "the norm works on XF's staged rows");
  constexpr int ROWS_PER_CTA = WARPS / WK * RT * 16;
  const int chunks = K / CHUNK;
  const int kw = warp % WK;  // this warp's share of each segment's chunks (WK warps per row tile)
  const int tiles = (N + 15) / 16;
  const int lane_id = threadIdx.x & 31;
  const long long units = (long long)((N + ROWS_PER_CTA - 1) / ROWS_PER_CTA) * chunks;
  long long u = units * blockIdx.x / gridDim.x;
  const long long u_end = units * (blockIdx.x + 1) / gridDim.x;

  // tokens past M read row M-1: their mma columns are never stored, and no lane needs a predicate
  const uint16_t* xp[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) xp[n] = x + (size_t)min(n * 8 + g, M - 1) * K + t * 32;

  // per-warp STAGES-deep cp.async ring of [weights RT x 1024 B][scales RT x 128 B], both in the tile's lane
  // order: lane L's bytes at L * 16 (+ 512 for rows g + 8) and W_BYTES + L * 4
  constexpr int TW = DENSE ? 16 * CHUNK * 2 : 16 * 64;  // weight bytes of one tile chunk
  constexpr int W_BYTES = RT * TW, S_BYTES = DENSE ? 0 : RT * 16 * 8, STAGE = W_BYTES + S_BYTES;
  const uint32_t ring_w = smem_addr(dyn_smem) + warp * STAGES * STAGE + lane_id * 16;
  const uint32_t ring_s = smem_addr(dyn_smem) + warp * STAGES * STAGE + W_BYTES + lane_id * 4;
  const int s_off = 1024 - 12 * lane_id;  // a lane's scales past its weights in the tile chunk
  const uint32_t lut_s = smem_addr(lut);
  // tiled layout: [tile][chunk][1024 B weights in lane order (h, g, t) | 128 B scales in lane order];
  // gw[r]: this lane's bytes of the next chunk to copy (issue is called for consecutive chunks)
  // (dense: lane L's (h, w) piece at ring slot (h * 4 + w) * 512 + L * 16; gw[r][h]: row-major row h's bytes)
  const uint8_t* gw[RT][2];
  auto issue_at = [&](uint32_t so) {  // into the ring stage at byte offset so
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      if constexpr (DENSE == 0) {
        cp16(ring_w + so + r * 1024, gw[r][0]);
        cp16(ring_w + so + r * 1024 + 512, gw[r][0] + 512);
        cp4(ring_s + so + r * 128, gw[r][0] + s_off);
        gw[r][0] += TILE_BYTES;
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int w = 0; w < 4; ++w)
            cp16(ring_w + so + r * TW + (h * 4 + w) * 512,
                 DENSE == 2 ? gw[r][0] + (h * 4 + w) * 512 : gw[r][h] + w * 16);
          if constexpr (DENSE == 1) gw[r][h] += CHUNK * 2;
        }
        if constexpr (DENSE == 2) gw[r][0] += TW;
      }
    }
  };
  auto issue = [&](int stage) { issue_at(stage * STAGE); };
  auto issue_if = [&](uint32_t so, bool on) {  // issue_at(so) where on (XF's loop), the pointers advance anyway
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      cp16_if(ring_w + so + r * 1024, gw[r][0], on);
      cp16_if(ring_w + so + r * 1024 + 512, gw[r][0] + 512, on);
      cp4_if(ring_s + so + r * 128, gw[r][0] + s_off, on);
      gw[r][0] += TILE_BYTES;
    }
  };
  // xp[n] + c * CHUNK: chunk c's activations; load_x is called for consecutive chunks from kb
  const uint16_t* xn[NT];
  auto load_x = [&](uint4 (&xv)[NT][4]) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int w = 0; w < 4; ++w) xv[n][w] = ldg_coherent(xn[n] + w * 8);
      xn[n] += CHUNK;
    }
  };
  // XS: one CTA-wide ring of activation chunks next to the per-warp weight rings
  constexpr int XSTAGE = NT * 8 * CHUNK * 2;
  const uint32_t xring = smem_addr(dyn_smem) + WARPS * STAGES * STAGE;
  // each thread copies NT units of 16 B per chunk (row = i / 16, unit = i % 16, i = thread + j * 128)
  // (rows >= M are not copied: their mma columns are never stored, and every CTA reading row M-1 for
  // them made one hot L2 line at M = 1, v5 sweep)
  const uint16_t* xsrc[NT];
  uint32_t xdst[NT], xoff[4];
  bool xon[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    int i = threadIdx.x + j * WARPS * 32, row = i >> 4, q = i & 15;
    xon[j] = row < M;
    xsrc[j] = x + (size_t)min(row, M - 1) * K + q * 8;
    xdst[j] = xring + row * 256 + xs_unit(row, q) * 16;
  }
#pragma unroll
  for (int w = 0; w < 4; ++w) xoff[w] = xring + g * 256 + xs_unit(g, t * 4 + w) * 16;
  auto issue_x = [&](int c, int stage) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
      if (xon[j]) cp16(xdst[j] + stage * XSTAGE, xsrc[j] + c * CHUNK);
  };
  auto read_x = [&](uint4 (&xv)[NT][4], int stage) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int w = 0; w < 4; ++w) xv[n][w] = lds128(xoff[w] + stage * XSTAGE + n * 8 * 256);
  };
  // XF: [chunk of the segment][token row < M][256 B], units swizzled as in XS, after the ring and the WK sums
  constexpr int RED_BYTES = WARPS / WK * (WK - 1) * 32 * RT * NT * 4 * 4;
  const uint32_t xfbuf = smem_addr(dyn_smem) + WARPS * STAGES * STAGE + RED_BYTES;
  uint32_t xfoff[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int row = min(n * 8 + g, M - 1);
#pragma unroll
    for (int w = 0; w < 4; ++w) xfoff[n][w] = xfbuf + row * 256 + xs_unit(row, t * 4 + w) * 16;
  }
  // chunks [c0, c1) of every token row, then wait for them (and the weight prologue) and make them CTA-visible
  auto stage_xf = [&](int c0, int c1) {
    const int units = (c1 - c0) * 16;
    for (int m = 0; m < M; ++m) {
      const uint16_t* src = x + (size_t)m * K + (size_t)c0 * CHUNK;
      for (int i = threadIdx.x; i < units; i += WARPS * 32)
        cp16(xfbuf + ((i >> 4) * M + m) * 256 + xs_unit(m, i & 15) * 16, src + (i >> 4) * CHUNK + (i & 15) * 8);
    }
    cp_commit();
    cp_wait<0>();
    __syncthreads();
  };
  // NORM: XF's buffer holds every chunk of the rows ([chunk][row][256 B]), then gamma [K], then the sums
  // [WARPS][16] and rstd [16] (floats)
  const int q_row = K / 8;  // 16-byte units per token row
  const uint32_t gbuf = xfbuf + (uint32_t)(chunks * M * 256);
  float* const norm_sums = reinterpret_cast<float*>(dyn_smem + WARPS * STAGES * STAGE + RED_BYTES + chunks * M * 256 + K * 2);
  auto norm_slot = [&](int i) {  // unit i of the [M, K / 8] rows
    const int m = i / q_row, q = i - m * q_row;
    return xfbuf + ((q >> 4) * M + m) * 256 + xs_unit(m, q & 15) * 16;
  };
  const bool writes_h = h_out && u == 0 && u_end > 0;  // the one CTA whose range starts at unit 0
  // c0 .. c1: the chunks this CTA multiplies, the only ones it normalizes (the sums need every chunk)
  auto stage_norm = [&](int c0, int c1) {
    // x straight into its slots (cp.async, no registers), delta through registers next to it: one L2 round
    // trip for both; the thread that copied a slot adds delta to it
    const int units = M * q_row;
    for (int i = threadIdx.x; i < units; i += WARPS * 32) cp16(norm_slot(i), x + (size_t)i * 8);
    cp_commit();
    constexpr int NB = 4;  // delta units per thread in flight
    for (int i0 = threadIdx.x; i0 < units; i0 += NB * WARPS * 32) {
      uint4 dv[NB];
#pragma unroll
      for (int j = 0; j < NB; ++j)
        if (delta && i0 + j * WARPS * 32 < units) dv[j] = ldg_coherent(delta + (size_t)(i0 + j * WARPS * 32) * 8);
      cp_wait<0>();
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        const int i = i0 + j * WARPS * 32;
        if (i < units) {
          const uint32_t a = norm_slot(i);
          uint4 hv = lds128(a);
          if (delta) {
            hv = add8<BF16>(hv, dv[j]);
            sts128(a, hv);
          }
          if (writes_h) *reinterpret_cast<uint4*>(h_out + (size_t)i * 8) = hv;
        }
      }
    }
    cp_wait<0>();  // gamma (copied with the prologue's first weight stage), also where a thread had no unit
    __syncthreads();
#pragma unroll
    for (int m = 0; m < NT * 8; ++m) {
      if (m < M) {  // uniform: every lane of the warp shuffles
        float ss = 0.f;
        for (int q = threadIdx.x; q < q_row; q += WARPS * 32) ss = sumsq8<BF16>(lds128(norm_slot(m * q_row + q)), ss);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) norm_sums[warp * 16 + m] = ss;
      }
    }
    __syncthreads();
    if (threadIdx.x < M) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) sum += norm_sums[w * 16 + threadIdx.x];
      norm_sums[WARPS * 16 + threadIdx.x] = rsqrtf(sum / (float)K + eps);
    }
    __syncthreads();
    const int span = (c1 - c0) * 16;  // units per row to normalize
    for (int i = threadIdx.x; i < M * span; i += WARPS * 32) {
      const int m = i / span, q = c0 * 16 + (i - m * span);
      const uint32_t a = norm_slot(m * q_row + q);
      sts128(a, norm8<BF16>(lds128(a), norm_sums[WARPS * 16 + m], lds128(gbuf + q * 16)));
    }
    __syncthreads();
  };
  auto read_xf = [&](uint4 (&xv)[NT][4], int j) {
    const uint32_t o = j * M * 256;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int w = 0; w < 4; ++w) xv[n][w] = lds128(xfoff[n][w] + o);
  };
  float acc[RT][NT][4];
  // the ring stage's weights and scales times activations xv, into acc
  auto compute_at = [&](uint32_t so, const uint4 (&xv)[NT][4]) {
    if constexpr (DENSE) {
#pragma unroll
      for (int w = 0; w < 4; ++w)
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          uint4 p0 = lds128(ring_w + so + r * TW + w * 512), p1 = lds128(ring_w + so + r * TW + (4 + w) * 512);
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[n][w]);
            mma<BF16>(acc[r][n], p0.x, p1.x, p0.y, p1.y, xw[0], xw[1]);
            mma<BF16>(acc[r][n], p0.z, p1.z, p0.w, p1.w, xw[2], xw[3]);
          }
        }
    } else {
    uint4 wv[RT][2];
    uint32_t sv[RT];  // scale bytes of (row g, blocks 2t, 2t+1), then (row g + 8, the same blocks)
#pragma unroll
    for (int r = 0; r < RT; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) wv[r][h] = lds128(ring_w + so + r * 1024 + h * 512);
      sv[r] = lds32(ring_s + so + r * 128);
    }
    uint32_t sc[RT][2][2];  // the LUT entry (scale * 2^119 or 2^7, twice) of byte h * 2 + j of sv[r]
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      sc[r][0][0] = lds32(lut_s | ((sv[r] << 2) & 0x3FC));
      sc[r][0][1] = lds32(lut_s | ((sv[r] >> 6) & 0x3FC));
      sc[r][1][0] = lds32(lut_s | ((sv[r] >> 14) & 0x3FC));
      sc[r][1][1] = lds32(lut_s | ((sv[r] >> 22) & 0x3FC));
    }
#pragma unroll
    for (int w = 0; w < 4; ++w) {
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        uint32_t p[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          decode_word<BF16>(reinterpret_cast<const uint32_t*>(&wv[r][h])[w], p[h]);
          const uint32_t s = sc[r][h][w >> 1];
#pragma unroll
          for (int i = 0; i < 4; ++i) p[h][i] = hmul2<BF16>(p[h][i], s);
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[n][w]);  // (k0,k1) .. (k6,k7)
          mma<BF16>(acc[r][n], p[0][0], p[1][0], p[0][1], p[1][1], xw[0], xw[1]);
          mma<BF16>(acc[r][n], p[0][2], p[1][2], p[0][3], p[1][3], xw[2], xw[3]);
        }
      }
    }
    }
  };
  auto compute = [&](int stage, const uint4 (&xv)[NT][4]) { compute_at(stage * STAGE, xv); };

  bool first = true;
  while (u < u_end) {  // one segment: row block rb, chunks [c_begin, c_end)
    const int rb = (int)(u / chunks), c_begin = (int)(u % chunks);
    const int c_end = (int)min((long long)chunks, c_begin + (u_end - u));
    u += c_end - c_begin;
    const int row_block = rb * ROWS_PER_CTA;
    const int row_warp = row_block + warp / WK * RT * 16;
    const int kb = c_begin + (c_end - c_begin) * kw / WK, ke = c_begin + (c_end - c_begin) * (kw + 1) / WK;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      int tile = min((row_warp + r * 16) / 16, tiles - 1);
      if constexpr (DENSE == 1) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          int row = GATED ? h * (N / 2) + tile * 8 + g : min(tile * 16 + h * 8 + g, N - 1);
          gw[r][h] = tiled + ((size_t)row * K + (size_t)kb * CHUNK + t * 32) * 2;
        }
      } else {
        gw[r][0] = tiled + ((size_t)tile * chunks + kb) * (DENSE ? TW : TILE_BYTES) + lane_id * 16;
      }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) xn[n] = xp[n] + (size_t)kb * CHUNK;
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[r][n][i] = 0.f;
    if (!first) __syncthreads();  // every warp is done with the last segment's activation ring and s_last
    if constexpr (NORM) {
      if (first)
        for (int q = threadIdx.x; q < q_row; q += WARPS * 32) cp16(gbuf + q * 16, gamma + q * 8);
    }
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (kb + i < ke) issue(i);
      cp_commit();
    }
    if (first) {
      // programmatic dependent launch: everything above touches only the weights (never written by the
      // previous kernel); activations and the workspace are touched only after the previous grid is done
      asm volatile("griddepcontrol.wait;" ::: "memory");
      asm volatile("griddepcontrol.launch_dependents;");
      first = false;
      if constexpr (NORM) {  // one segment (u reached u_end): its chunks; several: every chunk
        if (u >= u_end) stage_norm(c_begin, c_end);
        else stage_norm(0, chunks);
      }
    }
    int stage = 0;
    if constexpr (XS) {
      // chunk c: wait for it, one barrier (its data visible to all warps, and every warp done with c-1,
      // whose slot takes c+STAGES-1), refill, multiply
#pragma unroll
      for (int i = 0; i < STAGES - 1; ++i)
        if (c_begin + i < c_end) issue_x(c_begin + i, i);
      cp_commit();
      for (int c = c_begin; c < c_end; ++c) {
        if (c == c_begin) cp_wait<0>();
        else cp_wait<STAGES - 2>();
        __syncthreads();
        {
          int cn = c + STAGES - 1, sn = stage == 0 ? STAGES - 1 : stage - 1;
          if (cn < c_end) {
            issue(sn);
            issue_x(cn, sn);
          }
          cp_commit();
        }
        uint4 xv[NT][4];
        read_x(xv, stage);
        compute(stage, xv);
        stage = stage == STAGES - 1 ? 0 : stage + 1;
      }
    } else if constexpr (XF) {
      if constexpr (!NORM) stage_xf(c_begin, c_end);
      // ring stages as byte offsets: rd is read now, wr (the one read last) is refilled
      uint32_t rd = 0, wr = (STAGES - 1) * STAGE;
      for (int c = kb; c < ke; ++c) {
        issue_if(wr, c + STAGES - 1 < ke);
        cp_commit();
        cp_wait<STAGES - 1>();
        uint4 xv[NT][4];
        read_xf(xv, NORM ? c : c - c_begin);
        compute_at(rd, xv);
        wr = rd;
        rd = rd == (STAGES - 1) * STAGE ? 0 : rd + STAGE;
      }
    } else {
      // one chunk: refill the ring, prefetch the next chunk's activations into xn, multiply with xv
      auto step = [&](int c, const uint4 (&xv)[NT][4], uint4 (&xnext)[NT][4]) {
        {
          int cn = c + STAGES - 1, sn = stage == 0 ? STAGES - 1 : stage - 1;
          if (cn < ke) issue(sn);
          cp_commit();
        }
        if (c + 1 < ke) load_x(xnext);
        cp_wait<STAGES - 1>();
        const int st = stage;
        stage = stage == STAGES - 1 ? 0 : stage + 1;
        compute(st, xv);
      };
      uint4 xa[NT][4], xb[NT][4];
      if (kb < ke) load_x(xa);
      int c = kb;
      for (; c + 1 < ke; c += 2) {  // two chunks per trip: the activation buffers swap roles, no copies
        step(c, xa, xb);
        step(c + 1, xb, xa);
      }
      if (c < ke) step(c, xa, xb);
    }
    cp_wait<0>();
    if constexpr (WK > 1) {  // the k-split warps of a row tile add their sums into warp kw = 0's
      float* red = reinterpret_cast<float*>(dyn_smem + WARPS * STAGES * STAGE) +
                   ((warp / WK) * (WK - 1) * 32 + lane_id) * (RT * NT * 4);
      if (kw > 0) {
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[(kw - 1) * 32 * RT * NT * 4 + (r * NT + n) * 4 + i] = acc[r][n][i];
      }
      __syncthreads();
      if (kw == 0) {
#pragma unroll
        for (int j = 0; j < WK - 1; ++j)
#pragma unroll
          for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
              for (int i = 0; i < 4; ++i) acc[r][n][i] += red[j * 32 * RT * NT * 4 + (r * NT + n) * 4 + i];
      }
    }

    const float f = DENSE ? 1.0f : 128.0f / __ldg(gscale);
    // acc[r][n]: {row g, tok 2t}, {row g, tok 2t+1}, {row g+8, tok 2t}, {row g+8, tok 2t+1}
    if (c_begin == 0 && c_end == chunks) {  // the whole row block: store
      if (kw > 0) continue;
      if constexpr (GATED) {  // rows g (gate) and g + 8 (up) of each tile -> output row tile * 8 + g
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          int row = row_warp + r * 16 + g;
          if (row >= N) continue;
          int orow = (row_warp + r * 16) / 2 + g;
          float bg = bias ? out_to_float<BF16>(bias, row) : 0.f, bu = bias ? out_to_float<BF16>(bias, row + 8) : 0.f;
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              int tok = n * 8 + 2 * t + j;
              if (tok < M)
                store_out<BF16>(out, (size_t)tok * (N / 2) + orow,
                                silu_mul<BF16>(acc[r][n][j] * f + bg, acc[r][n][2 + j] * f + bu));
            }
        }
        continue;
      }
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          int row = row_warp + r * 16 + g + h * 8;
          if (row >= N) continue;
          float bv = bias ? out_to_float<BF16>(bias, row) : 0.f;
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              int tok = n * 8 + 2 * t + j;
              if (tok < M) store_out<BF16>(out, (size_t)tok * N + row, acc[r][n][h * 2 + j] * f + bv);
            }
        }
      continue;
    }

#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int row = row_warp + r * 16 + g + h * 8;
        if (row >= N || kw > 0) continue;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          int tok = n * 8 + 2 * t;
          if (tok < M) {
            float* dst = work + (size_t)row * WS_LD + tok;
            asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dst), "f"(acc[r][n][h * 2]),
                         "f"(acc[r][n][h * 2 + 1])
                         : "memory");
          }
        }
      }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      int done = c_end - c_begin;
      s_last = atomicAdd(&counters[rb], done) + done == chunks;
    }
    __syncthreads();
    if (!s_last) continue;
    __threadfence();
    // one row's <= 16 sums in four vector loads issued together (a loop of scalar loads paid one L2 round
    // trip per token: ~8 us at M = 16), then zeroed (slot M of an odd M got a pad-row sum too)
    auto take_sums = [&](int row, float4 (&v)[WS_LD / 4]) {
      float4* src = reinterpret_cast<float4*>(work + (size_t)row * WS_LD);
#pragma unroll
      for (int q = 0; q < WS_LD / 4; ++q)
        if (q * 4 < M) v[q] = __ldcg(src + q);
#pragma unroll
      for (int q = 0; q < WS_LD / 4; ++q)
        if (q * 4 <= M) __stcg(src + q, make_float4(0.f, 0.f, 0.f, 0.f));
    };
    if constexpr (GATED) {  // one output row per thread: gate row row_block + (i / 8) * 16 + i % 8, up row 8 further
      for (int i = threadIdx.x; i < ROWS_PER_CTA / 2; i += blockDim.x) {
        int row = row_block + (i >> 3) * 16 + (i & 7);
        if (row >= N) break;
        float bg = bias ? out_to_float<BF16>(bias, row) : 0.f, bu = bias ? out_to_float<BF16>(bias, row + 8) : 0.f;
        float4 vg[WS_LD / 4], vu[WS_LD / 4];
        take_sums(row, vg);
        take_sums(row + 8, vu);
#pragma unroll
        for (int m = 0; m < WS_LD; ++m)
          if (m < M)
            store_out<BF16>(out, (size_t)m * (N / 2) + row_block / 2 + i,
                            silu_mul<BF16>((&vg[m >> 2].x)[m & 3] * f + bg, (&vu[m >> 2].x)[m & 3] * f + bu));
      }
    } else {  // one row per thread
      for (int i = threadIdx.x; i < ROWS_PER_CTA; i += blockDim.x) {
        int row = row_block + i;
        if (row >= N) break;
        float bv = bias ? out_to_float<BF16>(bias, row) : 0.f;
        float4 v[WS_LD / 4];
        take_sums(row, v);
#pragma unroll
        for (int m = 0; m < WS_LD; ++m)
          if (m < M) store_out<BF16>(out, (size_t)m * N + row, (&v[m >> 2].x)[m & 3] * f + bv);
      }
    }
    if (threadIdx.x == 0) counters[rb] = 0;
  }
}

// NORM variants' inputs (see the kernel): delta may be null (h = x), h_out may be null (not written)
struct NormArgs {
  const uint16_t* delta = nullptr;
  const uint16_t* gamma = nullptr;
  uint16_t* h_out = nullptr;
  float eps = 0.f;
};

template <bool BF16, int NT, int STAGES, int RT, bool XS = false, int WK = 1, int DENSE = 0, bool XF = false,
          bool NORM = false>
int launch(int ctas, int pdl, cudaStream_t s, const uint16_t* x, const uint8_t* tiled, const float* gs,
           const void* bias, void* out, float* work, int* counters, int M, int N, int K, int gated,
           NormArgs na = {}) {
  constexpr int rows = WARPS / WK * RT * 16;
  int smem = WARPS * STAGES * RT * 16 * (DENSE ? CHUNK * 2 : 64 + 8) + (XS ? STAGES * NT * 8 * CHUNK * 2 : 0) +
             WARPS / WK * (WK - 1) * 32 * RT * NT * 4 * 4;
  if constexpr (NORM) {  // whole rows, gamma, the sums and rstd
    if (!na.gamma) return (int)cudaErrorInvalidValue;
    smem += M * K * 2 + K * 2 + (WARPS * 16 + 16) * 4;
  } else if constexpr (XF) {  // the longest segment a CTA gets: ceil(units / ctas) chunks, at most a row block's
    const long long chunks = K / CHUNK, units = (long long)((N + rows - 1) / rows) * chunks;
    smem += (int)min(chunks, (units + ctas - 1) / ctas) * M * CHUNK * 2;
  }
  auto kern = gated ? nvfp4_gemv_kernel<BF16, NT, STAGES, RT, XS, WK, true, DENSE, XF, NORM>
                    : nvfp4_gemv_kernel<BF16, NT, STAGES, RT, XS, WK, false, DENSE, XF, NORM>;
  if (smem > 46 * 1024) {  // 48 KB without the opt-in counts the ~1-2 KB of static shared memory too
    static int configured[2][64] = {};  // the dynamic shared memory allowed so far, per kernel and device
    int dev = 0;
    cudaGetDevice(&dev);
    if (dev >= 64 || configured[gated != 0][dev] < smem) {
      cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) {
        cudaGetLastError();
        return (int)e;
      }
      if (dev < 64) configured[gated != 0][dev] = smem;
    }
  }
  if ((!work || !counters) && ctas != (N + rows - 1) / rows) return (int)cudaErrorInvalidValue;
  dim3 grid(ctas);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(WARPS * 32);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kern, x, tiled, gs, bias, out, work, counters, M, N, K, na.delta, na.gamma,
                                     na.h_out, na.eps);
  // a failed launch also sets the thread's last error: clear it, so a later call does not report it again
  if (e != cudaSuccess) cudaGetLastError();
  return (int)e;
}

// variant: 0 = 2 row tiles per warp, 4 stages; 1 = 2 tiles, 6 stages; 2 = 1 tile, 4 stages; 3 = 1 tile, 8 stages;
// 4 / 5 = 2 / 1 tiles, 4 stages, activations through a CTA-wide shared-memory ring (XS); 6 = 4 with 8 stages;
// 7 / 8 = 1 tile per CTA (16 rows), its 4 warps splitting each segment's chunks (in-CTA split-K through shared
// memory), 4 / 8 stages; 9 = 2 tiles per warp pair (64 rows), k split in two; 10 / 11 = 4 / 9 with the segment's
// activations staged whole in shared memory (XF) instead of a ring / registers; 12 / 13 = 10 / 11 with the
// add + RMSNorm of the input (NORM, na)
template <bool BF16, int NT>
int launch_variant(int variant, int ctas, int pdl, cudaStream_t s, const uint16_t* x, const uint8_t* t, const float* gs,
                   const void* bias, void* out, float* work, int* cnt, int M, int N, int K, int gated, NormArgs na = {}) {
  switch (variant) {
    case 1: return launch<BF16, NT, 6, 2>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 2: return launch<BF16, NT, 4, 1>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 3: return launch<BF16, NT, 8, 1>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 4: return launch<BF16, NT, 4, 2, true>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 5: return launch<BF16, NT, 4, 1, true>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 6: return launch<BF16, NT, 8, 2, true>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 7: return launch<BF16, NT, 4, 1, false, 4>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 8: return launch<BF16, NT, 8, 1, false, 4>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 9: return launch<BF16, NT, 4, 2, false, 2>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 10: return launch<BF16, NT, 4, 2, false, 1, 0, true>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 11: return launch<BF16, NT, 4, 2, false, 2, 0, true>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
    case 12: return launch<BF16, NT, 4, 2, false, 1, 0, true, true>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated, na);
    case 13: return launch<BF16, NT, 4, 2, false, 2, 0, true, true>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated, na);
    default: return launch<BF16, NT, 4, 2>(ctas, pdl, s, x, t, gs, bias, out, work, cnt, M, N, K, gated);
  }
}

// dense variants (RT = 1: a 16-row tile chunk is 4 KB): 2 / 3 = 64-row CTAs, 4 / 8 stages (64 / 128 KB of ring);
// 7 / 8 = 16-row CTAs whose 4 warps split k, 4 / 8 stages; anything else: cudaErrorInvalidValue
template <bool BF16, int NT, int DENSE>
int launch_dense(int variant, int ctas, int pdl, cudaStream_t s, const uint16_t* x, const uint8_t* w, const void* bias,
                 void* out, float* work, int* cnt, int M, int N, int K, int gated) {
  switch (variant) {
    case 2: return launch<BF16, NT, 4, 1, false, 1, DENSE>(ctas, pdl, s, x, w, nullptr, bias, out, work, cnt, M, N, K, gated);
    case 3: return launch<BF16, NT, 8, 1, false, 1, DENSE>(ctas, pdl, s, x, w, nullptr, bias, out, work, cnt, M, N, K, gated);
    case 7: return launch<BF16, NT, 4, 1, false, 4, DENSE>(ctas, pdl, s, x, w, nullptr, bias, out, work, cnt, M, N, K, gated);
    case 8: return launch<BF16, NT, 8, 1, false, 4, DENSE>(ctas, pdl, s, x, w, nullptr, bias, out, work, cnt, M, N, K, gated);
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" {

// y[M, N] = x[M, K] @ W^T (+ bias) with W in the tiled layout of fp4reason.kernels.cuda.tile_nvfp4;
// gated = 1 (W tiled with gated=True, N % 16 == 0): y[M, N/2] = silu(gate) * up instead.
// pdl = 1 launches with programmatic stream serialization (overlaps this kernel's weight prefetch
// with the previous kernel's tail). ctas: the grid (the kernel's work split, see the top); any count other
// than one CTA per row block needs work (>= N*16 floats, zeroed) and counters (>= ceil(N/16) ints, zeroed),
// both left zeroed after the kernel. Returns a cudaError_t (0 = launched).
int fp4r_nvfp4_gemv(const void* x, const void* tiled, const float* gscale, const void* bias, void* out,
                    float* work, int* counters, int M, int N, int K, int ctas, int bf16, int variant,
                    int pdl, int gated, void* stream) {
  if (M < 1 || M > 16 || N < 1 || K % CHUNK || ctas < 1 || (gated && N % 16)) return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  auto xp = (const uint16_t*)x;
  auto tp = (const uint8_t*)tiled;
  if (bf16) {
    if (M <= 8) return launch_variant<true, 1>(variant, ctas, pdl, s, xp, tp, gscale, bias, out, work, counters, M, N, K, gated);
    return launch_variant<true, 2>(variant, ctas, pdl, s, xp, tp, gscale, bias, out, work, counters, M, N, K, gated);
  }
  if (M <= 8) return launch_variant<false, 1>(variant, ctas, pdl, s, xp, tp, gscale, bias, out, work, counters, M, N, K, gated);
  return launch_variant<false, 2>(variant, ctas, pdl, s, xp, tp, gscale, bias, out, work, counters, M, N, K, gated);
}

// y = RMSNorm(x + delta) @ W^T (+ bias) (or silu(gate) * up) with HF's RMSNorm (weight gamma [K], eps), and
// h_out = x + delta [M, K] (the residual stream; delta null: h = x). variant 12 or 13 (the NORM forms of 10 /
// 11); every CTA stages M x K activations plus gamma in shared memory. The other arguments as above.
int fp4r_nvfp4_norm_gemv(const void* x, const void* delta, const void* gamma, void* h_out, float eps,
                         const void* tiled, const float* gscale, const void* bias, void* out, float* work,
                         int* counters, int M, int N, int K, int ctas, int bf16, int variant, int pdl, int gated,
                         void* stream) {
  if (M < 1 || M > 16 || N < 1 || K % CHUNK || ctas < 1 || (gated && N % 16) || !gamma || (variant != 12 && variant != 13))
    return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  auto xp = (const uint16_t*)x;
  auto tp = (const uint8_t*)tiled;
  NormArgs na{(const uint16_t*)delta, (const uint16_t*)gamma, (uint16_t*)h_out, eps};
  if (bf16) {
    if (M <= 8) return launch_variant<true, 1>(variant, ctas, pdl, s, xp, tp, gscale, bias, out, work, counters, M, N, K, gated, na);
    return launch_variant<true, 2>(variant, ctas, pdl, s, xp, tp, gscale, bias, out, work, counters, M, N, K, gated, na);
  }
  if (M <= 8) return launch_variant<false, 1>(variant, ctas, pdl, s, xp, tp, gscale, bias, out, work, counters, M, N, K, gated, na);
  return launch_variant<false, 2>(variant, ctas, pdl, s, xp, tp, gscale, bias, out, work, counters, M, N, K, gated, na);
}

// The same for a dense bf16/fp16 weight (the dtype of x): w [N, K] row-major (tiled = 0) or in tile_dense's
// order (tiled = 1); gated = 1: w is a fused [gate; up] [N, K], row-major only, and bias (if any) in
// gated_rows order. variant: 2, 3, 7 or 8 (launch_dense).
int fp4r_dense_gemv(const void* x, const void* w, const void* bias, void* out, float* work, int* counters, int M,
                    int N, int K, int ctas, int bf16, int variant, int pdl, int gated, int tiled, void* stream) {
  if (M < 1 || M > 16 || N < 1 || K % CHUNK || ctas < 1 || (gated && (N % 16 || tiled)))
    return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  auto xp = (const uint16_t*)x;
  auto wp = (const uint8_t*)w;
#define FP4R_DENSE(B, NT, D) launch_dense<B, NT, D>(variant, ctas, pdl, s, xp, wp, bias, out, work, counters, M, N, K, gated)
  if (tiled) {
    if (bf16) return M <= 8 ? FP4R_DENSE(true, 1, 2) : FP4R_DENSE(true, 2, 2);
    return M <= 8 ? FP4R_DENSE(false, 1, 2) : FP4R_DENSE(false, 2, 2);
  }
  if (bf16) return M <= 8 ? FP4R_DENSE(true, 1, 1) : FP4R_DENSE(true, 2, 1);
  return M <= 8 ? FP4R_DENSE(false, 1, 1) : FP4R_DENSE(false, 2, 1);
#undef FP4R_DENSE
}
}
