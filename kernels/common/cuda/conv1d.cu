// Causal depthwise conv1d (+ SiLU) over time: forward and backward.
//
// Layout: x/out/dout/dx [B,T,C] contiguous, weight [C,K], bias [C],
// seq_ids [B,T] int64. out[b,t,c] = bias[c] + sum_j w[c,j] * x[b, t-(K-1)+j, c]
// where a tap before t=0 reads zero and, with seq_ids, a tap whose seq id
// differs from that of t is dropped.
//
// Work split: a warp covers 32 consecutive channel vectors (VEC channels each,
// loaded as one 8/16-byte access, so a warp reads a contiguous run of a row)
// and walks a tile of TT time steps, keeping the last K inputs in registers
// (a sliding window), so each input is read about once. The four warps of a
// block take four (batch, tile) units; blocks stride over the rest.
//
// Backward: the same walk recomputes the pre-activation (for the SiLU
// derivative), forms da = dout * silu'(a), and emits dx[t] once da[t..t+K-1]
// is known (the walk runs K-1 steps past the tile). dweight/dbias partial sums
// stay in registers over every tile a thread visits, are reduced over the
// block's warps in shared memory, then added with one atomicAdd per block per
// value; the grid is sized to one wave so that is a few atomics per address.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "element.cuh"
#include "launch.hpp"

namespace peftfw::kernels::cuda {
namespace {

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&o)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] = Num<T>::to_f(pk.v[i]);
}

template <typename T>
constexpr int kFullVec = 16 / static_cast<int>(sizeof(T));

constexpr int kWarps = 4;       // warps per block (blockDim = 32 x kWarps)
constexpr int kFwdTile = 16;    // time steps per forward tile
constexpr int kBwdTile = 32;    // time steps per backward tile
constexpr int64_t kNoSeq = INT64_MIN;

// ---- forward ----------------------------------------------------------------
template <typename T, int K, int VEC, bool SEQ>
__global__ void __launch_bounds__(32 * kWarps)
    conv_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                    const int64_t* __restrict__ seq, T* __restrict__ out, int B, int L, int C,
                    int64_t xs, int ntiles, bool silu) {
  const int c0 = (blockIdx.x * 32 + threadIdx.x) * VEC;
  if (c0 >= C) return;

  float wv[K][VEC], bv[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
#pragma unroll
    for (int j = 0; j < K; ++j) wv[j][i] = Num<T>::to_f(w[(c0 + i) * K + j]);
    bv[i] = bias != nullptr ? Num<T>::to_f(bias[c0 + i]) : 0.f;
  }

  const int64_t units = static_cast<int64_t>(B) * ntiles;
  for (int64_t unit = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.y; unit < units;
       unit += static_cast<int64_t>(gridDim.y) * kWarps) {
    const int b = static_cast<int>(unit / ntiles);
    const int t0 = static_cast<int>(unit % ntiles) * kFwdTile;
    const int t1 = min(t0 + kFwdTile, L);
    const int64_t row0 = static_cast<int64_t>(b) * L;  // flat (b, t=0) row index
    const T* xb = x + row0 * xs + c0;
    T* ob = out + row0 * C + c0;

    // win[j] holds x[t-(K-1)+j]; sid[j] its seq id.
    float win[K][VEC];
    int64_t sid[K];
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
      const int t = t0 - (K - 1) + j;
      if (t >= 0) {
        load_pack<T, VEC>(xb + static_cast<int64_t>(t) * xs, win[j]);
        sid[j] = SEQ ? seq[row0 + t] : 0;
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) win[j][i] = 0.f;
        sid[j] = kNoSeq;
      }
    }
    sid[K - 1] = 0;

