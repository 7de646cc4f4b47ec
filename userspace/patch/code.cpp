#include "patch/code.hpp"

#include <unistd.h>

#include <algorithm>
#include <set>

#include "arch/arch.hpp"
#include "common/paths.hpp"
#include "patch/fixlib.hpp"
#include "process/maps.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

namespace {

uint64_t page_size() { return static_cast<uint64_t>(::getpagesize()); }

std::string label(const PatchRecord& p, const FunctionRecord& f) {
  return symbol__demangle(f.mangled) + fmt::format(" (patch {})", p.id);
}

// Is `m` a mapping of p's loaded copy? By path (" (deleted)" once the copy is unlinked), or,
// should the path not match (renamed), by its load base.
bool maps_loaded_copy(const Mapping& m, const PatchRecord& p) {
  if (!m.file_backed()) return false;
  std::string path = m.path;
  const std::string deleted = " (deleted)";
  if (path.ends_with(deleted)) path.resize(path.size() - deleted.size());
  if (!p.loaded_copy.empty() && path == p.loaded_copy) return true;
  return p.load_base && m.start - m.offset == p.load_base && m.path.find(kPatchDir) == 0;
}

// Add the parts of `r` that no range of `out` covers yet.
void add_uncovered(std::vector<AddressRange>& out, const AddressRange& r) {
  std::vector<AddressRange> covered = out;
  std::sort(covered.begin(), covered.end(), [](auto& a, auto& b) { return a.begin < b.begin; });
  uint64_t at = r.begin;
  for (auto& c : covered) {
    if (c.end <= at || c.begin >= r.end) continue;
    if (c.begin > at) out.push_back({at, c.begin, r.name});
    at = std::max(at, c.end);
  }
  if (at < r.end) out.push_back({at, r.end, r.name});
}

}  // namespace

std::vector<AddressRange> patch_code__function(const SymbolTable& table, const PatchRecord& p,
                                               const FunctionRecord& f) {
  std::vector<AddressRange> out;
  std::string name = label(p, f);
  if (auto* fn = table.function_at(f.new_address); fn && fn->size)
    out.push_back({fn->address, fn->address + fn->size, name});
  else
    out.push_back({f.new_address, f.new_address + 1, name});
  bool island_counts = p.counters && !f.trampoline;  // else the replacement's trampoline counts
  if (f.island) {
    uint64_t size = island_counts ? arch::counting_island_size() : arch::island_jump_size();
    if (f.preserve)  // a preserving island, and the counting island it calls right after it
      size = ((arch::preserving_island_size(f.preserve) + 15) & ~15ull) + (island_counts ? size : 0);
    out.push_back({f.island, f.island + size, name + " island"});
  }
  if (f.trampoline)  // the replacement's moved first instructions
    out.push_back({f.trampoline, f.trampoline + arch::counting_trampoline_max_size(), name + " counting trampoline"});
  return out;
}

std::vector<uint64_t> patch_code__island_pages(const PatchRecord& p) {
  std::set<uint64_t> pages;
  for (auto& f : p.functions)
    for (uint64_t a : {f.island, f.trampoline})
      if (a) pages.insert(a & ~(page_size() - 1));
  return {pages.begin(), pages.end()};
}

Result<std::vector<AddressRange>> patch_code__all(pid_t pid, const SymbolTable& table, const PatchRecord& p) {
  std::vector<AddressRange> out;
  for (auto& f : p.functions) {
    auto code = patch_code__function(table, p, f);
    out.insert(out.end(), code.begin(), code.end());
  }
  // Whole island pages (an island of another function on the same page is this patch's too),
  // and the copy's other code: its other functions, PLT, init code. Only the parts not named
  // above, so that a message names the function a thread is in.
  std::vector<AddressRange> more;
  for (uint64_t page : patch_code__island_pages(p))
    more.push_back({page, page + page_size(), fmt::format("an island page of patch {}", p.id)});
  auto maps = HOTFIX_TRY(process__read_maps(pid));
  for (auto& m : maps)
    if (m.executable() && maps_loaded_copy(m, p))
      more.push_back({m.start, m.end, fmt::format("other code of {} (patch {})", p.loaded_copy, p.id)});
  for (auto& r : more) add_uncovered(out, r);
  return out;
}

}  // namespace hotfix
