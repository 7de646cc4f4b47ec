#include "patch/golang.hpp"

#include "observe/probe_safety.hpp"
#include "patch/plan.hpp"

namespace hotfix {

Result<void> golang__check(const std::vector<PlanEntry>& entries) {
  for (auto& e : entries)
    if (probe__is_go_object(e.target.object))
      return fail(fmt::format("cannot patch {}: it is Go code ({} is a Go binary), and Go's internal register ABI is "
                              "not the C ABI a fix.so is built for, and goroutine stacks are invisible to the stack "
                              "scan",
                              e.target.name, e.target.object),
                  "nothing was changed; fix the Go source and redeploy (hotfix patches C and C++ code only)");
  return {};
}

}  // namespace hotfix
