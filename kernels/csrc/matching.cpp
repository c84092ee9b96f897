// PANet matching head: scale * cosine at feature resolution, bilinear upsampling, argmax (issue #3).
//
// Per query: (1) low-resolution logits L[p][s] = scale * <q_s, p_hat> / max(|q_s|, eps) (one pass over
// the features); (2) the horizontal half of the upsampling, R[p][r][X] for the feature rows r needed;
// (3) per output row the vertical half, feeding either an argmax (+ max softmax prob) that writes uint8
// labels directly, or the float logits. The order of operations is torch's:
// (L[y0][x0] * wx0 + L[y0][x1] * wx1) * wy0 + (L[y1][x0] * wx0 + L[y1][x1] * wx1) * wy1.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "bilinear.h"
#include "buffers.h"
#include "ops.h"

namespace fss {
namespace {

constexpr float kCosineEps = 1e-8f;  // fss.constants.COSINE_EPS, as F.cosine_similarity
constexpr int64_t kLocationBlock = 128;

struct HeadShape {
  int64_t B, Q, P, C, h, w, H, W;
};

HeadShape head_shape(const py::array& qry, const py::array& protos, int64_t H, int64_t W) {
  if (qry.ndim() != 5 || protos.ndim() != 3) throw std::invalid_argument("qry must be 5-d, protos 3-d");
  return {qry.shape(0), qry.shape(1), protos.shape(1), qry.shape(2), qry.shape(3), qry.shape(4), H, W};
}

// exp(x) for x <= 0 in plain arithmetic that vectorises (std::exp does not): Cephes' expf, x = n ln2 + r
// with |r| <= ln2 / 2, a degree-6 polynomial (about 1 ulp), 2^n from the exponent bits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);                                             // exp(-87) ~ 1.6e-38: still normal
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);  // round to nearest (x <= 0)
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;         // ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return (p * r * r + r + 1.f) * scale;
}

// Prototypes divided by their clamped norms: B x P x C.
std::vector<float> unit_prototypes(const float* protos, const HeadShape& s) {
  std::vector<float> unit(s.B * s.P * s.C);
  for (int64_t bp = 0; bp < s.B * s.P; ++bp) {
    const float* p = protos + bp * s.C;
    double norm2 = 0.0;
    for (int64_t c = 0; c < s.C; ++c) norm2 += static_cast<double>(p[c]) * p[c];
    const float inv = 1.f / std::max(static_cast<float>(std::sqrt(norm2)), kCosineEps);
    for (int64_t c = 0; c < s.C; ++c) unit[bp * s.C + c] = p[c] * inv;
  }
  return unit;
}

// L[p][loc0 .. loc0 + len) of one query (C x hw features) into out[p * out_stride + j]; acc is
// P x kLocationBlock scratch.
void cosine_block(const float* qry, const float* unit, const HeadShape& s, float scale, int64_t loc0,
                  int64_t len, float* __restrict acc, float* __restrict out, int64_t out_stride) {
  const int64_t hw = s.h * s.w, P = s.P, C = s.C;
  float norm2[kLocationBlock] = {};
  std::fill(acc, acc + P * kLocationBlock, 0.f);
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {  // four channels per pass over the accumulators: a quarter of their traffic
    const float* __restrict x0 = qry + c * hw + loc0;
    const float* __restrict x1 = x0 + hw;
    const float* __restrict x2 = x1 + hw;
    const float* __restrict x3 = x2 + hw;
    for (int64_t j = 0; j < len; ++j) norm2[j] += x0[j] * x0[j] + x1[j] * x1[j] + x2[j] * x2[j] + x3[j] * x3[j];
    for (int64_t p = 0; p < P; ++p) {
      const float* u = unit + p * C + c;
      const float u0 = u[0], u1 = u[1], u2 = u[2], u3 = u[3];
      float* __restrict a = acc + p * kLocationBlock;
      for (int64_t j = 0; j < len; ++j) a[j] += x0[j] * u0 + x1[j] * u1 + x2[j] * u2 + x3[j] * u3;
    }
  }
  for (; c < C; ++c) {
    const float* __restrict x = qry + c * hw + loc0;
    for (int64_t j = 0; j < len; ++j) norm2[j] += x[j] * x[j];
    for (int64_t p = 0; p < P; ++p) {
      const float u = unit[p * C + c];
      float* __restrict a = acc + p * kLocationBlock;
      for (int64_t j = 0; j < len; ++j) a[j] += x[j] * u;
    }
  }
  for (int64_t j = 0; j < len; ++j) norm2[j] = scale / std::max(std::sqrt(norm2[j]), kCosineEps);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < len; ++j) out[p * out_stride + j] = acc[p * kLocationBlock + j] * norm2[j];
}

