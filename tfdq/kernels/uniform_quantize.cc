// Fused CPU kernels for tfdq's uniform quantizer (tfdq.ops.uniform_quantize).
//
//   TfdqUniformQuantize(x, d, q_max; signed) -> q
//     c = clip(x, lo, q_max)            lo = -q_max (signed) or 0
//     q = d * round_half_away(c / d)
//
//   TfdqUniformQuantizeGrad(dy, x, q, d, q_max; signed) -> (gx, gd, gq)
//     gx = (lo <= x <= q_max) ? dy : 0
//     gd = sum(dy * (q - c)) / d
//     gq = sum(dy where x > q_max) - (signed ? sum(dy where x < lo) : 0)
//
//   TfdqAddReluQuantize(a, b, d_a, q_max_a, d, q_max; signed_a) -> q
//     q = Q(relu(Q_a(a) + b))           Q unsigned (d, q_max), Q_a (d_a, q_max_a)
//
//   TfdqAddReluQuantizeGrad(dy, a, b, d_a, q_max_a, d, q_max; signed_a)
//       -> (ga, gb, gd_a, gq_a, gd, gq)
//     the gradients of the chain Q_a, Add, Relu, Q (TensorFlow's ReluGrad
//     included: gs = (0 <= r <= q_max ? dy : 0) * (s > 0), r = relu(s)),
//     element for element and sum for sum what the separate ops give.
//
//   TfdqAffineQuantize(x, scale, offset, d, q_max; signed) -> q
//     q = Q(x * scale[c] + offset[c])   c the last-axis (channel) index
//
//   TfdqAffineQuantizeGrad(dy, x, scale, offset, d, q_max; signed)
//       -> (gx, gscale, goffset, gd, gq)
//     with y = x * scale + offset and gy Q's straight-through gradient at y:
//     gx = gy * scale[c], gscale[c] = sum(gy * x), goffset[c] = sum(gy)
//     (the sums over every element of channel c), gd and gq as above.
//
//   TfdqAffineAddReluQuantize(x, scale, offset, b, d_a, q_max_a, d, q_max; signed_a) -> q
//     TfdqAddReluQuantize with a = x * scale[c] + offset[c]
//
//   TfdqAffineAddReluQuantizeGrad(dy, x, scale, offset, b, d_a, q_max_a, d, q_max; signed_a)
//       -> (gx, gscale, goffset, gb, gd_a, gq_a, gd, gq)
//     the junction's gradients, ga carried through the affine map as above.
//
// The affine pair is a BatchNormalization's output pass (x * inv + shift,
// per channel, as tf.nn.batch_normalization computes it) and the quantizer
// after it: one pass forward (read x, write q) instead of three, one
// backward (read dy and x, write gx) instead of five; TensorFlow's own ops
// compute the batch statistics and carry gscale and goffset on to them.
//
// The residual junction of a quantized ResNet (a signed quantizer on the
// branch, the sum with the shortcut, ReLU, the unsigned quantizer of the
// block's output) is thus one pass forward and one backward instead of four
// and three; tfdq/kernels/__init__.py builds it from those ops when it finds
// them in a training step's graph.
//
// The forward pass performs the same float32 operations as the TensorFlow
// formulas of tfdq.ops (min, max, divide, abs, add, floor, sign, multiply),
// so its result is bit-identical to them. (The XLA-compiled path of tfdq.ops
// differs from both in the sign of zero: it returns -0.0 for a negative zero
// or subnormal x, where tf.sign makes it +0.0.) Rounding half away from zero
// is floor(|v| + h) with h the largest float32 below 1/2 (see the docstring
// of tfdq.ops.round_half_away). The backward pass is one loop over the tensor;
// its three sums are accumulated in double per block of kBlock elements, the
// block sums added in block order (so the parameter gradients do not depend
// on how the blocks were spread over threads) and rounded to float last.
//
// Both ops run on TensorFlow's CPU worker thread pool, float32 only. They
// are built on first use by tfdq/kernels/__init__.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/denormal.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tfdq {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::TensorShapeUtils;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

#if defined(__GNUC__)
#define TFDQ_INLINE inline __attribute__((always_inline))
#else
#define TFDQ_INLINE inline
#endif

// Elements per block: the unit of work handed to the thread pool and the
// unit of the (double) partial sums of the backward pass.
constexpr int64_t kBlock = 8192;
// Rough cycles per element, for the thread pool's cost model.
constexpr int64_t kForwardCycles = 3;
constexpr int64_t kBackwardCycles = 5;

// 1/2 - 2^-25, the largest float32 below 1/2.
constexpr float kBelowHalf = 0x1.fffffep-2f;

// tf.clip_by_value(x, lo, hi) = maximum(minimum(x, hi), lo), where
// TensorFlow's Minimum and Maximum return NaN if either operand is NaN:
// a NaN x stays NaN (last select), a NaN hi makes every c NaN (first select
// gives NaN, the second keeps it); lo is NaN only when hi is (lo = -q_max).
// Written as plain selects so that the loops vectorize.
TFDQ_INLINE float Clip(float x, float lo, float hi) {
  float t = x < hi ? x : hi;
  t = t < lo ? lo : t;
  return x != x ? x : t;
}

// d * round_half_away(clip(x) / d), as tfdq.ops._uniform_forward computes it
// with TensorFlow ops: signed, sign(v) * floor(|v| + h) where tf.sign gives
// +0 for a zero v (then floor(|v| + h) is +0 as well, so selecting -r only
// for v < 0 is the same product); unsigned, floor(v + h).
template <bool kSigned>
TFDQ_INLINE float QuantizeOne(float x, float d, float lo, float q_max) {
  const float v = Clip(x, lo, q_max) / d;
  float r;
  if (kSigned) {
    r = std::floor(std::fabs(v) + kBelowHalf);
    r = v < 0.0f ? -r : r;
  } else {
    r = std::floor(v + kBelowHalf);
  }
  return d * r;
}

// QuantizeOne with the quotient c / d as c * inv where d is a power of two
// and inv = 1 / d a normal float (kPow2): both are the exact c 2^-k rounded
// once (and flushed alike), so the value is the same bit for bit; a multiply
// costs a fraction of a divide.
template <bool kSigned, bool kPow2>
TFDQ_INLINE float QuantizeScaled(float x, float d, float inv, float lo, float q_max) {
  if (!kPow2) return QuantizeOne<kSigned>(x, d, lo, q_max);
  const float v = Clip(x, lo, q_max) * inv;
  float r;
  if (kSigned) {
    r = std::floor(std::fabs(v) + kBelowHalf);
    r = v < 0.0f ? -r : r;
  } else {
    r = std::floor(v + kBelowHalf);
  }
  return d * r;
}

