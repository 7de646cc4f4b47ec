// The patch transaction: resolve -> plan -> stop -> check -> write -> record.
//
// All functions of one patch switch during one stop of every thread, or none do. Before the
// stop window: the plan, the prologue checks, the injection of the bound fix library (with
// the other threads running, see remote__inject_library), its fixups, islands and the
// registry mapping. Inside it: verify the bytes, check consistency, write the jumps, record.
// A failure anywhere leaves the target as it was: what was loaded is unloaded, what was
// mapped is unmapped, no byte of text is changed.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "arch/arch.hpp"
#include "common/error.hpp"
#include "patch/consistency.hpp"
#include "patch/fixlib.hpp"
#include "patch/plan.hpp"
#include "patch/progress.hpp"
#include "patch/registry.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

enum class Consistency { strict, entry };
const char* consistency__name(Consistency c);

struct PatchOptions {
  pid_t pid = 0;
  std::string library;                // fix.so
  std::vector<std::string> patterns;  // empty: everything fix.so replaces
  std::string object;                 // --object
  Consistency consistency = Consistency::strict;
  std::chrono::milliseconds timeout = std::chrono::seconds(10);  // strict mode's wait for quiescence
  std::string patch_dir = kPatchDir;
  bool abi_check = true;  // refuse replacements that break -fipa-ra callers (see abi_check.hpp)
  bool count = true;      // count hits: new code through counting islands, old code at its exits
  std::chrono::milliseconds observe = std::chrono::seconds(1);  // liveness window before acting
  bool observe_adaptive = true;   // observe from 100 ms, up to `observe` while counts are too few (observe/liveness.hpp)
  double max_overhead_pct = 2.0;  // the observe window's probe budget, % of one CPU (observe/budget.hpp)
  bool observe_trampolines = true;  // the observe window counts with trampolines (--count trampoline|uprobe)
  bool quiesce_probes = true;  // strict mode: let entry/return uprobes pick the moment to stop
  bool allow_untrusted_lib = false;  // load a fix.so that fails the trust rule (patch/trust.hpp)
  bool allow_uncovered = false;      // apply even where inlined copies, clones or aliases keep old code (patch/coverage.hpp)
  // A persisted set's copy (agent/store.hpp): fix.so's bytes as read must have this sha256
  // (hex), checked on the very bytes that are then loaded; "" checks nothing.
  std::string expected_sha256;
};

// One line of the plan from a check that passed with something to say ("ABI: 3 call sites
// checked, none keeps rcx live"; "types: not checked: the target has no DWARF ...").
struct PlanNote {
  std::string check;  // "abi", "types", "coverage", "provenance", ...
  std::string text;
};

// One function of a prepared patch: what will change where.
struct PlannedSwitch {
  PlanEntry entry;
  arch::EntryCheck check;          // what the jump covers
  std::vector<uint8_t> current;    // bytes at the entry now (file bytes, or an earlier patch's jump)
  const PatchRecord* stacked_on = nullptr;  // the active patch whose jump is there now
  uint64_t new_address = 0;        // known once fix.so is loaded
  uint64_t island = 0;             // set when the replacement is out of a direct jump's reach
  std::vector<uint8_t> jump;       // the bytes to write, known once fix.so is loaded
  // Call-clobbered registers (arch numbering, arch::ClobberSet bits) that some direct caller
  // keeps live across its call and the replacement may change: the jump then goes through an
  // island that saves them around the replacement (patch/preserve.hpp). 0 = a plain jump.
  uint64_t preserve = 0;
  uint64_t frame = 0;  // the preserving island's unwind information, registered in the target (apply)
  // The counting trampoline at the replacement's entry (apply, when counting), and how many
  // replacement bytes its jump covers; 0 when the replacement's prologue cannot be moved
  // (`uncounted` says why): its island counts then, and calls from inside fix.so do not.
  uint64_t trampoline = 0;
  uint64_t trampoline_covered = 0;
  std::string uncounted;
};