// Calls row_fn(bq, y, r0, r1, wy0, wy1, class_stride, scratch) for every output row y of every query,
// where r0 / r1 point at the horizontally upsampled logits R[class 0][y0] / R[class 0][y1] and scratch
// is 3 * W floats of the calling thread.
//
// Work item: a band of output rows of one query, which computes phases (1) and (2) for just the feature
// rows it reads (neighbouring bands share at most two). One parallel loop, no barrier inside: on a busy
// 2-core machine every barrier can cost a scheduler time slice.
template <typename RowFn>
void run_head(const float* qry, const float* protos, const HeadShape& s, float scale, int num_threads,
              RowFn&& row_fn) {
  const int64_t hw = s.h * s.w, P = s.P, w = s.w, W = s.W;
  const Taps th = bilinear_taps(s.H, s.h), tw = bilinear_taps(s.W, s.w);
  const std::vector<float> unit = unit_prototypes(protos, s);
  const int64_t queries = s.B * s.Q;
  // Enough bands that the items split evenly over the threads.
  const int64_t bands = std::min<int64_t>(s.H, num_threads / std::gcd<int64_t>(queries, num_threads));
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> acc(P * kLocationBlock), low, rows, scratch(3 * W);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < queries * bands; ++item) {
      const int64_t bq = item / bands, band = item % bands;
      const int64_t y_begin = band * s.H / bands, y_end = (band + 1) * s.H / bands;
      const int64_t r_begin = th.i0[y_begin], n_rows = th.i1[y_end - 1] + 1 - r_begin;  // taps are monotone
      const float* q = qry + bq * s.C * hw;
      const float* u = unit.data() + (bq / s.Q) * P * s.C;
      low.resize(P * n_rows * w);
      rows.resize(P * n_rows * W);
      for (int64_t j = 0; j < n_rows * w; j += kLocationBlock) {
        const int64_t len = std::min(kLocationBlock, n_rows * w - j);
        cosine_block(q, u, s, scale, r_begin * w + j, len, acc.data(), low.data() + j, n_rows * w);
      }
      for (int64_t pr = 0; pr < P * n_rows; ++pr) {
        const float* l = low.data() + pr * w;
        float* r = rows.data() + pr * W;
        for (int64_t x = 0; x < W; ++x) r[x] = l[tw.i0[x]] * tw.w0[x] + l[tw.i1[x]] * tw.w1[x];
      }
      for (int64_t y = y_begin; y < y_end; ++y) {
        const float* r0 = rows.data() + (th.i0[y] - r_begin) * W;
        const float* r1 = rows.data() + (th.i1[y] - r_begin) * W;
        row_fn(bq, y, r0, r1, th.w0[y], th.w1[y], n_rows * W, scratch.data());
      }
    }
  }
}

}  // namespace

