#include "patch/preserve.hpp"

#include "patch/engine.hpp"

namespace hotfix {

bool preserve__supported(const PlannedSwitch& s, std::string& why) {
  (void)s;
  why = "hotfix cannot build a preserving island yet";
  return false;
}

}  // namespace hotfix
