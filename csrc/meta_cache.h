// Validated metadata, cached for every kernel op (prologue.h): the CPU kernels and the GPU path (cuda/host_dispatch.h).
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
// Bounded LRU (64 entries and 256 MB of cached copies), thread-safe; an entry whose tensors' versions moved on is
// dropped when the new version's entry is made (DST changes a pattern in place every update).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <typeindex>
#include <type_traits>
#include <typeinfo>
#include <vector>

#include "export.h"

namespace padst::impl {

class MetaKey {
 public:
  explicit MetaKey(const char* tag) : tag_(tag) {}
  // A metadata tensor: identity + version (the cache keeps a reference to it).
  MetaKey& meta(const at::Tensor& t) {
    if (t.is_inference()) cacheable_ = false;
    ints_.push_back(reinterpret_cast<intptr_t>(t.unsafeGetTensorImpl()));
    version_slots_.push_back(ints_.size());
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
  // The same call on the same tensors, at any of their versions: an entry like this with other versions is stale
  // (an in-place change moved a version on; the old versions are never hit again).
  bool same_but_versions(const MetaKey& o) const {
    if (type_ != o.type_ || tag_ != o.tag_ || ints_.size() != o.ints_.size() || version_slots_ != o.version_slots_)
      return false;
    size_t v = 0;
    for (size_t i = 0; i < ints_.size(); ++i) {
      if (v < version_slots_.size() && version_slots_[v] == i) {
        ++v;
        continue;
      }
      if (ints_[i] != o.ints_[i]) return false;
    }
    return true;
  }

 private:
  std::string tag_;
  std::vector<int64_t> ints_;
  std::vector<size_t> version_slots_;  // where in ints_ the version counters are
  std::vector<at::Tensor> keep_;
  bool cacheable_ = true;
  std::type_index type_ = typeid(void);
};

struct MetaCacheStats {
  int64_t hits = 0, misses = 0, size = 0, bytes = 0;
};

// The memory an entry holds (its tensors' and vectors' bytes), for the cache's byte bound: a value type with a
// bytes() member reports it, others count as their sizeof.
template <typename V>
int64_t meta_bytes(const V& v) {
  if constexpr (requires { v.bytes(); }) {
    return static_cast<int64_t>(v.bytes()) + static_cast<int64_t>(sizeof(V));
  } else if constexpr (std::is_same_v<V, at::Tensor>) {
    return v.defined() ? static_cast<int64_t>(v.nbytes()) : 0;
  } else if constexpr (requires { v.first; v.second; }) {
    return meta_bytes(v.first) + meta_bytes(v.second);
  } else if constexpr (requires { v.data(); v.size(); typename V::value_type; }) {
    return static_cast<int64_t>(v.size() * sizeof(typename V::value_type));
  } else {
    return static_cast<int64_t>(sizeof(V));
  }
}
inline int64_t tensor_bytes(const at::Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0; }
inline int64_t tensor_bytes(const std::optional<at::Tensor>& t) { return t ? tensor_bytes(*t) : 0; }

// One per process (instance() is defined in _C and exported to the emulation module: export.h).
class PADST_EXPORT MetaCache {
 public:
  static constexpr size_t kCapacity = 64;
  // 256 MB of copies (PADST_META_CACHE_MB overrides it, read once), besides the 64-entry bound.
  static int64_t max_bytes() {
    static const int64_t bytes = [] {
      const char* v = std::getenv("PADST_META_CACHE_MB");
      const long long mb = v && *v ? std::atoll(v) : 256;
      return static_cast<int64_t>(mb > 0 ? mb : 256) << 20;
    }();
    return bytes;
  }
  static MetaCache& instance();
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
    const int64_t bytes = meta_bytes(*value);
    std::lock_guard<std::mutex> lock(mu_);
    // the same call's entries for older versions of its tensors are never hit again: drop them now
    for (auto it = lru_.begin(); it != lru_.end();) {
      if (it->key.same_but_versions(key)) {
        bytes_ -= it->bytes;
        it = lru_.erase(it);
      } else {
        ++it;
      }
    }
    lru_.push_front(Entry{std::move(key), value, bytes});
    bytes_ += bytes;
    while (lru_.size() > 1 && (lru_.size() > kCapacity || bytes_ > max_bytes())) {  // the newest entry always stays
      bytes_ -= lru_.back().bytes;
      lru_.pop_back();
    }
    return value;
  }
  MetaCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    MetaCacheStats s = stats_;
    s.size = static_cast<int64_t>(lru_.size());
    s.bytes = bytes_;
    return s;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    lru_.clear();
    bytes_ = 0;
    stats_ = MetaCacheStats{};
  }

 private:
  struct Entry {
    MetaKey key;
    std::shared_ptr<const void> value;
    int64_t bytes = 0;
  };
  std::mutex mu_;
  std::list<Entry> lru_;
  int64_t bytes_ = 0;
  MetaCacheStats stats_;
};

}  // namespace padst::impl
