// The preserving island: when a direct caller of a patched function keeps a call-clobbered
// register live across the call (GCC -fipa-ra) and the replacement may change it, the jump
// goes to an island that saves exactly those registers, calls the replacement, restores them
// and returns. PlannedSwitch::preserve holds the registers; the island's code and unwind
// information are arch/x86_64/preserve.cpp, the island is written by apply.cpp.
//
// Unwinding: the island is a real frame between the replacement and the original caller, so a
// C++ exception thrown in the replacement needs unwind information for it. The island carries
// an FDE, registered with the target's own libgcc unwinder (__register_frame) before the jump
// is written and deregistered (__deregister_frame) before its page is unmapped. A registration
// libgcc still holds must never point at unmapped memory: wherever hotfix cannot be sure a frame
// was deregistered (a crash in between), the island page stays mapped.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "patch/journal.hpp"

namespace hotfix {

struct PlannedSwitch;
struct PatchRecord;
class Tracee;

// Can `s` be made safe by a preserving island? false with `why` (one line) when not: the
// function's DWARF (from its object or a separate debug file by build-id) must show that no
// argument is passed on the stack (the island's frame sits between the caller's stack
// arguments and the replacement), and, when the set holds a return-value register, that the
// function returns nothing there. Without DWARF for the function the answer is no.
bool preserve__supported(const PlannedSwitch& s, std::string& why);

// The target's unwinder: libgcc's __register_frame / __deregister_frame, looked up from fix.so
// (whose dependencies may have brought libgcc_s) and then globally. Both 0: the process has no
// unwinder, so nothing can unwind through an island (there is nothing to register with).
struct Unwinder {
  uint64_t register_frame = 0, deregister_frame = 0;
  explicit operator bool() const { return register_frame && deregister_frame; }
};
Result<Unwinder> preserve__unwinder(Tracee& t, uint64_t fix_handle, std::chrono::milliseconds timeout);

// __register_frame(frame) / __deregister_frame(frame) on a thread holding no loader or malloc
// lock (libgcc mallocs), every other thread running. Journaled as "frame-registering" /
// "frame-registered" and "frame-deregistering" / "frame-deregistered" (op `op`, patch `id`).
Result<void> preserve__register(Tracee& t, Journal& j, const std::string& op, uint32_t id, const Unwinder& u,
                                uint64_t frame, std::chrono::milliseconds timeout);
Result<void> preserve__deregister(Tracee& t, Journal& j, const std::string& op, uint32_t id, const Unwinder& u,
                                  uint64_t frame, std::chrono::milliseconds timeout);

// Before p's islands are unmapped (release): deregister every frame p registered. Returns the
// island pages that must stay mapped (a frame not known to be deregistered: an earlier attempt
// was interrupted between its intent and its completion, or deregistering failed now). Runs
// before p's fix library is unloaded (the unwinder may be one of its dependencies).
std::set<uint64_t> preserve__release_frames(Tracee& t, Journal& j, const PatchRecord& p,
                                            std::chrono::milliseconds timeout, std::string& note);

// The frames an interrupted patch operation may have registered (its "frame-registering"
// records): recovery keeps the pages holding them mapped.
std::vector<uint64_t> preserve__journaled_frames(const std::vector<JournalRecord>& records, uint32_t id);

}  // namespace hotfix
