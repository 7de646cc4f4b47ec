// The perf map lines (observe/perfmap.hpp) of the islands a target's active patches hold, so
// perf names samples in them: "hotfix island: pricing::discount -> fix.so" (a plain jump
// island), "hotfix island (counting): ..." and "hotfix island (preserving): ...", and of the
// counting trampolines running watches put at entries: "hotfix watch trampoline: pricing::discount".
#pragma once
#include <sys/types.h>

#include <vector>

#include "observe/perfmap.hpp"
#include "patch/engine.hpp"
#include "patch/registry.hpp"

namespace hotfix {

constexpr std::string_view kIslandPerfName = "hotfix island";  // every island line starts so
constexpr std::string_view kWatchPerfName = "hotfix watch trampoline";  // every watch stub line starts so

// One entry per island (and per counting island behind a preserving one) of every active patch.
std::vector<PerfMapEntry> patch__island_entries(const Registry& r);
// Make the island lines of /tmp/perf-PID.map match `r` (others' lines, and our trampolines',
// stay). Best effort: a map that cannot be written is a note, the patch stands.
void patch__sync_perfmap(pid_t pid, const Registry& r, const ProgressFn& progress);
// The same from the registry the target holds now (nothing when it cannot be read or trusted).
void patch__sync_perfmap(pid_t pid, const ProgressFn& progress);

// One entry per watch trampoline whose entry jump is in place (every watch of the target).
std::vector<PerfMapEntry> watch__trampoline_entries(const Registry& r);
// Make the watch trampoline lines match `r`; best effort, a failure is a line for people through `note`.
void watch__sync_perfmap(pid_t pid, const Registry& r, const std::function<void(const std::string&)>& note);

}  // namespace hotfix
