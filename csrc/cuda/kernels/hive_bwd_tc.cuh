// hive_gather's fused backward on tensor cores for bf16/fp16 (overview in hive_gather.cuh):
// grad_weights and grad_proj, in two tile configurations.
#pragma once
#include "hive_fwd.cuh"

namespace midus {
namespace {

// ============================================================================================
// bwd_tc: fused backward for grad_weights and grad_proj on tensor cores (bf16 / fp16)
// ============================================================================================
// Tile configurations: TM tokens per tile (TM / 16 m-tiles for gu, TM / 16 k-steps for grad_proj).
// TM = 32 is the default; TM = 16 fits sm_86/sm_89's 99 KiB of shared memory (TM = 32 needs
// about 108 KiB at d_z = 256, d_v = 64, k = 32).
constexpr int B_THREADS = 256;   // 8 warps
constexpr int B_ZMAX = 256;      // fast path: d_z <= 256 (warp w owns d_z rows 32w..32w+31 of dP)
constexpr int B_VMAX = 64;       // fast path: d_v <= 64 (8 n-tiles)
constexpr int B_KMAX = 64;
constexpr int B_ROWS = 16;       // bank rows in flight per lane in the gather

struct BwdDims {
  int KZ, KV, LDZ, LDV, LDF;
};
__host__ __device__ inline BwdDims bwd_dims(int dz, int dv) {
  BwdDims d;
  d.KZ = (dz + 15) & ~15;
  d.KV = (dv + 15) & ~15;
  d.LDZ = d.KZ + 8;
  d.LDV = d.KV + 8;
  d.LDF = d.KZ + 8;
  return d;
}
inline size_t bwd_tc_smem_bytes(int tm, int dz, int dv, int64_t k) {
  const BwdDims d = bwd_dims(dz, dv);
  return sizeof(uint16_t) * (size_t(d.KZ) * d.LDV + size_t(tm) * d.LDV + 2 * size_t(tm) * d.LDZ) +
         sizeof(float) * size_t(tm) * d.LDF + size_t(tm) * size_t(k) * (sizeof(int32_t) + sizeof(float));
}

template <typename T, typename index_t, int TM>
__global__ void __launch_bounds__(B_THREADS, 1)
    bwd_tc_kernel(const T* __restrict__ g_, const T* __restrict__ w_, const index_t* __restrict__ idx,
                  const T* __restrict__ bank_, const T* __restrict__ proj_, T* __restrict__ gw_,
                  float* __restrict__ gp_part, int64_t N, int H, int k, int64_t R, int dz, int dv,
                  int tiles_per_block, bool need_w, bool need_proj) {
  MIDUS_DYNAMIC_SMEM(smem);
  const BwdDims d = bwd_dims(dz, dv);
  uint16_t* Ps = reinterpret_cast<uint16_t*>(smem);  // proj[h] [z][v]      (KZ x LDV)
  uint16_t* Gs = Ps + d.KZ * d.LDV;                   // grad_out tile [t][v] (TM x LDV)
  uint16_t* Uh = Gs + TM * d.LDV;                   // u tile [t][z], hi    (TM x LDZ)
  uint16_t* Ul = Uh + TM * d.LDZ;                   // u tile, lo
  float* GU = reinterpret_cast<float*>(Ul + TM * d.LDZ);  // gu tile [t][z] fp32 (TM x LDF)
  int32_t* sR = reinterpret_cast<int32_t*>(GU + TM * d.LDF);
  float* sW = reinterpret_cast<float*>(sR + TM * k);
  const uint16_t* gout = reinterpret_cast<const uint16_t*>(g_);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(w_);
  const uint16_t* bank = reinterpret_cast<const uint16_t*>(bank_);
  const uint16_t* proj = reinterpret_cast<const uint16_t*>(proj_);
  uint16_t* gw = reinterpret_cast<uint16_t*>(gw_);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c4 = lane & 3;
  const int h = blockIdx.y;
  const int64_t ntiles = (N + TM - 1) / TM;
  const int64_t tile_begin = int64_t(blockIdx.x) * tiles_per_block;
  const int64_t tile_end = std::min<int64_t>(ntiles, tile_begin + tiles_per_block);

  if (need_w) {
    for (int i = tid; i < d.KZ * d.KV; i += B_THREADS) {
      const int z = i / d.KV, v = i % d.KV;
      Ps[z * d.LDV + v] = (z < dz && v < dv) ? proj[(int64_t(h) * dz + z) * dv + v] : uint16_t(0);
    }
  }
  float dacc[2][8][4];  // grad_proj rows 32*warp + 16*mi + (g, g+8), cols 8*nt + 2*c4 (+1)
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) dacc[mi][nt][r] = 0.f;

