#include "patch/abi_types.hpp"

#include "patch/engine.hpp"

namespace hotfix {

Result<void> abi__check_types(PreparedPatch& p) {
  (void)p;
  return {};
}

}  // namespace hotfix
