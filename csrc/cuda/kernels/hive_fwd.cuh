// hive_gather's forward kernels with proj (overview in hive_gather.cuh): fwd_generic (any dtype and
// shape) and fwd_tc (bf16/fp16 on tensor cores, in two tile configurations), and the choice.
#pragma once
#include "hive_common.cuh"

namespace midus {
namespace {

// ============================================================================================
// fwd_generic: out[t,h,v] = sum_z u[t,h,z] proj[h,z,v], u gathered per chunk into shared memory
// ============================================================================================
constexpr int G_TM = 16;       // tokens per block
constexpr int G_ZC = 64;       // d_z columns per chunk
constexpr int G_VT = 64;       // d_v columns per block
constexpr int G_THREADS = 256;
constexpr int G_OUT_PER_THREAD = G_TM * G_VT / G_THREADS;  // 4

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(G_THREADS)
    fwd_generic_kernel(const scalar_t* __restrict__ w, const index_t* __restrict__ idx,
                       const scalar_t* __restrict__ bank, const scalar_t* __restrict__ proj,
                       scalar_t* __restrict__ out, int64_t N, int64_t H, int64_t k, int64_t R, int64_t dz,
                       int64_t dv) {
  using acc_t = acc_t_of<scalar_t>;
  MIDUS_SHARED(acc_t, su, [G_TM][G_ZC]);
  const int tid = threadIdx.x;
  const int64_t t0 = int64_t(blockIdx.x) * G_TM;
  const int64_t h = blockIdx.y;
  const int64_t v0 = int64_t(blockIdx.z) * G_VT;
  acc_t oacc[G_OUT_PER_THREAD];
#pragma unroll
  for (int q = 0; q < G_OUT_PER_THREAD; ++q) oacc[q] = acc_t(0);
  for (int64_t z0 = 0; z0 < dz; z0 += G_ZC) {
    __syncthreads();  // the previous chunk's products are done with su
    for (int i = tid; i < G_TM * G_ZC; i += G_THREADS) {
      const int t = i / G_ZC, zz = i % G_ZC;
      const int64_t tok = t0 + t, z = z0 + zz;
      acc_t a = acc_t(0);
      if (tok < N && z < dz) {
        const int64_t base = (tok * H + h) * k;
        for (int64_t j = 0; j < k; ++j)
          a += cvt<acc_t>(w[base + j]) * cvt<acc_t>(bank[checked_row(idx[base + j], R) * dz + z]);
      }
      su[t][zz] = a;
    }
    __syncthreads();
    const int64_t zn = std::min<int64_t>(G_ZC, dz - z0);
#pragma unroll
    for (int q = 0; q < G_OUT_PER_THREAD; ++q) {
      const int o = tid + q * G_THREADS;
      const int t = o / G_VT;
      const int64_t v = v0 + o % G_VT;
      if (v < dv) {
        const scalar_t* p = proj + (h * dz + z0) * dv + v;
        acc_t s = oacc[q];
        for (int64_t zz = 0; zz < zn; ++zz) s += su[t][zz] * cvt<acc_t>(p[zz * dv]);
        oacc[q] = s;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < G_OUT_PER_THREAD; ++q) {
    const int o = tid + q * G_THREADS;
    const int64_t tok = t0 + o / G_VT, v = v0 + o % G_VT;
    if (tok < N && v < dv) out[(tok * H + h) * dv + v] = cvt<scalar_t>(oacc[q]);
  }
}

// ============================================================================================
// fwd_tc: fused gather + projection on tensor cores (bf16 / fp16)
// ============================================================================================
constexpr int F_ZC = 256;         // d_z columns per chunk (32 lanes x 8)
constexpr int F_VT = 64;          // d_v columns per block (8 n-tiles of 8)
constexpr int F_THREADS = 256;    // 8 warps
constexpr int F_LDU = F_ZC + 8;   // row stride of the u tiles (conflict-free fragment loads)
constexpr int F_LDP = F_VT + 8;   // row stride of the proj chunk
constexpr int F_KMAX = 64;        // fast path only for k <= F_KMAX (indices/weights staged in smem)

// Tile configurations: TM tokens per block, TM / 16 m-tiles; the 8 warps split the block's 64
// columns of d_v among the m-tiles (warp w: m-tile w % MT, n-tiles NTW * (w / MT) ..). TM = 64
// (4 m-tiles, 4 n-tiles per warp) is the default; TM = 32 (2 m-tiles, 2 n-tiles per warp) halves
// the u tiles and the staged rows, so that the kernel fits sm_86/sm_89's 99 KiB of shared memory
// (TM = 64 needs 102 KiB + 512 B per k).
template <int TM>
struct FwdTcTile {
  static_assert(TM == 64 || TM == 32, "fwd_tc tiles: 64 or 32 tokens");
  static constexpr int MT = TM / 16;
  static constexpr int NTW = (F_VT / 8) / (8 / MT);
};

inline size_t fwd_tc_smem_bytes(int tm, int64_t k) {
  return sizeof(uint16_t) * (2 * size_t(tm) * F_LDU + size_t(F_ZC) * F_LDP) +
         size_t(tm) * size_t(k) * (sizeof(int32_t) + sizeof(float));
}

template <typename T, typename index_t, int TM>
__global__ void __launch_bounds__(F_THREADS, 2)
    fwd_tc_kernel(const T* __restrict__ w_, const index_t* __restrict__ idx, const T* __restrict__ bank_,
                  const T* __restrict__ proj_, T* __restrict__ out_, int64_t N, int H, int k, int64_t R, int dz,
                  int dv) {
  MIDUS_DYNAMIC_SMEM(smem);
  uint16_t* Uh = reinterpret_cast<uint16_t*>(smem);
  using Tile = FwdTcTile<TM>;
  uint16_t* Ul = Uh + TM * F_LDU;
  uint16_t* Ps = Ul + TM * F_LDU;  // proj chunk [z][v]
  int32_t* sR = reinterpret_cast<int32_t*>(Ps + F_ZC * F_LDP);
  float* sW = reinterpret_cast<float*>(sR + TM * k);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(w_);
  const uint16_t* bank = reinterpret_cast<const uint16_t*>(bank_);
  const uint16_t* proj = reinterpret_cast<const uint16_t*>(proj_);
  uint16_t* out = reinterpret_cast<uint16_t*>(out_);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c4 = lane & 3;
  const int64_t t0 = int64_t(blockIdx.x) * TM;
  const int h = blockIdx.y;
  const int v0 = blockIdx.z * F_VT;

  stage_tile_rows<T>(sR, sW, idx, w, t0, TM, N, H, h, k, R, tid, F_THREADS);

  const int mt = warp % Tile::MT;  // token rows 16*mt .. 16*mt+15
  const int nh = warp / Tile::MT;  // v columns 8*NTW*nh .. of the block's 64
  float acc[Tile::NTW][4];
#pragma unroll
  for (int a = 0; a < Tile::NTW; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;

  const int c = lane * 8;  // this lane's 8 columns of the chunk
  for (int z0 = 0; z0 < dz; z0 += F_ZC) {
    const int width = min(F_ZC, dz - z0);  // a multiple of 8
    const int kz = (width + 15) & ~15;     // padded to the mma k-step; the padding is zero
    __syncthreads();                       // sR/sW written; the previous chunk's mma is done
    for (int i = tid; i < kz * F_VT; i += F_THREADS) {
      const int z = i / F_VT, v = i % F_VT;
      uint16_t x = 0;
      if (z < width && v0 + v < dv) x = proj[(int64_t(h) * dz + z0 + z) * dv + v0 + v];
      Ps[z * F_LDP + v] = x;
    }
    // Gather: warp w handles tokens w, w+8, ..., each lane 8 columns, 8 rows in flight.
    for (int t = warp; t < TM; t += F_THREADS / 32) {
      float u[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) u[i] = 0.f;
      if (t0 + t < N && c < width) {
        const int32_t* rr = sR + t * k;
        const float* ww = sW + t * k;
        const uint16_t* base = bank + z0 + c;
        for (int j0 = 0; j0 < k; j0 += 8) {
          uint4 x[8];
#pragma unroll
          for (int q = 0; q < 8; ++q) x[q] = (j0 + q < k) ? ldg16(base + int64_t(rr[j0 + q]) * dz) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            if (j0 + q < k) {
              float xf[8];
              unpack8<T>(x[q], xf);
              const float wq = ww[j0 + q];
#pragma unroll
              for (int i = 0; i < 8; ++i) u[i] = fmaf(wq, xf[i], u[i]);
            }
          }
        }
      }
      if (c < kz) {
        uint16_t hi[8], lo[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) split_bf16(u[i], hi[i], lo[i]);
        *reinterpret_cast<uint4*>(Uh + t * F_LDU + c) =
            make_uint4(pack2(hi[0], hi[1]), pack2(hi[2], hi[3]), pack2(hi[4], hi[5]), pack2(hi[6], hi[7]));
        *reinterpret_cast<uint4*>(Ul + t * F_LDU + c) =
            make_uint4(pack2(lo[0], lo[1]), pack2(lo[2], lo[3]), pack2(lo[4], lo[5]), pack2(lo[6], lo[7]));
      }
    }
    __syncthreads();
    for (int kk = 0; kk < kz; kk += 16) {
      uint32_t ah[4], al[4];
      load_a(ah, Uh, F_LDU, mt * 16, kk, g, c4);
      load_a(al, Ul, F_LDU, mt * 16, kk, g, c4);
#pragma unroll
      for (int nt = 0; nt < Tile::NTW; ++nt) {
        uint32_t b[2];
        load_b_kn(b, Ps, F_LDP, kk, (nh * Tile::NTW + nt) * 8, g, c4);
        mma_split<T>(acc[nt], ah, al, b);
      }
    }
  }
  // Store: C rows g and g+8 of m-tile mt, columns 2*c4, 2*c4+1 of each n-tile.
#pragma unroll
  for (int nt = 0; nt < Tile::NTW; ++nt) {
    const int v = v0 + (nh * Tile::NTW + nt) * 8 + 2 * c4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t tok = t0 + mt * 16 + g + 8 * half;
      if (tok < N) {
        uint16_t* o = out + (tok * H + h) * dv;
        if (v < dv) o[v] = F16<T>::from_float(acc[nt][2 * half]);
        if (v + 1 < dv) o[v + 1] = F16<T>::from_float(acc[nt][2 * half + 1]);
      }
    }
  }
}

// ============================================================================================
// Launch logic
// ============================================================================================
// Conditions shared by the tensor-core paths (16-bit dtype checked by the caller).
inline bool tc_common_ok(const HiveShapes& s, bool bank_aligned16, const HiveOptions& o) {
  return o.tensor_cores && s.has_proj && s.dz % 8 == 0 && s.k <= F_KMAX && s.R <= INT32_MAX && s.H <= 65535 &&
         bank_aligned16;
}

// The fwd_tc tile (64 or 32 tokens per block) for these shapes on a device with `optin` bytes of
// shared memory per block, or 0 where only the generic kernel can run.
inline int fwd_tc_tile(const HiveShapes& s, bool bank_aligned16, size_t optin, const HiveOptions& o) {
  if (!tc_common_ok(s, bank_aligned16, o) || ceil_div(s.dv, F_VT) > 65535 || s.dz > INT32_MAX / 2 ||
      s.dv > INT32_MAX / 2)
    return 0;
  for (int tm : {64, 32}) {
    if (o.fwd_tile != 0 && o.fwd_tile != tm) continue;
    if (fwd_tc_smem_bytes(tm, s.k) <= optin && ceil_div(s.N, tm) <= INT32_MAX) return tm;
  }
  return 0;
}

template <typename Dev, typename T, typename index_t, int TM>
void launch_fwd_tc(Dev& dev, const HiveShapes& s, const T* w, const index_t* idx, const T* bank, const T* proj,
                   T* out) {
  const size_t smem = fwd_tc_smem_bytes(TM, s.k);
  auto kernel = fwd_tc_kernel<T, index_t, TM>;
  allow_smem(dev, kernel, smem);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.N, TM)), static_cast<unsigned>(s.H),
                  static_cast<unsigned>(ceil_div(s.dv, F_VT)));
  dev.launch(TM == 64 ? "fwd_tc_64" : "fwd_tc_32", kernel, grid, dim3(F_THREADS), smem, w, idx, bank, proj, out, s.N,
             int(s.H), int(s.k), s.R, int(s.dz), int(s.dv));
}

