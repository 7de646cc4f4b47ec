// What patch and revert report while they work, as events a front end renders as it likes
// (the CLI: one updating line on a terminal, else one line per change of blocker). The model
// and its wording live here, not in the CLI, so that a second front end gets them too.
#pragma once
#include <chrono>
#include <string>

#include "patch/consistency.hpp"

namespace hotfix {

struct ProgressEvent {
  enum class Kind {
    note,     // a step done ("loaded ...", "  write ..."): `text` is the whole line
    waiting,  // a strict (or entry) stop was blocked; retrying
    stuck,    // once per switch: the same thread blocks at the same place on every attempt
  };
  Kind kind = Kind::note;
  std::string text;  // note: the line; waiting, stuck: what progress_event__describe says

  // waiting, stuck:
  int attempt = 0;                  // stops so far
  Blocker blocker;                  // the thread that blocked most often (named)
  int blockers = 0;                 // threads that blocked this attempt
  bool blocker_changed = false;     // another thread or function than at the last waiting event
  int same_place = 0;               // consecutive attempts `blocker` blocked in the same function (and pc)
  bool same_pc = false;             // ... at the very same pc every time (a loop calling out of it)
  std::chrono::milliseconds left{};  // until --timeout

  ProgressEvent() = default;
  ProgressEvent(std::string line) : text(std::move(line)) {}  // a note (implicit: progress("..."))
};

// The event as one line, without a newline: "attempt 7: thread 42 (worker) is inside f (frame
// #2, pc 0x...); retrying, 2.9 s left".
std::string progress_event__describe(const ProgressEvent& e);

// The way out of a blocker that never leaves (for the stuck event and the timeout error).
std::string progress__stuck_hint(const Blocker& b);

}  // namespace hotfix
