// Hit counters of a patch, in BPF maps pinned under /sys/fs/bpf/hotfix/<pid>/<patch id>/:
// they outlive hotfix-ctl, `bpftool map dump pinned <dir>/new_hits` shows them, and any later
// hotfix-ctl reads them (`stats`). One set per target pid and patch id.
//
//   new_hits   u64 per function, index = the function's index in the PatchRecord. The map is
//              BPF_F_MMAPABLE: the target maps it (remote BPF_OBJ_GET of the pin + mmap
//              MAP_SHARED) and each counting island does `lock inc` on slot i, then jumps to
//              the replacement. No trap: new-code calls cost one atomic add.
//   old_hits   u64 per function, same index: uprobes on every exit of the OLD body add 1, so
//              only calls that still run the old code (threads inside when an entry-mode patch
//              landed) pay for a probe. A call is counted when it leaves the old code.
//   meta       whose counters these are (pid + its start time, so a reused pid is told apart).
//   old_exits  the pinned uprobe_multi link(s) of old_hits ("old_exits", "old_exits.1", ...).
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "common/paths.hpp"
#include "common/unique_fd.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

constexpr const char* kBpffsMount = "/sys/fs/bpf";
constexpr const char* kPinRoot = "/sys/fs/bpf/hotfix";

// Mount the BPF filesystem at /sys/fs/bpf unless it is there already.
Result<void> bpffs__ensure_mounted();

// /sys/fs/bpf/hotfix/<pid>/<id>
std::string patchcount__dir(pid_t pid, uint32_t id);

struct PatchCounters {
  pid_t pid = 0;
  uint32_t id = 0;
  uint32_t nfunctions = 0;
  std::string dir;             // patchcount__dir(pid, id)
  std::string new_hits_path;   // dir + "/new_hits": what the target opens with BPF_OBJ_GET
  std::string old_hits_path;   // dir + "/old_hits"
  UniqueFd new_hits;           // map fds, valid in this process
  UniqueFd old_hits;
  // new_hits value layout: function i's counter is the u64 at byte i * value_stride of the
  // mapping (mmap offset 0, length mmap_size(), MAP_SHARED, PROT_READ|PROT_WRITE).
  static constexpr size_t value_stride = 8;
  size_t mmap_size() const;
};

// Create and pin the counters of patch `id` of `pid` (zeroed, nfunctions slots). Pins are
// root's alone (files 0600, directories 0700). Fails if counters for this patch of this
// process exist already; stale ones of a reused pid are replaced. On failure nothing is left
// pinned.
Result<PatchCounters> patchcount__create(pid_t pid, uint32_t id, uint32_t nfunctions);

// A target that is not root cannot walk the 0700 directories to BPF_OBJ_GET new_hits itself:
// pin it once more, for that user alone (/sys/fs/bpf/hotfix-handoff-<pid>-<id>/new_hits, 0600
// in 0700, owned by uid/gid), for the moment it maps it; patchcount__handoff_done removes it.
Result<std::string> patchcount__handoff(const PatchCounters& c, uid_t uid, gid_t gid);
void patchcount__handoff_done(const std::string& path);

// The exits of one old function: probes there count calls still running the old code.
struct OldCodeExits {
  uint32_t index = 0;             // the function's index in the PatchRecord (= counter slot)
  std::string object;             // ELF object as mapped (Function::object)
  std::vector<uint64_t> offsets;  // file offsets of its ret / tail-jump instructions
  size_t unresolved = 0;          // exits that cannot be probed exactly (jmp reg): not counted
};
// Find the exits of `old_fn` (a function of `pid`, with its size) from its bytes in the file.
Result<OldCodeExits> patchcount__old_exits(pid_t pid, const Function& old_fn, uint32_t index);

// Attach uprobes (one uprobe_multi link per object, pinned in the patch's directory) that
// increment old_hits[index] at every exit. Returns the number of probes.
// Offsets the kernel refuses to probe are left out: each is named in `skipped` ("OBJECT+0xOFF
// (why)") and not counted in the result.
Result<size_t> patchcount__attach_old(pid_t pid, uint32_t id, const std::vector<OldCodeExits>& functions,
                                      std::vector<std::string>* skipped = nullptr);

struct FunctionHits {
  uint64_t new_hits = 0;
  uint64_t old_hits = 0;
};
struct PatchHits {
  pid_t pid = 0;
  uint32_t id = 0;
  uint64_t created_ns = 0;          // CLOCK_REALTIME
  uint32_t exit_probes = 0;         // uprobes on the old code's exits (0: old hits not counted)
  std::vector<FunctionHits> functions;  // index = PatchRecord function index
};
// The counts of patch `id` of `pid`; nullopt if that patch has no counters.
Result<std::optional<PatchHits>> patchcount__read(pid_t pid, uint32_t id);
// Patch ids of `pid` that have counters pinned.
std::vector<uint32_t> patchcount__ids(pid_t pid);

// Unpin everything of patch `id` (detaches its old-code probes). Nothing to remove is success.
Result<void> patchcount__remove(pid_t pid, uint32_t id);

struct GcReport {
  std::vector<std::string> removed;  // paths removed (pin directories, /run/hotfix/<pid>)
  std::vector<std::string> errors;   // what could not be removed, and why
};
// Remove the pins of processes that are gone (or whose pid now names another process) and
// /run/hotfix/<pid> directories of dead pids. `dry_run`: only report what would go.
GcReport patchcount__gc(bool dry_run = false);

}  // namespace hotfix
