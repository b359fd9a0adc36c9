// hive_gather in double precision from the stored (rounded) inputs, forward and backward, and
// the inputs of the emulated tests: what drv_hive_*.cpp compare the kernels against.
#pragma once
#include <vector>

namespace hive_test {

using midus::HiveShapes;
using emu_test::Ctx;
using emu_test::from_double;
using emu_test::to_double;

template <typename T, typename I>
struct Inputs {
  HiveShapes s;
  std::vector<T> w, bank, proj, gout;
  std::vector<I> idx;
};

enum class Idx { Uniform, OneHot, FewRows };

template <typename T, typename I>
Inputs<T, I> make_inputs(Ctx& ctx, HiveShapes s, Idx mode = Idx::Uniform) {
  Inputs<T, I> in;
  in.s = s;
  const size_t M = size_t(s.N * s.H * s.k);
  in.w.resize(M);
  for (T& x : in.w) x = from_double<T>(ctx.normal());
  in.idx.resize(M);
  const int64_t hot = ctx.randint(0, s.R);
  for (I& x : in.idx)
    x = static_cast<I>(mode == Idx::OneHot ? hot : mode == Idx::FewRows ? ctx.randint(0, std::min<int64_t>(s.R, 3))
                                                                        : ctx.randint(0, s.R));
  in.bank.resize(size_t(s.R * s.dz));
  for (T& x : in.bank) x = from_double<T>(ctx.normal());
  if (s.has_proj) {
    in.proj.resize(size_t(s.H * s.dz * s.dv));
    const double sc = 1.0 / std::sqrt(double(std::max<int64_t>(s.dz, 1)));
    for (T& x : in.proj) x = from_double<T>(sc * ctx.normal());
  }
  in.gout.resize(size_t(s.N * s.H * s.dv));
  for (T& x : in.gout) x = from_double<T>(ctx.normal());
  return in;
}

// u[t, h, :] = sum_j w bank[idx] (double).
template <typename T, typename I>
std::vector<double> gathered(const Inputs<T, I>& in) {
  const HiveShapes& s = in.s;
  std::vector<double> u(size_t(s.N * s.H * s.dz), 0.0);
  for (int64_t b = 0; b < s.N * s.H; ++b)
    for (int64_t j = 0; j < s.k; ++j) {
      const double wv = to_double(in.w[size_t(b * s.k + j)]);
      const int64_t r = static_cast<int64_t>(in.idx[size_t(b * s.k + j)]);
      for (int64_t z = 0; z < s.dz; ++z) u[size_t(b * s.dz + z)] += wv * to_double(in.bank[size_t(r * s.dz + z)]);
    }
  return u;
}

template <typename T, typename I>
std::vector<double> forward_ref(const Inputs<T, I>& in) {
  const HiveShapes& s = in.s;
  std::vector<double> u = gathered(in);
  if (!s.has_proj) return u;
  std::vector<double> out(size_t(s.N * s.H * s.dv), 0.0);
  for (int64_t t = 0; t < s.N; ++t)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t v = 0; v < s.dv; ++v) {
        double acc = 0;
        for (int64_t z = 0; z < s.dz; ++z)
          acc += u[size_t((t * s.H + h) * s.dz + z)] * to_double(in.proj[size_t((h * s.dz + z) * s.dv + v)]);
        out[size_t((t * s.H + h) * s.dv + v)] = acc;
      }
  return out;
}

struct Grads {
  std::vector<double> gw, gb, gp;
};

template <typename T, typename I>
Grads backward_ref(const Inputs<T, I>& in) {
  const HiveShapes& s = in.s;
  Grads g;
  // gu[t, h, :] = grad_out[t, h] proj[h]^T (grad_out itself without proj)
  std::vector<double> gu(size_t(s.N * s.H * s.dz), 0.0);
  for (int64_t b = 0; b < s.N * s.H; ++b) {
    const int64_t h = b % s.H;
    for (int64_t z = 0; z < s.dz; ++z) {
      double acc = 0;
      if (s.has_proj) {
        for (int64_t v = 0; v < s.dv; ++v)
          acc += to_double(in.gout[size_t(b * s.dv + v)]) * to_double(in.proj[size_t((h * s.dz + z) * s.dv + v)]);
      } else {
        acc = to_double(in.gout[size_t(b * s.dz + z)]);
      }
      gu[size_t(b * s.dz + z)] = acc;
    }
  }
  g.gw.assign(size_t(s.N * s.H * s.k), 0.0);
  g.gb.assign(size_t(s.R * s.dz), 0.0);
  for (int64_t b = 0; b < s.N * s.H; ++b)
    for (int64_t j = 0; j < s.k; ++j) {
      const size_t e = size_t(b * s.k + j);
      const int64_t r = static_cast<int64_t>(in.idx[e]);
      const double wv = to_double(in.w[e]);
      double dot = 0;
      for (int64_t z = 0; z < s.dz; ++z) {
        dot += gu[size_t(b * s.dz + z)] * to_double(in.bank[size_t(r * s.dz + z)]);
        g.gb[size_t(r * s.dz + z)] += wv * gu[size_t(b * s.dz + z)];
      }
      g.gw[e] = dot;
    }
  if (s.has_proj) {
    const std::vector<double> u = gathered(in);
    g.gp.assign(size_t(s.H * s.dz * s.dv), 0.0);
    for (int64_t t = 0; t < s.N; ++t)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t z = 0; z < s.dz; ++z) {
          const double uz = u[size_t((t * s.H + h) * s.dz + z)];
          for (int64_t v = 0; v < s.dv; ++v)
            g.gp[size_t((h * s.dz + z) * s.dv + v)] += uz * to_double(in.gout[size_t((t * s.H + h) * s.dv + v)]);
        }
  }
  return g;
}

}  // namespace hive_test