#pragma unroll 4
    for (int t = t0; t < t1; ++t) {
      load_pack<T, VEC>(xb + static_cast<int64_t>(t) * xs, win[K - 1]);
      if (SEQ) sid[K - 1] = seq[row0 + t];
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = bv[i];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const bool use = !SEQ || j == K - 1 || sid[j] == sid[K - 1];
        if (use) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = fmaf(wv[j][i], win[j][i], acc[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        float a = round_to<T>(acc[i]);  // the conv's output, in T
        if (silu) a = round_to<T>(a / (1.f + expf(-a)));
        acc[i] = a;
      }
      store_pack<T, VEC>(ob + static_cast<int64_t>(t) * C, acc);
#pragma unroll
      for (int j = 0; j < K - 1; ++j) {
        sid[j] = sid[j + 1];
#pragma unroll
        for (int i = 0; i < VEC; ++i) win[j][i] = win[j + 1][i];
      }
    }
  }
}

// ---- backward ---------------------------------------------------------------
template <typename T, int K, int VEC, bool SEQ, bool SILU>
__global__ void __launch_bounds__(32 * kWarps)
    conv_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ x, const T* __restrict__ w,
                    const T* __restrict__ bias, const int64_t* __restrict__ seq, T* __restrict__ dx,
                    float* __restrict__ dweight, float* __restrict__ dbias, int B, int L, int C,
                    int64_t xs, int ntiles) {
  constexpr int NP = (K + 1) * VEC;  // partial sums per thread: K taps + bias
  __shared__ float red[kWarps - 1][NP][32];

  const int c0 = (blockIdx.x * 32 + threadIdx.x) * VEC;
  const bool active = c0 < C;

  float dw[K][VEC], db[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    db[i] = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) dw[j][i] = 0.f;
  }

  if (active) {
    float wv[K][VEC], bv[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
#pragma unroll
      for (int j = 0; j < K; ++j) wv[j][i] = Num<T>::to_f(w[(c0 + i) * K + j]);
      bv[i] = (SILU && bias != nullptr) ? Num<T>::to_f(bias[c0 + i]) : 0.f;
    }

    const int64_t units = static_cast<int64_t>(B) * ntiles;
    for (int64_t unit = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.y; unit < units;
         unit += static_cast<int64_t>(gridDim.y) * kWarps) {
      const int b = static_cast<int>(unit / ntiles);
      const int t0 = static_cast<int>(unit % ntiles) * kBwdTile;
      const int t1 = min(t0 + kBwdTile, L);
      const int64_t row0 = static_cast<int64_t>(b) * L;
      const T* xb = x + row0 * xs + c0;
      const T* gb = dout + row0 * C + c0;

      // At the top of step u: xw[j] = x[u-(K-1)+j], sw[j] its seq id,
      // da[j] = dL/da[u-(K-1)+j] (zero before t0: not needed there).
      float xw[K][VEC], da[K][VEC];
      int64_t sw[K];
#pragma unroll
      for (int j = 0; j < K - 1; ++j) {
        const int t = t0 - (K - 1) + j;
        if (t >= 0) {
          load_pack<T, VEC>(xb + static_cast<int64_t>(t) * xs, xw[j]);
          sw[j] = SEQ ? seq[row0 + t] : 0;
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) xw[j][i] = 0.f;
          sw[j] = kNoSeq;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) da[j][i] = 0.f;
      }
      sw[K - 1] = 0;

#pragma unroll 2
      for (int u = t0; u < t1 + K - 1; ++u) {
        const bool in = u < L;
        float g[VEC];
        if (in) {
          load_pack<T, VEC>(xb + static_cast<int64_t>(u) * xs, xw[K - 1]);
          load_pack<T, VEC>(gb + static_cast<int64_t>(u) * C, g);
          if (SEQ) sw[K - 1] = seq[row0 + u];
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) xw[K - 1][i] = g[i] = 0.f;
          sw[K - 1] = kNoSeq;
        }
        bool m[K];  // tap j of output u is used
#pragma unroll
        for (int j = 0; j < K; ++j) m[j] = !SEQ || j == K - 1 || sw[j] == sw[K - 1];

        if (SILU && in) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            // Same accumulation order and rounding as the forward.
            float acc = bv[i];
#pragma unroll
            for (int j = 0; j < K; ++j)
              if (m[j]) acc = fmaf(wv[j][i], xw[j][i], acc);
            const float a = round_to<T>(acc);
            const float s = 1.f / (1.f + expf(-a));
            g[i] *= s * (1.f + a * (1.f - s));  // silu'(a)
          }
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) da[K - 1][i] = g[i];

        if (u < t1) {  // output u belongs to this tile: weight / bias grads
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            db[i] += g[i];
#pragma unroll
            for (int j = 0; j < K; ++j)
              if (m[j]) dw[j][i] = fmaf(g[i], xw[j][i], dw[j][i]);
          }
        }

        // dx[t] = sum_j w[j] * da[t+K-1-j] * [seq(t+K-1-j) == seq(t)], t = u-(K-1).
        const int t = u - (K - 1);
        if (dx != nullptr && t >= t0) {
          float o[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) o[i] = 0.f;
#pragma unroll
          for (int j = 0; j < K; ++j) {
            const bool use = !SEQ || j == K - 1 || sw[K - 1 - j] == sw[0];
            if (use) {
#pragma unroll
              for (int i = 0; i < VEC; ++i) o[i] = fmaf(wv[j][i], da[K - 1 - j][i], o[i]);
            }
          }
          store_pack<T, VEC>(dx + (row0 + t) * C + c0, o);
        }

