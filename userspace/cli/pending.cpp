// Verbs whose issue is not done yet say so instead of pretending.
#include "cli/cli.hpp"

namespace hotfix::cli {
namespace {
int not_yet(const char* verb) {
  return report(Error{fmt::format("'{}' is not implemented in this build yet", verb), "see the open issues", 1});
}
}  // namespace
int verb_patch(const Args&) { return not_yet("patch"); }
int verb_list(const Args&) { return not_yet("list"); }
int verb_revert(const Args&) { return not_yet("revert"); }
int verb_stats(const Args&) { return not_yet("stats"); }
int verb_gc(const Args&) { return not_yet("gc"); }
int verb_symbols(const Args&) { return not_yet("symbols"); }
int verb_watch(const Args&) { return not_yet("watch"); }
}  // namespace hotfix::cli