  const int c = lane * 8;  // this lane's 8 columns of d_z (d_z <= 256)
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * TM;
    __syncthreads();  // Ps written (first tile); the previous tile is done with the smem tiles
    for (int i = tid; i < TM * d.KV; i += B_THREADS) {
      const int t = i / d.KV, v = i % d.KV;
      const int64_t tok = t0 + t;
      Gs[t * d.LDV + v] = (tok < N && v < dv) ? gout[(tok * H + h) * dv + v] : uint16_t(0);
    }
    stage_tile_rows<T>(sR, sW, idx, w, t0, TM, N, H, h, k, R, tid, B_THREADS);
    __syncthreads();
    if (need_w) {
      // GU[t][z] = sum_v Gs[t][v] * Ps[z][v]: warp w computes z columns 32w .. 32w+31.
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int n0 = warp * 32 + q * 8;
        if (n0 < d.KZ) {
          float cc[TM / 16][4];
#pragma unroll
          for (int mi = 0; mi < TM / 16; ++mi)
#pragma unroll
            for (int r = 0; r < 4; ++r) cc[mi][r] = 0.f;
          for (int kk = 0; kk < d.KV; kk += 16) {
            uint32_t b[2];
            load_b_nk(b, Ps, d.LDV, kk, n0, g, c4);
#pragma unroll
            for (int mi = 0; mi < TM / 16; ++mi) {
              uint32_t a[4];
              load_a(a, Gs, d.LDV, mi * 16, kk, g, c4);
              mma_native<T>(cc[mi], a, b);
            }
          }
#pragma unroll
          for (int mi = 0; mi < TM / 16; ++mi) {
            *reinterpret_cast<float2*>(GU + (mi * 16 + g) * d.LDF + n0 + 2 * c4) = make_float2(cc[mi][0], cc[mi][1]);
            *reinterpret_cast<float2*>(GU + (mi * 16 + g + 8) * d.LDF + n0 + 2 * c4) =
                make_float2(cc[mi][2], cc[mi][3]);
          }
        }
      }
      __syncthreads();
    }
    // One gather of each token's k rows: grad_weights (dot with gu) and u (for grad_proj).
    for (int t = warp; t < TM; t += B_THREADS / 32) {
      const int64_t tok = t0 + t;
      float u[8], gu[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        u[i] = 0.f;
        gu[i] = 0.f;
      }
      if (tok < N) {  // warp-uniform
        const bool col = c < dz;
        if (need_w && col) {
          const float4 a = *reinterpret_cast<const float4*>(GU + t * d.LDF + c);
          const float4 b = *reinterpret_cast<const float4*>(GU + t * d.LDF + c + 4);
          gu[0] = a.x, gu[1] = a.y, gu[2] = a.z, gu[3] = a.w;
          gu[4] = b.x, gu[5] = b.y, gu[6] = b.z, gu[7] = b.w;
        }
        const int32_t* rr = sR + t * k;
        const float* ww = sW + t * k;
        const uint16_t* base = bank + c;
        const int64_t gw_off = (tok * H + h) * k;
        // 16 rows in flight per lane: one block per SM holds only 8 warps, so each needs more.
        for (int j0 = 0; j0 < k; j0 += B_ROWS) {
          uint4 x[B_ROWS];
#pragma unroll
          for (int q = 0; q < B_ROWS; ++q)
            x[q] = (col && j0 + q < k) ? ldg16(base + int64_t(rr[j0 + q]) * dz) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int q = 0; q < B_ROWS; ++q) {
            if (j0 + q < k) {  // warp-uniform
              float xf[8];
              unpack8<T>(x[q], xf);
              if (need_proj) {
                const float wq = ww[j0 + q];
#pragma unroll
                for (int i = 0; i < 8; ++i) u[i] = fmaf(wq, xf[i], u[i]);
              }
              if (need_w) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) s = fmaf(gu[i], xf[i], s);
                s = warp_sum(s);
                if (lane == 0) gw[gw_off + j0 + q] = F16<T>::from_float(s);
              }
            }
          }
        }
      }
      if (need_proj && c < d.KZ) {
        uint16_t hi[8], lo[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) split_bf16(u[i], hi[i], lo[i]);
        *reinterpret_cast<uint4*>(Uh + t * d.LDZ + c) =
            make_uint4(pack2(hi[0], hi[1]), pack2(hi[2], hi[3]), pack2(hi[4], hi[5]), pack2(hi[6], hi[7]));
        *reinterpret_cast<uint4*>(Ul + t * d.LDZ + c) =
            make_uint4(pack2(lo[0], lo[1]), pack2(lo[2], lo[3]), pack2(lo[4], lo[5]), pack2(lo[6], lo[7]));
      }
    }
    if (need_proj) {
      __syncthreads();
      // dP[z][v] += sum_t U[t][z] * G[t][v]: A = U^T (rows z of warp w), B = Gs [t][v].
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int m0 = warp * 32 + mi * 16;
        if (m0 < d.KZ) {
#pragma unroll
          for (int kk = 0; kk < TM; kk += 16) {
            uint32_t ah[4], al[4];
            load_a_trans(ah, Uh, d.LDZ, m0, kk, g, c4);
            load_a_trans(al, Ul, d.LDZ, m0, kk, g, c4);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              if (nt * 8 < d.KV) {
                uint32_t b[2];
                load_b_kn(b, Gs, d.LDV, kk, nt * 8, g, c4);
                mma_split<T>(dacc[mi][nt], ah, al, b);
              }
            }
          }
        }
      }
    }
  }
  if (need_proj) {
    float* dst = gp_part + (int64_t(blockIdx.x) * H + h) * int64_t(dz) * dv;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int z = warp * 32 + mi * 16 + g + 8 * (r >> 1);
          const int v = nt * 8 + 2 * c4 + (r & 1);
          if (z < dz && v < dv) dst[int64_t(z) * dv + v] = dacc[mi][nt][r];
        }
  }
}

