#include "patch/provenance.hpp"

#include "patch/engine.hpp"

namespace hotfix {

Result<void> provenance__check(PreparedPatch& p) {
  (void)p;
  return {};
}

}  // namespace hotfix
