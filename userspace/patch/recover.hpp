// Recovery: finish or undo what a killed hotfix-ctl left half done, from the journal
// (patch/journal.hpp), comparing it with the live process.
//
// The rule, per operation in the journal (grouped by operation and patch id; a "begin"
// starts a new attempt):
//   patch without "committed"    rolled back: every jump it wrote (live bytes == journaled
//                                 new bytes) is restored in one stop, checked as a revert of
//                                 that consistency mode is; the registry loses the record;
//                                 then, once no thread can run its code (strict check, as
//                                 revert's release), the library is dlclose'd, its islands,
//                                 counter mapping (recorded, or the one unrecorded page/map a
//                                 journaled intent allows) and registry (if this patch made
//                                 it and it is empty) unmapped, its pins and copy removed.
//                                 Memory a thread can still reach is held ("held") and
//                                 released by a later recovery.
//   patch with "committed"       kept (marked done).
//   revert without "committed"   completed: remaining jumps restored, registry marked
//                                 reverted, pins removed, memory released when unreachable.
//   revert/release unfinished    completed (pins removed, release retried).
// Every recovery step is journaled and idempotent (it looks at what is mapped and what the
// bytes are), so a recovery killed half-way is recovered again.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "patch/counting.hpp"
#include "common/error.hpp"
#include "observe/patchcount.hpp"
#include "patch/engine.hpp"
#include "patch/journal.hpp"

namespace hotfix {

// Finish or undo every interrupted operation on `pid`; one line per operation recovered
// ("recovered an interrupted patch 3 of pid 1234: rolled back (...)"). No journal, or
// nothing interrupted: no line, and the target is not touched. `wait`: wait for a
// concurrent hotfix-ctl to finish instead of skipping.
Result<std::vector<std::string>> recover__run(pid_t pid, const ProgressFn& progress, bool wait = false);

// Remove orphans of live processes too: state with no committed patch behind it (after
// recovering their journals), and the journals of processes that are gone.
void recover__gc(bool dry_run, GcReport& report);

// --- used by apply.cpp / revert.cpp for their journal records ---
// Start addresses ("0x..,0x..") of the anonymous executable mappings / BPF map mappings of
// `pid` now: what an island / counters mmap about to happen must not be confused with.
std::string recover__anonymous_pages(pid_t pid);
std::string recover__bpf_map_pages(pid_t pid);
std::pair<uint64_t, uint64_t> recover__file_identity(const std::string& path);  // (dev, ino), 0s if absent
// The lowest patch id above every unfinished (held) patch of the journal (0 if none).
uint32_t recover__next_id(const Journal& journal);
// Nothing active, nothing held, nothing unfinished: delete the journal and /run/hotfix/<pid>.
void recover__forget_if_clean(Journal& journal, const Registry& registry);
// Is `path` mapped in `pid`? Is [address, +length) still the kind of mapping we made there?
bool recover__is_mapped(pid_t pid, const std::string& path);
bool recover__still_ours(pid_t pid, uint64_t address, uint64_t length, bool bpf_map);
// What mapping a counter map into the target left there (patch/counting.hpp), as journaled
// ("counters-handoff" records, one snapshot per step, by patch and watch), and found again
// by recovery: the fds to close and the scratch page to unmap. Only what is provably ours.
JournalRecord& recover__note_handoff(JournalRecord& r, const CountingLeftovers& left);
struct HandoffLeftovers {
  std::vector<int> fds;
  uint64_t scratch = 0;
  bool empty() const { return fds.empty() && !scratch; }
};
HandoffLeftovers recover__handoff_leftovers(Tracee& t, const JournalRecord& snapshot);
// Close and unmap them on `tid` (stopped).
void recover__release_handoff(Tracee& t, pid_t tid, const HandoffLeftovers& l);

}  // namespace hotfix