void segment_forward(py::array qry, py::array protos, float scale, py::array labels, py::object prob,
                     int num_threads) {
  if (labels.ndim() != 4) throw std::invalid_argument("labels must be B x Q x H x W");
  const HeadShape s = head_shape(qry, protos, labels.shape(2), labels.shape(3));
  if (s.P > 256) throw std::invalid_argument("uint8 labels hold at most 256 classes");
  const float* q = checked_data<float>(qry, "qry", {s.B, s.Q, s.C, s.h, s.w});
  const float* p = checked_data<float>(protos, "protos", {s.B, s.P, s.C});
  uint8_t* out = checked_data<uint8_t>(labels, "labels", {s.B, s.Q, s.H, s.W});
  float* out_prob = nullptr;
  if (!prob.is_none()) {
    py::array prob_array = prob.cast<py::array>();
    out_prob = checked_data<float>(prob_array, "prob", {s.B, s.Q, s.H, s.W});
  }
  const int64_t HW = s.H * s.W, P = s.P, W = s.W;
  py::gil_scoped_release release;
  const auto label_row = [=](int64_t bq, int64_t y, const float* r0, const float* r1, float a0, float a1,
                             int64_t class_stride, float* scratch) {
    // Labels kept as floats until the end: compare and select stay in one vector width.
    float* __restrict best = scratch;
    float* __restrict label = scratch + W;
    for (int64_t x = 0; x < W; ++x) {
      best[x] = r0[x] * a0 + r1[x] * a1;
      label[x] = 0.f;
    }
    for (int64_t c = 1; c < P; ++c) {
      const float* __restrict c0 = r0 + c * class_stride;
      const float* __restrict c1 = r1 + c * class_stride;
      const float class_label = static_cast<float>(c);
      for (int64_t x = 0; x < W; ++x) {  // branch-free, so that it vectorises
        const float v = c0[x] * a0 + c1[x] * a1;
        const float above = static_cast<float>(v > best[x]);  // strict: ties keep the first class, as torch
        label[x] += above * (class_label - label[x]);
        best[x] = std::max(best[x], v);
      }
    }
    uint8_t* __restrict labels_row = out + bq * HW + y * W;
    const int64_t width = W;  // a local: uint8 stores may alias the lambda's captures
    for (int64_t x = 0; x < width; ++x) labels_row[x] = static_cast<uint8_t>(static_cast<int32_t>(label[x]));
    if (out_prob == nullptr) return;
    float* __restrict total = scratch + 2 * W;
    std::fill(total, total + W, 0.f);
    for (int64_t c = 0; c < P; ++c) {
      const float* __restrict c0 = r0 + c * class_stride;
      const float* __restrict c1 = r1 + c * class_stride;
      for (int64_t x = 0; x < W; ++x) total[x] += exp_nonpositive(c0[x] * a0 + c1[x] * a1 - best[x]);
    }
    float* __restrict prob_row = out_prob + bq * HW + y * W;
    for (int64_t x = 0; x < W; ++x) prob_row[x] = 1.f / total[x];
  };
  run_head(q, p, s, scale, num_threads, label_row);
}

void match_forward(py::array qry, py::array protos, float scale, py::array logits, int num_threads) {
  if (logits.ndim() != 5) throw std::invalid_argument("logits must be B x Q x P x H x W");
  const HeadShape s = head_shape(qry, protos, logits.shape(3), logits.shape(4));
  const float* q = checked_data<float>(qry, "qry", {s.B, s.Q, s.C, s.h, s.w});
  const float* p = checked_data<float>(protos, "protos", {s.B, s.P, s.C});
  float* out = checked_data<float>(logits, "logits", {s.B, s.Q, s.P, s.H, s.W});
  const int64_t HW = s.H * s.W, P = s.P, W = s.W;
  py::gil_scoped_release release;
  const auto logits_row = [=](int64_t bq, int64_t y, const float* r0, const float* r1, float a0, float a1,
                              int64_t class_stride, float*) {
    for (int64_t c = 0; c < P; ++c) {
      const float* __restrict c0 = r0 + c * class_stride;
      const float* __restrict c1 = r1 + c * class_stride;
      float* __restrict o = out + (bq * P + c) * HW + y * W;
      for (int64_t x = 0; x < W; ++x) o[x] = c0[x] * a0 + c1[x] * a1;
    }
  };
  run_head(q, p, s, scale, num_threads, logits_row);
}

}  // namespace fss