#pragma unroll
        for (int j = 0; j < K - 1; ++j) {
          sw[j] = sw[j + 1];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            xw[j][i] = xw[j + 1][i];
            da[j][i] = da[j + 1][i];
          }
        }
      }
    }
  }

  if (dweight == nullptr && dbias == nullptr) return;  // uniform over the grid

  // Reduce the partial sums over the block's warps, then one atomic per value.
  if (threadIdx.y > 0) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
#pragma unroll
      for (int j = 0; j < K; ++j) red[threadIdx.y - 1][j * VEC + i][threadIdx.x] = dw[j][i];
      red[threadIdx.y - 1][K * VEC + i][threadIdx.x] = db[i];
    }
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int y = 0; y < kWarps - 1; ++y) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
#pragma unroll
        for (int j = 0; j < K; ++j) dw[j][i] += red[y][j * VEC + i][threadIdx.x];
        db[i] += red[y][K * VEC + i][threadIdx.x];
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if (dweight != nullptr) {
#pragma unroll
        for (int j = 0; j < K; ++j) atomicAdd(dweight + (c0 + i) * K + j, dw[j][i]);
      }
      if (dbias != nullptr) atomicAdd(dbias + c0 + i, db[i]);
    }
  }
}

// ---- launchers ----------------------------------------------------------------
bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

bool sizes_ok(int64_t batch, int64_t seqlen, int64_t channels, int kernel_size) {
  return batch >= 0 && seqlen >= 0 && channels >= 0 && batch <= INT_MAX && seqlen <= INT_MAX &&
         channels <= INT_MAX / 4 && kernel_size >= 2 && kernel_size <= 4;
}

int grid_rows(int64_t units) {  // gridDim.y covering `units` (batch, tile) pairs
  const int64_t rows = (units + kWarps - 1) / kWarps;
  return static_cast<int>(rows < 65535 ? rows : 65535);
}

template <typename T, int K, int VEC>
void fwd_launch(const T* x, const T* w, const T* bias, const int64_t* seq, T* out, int B, int L,
                int C, int64_t xs, bool silu, cudaStream_t stream) {
  const int ntiles = (L + kFwdTile - 1) / kFwdTile;
  const int cvec = C / VEC;
  const dim3 block(32, kWarps);
  const dim3 grid((cvec + 31) / 32, grid_rows(static_cast<int64_t>(B) * ntiles));
  if (seq != nullptr)
    conv_fwd_kernel<T, K, VEC, true><<<grid, block, 0, stream>>>(x, w, bias, seq, out, B, L, C,
                                                                 xs, ntiles, silu);
  else
    conv_fwd_kernel<T, K, VEC, false><<<grid, block, 0, stream>>>(x, w, bias, seq, out, B, L, C,
                                                                  xs, ntiles, silu);
}

