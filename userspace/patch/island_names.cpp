#include "patch/island_names.hpp"

#include <filesystem>

#include <fmt/format.h>

#include "arch/arch.hpp"
#include "patch/fixlib.hpp"

namespace hotfix {

namespace {

uint64_t aligned(uint64_t n) { return (n + 15) & ~15ull; }  // islands are placed on 16-byte steps

// The islands of one function, laid out as patch/apply.cpp writes them.
void add_islands(const PatchRecord& p, const FunctionRecord& f, std::vector<PerfMapEntry>& out) {
  std::string what = fmt::format("{} -> {}", symbol__demangle(f.mangled), std::filesystem::path(p.library).filename().string());
  auto name = [&](const char* kind) { return fmt::format("{}{}: {}", kIslandPerfName, kind, what); };
  bool counting = p.counters != 0 && !f.trampoline;  // else the replacement's own trampoline counts
  if (f.preserve) {
    uint64_t own = aligned(arch::preserving_island_size(f.preserve));
    out.push_back({f.island, own, name(" (preserving)")});
    if (counting) out.push_back({f.island + own, arch::counting_island_size(), name(" (counting)")});
  } else if (counting) {
    out.push_back({f.island, arch::counting_island_size(), name(" (counting)")});
  } else {
    out.push_back({f.island, arch::island_jump_size(), name("")});
  }
}

}  // namespace

std::vector<PerfMapEntry> patch__island_entries(const Registry& r) {
  std::vector<PerfMapEntry> out;
  for (auto& p : r.patches) {
    if (p.state != PatchState::active) continue;
    for (auto& f : p.functions) {
      if (f.island) add_islands(p, f, out);
      if (f.trampoline)
        out.push_back({f.trampoline, arch::counting_trampoline_max_size(),
                       fmt::format("{} (counting trampoline): {} in {}", kIslandPerfName, symbol__demangle(f.mangled),
                                   std::filesystem::path(p.library).filename().string())});
    }
  }
  return out;
}

void patch__sync_perfmap(pid_t pid, const Registry& r, const ProgressFn& progress) {
  if (auto ok = perfmap__sync(pid, kIslandPerfName, patch__island_entries(r)); !ok)
    progress(fmt::format("note: {}", ok.error().line()));
}

void patch__sync_perfmap(pid_t pid, const ProgressFn& progress) {
  auto r = registry__read(pid);
  if (r && r->authentic) patch__sync_perfmap(pid, *r, progress);
}

std::vector<PerfMapEntry> watch__trampoline_entries(const Registry& r) {
  std::vector<PerfMapEntry> out;
  for (auto& w : r.watches)
    for (auto& s : w.stubs)
      out.push_back({s.stub, arch::counting_trampoline_max_size(),
                     fmt::format("{}: {}", kWatchPerfName, symbol__demangle(s.name))});
  return out;
}

void watch__sync_perfmap(pid_t pid, const Registry& r, const std::function<void(const std::string&)>& note) {
  if (auto ok = perfmap__sync(pid, kWatchPerfName, watch__trampoline_entries(r)); !ok && note)
    note(ok.error().line());
}

}  // namespace hotfix