// grad_proj = the sum over the S blocks' partials part [S, count] (fixed order s = 0, 1, ...),
// converted to T.
template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t S, int64_t count, T* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    float s = part[i];
    for (int64_t b = 1; b < S; ++b) s += part[b * count + i];
    out[i] = cvt<T>(s);
  }
}

// ============================================================================================
// Launch logic
// ============================================================================================
// The bwd_tc tile (32 or 16 tokens) for these shapes, or 0 where the generic path must run.
inline int bwd_tc_tile(const HiveShapes& s, bool bank_aligned16, size_t optin, const HiveOptions& o) {
  if (!tc_common_ok(s, bank_aligned16, o) || s.dz > B_ZMAX || s.dv > B_VMAX || s.k > B_KMAX) return 0;
  for (int tm : {32, 16}) {
    if (o.bwd_tile != 0 && o.bwd_tile != tm) continue;
    if (bwd_tc_smem_bytes(tm, int(s.dz), int(s.dv), s.k) <= optin) return tm;
  }
  return 0;
}

// Tiles per block: one unless grad_proj is accumulated; then one block per head and per slot of
// the GPU (sm_count x occupancy), each over a run of tiles, so that few partials are summed.
inline int64_t bwd_tc_tiles_per_block(int64_t ntiles, int64_t H, int sm_count, int occ, bool need_proj) {
  if (!need_proj) return 1;
  const int64_t slots = int64_t(sm_count) * std::max(occ, 1);
  return ceil_div(ntiles, std::max<int64_t>(1, std::min<int64_t>(ntiles, slots / H)));
}

// grad_weights into gw and grad_proj into gp (each may be null: not wanted) on tensor cores.
template <typename Dev, typename T, typename index_t, int TM>
void launch_bwd_tc(Dev& dev, const HiveShapes& s, const T* gout, const T* w, const index_t* idx, const T* bank,
                   const T* proj, T* gw, T* gp) {
  const bool need_w = gw != nullptr, need_proj = gp != nullptr;
  const size_t smem = bwd_tc_smem_bytes(TM, int(s.dz), int(s.dv), s.k);
  auto kernel = bwd_tc_kernel<T, index_t, TM>;
  allow_smem(dev, kernel, smem);
  const int64_t ntiles = ceil_div(s.N, TM);
  const int occ = need_proj ? dev.max_active_blocks(kernel, B_THREADS, smem) : 1;
  const int64_t tpb = bwd_tc_tiles_per_block(ntiles, s.H, dev.sm_count(), occ, need_proj);
  const int64_t S = ceil_div(ntiles, tpb);  // token splits
  MIDUS_CHECK(S <= INT32_MAX && tpb <= INT32_MAX, "hive_gather_backward: too many tokens: ", s.N);
  const int64_t count = s.H * s.dz * s.dv;
  float* part = need_proj ? dev.template alloc<float>(size_t(S * count)) : nullptr;
  const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(s.H));
  dev.launch(TM == 32 ? "bwd_tc_32" : "bwd_tc_16", kernel, grid, dim3(B_THREADS), smem, gout, w, idx, bank, proj, gw,
             part, s.N, int(s.H), int(s.k), s.R, int(s.dz), int(s.dv), int(tpb), need_w, need_proj);
  if (need_proj) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(count, threads), int64_t(dev.sm_count()) * 8);
    dev.launch("sum_partials", sum_partials_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0,
               static_cast<const float*>(part), S, count, gp);
  }
}

// True when bwd_tc computed gw / gp (bf16/fp16 and its conditions), false for the generic path.
template <typename Dev, typename T, typename index_t>
bool try_bwd_tc(Dev& dev, const HiveShapes& s, const T* gout, const T* w, const index_t* idx, const T* bank,
                const T* proj, T* gw, T* gp, const HiveOptions& o) {
  if constexpr (!is_16bit_v<T>) {
    return false;
  } else {
    const int tm = bwd_tc_tile(s, aligned16(bank), dev.smem_optin(), o);
    if (tm == 32) launch_bwd_tc<Dev, T, index_t, 32>(dev, s, gout, w, idx, bank, proj, gw, gp);
    if (tm == 16) launch_bwd_tc<Dev, T, index_t, 16>(dev, s, gout, w, idx, bank, proj, gw, gp);
    return tm != 0;
  }
}

}  // namespace
}  // namespace midus
