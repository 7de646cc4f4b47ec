// Verbs whose issue is not done yet say so instead of pretending.
#include "cli/cli.hpp"

namespace hotfix::cli {
namespace {
int not_yet(const char* verb) {
  return report(Error{fmt::format("'{}' is not implemented in this build yet", verb), "see the open issues", 1});
}
}  // namespace
int verb_stats(const Args&) { return not_yet("stats"); }
int verb_gc(const Args&) { return not_yet("gc"); }
}  // namespace hotfix::cli