// Whether d is a power of two whose reciprocal is a normal float (then inv = 1 / d).
inline bool ExactReciprocal(float d, float* inv) {
  int exponent = 0;
  if (!std::isnormal(d) || std::frexp(d, &exponent) != 0.5f) return false;
  *inv = 1.0f / d;
  return std::isnormal(*inv);
}

// The loops. The output may be the same buffer as the first input
// (TensorFlow forwarded it); each element is read before it is written, so `omp simd`
// (which ignores aliasing) stays correct for that exact overlap.
template <bool kSigned>
TFDQ_INLINE void ForwardImpl(const float* x, float* q, int64_t n, float d, float lo,
                             float q_max) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = QuantizeOne<kSigned>(x[i], d, lo, q_max);
}

struct Sums {
  double step = 0.0;   // sum dy * (q - c)
  double above = 0.0;  // sum dy where x > q_max
  double below = 0.0;  // sum dy where x < lo
};

template <bool kSigned>
TFDQ_INLINE Sums BackwardImpl(const float* dy, const float* x, const float* q, float* gx,
                              int64_t n, float lo, float q_max) {
  double step = 0.0, above = 0.0, below = 0.0;
#pragma omp simd reduction(+ : step, above, below)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const float g = dy[i];
    const float c = Clip(xi, lo, q_max);
    const bool inside = (xi >= lo) & (xi <= q_max);
    step += static_cast<double>(g) * (static_cast<double>(q[i]) - static_cast<double>(c));
    above += xi > q_max ? static_cast<double>(g) : 0.0;
    if (kSigned) below += xi < lo ? static_cast<double>(g) : 0.0;
    gx[i] = inside ? g : 0.0f;
  }
  Sums s;
  s.step = step;
  s.above = above;
  s.below = below;
  return s;
}

// Scalars of the junction Q(relu(Q_a(a) + b)).
struct Junction {
  float d_a, lo_a, q_max_a;  // Q_a: lo_a = -q_max_a (signed) or 0
  float d, q_max;            // Q: unsigned
  float inv_a = 0.0f, inv = 0.0f;  // 1 / d_a and 1 / d where pow2 (ExactReciprocal of both)
  bool pow2 = false;
};

// TensorFlow's Relu: max(s, 0) with relu(-0) = -0 and relu(NaN) = NaN.
TFDQ_INLINE float Relu(float s) { return s < 0.0f ? 0.0f : s; }

template <bool kSignedA>
TFDQ_INLINE void JunctionForwardImpl(const float* a, const float* b, float* q, int64_t n,
                                     Junction p) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float s = QuantizeOne<kSignedA>(a[i], p.d_a, p.lo_a, p.q_max_a) + b[i];
    q[i] = QuantizeOne<false>(Relu(s), p.d, 0.0f, p.q_max);
  }
}

// The junction's backward pass, as the separate ops compute it: Q's
// backward on r = relu(s) with dy, ReluGrad (a product with 0 or 1, so -0
// and NaN propagate as TensorFlow's do), the Add's gradient (gs to both
// operands), Q_a's backward with gs. The sums are the separate ops' sums of
// the same terms (their order within a block may differ). ga may be dy's
// buffer (each element is read before it is written).
template <bool kSignedA, bool kPow2>
TFDQ_INLINE void JunctionBackwardImpl(const float* dy, const float* a, const float* b, float* ga,
                                      float* gb, int64_t n, Junction p, Sums* out_a, Sums* out) {
  const float d_a = p.d_a, lo_a = p.lo_a, q_max_a = p.q_max_a, d = p.d, q_max = p.q_max;
  const float inv_a = p.inv_a, inv = p.inv;
  // Q sees r = relu(s). Written with s (GCC does not vectorize the loop with
  // relu in it), with the same values: Q(r) = Q(s) and clip(r) = clip(s)
  // for the unsigned Q (both are +0 for s < 0, -0 for s = -0, NaN for NaN),
  // r > q_max iff s > q_max, and 0 <= r <= q_max is s's test for s >= 0 and
  // 0 <= q_max for s < 0.
  const bool zero_inside = 0.0f <= q_max;
  double step = 0.0, above = 0.0, step_a = 0.0, above_a = 0.0, below_a = 0.0;
#pragma omp simd reduction(+ : step, above, step_a, above_a, below_a)
  for (int64_t i = 0; i < n; ++i) {
    const float g = dy[i];
    const float ai = a[i];
    const float qa = QuantizeScaled<kSignedA, kPow2>(ai, d_a, inv_a, lo_a, q_max_a);
    const float s = qa + b[i];
    // Q's backward on r, then ReluGrad
    const float qi = QuantizeScaled<false, kPow2>(s, d, inv, 0.0f, q_max);
    const float c = Clip(s, 0.0f, q_max);
    step += static_cast<double>(g) * (static_cast<double>(qi) - static_cast<double>(c));
    above += s > q_max ? static_cast<double>(g) : 0.0;
    const bool inside = ((s >= 0.0f) & (s <= q_max)) | ((s < 0.0f) & zero_inside);
    const float gs = (inside ? g : 0.0f) * (s > 0.0f ? 1.0f : 0.0f);
    // Q_a's backward with gs
    const float c_a = Clip(ai, lo_a, q_max_a);
    step_a += static_cast<double>(gs) * (static_cast<double>(qa) - static_cast<double>(c_a));
    above_a += ai > q_max_a ? static_cast<double>(gs) : 0.0;
    if (kSignedA) below_a += ai < lo_a ? static_cast<double>(gs) : 0.0;
    gb[i] = gs;
    ga[i] = (ai >= lo_a) & (ai <= q_max_a) ? gs : 0.0f;
  }
  out->step = step;
  out->above = above;
  out->below = 0.0;
  out_a->step = step_a;
  out_a->above = above_a;
  out_a->below = below_a;
}

// Per-channel sums of the affine pair's backward pass.
struct ChannelSums {
  std::vector<double> scale;   // sum gy * x
  std::vector<double> offset;  // sum gy
};

// Q(x * scale + offset) over `rows` rows of `channels` elements. The product
// and the sum round to float32 one at a time (no fused multiply-add: see
// CXXFLAGS), as TensorFlow's Mul and AddV2 do.
template <bool kSigned>
TFDQ_INLINE void AffineForwardImpl(const float* x, const float* scale, const float* offset,
                                   float* q, int64_t rows, int64_t channels, float d, float lo,
                                   float q_max) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * channels;
    float* qr = q + r * channels;
#pragma omp simd
    for (int64_t j = 0; j < channels; ++j) {
      const float y = xr[j] * scale[j] + offset[j];
      qr[j] = QuantizeOne<kSigned>(y, d, lo, q_max);
    }
  }
}

