// Hit counting of a patch, target side: the pinned counters (observe/patchcount.hpp) are
// mapped into the target so that each counting island can add to its slot with one atomic
// instruction -- no trap on the new code's hot path.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>

#include "common/error.hpp"
#include "observe/patchcount.hpp"
#include "process/fdpass.hpp"

namespace hotfix {

class Tracee;

struct TargetCounters {
  PatchCounters counters;  // the pinned maps, and their fds in hotfix-ctl
  uint64_t address = 0;    // where new_hits is mapped in the target
  uint64_t length = 0;
  uint64_t slot(uint32_t index) const { return address + index * PatchCounters::value_stride; }
};

// What mapping the counters may leave in the target if hotfix-ctl is killed midway: an fd of
// the new_hits map (found by its map id in /proc/PID/fdinfo, whichever way it came), and the
// fd handoff's scratch page and sockets (process/fdpass.hpp). Journaled by the caller.
struct CountingLeftovers {
  uint32_t map_id = 0;
  FdpassLeftovers handoff;
};
using CountingNote = std::function<void(const CountingLeftovers&)>;

// Create the counters of patch `id` and map new_hits into the target with a remote
// bpf(BPF_OBJ_GET) of its pin (or, for a target without bpffs, our fd handed over) and
// mmap(MAP_SHARED) on `tid`, which must be stopped. `note` hears what may be left in the
// target at each step, first the map id (before any fd of the map reaches the target).
Result<TargetCounters> counting__map_into(Tracee& t, pid_t tid, uint32_t id, uint32_t nfunctions,
                                          const CountingNote& note = {});

// The same, mapped at `address` with MAP_FIXED (0: anywhere), replacing what is there: a forked
// child's inherited mapping of its parent's counters becomes its own (patch/adopt.hpp).
Result<TargetCounters> counting__map_at(Tracee& t, pid_t tid, uint32_t id, uint32_t nfunctions, uint64_t address,
                                        const CountingNote& note = {});

// The target opens the BPF object pinned at `path` itself (a remote bpf(BPF_OBJ_GET) on `tid`,
// stopped): its fd in the target. Also used by watch's trampolines (patch/watchstubs.hpp).
Result<int> counting__remote_obj_get(Tracee& t, pid_t tid, const std::string& path);

}  // namespace hotfix
