// PANet prototypes through the adjoint of bilinear upsampling (issue #3).
//
// sum_p up(F)[p] m[p] = sum_q F[q] (A_H^T m A_W)[q]: each mask is pooled down to feature resolution
// with the transposed interpolation weights (two sparse passes, two taps per row), then every channel
// needs one dot product of length h*w per mask instead of an H x W upsample.
#include <algorithm>
#include <vector>

#include "bilinear.h"
#include "buffers.h"
#include "ops.h"

namespace fss {
namespace {

constexpr double kPoolEps = 1e-5;  // fss.constants.POOL_EPS

// pooled (h x w) = A_H^T mask A_W; returns sum(mask). rows is h x W scratch.
template <typename MaskT>
double pool_mask(const MaskT* __restrict mask, int64_t H, int64_t W, const Taps& th, const Taps& tw, int64_t h,
                 int64_t w, float* __restrict rows, float* __restrict pooled) {
  std::fill(rows, rows + h * W, 0.f);
  double total = 0.0;
  for (int64_t y = 0; y < H; ++y) {
    const MaskT* m = mask + y * W;
    float* r0 = rows + th.i0[y] * W;
    float* r1 = rows + th.i1[y] * W;  // == r0 on the last row: both weights land there, as in torch
    const float a0 = th.w0[y], a1 = th.w1[y];
    float row_total = 0.f;
    for (int64_t x = 0; x < W; ++x) {
      const float v = static_cast<float>(m[x]);
      row_total += v;
      r0[x] += a0 * v;
      r1[x] += a1 * v;
    }
    total += row_total;
  }
  std::fill(pooled, pooled + h * w, 0.f);
  for (int64_t i = 0; i < h; ++i) {
    const float* r = rows + i * W;
    float* p = pooled + i * w;
    for (int64_t x = 0; x < W; ++x) {
      p[tw.i0[x]] += tw.w0[x] * r[x];
      p[tw.i1[x]] += tw.w1[x] * r[x];
    }
  }
  return total;
}

// Weight of a shot's pooled sums in its prototypes: fg of way n = mean over its valid shots of
// sum(F m) / (sum(m) + eps); background = mean over ways of the same (official getPrototype).
void shot_coefficients(const uint8_t* valid, const float* counts, int64_t B, int64_t N, int64_t K,
                       float* coef) {
  for (int64_t bn = 0; bn < B * N; ++bn) {
    int64_t n_valid = 0;
    for (int64_t k = 0; k < K; ++k) n_valid += valid[bn * K + k] != 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t shot = bn * K + k;
      if (!valid[shot]) {
        coef[2 * shot] = coef[2 * shot + 1] = 0.f;
        continue;
      }
      coef[2 * shot] = static_cast<float>(1.0 / (n_valid * (counts[2 * shot] + kPoolEps)));
      coef[2 * shot + 1] = static_cast<float>(1.0 / (N * n_valid * (counts[2 * shot + 1] + kPoolEps)));
    }
  }
}

struct ProtoShape {
  int64_t B, N, K, C, h, w, H, W;
};

// One parallel region, one barrier: pool every mask (2 per shot), then per channel the dot products of
// all shots' features with their pooled masks.
template <typename MaskT>
void prototypes_impl(const float* feats, const MaskT* fg, const MaskT* bg, const uint8_t* valid,
                     const ProtoShape& s, float* protos, float* pooled, float* counts, int num_threads) {
  const int64_t B = s.B, N = s.N, K = s.K, C = s.C, h = s.h, w = s.w, H = s.H, W = s.W, hw = h * w;
  const int64_t shots = B * N * K;
  const Taps th = bilinear_taps(H, h), tw = bilinear_taps(W, w);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> rows(h * W), coef(2 * shots);
#pragma omp for schedule(dynamic)
    for (int64_t idx = 0; idx < 2 * shots; ++idx) {  // (shot, fg | bg), the layout of pooled
      const int64_t shot = idx / 2;
      float* out = pooled + idx * hw;
      if (!valid[shot]) {
        std::fill(out, out + hw, 0.f);
        counts[idx] = 0.f;
        continue;
      }
      const MaskT* mask = (idx % 2 ? bg : fg) + shot * H * W;
      counts[idx] = static_cast<float>(pool_mask(mask, H, W, th, tw, h, w, rows.data(), out));
    }
    shot_coefficients(valid, counts, B, N, K, coef.data());  // tiny: every thread its own copy
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        float bg_proto = 0.f;
        for (int64_t n = 0; n < N; ++n) {
          float fg_proto = 0.f;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t shot = (b * N + n) * K + k;
            if (!valid[shot]) continue;
            const float* x = feats + (shot * C + c) * hw;
            const float* w_fg = pooled + 2 * shot * hw;
            const float* w_bg = w_fg + hw;
            float s_fg = 0.f, s_bg = 0.f;
#pragma omp simd reduction(+ : s_fg, s_bg)
            for (int64_t q = 0; q < hw; ++q) {
              s_fg += x[q] * w_fg[q];
              s_bg += x[q] * w_bg[q];
            }
            fg_proto += coef[2 * shot] * s_fg;
            bg_proto += coef[2 * shot + 1] * s_bg;
          }
          protos[(b * (N + 1) + 1 + n) * C + c] = fg_proto;
        }
        protos[b * (N + 1) * C + c] = bg_proto;
      }
    }
  }
}

}  // namespace

void prototypes_forward(py::array feats, py::array fg, py::array bg, py::array shot_valid, py::array protos,
                        py::array pooled, py::array counts, int num_threads) {
  if (feats.ndim() != 6 || fg.ndim() != 5) throw std::invalid_argument("feats must be 6-d, masks 5-d");
  const ProtoShape s{feats.shape(0), feats.shape(1), feats.shape(2), feats.shape(3),
                     feats.shape(4), feats.shape(5), fg.shape(3),    fg.shape(4)};
  const float* f = checked_data<float>(feats, "feats", {s.B, s.N, s.K, s.C, s.h, s.w});
  const uint8_t* valid = checked_data<uint8_t>(shot_valid, "shot_valid", {s.B, s.N, s.K});
  float* out = checked_data<float>(protos, "protos", {s.B, s.N + 1, s.C});
  float* pool = checked_data<float>(pooled, "pooled", {s.B, s.N, s.K, 2, s.h, s.w});
  float* cnt = checked_data<float>(counts, "counts", {s.B, s.N, s.K, 2});
  if (fg.dtype().is(py::dtype::of<uint8_t>())) {
    const uint8_t* m_fg = checked_data<uint8_t>(fg, "fg", {s.B, s.N, s.K, s.H, s.W});
    const uint8_t* m_bg = checked_data<uint8_t>(bg, "bg", {s.B, s.N, s.K, s.H, s.W});
    py::gil_scoped_release release;
    prototypes_impl(f, m_fg, m_bg, valid, s, out, pool, cnt, num_threads);
  } else {
    const float* m_fg = checked_data<float>(fg, "fg", {s.B, s.N, s.K, s.H, s.W});
    const float* m_bg = checked_data<float>(bg, "bg", {s.B, s.N, s.K, s.H, s.W});
    py::gil_scoped_release release;
    prototypes_impl(f, m_fg, m_bg, valid, s, out, pool, cnt, num_threads);
  }
}

}  // namespace fss