// The backward pass of Q(x * scale + offset): Q's straight-through pass at
// y (recomputed), then the Mul and AddV2 gradients. sum_scale and
// sum_offset (one double per channel) are added to; gx may be dy's buffer.
template <bool kSigned, bool kPow2>
TFDQ_INLINE Sums AffineBackwardImpl(const float* dy, const float* x, const float* scale,
                                    const float* offset, float* gx, int64_t rows,
                                    int64_t channels, float d, float inv, float lo, float q_max,
                                    double* sum_scale, double* sum_offset) {
  double step = 0.0, above = 0.0, below = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* dyr = dy + r * channels;
    const float* xr = x + r * channels;
    float* gxr = gx + r * channels;
#pragma omp simd reduction(+ : step, above, below)
    for (int64_t j = 0; j < channels; ++j) {
      const float g = dyr[j];
      const float xi = xr[j];
      const float y = xi * scale[j] + offset[j];
      const float qi = QuantizeScaled<kSigned, kPow2>(y, d, inv, lo, q_max);
      const float c = Clip(y, lo, q_max);
      step += static_cast<double>(g) * (static_cast<double>(qi) - static_cast<double>(c));
      above += y > q_max ? static_cast<double>(g) : 0.0;
      if (kSigned) below += y < lo ? static_cast<double>(g) : 0.0;
      const float gy = (y >= lo) & (y <= q_max) ? g : 0.0f;
      sum_scale[j] += static_cast<double>(gy) * static_cast<double>(xi);
      sum_offset[j] += static_cast<double>(gy);
      gxr[j] = gy * scale[j];
    }
  }
  Sums s;
  s.step = step;
  s.above = above;
  s.below = below;
  return s;
}

// The residual junction Q(relu(Q_a(x * scale + offset) + b)) over `rows` rows
// of `channels` elements: a BatchNorm's output pass on the residual branch,
// its quantizer, the Add, the ReLU and the block output's quantizer.
template <bool kSignedA>
TFDQ_INLINE void AffineJunctionForwardImpl(const float* x, const float* scale,
                                           const float* offset, const float* b, float* q,
                                           int64_t rows, int64_t channels, Junction p) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * channels;
    const float* br = b + r * channels;
    float* qr = q + r * channels;
#pragma omp simd
    for (int64_t j = 0; j < channels; ++j) {
      const float a = xr[j] * scale[j] + offset[j];
      const float s = QuantizeOne<kSignedA>(a, p.d_a, p.lo_a, p.q_max_a) + br[j];
      qr[j] = QuantizeOne<false>(Relu(s), p.d, 0.0f, p.q_max);
    }
  }
}

// Its backward pass: JunctionBackwardImpl's terms with a recomputed from x,
// then ga through the affine map (gx = ga * scale, per-channel sums added
// to sum_scale and sum_offset). gx may be dy's buffer.
template <bool kSignedA, bool kPow2>
TFDQ_INLINE void AffineJunctionBackwardImpl(const float* dy, const float* x, const float* scale,
                                            const float* offset, const float* b, float* gx,
                                            float* gb, int64_t rows, int64_t channels,
                                            Junction p, Sums* out_a, Sums* out,
                                            double* sum_scale, double* sum_offset) {
  const float d_a = p.d_a, lo_a = p.lo_a, q_max_a = p.q_max_a, d = p.d, q_max = p.q_max;
  const float inv_a = p.inv_a, inv = p.inv;
  const bool zero_inside = 0.0f <= q_max;  // see JunctionBackwardImpl
  double step = 0.0, above = 0.0, step_a = 0.0, above_a = 0.0, below_a = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* dyr = dy + r * channels;
    const float* xr = x + r * channels;
    const float* br = b + r * channels;
    float* gxr = gx + r * channels;
    float* gbr = gb + r * channels;
#pragma omp simd reduction(+ : step, above, step_a, above_a, below_a)
    for (int64_t j = 0; j < channels; ++j) {
      const float g = dyr[j];
      const float xi = xr[j];
      const float ai = xi * scale[j] + offset[j];
      const float qa = QuantizeScaled<kSignedA, kPow2>(ai, d_a, inv_a, lo_a, q_max_a);
      const float s = qa + br[j];
      const float qi = QuantizeScaled<false, kPow2>(s, d, inv, 0.0f, q_max);
      const float c = Clip(s, 0.0f, q_max);
      step += static_cast<double>(g) * (static_cast<double>(qi) - static_cast<double>(c));
      above += s > q_max ? static_cast<double>(g) : 0.0;
      const bool inside = ((s >= 0.0f) & (s <= q_max)) | ((s < 0.0f) & zero_inside);
      const float gs = (inside ? g : 0.0f) * (s > 0.0f ? 1.0f : 0.0f);
      const float c_a = Clip(ai, lo_a, q_max_a);
      step_a += static_cast<double>(gs) * (static_cast<double>(qa) - static_cast<double>(c_a));
      above_a += ai > q_max_a ? static_cast<double>(gs) : 0.0;
      if (kSignedA) below_a += ai < lo_a ? static_cast<double>(gs) : 0.0;
      const float ga = (ai >= lo_a) & (ai <= q_max_a) ? gs : 0.0f;
      sum_scale[j] += static_cast<double>(ga) * static_cast<double>(xi);
      sum_offset[j] += static_cast<double>(ga);
      gbr[j] = gs;
      gxr[j] = ga * scale[j];
    }
  }
  out->step = step;
  out->above = above;
  out->below = 0.0;
  out_a->step = step_a;
  out_a->above = above_a;
  out_a->below = below_a;
}

// Entry points compiled for several instruction sets where GCC can dispatch
// at load time (ifunc); the body is the same portable C++ for all of them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TFDQ_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "sse4.1", "default")))
#else
#define TFDQ_CLONES
#endif

TFDQ_CLONES void ForwardSigned(const float* x, float* q, int64_t n, float d, float lo,
                               float q_max) {
  ForwardImpl<true>(x, q, n, d, lo, q_max);
}
TFDQ_CLONES void ForwardUnsigned(const float* x, float* q, int64_t n, float d, float lo,
                                 float q_max) {
  ForwardImpl<false>(x, q, n, d, lo, q_max);
}
TFDQ_CLONES Sums BackwardSigned(const float* dy, const float* x, const float* q, float* gx,
                                int64_t n, float lo, float q_max) {
  return BackwardImpl<true>(dy, x, q, gx, n, lo, q_max);
}
TFDQ_CLONES Sums BackwardUnsigned(const float* dy, const float* x, const float* q,
                                  float* gx, int64_t n, float lo, float q_max) {
  return BackwardImpl<false>(dy, x, q, gx, n, lo, q_max);
}