struct PreparedPatch {
  PatchOptions options;
  SymbolTable table;
  Registry registry;
  uint32_t id = 0;
  std::string executable;
  std::vector<PlannedSwitch> switches;
  FixImage fix;           // fix.so's bytes, read once: what is checked, bound and delivered
  std::string untrusted;  // why fix.so failed the trust rule, when allow_untrusted_lib let it in
  std::vector<PlanNote> notes;  // what the checks proved or could not check, for the plan
  // Places that run the patched code where the jump does not reach (inlined copies, clones)
  // or changes more than asked (aliases), accepted with --allow-uncovered (patch/coverage.hpp).
  std::vector<UncoveredPlace> uncovered;
};

// Resolve and plan without touching the target: every refusal that needs no ptrace happens
// here (bad library, no match, no replacement, ambiguity, a function too short or with a
// branch into its first bytes).
Result<PreparedPatch> patch__prepare(const PatchOptions& opts);

// Before acting: watch the functions to be patched for `window` with uprobes (their current
// code: a patched function's replacement) and report calls/s and threads inside. Return
// probes are used only where no C++ exception can unwind through them (then in-flight is -1).
struct FunctionLiveness {
  std::string name;
  double calls_per_s = 0;
  int64_t inflight = -1;  // threads inside at the end (observe/inside.hpp); -1: not measured
  size_t inside_unknown = 0;  // threads that could not be read: inflight is a lower bound
  bool trampoline = false;  // counted by a counting trampoline in the observe window
};
Result<std::vector<FunctionLiveness>> patch__observe(const PreparedPatch& p, std::chrono::milliseconds window);
// The observe window as PatchOptions asks (adaptive, within the overhead budget; counting
// trampolines by default, removed before this returns: observe/liveness.hpp), with how long it
// took and what it did (extended, cut probes, functions counted by uprobe), one line each.
struct ObservedWindow {
  std::vector<FunctionLiveness> functions;
  double seconds = 0;
  std::vector<std::string> notes;
  size_t trampolines = 0, uprobes = 0;  // functions counted by each
};
Result<ObservedWindow> patch__observe_window(const PreparedPatch& p);

// Progress for the front end: notes ("loaded ...") and, while a stop is blocked, structured
// waiting events (patch/progress.hpp).
using ProgressFn = std::function<void(const ProgressEvent&)>;

struct PatchOutcome {
  uint32_t id = 0;
  std::chrono::nanoseconds pause{};  // longest time any thread was stopped, over all attempts
  int attempts = 0;
  std::vector<FunctionRecord> functions;
  std::string loaded_copy;  // the delivered copy as /proc/PID/maps names it
  std::string sha256;         // of fix.so's bytes as read (what `sha256sum fix.so` printed then)
  std::string loaded_sha256;  // of the bytes the target loaded: fix.so with its hand-bound symbols made weak
};

// Apply a prepared patch. The plan's jump bytes are filled in (and reported through
// `progress`) once the library is loaded, before the stop.
Result<PatchOutcome> patch__apply(PreparedPatch& prepared, const ProgressFn& progress);

struct RevertOptions {
  pid_t pid = 0;
  std::vector<uint32_t> ids;  // empty with all = true: every active patch, newest first
  bool all = false;
  Consistency consistency = Consistency::strict;
  std::chrono::milliseconds timeout = std::chrono::seconds(10);
};

struct RevertOutcome {
  uint32_t id = 0;
  std::chrono::nanoseconds pause{};
  int attempts = 0;
  bool released = false;  // fix.so unloaded and islands unmapped
  std::string held_by;    // why its memory is still held, when not released
  bool earlier = false;   // reverted by an earlier revert: only its memory was given back now
  std::string note;       // released, but something stays (the loader kept the library mapped)
};

Result<std::vector<RevertOutcome>> patch__revert(const RevertOptions& opts, const ProgressFn& progress);

}  // namespace hotfix