// out [N, H, dv] = (sum_j w bank[idx]) @ proj[h], by fwd_tc where it applies, else fwd_generic.
// Needs N, H, k, dz >= 1 and proj.
template <typename Dev, typename T, typename index_t>
void hive_forward_proj(Dev& dev, const HiveShapes& s, const T* w, const index_t* idx, const T* bank, const T* proj,
                       T* out, const HiveOptions& o) {
  if constexpr (is_16bit_v<T>) {
    const int tm = fwd_tc_tile(s, aligned16(bank), dev.smem_optin(), o);
    if (tm == 64) return launch_fwd_tc<Dev, T, index_t, 64>(dev, s, w, idx, bank, proj, out);
    if (tm == 32) return launch_fwd_tc<Dev, T, index_t, 32>(dev, s, w, idx, bank, proj, out);
  }
  MIDUS_CHECK(s.H <= 65535 && ceil_div(s.dv, G_VT) <= 65535, "hive_gather: H = ", s.H, " or d_v = ", s.dv,
              " too large for the CUDA kernel");
  MIDUS_CHECK(ceil_div(s.N, G_TM) <= INT32_MAX, "hive_gather: too many tokens for one launch: ", s.N);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.N, G_TM)), static_cast<unsigned>(s.H),
                  static_cast<unsigned>(ceil_div(s.dv, G_VT)));
  dev.launch("fwd_generic", fwd_generic_kernel<T, index_t>, grid, dim3(G_THREADS), 0, w, idx, bank, proj, out, s.N,
             s.H, s.k, s.R, s.dz, s.dv);
}

}  // namespace
}  // namespace midus