TFDQ_CLONES void JunctionForwardSigned(const float* a, const float* b, float* q, int64_t n,
                                       Junction p) {
  JunctionForwardImpl<true>(a, b, q, n, p);
}
TFDQ_CLONES void JunctionForwardUnsigned(const float* a, const float* b, float* q, int64_t n,
                                         Junction p) {
  JunctionForwardImpl<false>(a, b, q, n, p);
}
TFDQ_CLONES void JunctionBackwardSigned(const float* dy, const float* a, const float* b, float* ga,
                                        float* gb, int64_t n, Junction p, Sums* out_a,
                                        Sums* out) {
  if (p.pow2) {
    JunctionBackwardImpl<true, true>(dy, a, b, ga, gb, n, p, out_a, out);
  } else {
    JunctionBackwardImpl<true, false>(dy, a, b, ga, gb, n, p, out_a, out);
  }
}
TFDQ_CLONES void JunctionBackwardUnsigned(const float* dy, const float* a, const float* b,
                                          float* ga, float* gb, int64_t n, Junction p,
                                          Sums* out_a, Sums* out) {
  if (p.pow2) {
    JunctionBackwardImpl<false, true>(dy, a, b, ga, gb, n, p, out_a, out);
  } else {
    JunctionBackwardImpl<false, false>(dy, a, b, ga, gb, n, p, out_a, out);
  }
}

TFDQ_CLONES void AffineForwardSigned(const float* x, const float* scale, const float* offset,
                                     float* q, int64_t rows, int64_t channels, float d,
                                     float lo, float q_max) {
  AffineForwardImpl<true>(x, scale, offset, q, rows, channels, d, lo, q_max);
}
TFDQ_CLONES void AffineForwardUnsigned(const float* x, const float* scale, const float* offset,
                                       float* q, int64_t rows, int64_t channels, float d,
                                       float lo, float q_max) {
  AffineForwardImpl<false>(x, scale, offset, q, rows, channels, d, lo, q_max);
}
TFDQ_CLONES Sums AffineBackward(bool is_signed, const float* dy, const float* x,
                                const float* scale, const float* offset, float* gx,
                                int64_t rows, int64_t channels, float d, float lo, float q_max,
                                double* sum_scale, double* sum_offset) {
  float inv = 0.0f;
  const bool pow2 = ExactReciprocal(d, &inv);
  if (is_signed) {
    return pow2 ? AffineBackwardImpl<true, true>(dy, x, scale, offset, gx, rows, channels, d,
                                                 inv, lo, q_max, sum_scale, sum_offset)
                : AffineBackwardImpl<true, false>(dy, x, scale, offset, gx, rows, channels, d,
                                                  inv, lo, q_max, sum_scale, sum_offset);
  }
  return pow2 ? AffineBackwardImpl<false, true>(dy, x, scale, offset, gx, rows, channels, d,
                                                inv, lo, q_max, sum_scale, sum_offset)
              : AffineBackwardImpl<false, false>(dy, x, scale, offset, gx, rows, channels, d,
                                                 inv, lo, q_max, sum_scale, sum_offset);
}

TFDQ_CLONES void AffineJunctionForward(bool signed_a, const float* x, const float* scale,
                                       const float* offset, const float* b, float* q,
                                       int64_t rows, int64_t channels, Junction p) {
  if (signed_a) {
    AffineJunctionForwardImpl<true>(x, scale, offset, b, q, rows, channels, p);
  } else {
    AffineJunctionForwardImpl<false>(x, scale, offset, b, q, rows, channels, p);
  }
}
TFDQ_CLONES void AffineJunctionBackward(bool signed_a, const float* dy, const float* x,
                                        const float* scale, const float* offset, const float* b,
                                        float* gx, float* gb, int64_t rows, int64_t channels,
                                        Junction p, Sums* out_a, Sums* out, double* sum_scale,
                                        double* sum_offset) {
  if (signed_a && p.pow2) {
    AffineJunctionBackwardImpl<true, true>(dy, x, scale, offset, b, gx, gb, rows, channels, p,
                                           out_a, out, sum_scale, sum_offset);
  } else if (signed_a) {
    AffineJunctionBackwardImpl<true, false>(dy, x, scale, offset, b, gx, gb, rows, channels, p,
                                            out_a, out, sum_scale, sum_offset);
  } else if (p.pow2) {
    AffineJunctionBackwardImpl<false, true>(dy, x, scale, offset, b, gx, gb, rows, channels, p,
                                            out_a, out, sum_scale, sum_offset);
  } else {
    AffineJunctionBackwardImpl<false, false>(dy, x, scale, offset, b, gx, gb, rows, channels, p,
                                             out_a, out, sum_scale, sum_offset);
  }
}

// Runs fn(first_block, end_block) over ceil(n / kBlock) blocks on the CPU
// worker threads (inline when there is one block).
template <typename Fn>
void ForBlocks(OpKernelContext* ctx, int64_t n, int64_t cycles_per_element, const Fn& fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  if (blocks <= 1 || threads == nullptr || threads->workers == nullptr) {
    tensorflow::port::ScopedFlushDenormal flush;
    fn(0, blocks);
    return;
  }
  threads->workers->ParallelFor(
      blocks,
      tsl::thread::ThreadPool::SchedulingParams::Adaptive(kBlock * cycles_per_element),
      [&fn](int64_t begin, int64_t end) {
        // TensorFlow's own kernels run with denormals flushed to zero;
        // so do these, on whichever thread a shard lands.
        tensorflow::port::ScopedFlushDenormal flush;
        fn(begin, end);
      });
}

// ForBlocks over ceil(rows / per_block) blocks of whole rows.
template <typename Fn>
void ForRowBlocks(OpKernelContext* ctx, int64_t rows, int64_t per_block, int64_t channels,
                  int64_t cycles_per_element, const Fn& fn) {
  const int64_t blocks = (rows + per_block - 1) / per_block;
  const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  if (blocks <= 1 || threads == nullptr || threads->workers == nullptr) {
    tensorflow::port::ScopedFlushDenormal flush;
    fn(0, blocks);
    return;
  }
  threads->workers->ParallelFor(
      blocks,
      tsl::thread::ThreadPool::SchedulingParams::Adaptive(per_block * channels *
                                                          cycles_per_element),
      [&fn](int64_t begin, int64_t end) {
        tensorflow::port::ScopedFlushDenormal flush;
        fn(begin, end);
      });
}

absl::Status CheckScalar(const Tensor& t, const char* name) {
  if (!TensorShapeUtils::IsScalar(t.shape())) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " must be a scalar, got shape ", t.shape().DebugString()));
  }
  return absl::OkStatus();
}

