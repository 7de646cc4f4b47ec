// Fork adoption: a forked child of a patched process gets a registry and counters of its own.
//
// fork() gives the child the parent's jumps, fix copy and islands (private copy-on-write pages:
// the child's writes never reach the parent), but the registry (a MAP_SHARED memfd) and the hit
// counters (MAP_SHARED BPF maps: the patch's new_hits, a watch's counters) stay shared. Until it
// is adopted, the child's list shows its parent's record, its stats count into its parent's
// slots, and any write would change its parent's registry.
//
// Adoption (on the child, under its journal lock, the child seized; op "adopt", id = the
// parent's pid):
//   begin                     the inherited registry's address and owner
//   counters (per patch)      the child's own pinned counters (/sys/fs/bpf/hotfix/CHILD/ID),
//                             mapped MAP_FIXED over the inherited mapping at the SAME address:
//                             the counting islands and trampolines (absolute slot addresses)
//                             need no rewrite, and from that syscall on the child counts alone
//   watch-counters (per watch) a fresh unpinned map over the inherited watch counters, and a
//                             journal op "watch" for the inherited trampolines, so that they
//                             are taken down in the child once that watch has ended
//                             (watchstubs__recover), as for a killed watch
//   registry-memfd            a new "hotfix-registry" memfd in the child (not mapped yet); its
//                             content, the inherited record with `owner CHILD`, written through
//                             /proc/CHILD/fd/N
//   registry-swapped          that memfd mapped MAP_FIXED|MAP_SHARED over the inherited mapping:
//                             the commit. Before it the child still maps the parent's registry
//                             (owner = the parent), so the next hotfix-ctl adopts again
//   done                      the memfd's fd closed (the mapping keeps it)
// Every step is idempotent and acts on the child only; the parent's mappings, pins, journal and
// bytes are never touched, so a kill at any point leaves both correct: an fd left open in the
// child is closed by the next adoption or recovery.
//
// Before adopting, the child's text must agree with the record (each active patch's jump at
// its entries, no reverted patch's jump left): a parent that patched or reverted after the
// fork changed the shared record, which then no longer describes the child -- refused. So
// that this does not happen, a verb that writes a registry first adopts every other process
// that still maps it (adopt__sharers).
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "patch/registry.hpp"

namespace hotfix {

// Why the child's live bytes do not match the inherited record `r`, "" when they do. `read`
// returns the child's bytes at an address (nullopt: unreadable).
std::string adopt__mismatch(const Registry& r,
                            const std::function<std::optional<std::vector<uint8_t>>(uint64_t, size_t)>& read);

// If `pid` maps a registry written for another process (a fork's inherited record), give it
// its own registry and counters as above; finish an adoption a killed hotfix-ctl left (close
// its fd, record "done"). One line per thing done, for people. `wait`: wait for a concurrent
// hotfix-ctl on `pid` (false: skip, nothing done).
Result<std::vector<std::string>> adopt__run(pid_t pid, bool wait);

// Before writing `pid`'s registry: adopt every other process that maps the same registry
// memfd (forks of `pid` not adopted yet), each exactly as adopt__run would, retrying one that
// another hotfix-ctl holds for up to `wait`. Fails naming the process that could not be
// adopted: the write would change its record too.
Result<std::vector<std::string>> adopt__sharers(pid_t pid, std::chrono::milliseconds wait = std::chrono::seconds(10));

// adopt__run(pid, true) then adopt__sharers(pid): what every registry-writing operation does
// first (patch, revert, watch's trampolines). Their lines.
Result<std::vector<std::string>> adopt__before_write(pid_t pid);

}  // namespace hotfix
