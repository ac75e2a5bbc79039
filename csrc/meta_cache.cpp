#include "meta_cache.h"

namespace padst::impl {

MetaCache& MetaCache::instance() {
  static MetaCache cache;
  return cache;
}

}  // namespace padst::impl