// Sums of the blocks in block order (independent of the threads).
Sums AddBlocks(const std::vector<Sums>& partial) {
  Sums total;
  for (const Sums& s : partial) {
    total.step += s.step;
    total.above += s.above;
    total.below += s.below;
  }
  return total;
}

class UniformQuantizeOp : public OpKernel {
 public:
  explicit UniformQuantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed", &signed_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    OP_REQUIRES_OK(ctx, CheckScalar(ctx->input(1), "d"));
    OP_REQUIRES_OK(ctx, CheckScalar(ctx->input(2), "q_max"));
    const float d = ctx->input(1).scalar<float>()();
    const float q_max = ctx->input(2).scalar<float>()();
    const float lo = signed_ ? -q_max : 0.0f;

    Tensor* q = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &q));
    const int64_t n = x.NumElements();
    if (n == 0) return;
    const float* px = x.flat<float>().data();
    float* pq = q->flat<float>().data();
    const bool is_signed = signed_;
    ForBlocks(ctx, n, kForwardCycles, [=](int64_t begin, int64_t end) {
      const int64_t start = begin * kBlock;
      const int64_t count = std::min(end * kBlock, n) - start;
      if (is_signed) {
        ForwardSigned(px + start, pq + start, count, d, lo, q_max);
      } else {
        ForwardUnsigned(px + start, pq + start, count, d, lo, q_max);
      }
    });
  }

 private:
  bool signed_;
};

class UniformQuantizeGradOp : public OpKernel {
 public:
  explicit UniformQuantizeGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed", &signed_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& q = ctx->input(2);
    OP_REQUIRES(ctx, dy.shape() == x.shape() && q.shape() == x.shape(),
                absl::InvalidArgumentError(absl::StrCat(
                    "dy, x and q must have the same shape, got ", dy.shape().DebugString(),
                    ", ", x.shape().DebugString(), " and ", q.shape().DebugString())));
    OP_REQUIRES_OK(ctx, CheckScalar(ctx->input(3), "d"));
    OP_REQUIRES_OK(ctx, CheckScalar(ctx->input(4), "q_max"));
    const float d = ctx->input(3).scalar<float>()();
    const float q_max = ctx->input(4).scalar<float>()();
    const float lo = signed_ ? -q_max : 0.0f;

    Tensor* gx = nullptr;
    Tensor* gd = nullptr;
    Tensor* gq = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &gx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &gd));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &gq));

    const int64_t n = x.NumElements();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<Sums> partial(blocks);
    const float* pdy = dy.flat<float>().data();
    const float* px = x.flat<float>().data();
    const float* pq = q.flat<float>().data();
    float* pgx = gx->flat<float>().data();
    const bool is_signed = signed_;
    Sums* out = partial.data();
    ForBlocks(ctx, n, kBackwardCycles, [=](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = b * kBlock;
        const int64_t count = std::min(start + kBlock, n) - start;
        out[b] = is_signed
                     ? BackwardSigned(pdy + start, px + start, pq + start, pgx + start,
                                      count, lo, q_max)
                     : BackwardUnsigned(pdy + start, px + start, pq + start, pgx + start,
                                        count, lo, q_max);
      }
    });
    const Sums total = AddBlocks(partial);
    gd->scalar<float>()() = static_cast<float>(total.step / static_cast<double>(d));
    gq->scalar<float>()() =
        static_cast<float>(is_signed ? total.above - total.below : total.above);
  }

 private:
  bool signed_;
};

absl::Status CheckSameShape(const Tensor& a, const char* a_name, const Tensor& b,
                            const char* b_name) {
  if (a.shape() != b.shape()) {
    return absl::InvalidArgumentError(absl::StrCat(a_name, " and ", b_name,
                                                   " must have the same shape, got ",
                                                   a.shape().DebugString(), " and ",
                                                   b.shape().DebugString()));
  }
  return absl::OkStatus();
}

// Reads the four scalars d_a, q_max_a, d, q_max from inputs first..first+3.
absl::Status ReadJunction(OpKernelContext* ctx, int first, bool signed_a, Junction* p) {
  static const char* const kNames[] = {"d_a", "q_max_a", "d", "q_max"};
  for (int k = 0; k < 4; ++k) {
    absl::Status status = CheckScalar(ctx->input(first + k), kNames[k]);
    if (!status.ok()) return status;
  }
  p->d_a = ctx->input(first).scalar<float>()();
  p->q_max_a = ctx->input(first + 1).scalar<float>()();
  p->lo_a = signed_a ? -p->q_max_a : 0.0f;
  p->d = ctx->input(first + 2).scalar<float>()();
  p->q_max = ctx->input(first + 3).scalar<float>()();
  p->pow2 = ExactReciprocal(p->d_a, &p->inv_a) && ExactReciprocal(p->d, &p->inv);
  return absl::OkStatus();
}

class AddReluQuantizeOp : public OpKernel {
 public:
  explicit AddReluQuantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed_a", &signed_a_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckSameShape(a, "a", b, "b"));
    Junction p;
    OP_REQUIRES_OK(ctx, ReadJunction(ctx, 2, signed_a_, &p));
    Tensor* q = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, a.shape(), &q));
    const int64_t n = a.NumElements();
    if (n == 0) return;
    const float* pa = a.flat<float>().data();
    const float* pb = b.flat<float>().data();
    float* pq = q->flat<float>().data();
    const bool is_signed = signed_a_;
    ForBlocks(ctx, n, 2 * kForwardCycles, [=](int64_t begin, int64_t end) {
      const int64_t start = begin * kBlock;
      const int64_t count = std::min(end * kBlock, n) - start;
      if (is_signed) {
        JunctionForwardSigned(pa + start, pb + start, pq + start, count, p);
      } else {
        JunctionForwardUnsigned(pa + start, pb + start, pq + start, count, p);
      }
    });
  }

 private:
  bool signed_a_;
};

