// How hotfix-ctl shows a patch's (or revert's) progress: on a terminal, the retries of a
// blocked stop rewrite one line (carriage return: attempts, who blocks, time left); into a
// pipe or file, one line per change of blocker, so a log gets the story and not thousands of
// lines. Notes and the "stuck" warning always get a line of their own. The events and their
// wording come from the library (patch/progress.hpp); only the layout is decided here.
#pragma once
#include <fmt/core.h>
#include <unistd.h>

#include <cstdio>

#include "patch/engine.hpp"

namespace hotfix::cli {

class ProgressPrinter {
 public:
  explicit ProgressPrinter(bool quiet) : quiet_(quiet), tty_(::isatty(STDOUT_FILENO) == 1) {}
  ~ProgressPrinter() { finish(); }

  void operator()(const ProgressEvent& e) {
    if (quiet_) return;
    std::string line = progress_event__describe(e);
    if (e.kind == ProgressEvent::Kind::waiting && tty_) {
      fmt::print("\r{}\033[K", line);  // \033[K: clear what a longer previous line left
      open_ = true;
    } else if (e.kind == ProgressEvent::Kind::waiting && !e.blocker_changed) {
      return;
    } else {
      finish();
      fmt::print("{}\n", line);
    }
    std::fflush(stdout);
  }
  // End an open updating line (before the result, or the error on stderr).
  void finish() {
    if (!open_) return;
    fmt::print("\n");
    std::fflush(stdout);
    open_ = false;
  }

 private:
  bool quiet_, tty_, open_ = false;
};

}  // namespace hotfix::cli
