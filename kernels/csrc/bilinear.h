// Bilinear interpolation weights along one axis, exactly as torch's upsample_bilinear2d computes them
// for F.interpolate(size=..., mode="bilinear", align_corners=False) on CPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fss {

// Output index d reads input[i0[d]] * w0[d] + input[i1[d]] * w1[d].
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};

inline Taps bilinear_taps(int64_t out_size, int64_t in_size) {
  Taps t;
  t.i0.resize(out_size);
  t.i1.resize(out_size);
  t.w0.resize(out_size);
  t.w1.resize(out_size);
  // Same float arithmetic as ATen: scale = in / out in float, src = max(scale * (d + 0.5) - 0.5, 0),
  // where torch's x86 kernels (built for AVX2 and up) contract the multiply-add into one fma.
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int64_t d = 0; d < out_size; ++d) {
    const float src = std::max(std::fma(scale, static_cast<float>(d) + 0.5f, -0.5f), 0.f);
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in_size - 1);
    const float lambda = std::min(std::max(src - static_cast<float>(i0), 0.f), 1.f);
    t.i0[d] = i0;
    t.i1[d] = i0 < in_size - 1 ? i0 + 1 : i0;
    t.w0[d] = 1.f - lambda;
    t.w1[d] = lambda;
  }
  return t;
}

}  // namespace fss