class AddReluQuantizeGradOp : public OpKernel {
 public:
  explicit AddReluQuantizeGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed_a", &signed_a_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& a = ctx->input(1);
    const Tensor& b = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckSameShape(dy, "dy", a, "a"));
    OP_REQUIRES_OK(ctx, CheckSameShape(a, "a", b, "b"));
    Junction p;
    OP_REQUIRES_OK(ctx, ReadJunction(ctx, 3, signed_a_, &p));
    Tensor* ga = nullptr;
    Tensor* gb = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, a.shape(), &ga));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, a.shape(), &gb));
    Tensor* scalars[4];
    for (int k = 0; k < 4; ++k) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(2 + k, TensorShape({}), &scalars[k]));
    }
    const int64_t n = a.NumElements();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<Sums> partial_a(blocks), partial(blocks);
    const float* pdy = dy.flat<float>().data();
    const float* pa = a.flat<float>().data();
    const float* pb = b.flat<float>().data();
    float* pga = ga->flat<float>().data();
    float* pgb = gb->flat<float>().data();
    const bool is_signed = signed_a_;
    Sums* out_a = partial_a.data();
    Sums* out = partial.data();
    ForBlocks(ctx, n, 2 * kBackwardCycles, [=](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t start = k * kBlock;
        const int64_t count = std::min(start + kBlock, n) - start;
        if (is_signed) {
          JunctionBackwardSigned(pdy + start, pa + start, pb + start, pga + start, pgb + start,
                                 count, p, out_a + k, out + k);
        } else {
          JunctionBackwardUnsigned(pdy + start, pa + start, pb + start, pga + start, pgb + start,
                                   count, p, out_a + k, out + k);
        }
      }
    });
    const Sums total_a = AddBlocks(partial_a);
    const Sums total = AddBlocks(partial);
    scalars[0]->scalar<float>()() = static_cast<float>(total_a.step / static_cast<double>(p.d_a));
    scalars[1]->scalar<float>()() =
        static_cast<float>(is_signed ? total_a.above - total_a.below : total_a.above);
    scalars[2]->scalar<float>()() = static_cast<float>(total.step / static_cast<double>(p.d));
    scalars[3]->scalar<float>()() = static_cast<float>(total.above);
  }

 private:
  bool signed_a_;
};

// Rows (of `channels` elements) per block of the affine pair: about kBlock
// elements, whole rows, so that every block starts at channel 0.
int64_t RowsPerBlock(int64_t channels) { return std::max<int64_t>(1, kBlock / channels); }

// Checks x (rank >= 1, last axis C) and the per-channel scale and offset at inputs
// first and first + 1 (C elements each).
absl::Status CheckChannelVectors(OpKernelContext* ctx, const Tensor& x, int first,
                                 int64_t* channels) {
  if (x.dims() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("x must have a channel axis, got shape ", x.shape().DebugString()));
  }
  *channels = x.dim_size(x.dims() - 1);
  static const char* const kNames[] = {"scale", "offset"};
  for (int k = 0; k < 2; ++k) {
    const Tensor& t = ctx->input(first + k);
    if (t.dims() != 1 || t.dim_size(0) != *channels) {
      return absl::InvalidArgumentError(absl::StrCat(kNames[k], " must have shape [", *channels,
                                                     "] (x's last axis), got ",
                                                     t.shape().DebugString()));
    }
  }
  return absl::OkStatus();
}

// CheckChannelVectors, then the scalars d and q_max at inputs first + 2 and first + 3.
absl::Status CheckAffine(OpKernelContext* ctx, const Tensor& x, int first, int64_t* channels) {
  absl::Status status = CheckChannelVectors(ctx, x, first, channels);
  if (!status.ok()) return status;
  status = CheckScalar(ctx->input(first + 2), "d");
  if (!status.ok()) return status;
  return CheckScalar(ctx->input(first + 3), "q_max");
}

// The channel sums of blocks (2 C per block: scale's, then offset's) added in block order.
void AddChannelBlocks(const std::vector<double>& sums, int64_t blocks, int64_t channels,
                      Tensor* gscale, Tensor* goffset) {
  auto scale_out = gscale->flat<float>();
  auto offset_out = goffset->flat<float>();
  for (int64_t j = 0; j < channels; ++j) {
    double sum_scale = 0.0, sum_offset = 0.0;
    for (int64_t k = 0; k < blocks; ++k) {
      sum_scale += sums[k * 2 * channels + j];
      sum_offset += sums[k * 2 * channels + channels + j];
    }
    scale_out(j) = static_cast<float>(sum_scale);
    offset_out(j) = static_cast<float>(sum_offset);
  }
}

class AffineQuantizeOp : public OpKernel {
 public:
  explicit AffineQuantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed", &signed_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    int64_t channels = 0;
    OP_REQUIRES_OK(ctx, CheckAffine(ctx, x, 1, &channels));
    const float d = ctx->input(3).scalar<float>()();
    const float q_max = ctx->input(4).scalar<float>()();
    const float lo = signed_ ? -q_max : 0.0f;
    Tensor* q = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &q));
    const int64_t n = x.NumElements();
    if (n == 0) return;
    const int64_t rows = n / channels;
    const int64_t per_block = RowsPerBlock(channels);
    const float* px = x.flat<float>().data();
    const float* ps = ctx->input(1).flat<float>().data();
    const float* po = ctx->input(2).flat<float>().data();
    float* pq = q->flat<float>().data();
    const bool is_signed = signed_;
    ForRowBlocks(ctx, rows, per_block, channels, kForwardCycles + 1,
                 [=](int64_t begin, int64_t end) {
                   const int64_t first = begin * per_block;
                   const int64_t count = std::min(end * per_block, rows) - first;
                   const int64_t start = first * channels;
                   if (is_signed) {
                     AffineForwardSigned(px + start, ps, po, pq + start, count, channels, d, lo,
                                         q_max);
                   } else {
                     AffineForwardUnsigned(px + start, ps, po, pq + start, count, channels, d, lo,
                                           q_max);
                   }
                 });
  }

 private:
  bool signed_;
};

class AffineQuantizeGradOp : public OpKernel {
 public:
  explicit AffineQuantizeGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed", &signed_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckSameShape(dy, "dy", x, "x"));
    int64_t channels = 0;
    OP_REQUIRES_OK(ctx, CheckAffine(ctx, x, 2, &channels));
    const float d = ctx->input(4).scalar<float>()();
    const float q_max = ctx->input(5).scalar<float>()();
    const float lo = signed_ ? -q_max : 0.0f;
    Tensor* gx = nullptr;
    Tensor* gscale = nullptr;
    Tensor* goffset = nullptr;
    Tensor* gd = nullptr;
    Tensor* gq = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &gx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({channels}), &gscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({channels}), &goffset));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({}), &gd));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({}), &gq));
    const int64_t n = x.NumElements();
    const int64_t rows = channels > 0 ? n / channels : 0;
    const int64_t per_block = RowsPerBlock(std::max<int64_t>(channels, 1));
    const int64_t blocks = (rows + per_block - 1) / per_block;
    // per block: its three scalar sums and 2 C channel sums (added in block order below)
    std::vector<Sums> partial(blocks);
    std::vector<double> channel_sums(static_cast<size_t>(blocks) * 2 * channels, 0.0);
    const float* pdy = dy.flat<float>().data();
    const float* px = x.flat<float>().data();
    const float* ps = ctx->input(2).flat<float>().data();
    const float* po = ctx->input(3).flat<float>().data();
    float* pgx = gx->flat<float>().data();
    const bool is_signed = signed_;
    Sums* out = partial.data();
    double* sums = channel_sums.data();
    ForRowBlocks(ctx, rows, per_block, channels, kBackwardCycles + 2,
                 [=](int64_t begin, int64_t end) {
                   for (int64_t k = begin; k < end; ++k) {
                     const int64_t first = k * per_block;
                     const int64_t count = std::min(first + per_block, rows) - first;
                     const int64_t start = first * channels;
                     double* block_sums = sums + k * 2 * channels;
                     out[k] = AffineBackward(is_signed, pdy + start, px + start, ps, po,
                                             pgx + start, count, channels, d, lo, q_max,
                                             block_sums, block_sums + channels);
                   }
                 });
    const Sums total = AddBlocks(partial);
    AddChannelBlocks(channel_sums, blocks, channels, gscale, goffset);
    gd->scalar<float>()() = static_cast<float>(total.step / static_cast<double>(d));
    gq->scalar<float>()() =
        static_cast<float>(is_signed ? total.above - total.below : total.above);
  }

 private:
  bool signed_;
};

