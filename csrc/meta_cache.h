// Validated metadata, cached for the GPU path (csrc/sparse_impl.h).
//
// The ops validate their metadata in full on the host (checks.h): on a GPU that is a device-to-host copy, and the
// validated index arrays then go back to the device, a synchronisation or two per call. Layers call the ops with
// the same metadata tensors step after step, so the result of validation (and the device copies the kernels
// read) is cached, keyed on
//   - the identity and version counter of every metadata tensor (indices, permutations, offsets): an in-place
//     change bumps the version, so a modified tensor is validated again; the cache holds a reference to each
//     key tensor, so its address cannot be reused by another tensor while the entry lives;
//   - the signature (sizes, dtype, device) of the data tensors whose shapes validation reads, and the int args.
// Validation reads nothing else, so a hit returns exactly what validation would. The kernels only ever read the
// cached, validated copies, never the caller's tensors (the copies are owned: checks.cpp's as_cpu_long always copies,
// the N:M paths cache a copy; tests/test_out_of_band.py). Not seen: writes that bypass the version counter (through
// `.data`, numpy or DLPack aliases): they leave the previous, valid pattern in use, never an unchecked index;
// inference-mode tensors have no version counter and are never cached.
// Bounded LRU (64 entries), thread-safe.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <typeindex>
#include <typeinfo>
#include <vector>

namespace padst::impl {

class MetaKey {
 public:
  explicit MetaKey(const char* tag) : tag_(tag) {}
  // A metadata tensor: identity + version (the cache keeps a reference to it).
  MetaKey& meta(const at::Tensor& t) {
    if (t.is_inference()) cacheable_ = false;
    ints_.push_back(reinterpret_cast<intptr_t>(t.unsafeGetTensorImpl()));
    ints_.push_back(t.is_inference() ? 0 : static_cast<int64_t>(t._version()));
    keep_.push_back(t);
    return sig(t);
  }
  MetaKey& meta(const std::optional<at::Tensor>& t) {
    ints_.push_back(t.has_value());
    return t.has_value() ? meta(*t) : *this;
  }
  // A data tensor whose shape, dtype and device validation reads.
  MetaKey& sig(const at::Tensor& t) {
    ints_.push_back(t.dim());
    for (int64_t s : t.sizes()) ints_.push_back(s);
    ints_.push_back(static_cast<int64_t>(t.scalar_type()));
    ints_.push_back(static_cast<int64_t>(t.device().type()));
    ints_.push_back(t.device().index());
    return *this;
  }
  MetaKey& sig(const std::optional<at::Tensor>& t) {
    ints_.push_back(t.has_value());
    return t.has_value() ? sig(*t) : *this;
  }
  MetaKey& val(int64_t v) {
    ints_.push_back(v);
    return *this;
  }
  bool cacheable() const { return cacheable_; }
  // The type of the cached value is part of the key: two backends may validate the same op differently.
  void set_type(std::type_index t) { type_ = t; }
  bool operator==(const MetaKey& o) const { return type_ == o.type_ && tag_ == o.tag_ && ints_ == o.ints_; }

 private:
  std::string tag_;
  std::vector<int64_t> ints_;
  std::vector<at::Tensor> keep_;
  bool cacheable_ = true;
  std::type_index type_ = typeid(void);
};

struct MetaCacheStats {
  int64_t hits = 0, misses = 0, size = 0;
};

class MetaCache {
 public:
  static constexpr size_t kCapacity = 64;
  static MetaCache& instance() {
    static MetaCache cache;
    return cache;
  }
  // Returns the cached value for `key`, or computes it with make() (outside the lock; make may throw, and then
  // nothing is cached) and stores it.
  template <typename V>
  std::shared_ptr<const V> get(MetaKey key, const std::function<V()>& make) {
    if (!key.cacheable()) return std::make_shared<const V>(make());
    key.set_type(typeid(V));
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = lru_.begin(); it != lru_.end(); ++it) {
        if (it->key == key) {
          lru_.splice(lru_.begin(), lru_, it);
          ++stats_.hits;
          return std::static_pointer_cast<const V>(lru_.front().value);
        }
      }
      ++stats_.misses;
    }
    auto value = std::make_shared<const V>(make());
    std::lock_guard<std::mutex> lock(mu_);
    lru_.push_front(Entry{std::move(key), value});
    if (lru_.size() > kCapacity) lru_.pop_back();
    return value;
  }
  MetaCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    MetaCacheStats s = stats_;
    s.size = static_cast<int64_t>(lru_.size());
    return s;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    lru_.clear();
    stats_ = MetaCacheStats{};
  }

 private:
  struct Entry {
    MetaKey key;
    std::shared_ptr<const void> value;
  };
  std::mutex mu_;
  std::list<Entry> lru_;
  MetaCacheStats stats_;
};

}  // namespace padst::impl