template <typename T, int VEC>
void fwd_dispatch_k(int K, const T* x, const T* w, const T* bias, const int64_t* seq, T* out,
                    int B, int L, int C, int64_t xs, bool silu, cudaStream_t stream) {
  switch (K) {
    case 2: fwd_launch<T, 2, VEC>(x, w, bias, seq, out, B, L, C, xs, silu, stream); break;
    case 3: fwd_launch<T, 3, VEC>(x, w, bias, seq, out, B, L, C, xs, silu, stream); break;
    default: fwd_launch<T, 4, VEC>(x, w, bias, seq, out, B, L, C, xs, silu, stream); break;
  }
}

template <typename T>
cudaError_t fwd_typed(const void* x, const void* w, const void* bias, const int64_t* seq,
                      void* out, int B, int L, int C, int64_t xs, int K, bool silu,
                      cudaStream_t stream) {
  constexpr int V = kFullVec<T>;
  const bool vec = C % V == 0 && xs % V == 0 && aligned(x, V * sizeof(T)) && aligned(out, V * sizeof(T));
  auto* xp = static_cast<const T*>(x);
  auto* wp = static_cast<const T*>(w);
  auto* bp = static_cast<const T*>(bias);
  auto* op = static_cast<T*>(out);
  if (vec)
    fwd_dispatch_k<T, V>(K, xp, wp, bp, seq, op, B, L, C, xs, silu, stream);
  else
    fwd_dispatch_k<T, 1>(K, xp, wp, bp, seq, op, B, L, C, xs, silu, stream);
  return cudaGetLastError();
}

template <typename T, int K, int VEC, bool SEQ, bool SILU>
cudaError_t bwd_launch(const T* dout, const T* x, const T* w, const T* bias, const int64_t* seq,
                       T* dx, float* dw, float* db, int B, int L, int C, int64_t xs,
                       cudaStream_t stream) {
  auto kernel = conv_bwd_kernel<T, K, VEC, SEQ, SILU>;
  const int ntiles = (L + kBwdTile - 1) / kBwdTile;
  const int cvec = C / VEC;
  const dim3 block(32, kWarps);
  const int gx = (cvec + 31) / 32;
  int gy = grid_rows(static_cast<int64_t>(B) * ntiles);
  if (dw != nullptr || db != nullptr) {
    // One wave of blocks: each block strides over many tiles, so the
    // weight/bias partials need only a few atomics per address.
    int64_t wave = 0;
    const cudaError_t err = one_wave(kernel, 32 * kWarps, &wave);
    if (err != cudaSuccess) return err;
    const int64_t want = (wave + gx - 1) / gx;
    if (want < gy) gy = static_cast<int>(want < 1 ? 1 : want);
  }
  kernel<<<dim3(gx, gy), block, 0, stream>>>(dout, x, w, bias, seq, dx, dw, db, B, L, C, xs, ntiles);
  return cudaGetLastError();
}

template <typename T, int K, int VEC>
cudaError_t bwd_dispatch_flags(const T* dout, const T* x, const T* w, const T* bias,
                               const int64_t* seq, T* dx, float* dw, float* db, int B, int L,
                               int C, int64_t xs, bool silu, cudaStream_t stream) {
  if (seq != nullptr) {
    if (silu) return bwd_launch<T, K, VEC, true, true>(dout, x, w, bias, seq, dx, dw, db, B, L, C, xs, stream);
    return bwd_launch<T, K, VEC, true, false>(dout, x, w, bias, seq, dx, dw, db, B, L, C, xs, stream);
  }
  if (silu) return bwd_launch<T, K, VEC, false, true>(dout, x, w, bias, seq, dx, dw, db, B, L, C, xs, stream);
  return bwd_launch<T, K, VEC, false, false>(dout, x, w, bias, seq, dx, dw, db, B, L, C, xs, stream);
}

template <typename T, int VEC>
cudaError_t bwd_dispatch_k(int K, const T* dout, const T* x, const T* w, const T* bias,
                           const int64_t* seq, T* dx, float* dw, float* db, int B, int L, int C,
                           int64_t xs, bool silu, cudaStream_t stream) {
  switch (K) {
    case 2: return bwd_dispatch_flags<T, 2, VEC>(dout, x, w, bias, seq, dx, dw, db, B, L, C, xs, silu, stream);
    case 3: return bwd_dispatch_flags<T, 3, VEC>(dout, x, w, bias, seq, dx, dw, db, B, L, C, xs, silu, stream);
    default: return bwd_dispatch_flags<T, 4, VEC>(dout, x, w, bias, seq, dx, dw, db, B, L, C, xs, silu, stream);
  }
}