class AffineAddReluQuantizeOp : public OpKernel {
 public:
  explicit AffineAddReluQuantizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed_a", &signed_a_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& b = ctx->input(3);
    int64_t channels = 0;
    OP_REQUIRES_OK(ctx, CheckChannelVectors(ctx, x, 1, &channels));
    OP_REQUIRES_OK(ctx, CheckSameShape(x, "x", b, "b"));
    Junction p;
    OP_REQUIRES_OK(ctx, ReadJunction(ctx, 4, signed_a_, &p));
    Tensor* q = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &q));
    const int64_t n = x.NumElements();
    if (n == 0) return;
    const int64_t rows = n / channels;
    const int64_t per_block = RowsPerBlock(channels);
    const float* px = x.flat<float>().data();
    const float* ps = ctx->input(1).flat<float>().data();
    const float* po = ctx->input(2).flat<float>().data();
    const float* pb = b.flat<float>().data();
    float* pq = q->flat<float>().data();
    const bool is_signed = signed_a_;
    ForRowBlocks(ctx, rows, per_block, channels, 2 * kForwardCycles + 1,
                 [=](int64_t begin, int64_t end) {
                   const int64_t first = begin * per_block;
                   const int64_t count = std::min(end * per_block, rows) - first;
                   const int64_t start = first * channels;
                   AffineJunctionForward(is_signed, px + start, ps, po, pb + start, pq + start,
                                         count, channels, p);
                 });
  }

 private:
  bool signed_a_;
};

class AffineAddReluQuantizeGradOp : public OpKernel {
 public:
  explicit AffineAddReluQuantizeGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("signed_a", &signed_a_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& b = ctx->input(4);
    OP_REQUIRES_OK(ctx, CheckSameShape(dy, "dy", x, "x"));
    OP_REQUIRES_OK(ctx, CheckSameShape(x, "x", b, "b"));
    int64_t channels = 0;
    OP_REQUIRES_OK(ctx, CheckChannelVectors(ctx, x, 2, &channels));
    Junction p;
    OP_REQUIRES_OK(ctx, ReadJunction(ctx, 5, signed_a_, &p));
    Tensor* gx = nullptr;
    Tensor* gscale = nullptr;
    Tensor* goffset = nullptr;
    Tensor* gb = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &gx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({channels}), &gscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({channels}), &goffset));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, x.shape(), &gb));
    Tensor* scalars[4];
    for (int k = 0; k < 4; ++k) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(4 + k, TensorShape({}), &scalars[k]));
    }
    const int64_t n = x.NumElements();
    const int64_t rows = channels > 0 ? n / channels : 0;
    const int64_t per_block = RowsPerBlock(std::max<int64_t>(channels, 1));
    const int64_t blocks = (rows + per_block - 1) / per_block;
    std::vector<Sums> partial_a(blocks), partial(blocks);
    std::vector<double> channel_sums(static_cast<size_t>(blocks) * 2 * channels, 0.0);
    const float* pdy = dy.flat<float>().data();
    const float* px = x.flat<float>().data();
    const float* ps = ctx->input(2).flat<float>().data();
    const float* po = ctx->input(3).flat<float>().data();
    const float* pb = b.flat<float>().data();
    float* pgx = gx->flat<float>().data();
    float* pgb = gb->flat<float>().data();
    const bool is_signed = signed_a_;
    Sums* out_a = partial_a.data();
    Sums* out = partial.data();
    double* sums = channel_sums.data();
    ForRowBlocks(ctx, rows, per_block, channels, 2 * kBackwardCycles + 2,
                 [=](int64_t begin, int64_t end) {
                   for (int64_t k = begin; k < end; ++k) {
                     const int64_t first = k * per_block;
                     const int64_t count = std::min(first + per_block, rows) - first;
                     const int64_t start = first * channels;
                     double* block_sums = sums + k * 2 * channels;
                     AffineJunctionBackward(is_signed, pdy + start, px + start, ps, po,
                                            pb + start, pgx + start, pgb + start, count,
                                            channels, p, out_a + k, out + k, block_sums,
                                            block_sums + channels);
                   }
                 });
    AddChannelBlocks(channel_sums, blocks, channels, gscale, goffset);
    const Sums total_a = AddBlocks(partial_a);
    const Sums total = AddBlocks(partial);
    scalars[0]->scalar<float>()() = static_cast<float>(total_a.step / static_cast<double>(p.d_a));
    scalars[1]->scalar<float>()() =
        static_cast<float>(is_signed ? total_a.above - total_a.below : total_a.above);
    scalars[2]->scalar<float>()() = static_cast<float>(total.step / static_cast<double>(p.d));
    scalars[3]->scalar<float>()() = static_cast<float>(total.above);
  }

 private:
  bool signed_a_;
};

absl::Status ScalarInput(InferenceContext* c, int index) {
  ShapeHandle unused;
  return c->WithRank(c->input(index), 0, &unused);
}

}  // namespace

REGISTER_OP("TfdqUniformQuantize")
    .Input("x: float")
    .Input("d: float")
    .Input("q_max: float")
    .Output("q: float")
    .Attr("signed: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(ScalarInput(c, 1));
      TF_RETURN_IF_ERROR(ScalarInput(c, 2));
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc("tfdq uniform quantizer: d * round_half_away(clip(x, lo, q_max) / d).");

REGISTER_OP("TfdqUniformQuantizeGrad")
    .Input("dy: float")
    .Input("x: float")
    .Input("q: float")
    .Input("d: float")
    .Input("q_max: float")
    .Output("gx: float")
    .Output("gd: float")
    .Output("gq: float")
    .Attr("signed: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle shape;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &shape));
      TF_RETURN_IF_ERROR(c->Merge(shape, c->input(2), &shape));
      TF_RETURN_IF_ERROR(ScalarInput(c, 3));
      TF_RETURN_IF_ERROR(ScalarInput(c, 4));
      c->set_output(0, shape);
      c->set_output(1, c->Scalar());
      c->set_output(2, c->Scalar());
      return absl::OkStatus();
    })
    .Doc("Straight-through gradients of TfdqUniformQuantize (gx, gd, gq).");

