// The emulated GPU behind the launch logic of csrc/cuda/kernels (the `dev` object described in
// common.cuh): kernels run in the CPU emulator of cuda_emu.h, workspaces and test buffers are
// guard-paged and poisoned, and the few ATen-side primitives are plain host code (a stable sort,
// memset). GEMMs always run gemm.cuh's kernel, emulated (cuBLAS exists only on a GPU).
// Include after the kernel headers.
#pragma once
#include <map>
#include <numeric>
#include <string>
#include <vector>

namespace midus_emu {

// n elements of T in guard-paged memory, filled with 0xFF bytes (NaN / -1) so that an element a
// kernel should have written but did not shows. align = sizeof(T) puts the end exactly at the
// guard page (and may leave the start unaligned to 16 bytes, like a tensor view at an offset).
template <typename T>
class DevBuf {
 public:
  DevBuf() = default;
  DevBuf(size_t n, const std::string& name, size_t align = 16) : n_(n) {
    p_ = static_cast<T*>(guarded_alloc(n * sizeof(T), name, align));
    poison();
  }
  DevBuf(const std::vector<T>& host, const std::string& name, size_t align = 16) : DevBuf(host.size(), name, align) {
    std::copy(host.begin(), host.end(), p_);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~DevBuf() { guarded_free(p_); }
  void poison() { std::memset(static_cast<void*>(p_), 0xff, n_ * sizeof(T)); }
  T* get() const { return p_; }
  size_t size() const { return n_; }
  std::vector<T> host() const { return std::vector<T>(p_, p_ + n_); }
  T& operator[](size_t i) { return p_[i]; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

class EmuDev {
 public:
  explicit EmuDev(int sm, int device_id = 0) : arch_(&arch(sm)), device_(device_id) {}
  ~EmuDev() {
    for (void* p : work_) guarded_free(p);
  }
  EmuDev(const EmuDev&) = delete;
  EmuDev& operator=(const EmuDev&) = delete;

  int device() const { return device_; }
  int sm_count() const { return arch_->sm_count; }
  size_t smem_optin() const { return arch_->smem_optin; }
  const Arch& arch_info() const { return *arch_; }

  template <typename... P, typename... A>
  void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    ++launches[name];
    midus_emu::launch(name, kernel, grid, block, smem, *arch_, device_, std::forward<A>(args)...);
  }
  template <typename... P>
  void set_max_dynamic_smem(void (*kernel)(P...), size_t bytes) {
    func_set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), device_, bytes, *arch_);
    ++attribute_sets;
  }
  template <typename... P>
  int max_active_blocks(void (*)(P...), int threads, size_t smem) {
    return midus_emu::max_active_blocks(threads, smem, *arch_);
  }
  template <typename T>
  T* alloc(size_t n) {
    T* p = static_cast<T*>(guarded_alloc(std::max<size_t>(n, 1) * sizeof(T), "workspace", 16));
    std::memset(static_cast<void*>(p), 0xff, std::max<size_t>(n, 1) * sizeof(T));
    work_.push_back(p);
    return p;
  }
  template <typename T>
  void zero(T* p, int64_t n) {
    if (n > 0) std::memset(static_cast<void*>(p), 0, size_t(n) * sizeof(T));
  }
  // What at::sort(keys, stable=true) gives: keys ascending, equal keys in their original order.
  template <typename K>
  void sort_keys(const K* keys, int64_t n, int64_t* sorted, int64_t* perm) {
    std::vector<int64_t> p(static_cast<size_t>(n));
    std::iota(p.begin(), p.end(), int64_t(0));
    std::stable_sort(p.begin(), p.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
    for (int64_t i = 0; i < n; ++i) {
      perm[i] = p[size_t(i)];
      sorted[i] = static_cast<int64_t>(keys[p[size_t(i)]]);
    }
  }
  template <typename acc_t>
  void gemm(const midus::GemmArgs<acc_t>& g) {
    midus::launch_gemm(*this, g);
  }

  std::map<std::string, int> launches;  // kernel name -> launches (tests check which path ran)
  int attribute_sets = 0;

 private:
  const Arch* arch_;
  int device_;
  std::vector<void*> work_;
};

}  // namespace midus_emu