template <typename T>
cudaError_t bwd_typed(const void* dout, const void* x, const void* w, const void* bias,
                      const int64_t* seq, void* dx, float* dw, float* db, int B, int L, int C,
                      int64_t xs, int K, bool silu, cudaStream_t stream) {
  // 4 channels per thread (8- or 16-byte accesses) keeps the register
  // footprint (windows of x and da plus the weight partials) moderate.
  constexpr int V = 4;
  const int bytes = V * static_cast<int>(sizeof(T));
  const bool vec = C % V == 0 && xs % V == 0 && aligned(dout, bytes) && aligned(x, bytes) &&
                   aligned(dx, bytes);
  auto* gp = static_cast<const T*>(dout);
  auto* xp = static_cast<const T*>(x);
  auto* wp = static_cast<const T*>(w);
  auto* bp = static_cast<const T*>(bias);
  auto* dxp = static_cast<T*>(dx);
  if (vec) return bwd_dispatch_k<T, V>(K, gp, xp, wp, bp, seq, dxp, dw, db, B, L, C, xs, silu, stream);
  return bwd_dispatch_k<T, 1>(K, gp, xp, wp, bp, seq, dxp, dw, db, B, L, C, xs, silu, stream);
}

}  // namespace

cudaError_t causal_conv1d_fwd(DType dtype, const void* x, int64_t x_ld, const void* weight,
                              const void* bias, const int64_t* seq_ids, void* out, int64_t batch,
                              int64_t seqlen, int64_t channels, int kernel_size, bool silu,
                              cudaStream_t stream) {
  if (!sizes_ok(batch, seqlen, channels, kernel_size) || x_ld < channels) return cudaErrorInvalidValue;
  if (batch == 0 || seqlen == 0 || channels == 0) return cudaSuccess;
  if (x == nullptr || weight == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const int B = static_cast<int>(batch), L = static_cast<int>(seqlen), C = static_cast<int>(channels);
  switch (dtype) {
    case DType::f32: return fwd_typed<float>(x, weight, bias, seq_ids, out, B, L, C, x_ld, kernel_size, silu, stream);
    case DType::f16: return fwd_typed<__half>(x, weight, bias, seq_ids, out, B, L, C, x_ld, kernel_size, silu, stream);
    case DType::bf16: return fwd_typed<__nv_bfloat16>(x, weight, bias, seq_ids, out, B, L, C, x_ld, kernel_size, silu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t causal_conv1d_bwd(DType dtype, const void* dout, const void* x, int64_t x_ld,
                              const void* weight, const void* bias, const int64_t* seq_ids, void* dx,
                              float* dweight, float* dbias, int64_t batch, int64_t seqlen,
                              int64_t channels, int kernel_size, bool silu, cudaStream_t stream) {
  if (!sizes_ok(batch, seqlen, channels, kernel_size) || x_ld < channels) return cudaErrorInvalidValue;
  if (batch == 0 || seqlen == 0 || channels == 0) return cudaSuccess;
  if (dx == nullptr && dweight == nullptr && dbias == nullptr) return cudaSuccess;
  if (dout == nullptr || x == nullptr || weight == nullptr) return cudaErrorInvalidValue;
  const int B = static_cast<int>(batch), L = static_cast<int>(seqlen), C = static_cast<int>(channels);
  switch (dtype) {
    case DType::f32:
      return bwd_typed<float>(dout, x, weight, bias, seq_ids, dx, dweight, dbias, B, L, C, x_ld, kernel_size, silu, stream);
    case DType::f16:
      return bwd_typed<__half>(dout, x, weight, bias, seq_ids, dx, dweight, dbias, B, L, C, x_ld, kernel_size, silu, stream);
    case DType::bf16:
      return bwd_typed<__nv_bfloat16>(dout, x, weight, bias, seq_ids, dx, dweight, dbias, B, L, C, x_ld, kernel_size, silu, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace peftfw::kernels::cuda