REGISTER_OP("TfdqAddReluQuantize")
    .Input("a: float")
    .Input("b: float")
    .Input("d_a: float")
    .Input("q_max_a: float")
    .Input("d: float")
    .Input("q_max: float")
    .Output("q: float")
    .Attr("signed_a: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle shape;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &shape));
      for (int k = 2; k < 6; ++k) TF_RETURN_IF_ERROR(ScalarInput(c, k));
      c->set_output(0, shape);
      return absl::OkStatus();
    })
    .Doc("tfdq residual junction: unsigned Q(relu(Q_a(a) + b)).");

REGISTER_OP("TfdqAddReluQuantizeGrad")
    .Input("dy: float")
    .Input("a: float")
    .Input("b: float")
    .Input("d_a: float")
    .Input("q_max_a: float")
    .Input("d: float")
    .Input("q_max: float")
    .Output("ga: float")
    .Output("gb: float")
    .Output("gd_a: float")
    .Output("gq_a: float")
    .Output("gd: float")
    .Output("gq: float")
    .Attr("signed_a: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle shape;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &shape));
      TF_RETURN_IF_ERROR(c->Merge(shape, c->input(2), &shape));
      for (int k = 3; k < 7; ++k) TF_RETURN_IF_ERROR(ScalarInput(c, k));
      c->set_output(0, shape);
      c->set_output(1, shape);
      for (int k = 2; k < 6; ++k) c->set_output(k, c->Scalar());
      return absl::OkStatus();
    })
    .Doc("Straight-through gradients of TfdqAddReluQuantize (ga, gb, gd_a, gq_a, gd, gq).");

REGISTER_OP("TfdqAffineQuantize")
    .Input("x: float")
    .Input("scale: float")
    .Input("offset: float")
    .Input("d: float")
    .Input("q_max: float")
    .Output("q: float")
    .Attr("signed: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &unused));
      TF_RETURN_IF_ERROR(ScalarInput(c, 3));
      TF_RETURN_IF_ERROR(ScalarInput(c, 4));
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc("tfdq: Q(x * scale + offset), scale and offset per channel (last axis).");

REGISTER_OP("TfdqAffineQuantizeGrad")
    .Input("dy: float")
    .Input("x: float")
    .Input("scale: float")
    .Input("offset: float")
    .Input("d: float")
    .Input("q_max: float")
    .Output("gx: float")
    .Output("gscale: float")
    .Output("goffset: float")
    .Output("gd: float")
    .Output("gq: float")
    .Attr("signed: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle shape;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &shape));
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(shape, 1, &shape));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &unused));
      TF_RETURN_IF_ERROR(ScalarInput(c, 4));
      TF_RETURN_IF_ERROR(ScalarInput(c, 5));
      c->set_output(0, shape);
      c->set_output(1, c->input(2));
      c->set_output(2, c->input(3));
      c->set_output(3, c->Scalar());
      c->set_output(4, c->Scalar());
      return absl::OkStatus();
    })
    .Doc("Straight-through gradients of TfdqAffineQuantize (gx, gscale, goffset, gd, gq).");

REGISTER_OP("TfdqAffineAddReluQuantize")
    .Input("x: float")
    .Input("scale: float")
    .Input("offset: float")
    .Input("b: float")
    .Input("d_a: float")
    .Input("q_max_a: float")
    .Input("d: float")
    .Input("q_max: float")
    .Output("q: float")
    .Attr("signed_a: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle shape;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(3), &shape));
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(shape, 1, &shape));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &unused));
      for (int k = 4; k < 8; ++k) TF_RETURN_IF_ERROR(ScalarInput(c, k));
      c->set_output(0, shape);
      return absl::OkStatus();
    })
    .Doc("tfdq residual junction after a per-channel affine map: Q(relu(Q_a(x * scale + offset) + b)).");

REGISTER_OP("TfdqAffineAddReluQuantizeGrad")
    .Input("dy: float")
    .Input("x: float")
    .Input("scale: float")
    .Input("offset: float")
    .Input("b: float")
    .Input("d_a: float")
    .Input("q_max_a: float")
    .Input("d: float")
    .Input("q_max: float")
    .Output("gx: float")
    .Output("gscale: float")
    .Output("goffset: float")
    .Output("gb: float")
    .Output("gd_a: float")
    .Output("gq_a: float")
    .Output("gd: float")
    .Output("gq: float")
    .Attr("signed_a: bool = true")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle shape;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &shape));
      TF_RETURN_IF_ERROR(c->Merge(shape, c->input(4), &shape));
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(shape, 1, &shape));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &unused));
      for (int k = 5; k < 9; ++k) TF_RETURN_IF_ERROR(ScalarInput(c, k));
      c->set_output(0, shape);
      c->set_output(1, c->input(2));
      c->set_output(2, c->input(3));
      c->set_output(3, shape);
      for (int k = 4; k < 8; ++k) c->set_output(k, c->Scalar());
      return absl::OkStatus();
    })
    .Doc("Straight-through gradients of TfdqAffineAddReluQuantize.");

REGISTER_KERNEL_BUILDER(Name("TfdqUniformQuantize").Device(DEVICE_CPU), UniformQuantizeOp);
REGISTER_KERNEL_BUILDER(Name("TfdqUniformQuantizeGrad").Device(DEVICE_CPU),
                        UniformQuantizeGradOp);
REGISTER_KERNEL_BUILDER(Name("TfdqAddReluQuantize").Device(DEVICE_CPU), AddReluQuantizeOp);
REGISTER_KERNEL_BUILDER(Name("TfdqAddReluQuantizeGrad").Device(DEVICE_CPU),
                        AddReluQuantizeGradOp);
REGISTER_KERNEL_BUILDER(Name("TfdqAffineQuantize").Device(DEVICE_CPU), AffineQuantizeOp);
REGISTER_KERNEL_BUILDER(Name("TfdqAffineQuantizeGrad").Device(DEVICE_CPU),
                        AffineQuantizeGradOp);
REGISTER_KERNEL_BUILDER(Name("TfdqAffineAddReluQuantize").Device(DEVICE_CPU),
                        AffineAddReluQuantizeOp);
REGISTER_KERNEL_BUILDER(Name("TfdqAffineAddReluQuantizeGrad").Device(DEVICE_CPU),
                        AffineAddReluQuantizeGradOp);

}  // namespace tfdq
