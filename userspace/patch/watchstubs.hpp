// Trap-free call counting for `hotfix-ctl watch`: a counting trampoline per function.
//
// The entry of a watched function gets a 5-byte jump to a stub in an anonymous executable page
// of the target (near it). The stub adds 1 to the function's slot of a BPF array map
// (BPF_F_MMAPABLE, named "hotfix_watch", mapped MAP_SHARED into the target, so `bpftool map
// dump name hotfix_watch` reads it too), runs the instructions the jump covers, relocated
// (arch/x86_64/relocator), and jumps back after them. No trap: a counted call costs one atomic
// add and two jumps.
//
// Safety is the patch's: the prologue checks (arch::check_entry and the relocator's refusals),
// the bytes must be the file's (never written where a breakpoint sits: someone else's uprobe,
// a debugger), no function patched by hotfix, no Go code, entry consistency (no thread inside
// the covered bytes, none resuming into them) and one stop for all functions; a record in the
// target's registry (WatchRecord) and the journal (op "watch", id = the watch's pid) before and
// after every change. Removal restores the file's bytes in one stop and frees a page only once
// no thread can be inside it (pc or a return address on any stack: the strict scan). A watch
// that dies (SIGKILL) leaves its op unfinished with a dead owner: the next hotfix-ctl on the
// pid (watch, patch, list, stats, gc, recover) removes its trampolines (watchstubs__recover).
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "common/unique_fd.hpp"
#include "patch/registry.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

class Journal;
struct JournalRecord;
class ProcessMemory;
class Tracee;

// At most this many trampolines in one watch: each is a registry line and a journal record, and
// all go in in one stop. A pattern matching more (watch '*') is watched with uprobes.
constexpr size_t kMaxWatchTrampolines = 1000;

// A function that gets no trampoline (a uprobe counts it instead), and why, for people.
struct TrampolineRefusal {
  Function function;
  std::string reason;
};

struct WatchStubOptions {
  std::chrono::milliseconds timeout{10000};  // for the stop that writes the jumps
  std::function<void(const std::string&)> progress = nullptr;
};

class WatchStubs {
 public:
  // Give every function of `functions` that can take one a counting trampoline, all in one stop;
  // the others go to `refused`. Nothing installed (none could) is success with no functions.
  static Result<WatchStubs> install(pid_t pid, const std::vector<Function>& functions, const WatchStubOptions& opts,
                                    std::vector<TrampolineRefusal>& refused);

  WatchStubs(WatchStubs&&) noexcept;
  WatchStubs& operator=(WatchStubs&&) noexcept;
  ~WatchStubs();  // removes what is still installed (best effort: remove() says what went wrong)

  const std::vector<Function>& functions() const { return functions_; }
  // Calls counted so far, by functions() index.
  std::vector<uint64_t> read() const;
  // Put the file's bytes back at every entry (one stop), then free the trampolines' memory once
  // no thread can be inside it, waiting up to `wait` for threads to leave. Notes for people:
  // memory still held (the next hotfix-ctl frees it), an entry someone else changed since.
  Result<std::vector<std::string>> remove(std::chrono::milliseconds wait,
                                          const std::function<void(const std::string&)>& progress = nullptr);
  uint64_t stub_of(size_t i) const { return record_.stubs[i].stub; }   // for tests and tools
  const WatchRecord& record() const { return record_; }
  // Notes for people from the install (a perf map that could not be written).
  const std::vector<std::string>& notes() const { return notes_; }

 private:
  WatchStubs() = default;
  pid_t pid_ = 0;
  std::vector<Function> functions_;
  WatchRecord record_;
  UniqueFd map_;              // the counter map, in this process
  void* view_ = nullptr;      // the map's values, mapped read-only here
  size_t view_len_ = 0;
  bool installed_ = false;
  uint64_t made_registry_ = 0;  // the registry mapping install() created (0: it was there)
  std::vector<std::string> notes_;
};

// Why `fn` cannot take a trampoline in the process behind `mem` now ("" when it can). `go`: its
// object is Go code.
std::string watchstubs__refusal(const ProcessMemory& mem, const Registry& registry, const Function& fn, bool go);

// One line naming the functions a uprobe counts instead of a trampoline, grouped by reason.
std::string watchstubs__refused_line(const std::vector<TrampolineRefusal>& refused);

// --- recovery (patch/recover.cpp, under the journal lock) ---
// Is the watch of journal op "watch" `records` still running (its owner alive, same start)?
bool watchstubs__owner_alive(const std::vector<JournalRecord>& records);
// Remove what a dead watch left (`records`: its journal op since "begin"). One line for people.
Result<std::string> watchstubs__recover(Tracee& t, Journal& j, uint32_t id, const std::vector<JournalRecord>& records);

}  // namespace hotfix
