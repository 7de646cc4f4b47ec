// What the coverage check costs (patch/coverage.hpp): one DWARF walk over the object that
// holds the planned functions, looking for their inlined copies and clones. Measured on
// hotfix-ctl itself (C++, RelWithDebInfo: a large .debug_info) and on the cov_target fixture.
//   bench_coverage [--quick] [FILE FUNCTION...]   (with FILE: also lists the places found)
#include <fmt/core.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "patch/coverage.hpp"

using namespace hotfix;

namespace {

std::vector<Function> functions_named(const SymbolTable& t, const std::vector<std::string>& names) {
  std::vector<Function> out;
  for (auto& n : names)
    for (auto& f : t.functions())
      if (f.name == n || f.mangled == n || f.name.starts_with(n + "(") || f.name.starts_with(n + "[") ||
          std::find(f.aliases.begin(), f.aliases.end(), n) != f.aliases.end()) {
        out.push_back(f);
        break;
      }
  return out;
}

void bench(const std::string& file, const std::vector<std::string>& names, int runs, bool list = false) {
  auto table = SymbolTable::for_file(file);
  if (!table) {
    fmt::print("{}: {}\n", file, table.error().line());
    return;
  }
  auto planned = functions_named(*table, names);
  struct stat st {};
  ::stat(file.c_str(), &st);
  std::vector<double> ms;
  CoverageFindings found;
  for (int i = 0; i < runs; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    found = coverage__find(*table, planned, [](const std::string&) { return false; });
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  size_t inlined = std::count_if(found.places.begin(), found.places.end(), [](auto& p) { return p.place.kind == "inlined"; });
  fmt::print("| {} ({:.1f} MB) | {} | {} | {} | {} | {} | {:.1f} | {:.1f} |\n", file.substr(file.rfind('/') + 1),
             st.st_size / 1e6, planned.size(), found.units, found.dies, inlined, found.places.size() - inlined, ms[runs / 2],
             found.walk_ms);
  if (list)
    for (auto& p : found.places)
      fmt::print("    {}{}{}\n", coverage__describe(p.place), p.detail.empty() ? "" : ", " + p.detail,
                 p.covered ? " (covered)" : "");
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  bool quick = !args.empty() && args[0] == "--quick";
  if (quick) args.erase(args.begin());
  int runs = quick ? 1 : 5;
  fmt::print("coverage check: one DWARF walk of the planned functions' object (median of {} run(s))\n\n", runs);
  fmt::print("| object | functions | units walked | DWARF entries visited | inlined copies | clones+aliases | total ms | walk ms |\n");
  fmt::print("|---|---|---|---|---|---|---|---|\n");
  if (!args.empty()) {
    bench(args[0], {args.begin() + 1, args.end()}, runs, true);
    return 0;
  }
  bench(std::string(HOTFIX_FIXTURES) + "/cov_target", {"tax", "scale", "price"}, runs);
  // A function from a .cpp file (its own unit only), then one from a header (every unit).
  bench(HOTFIX_CTL, {"hotfix::symbols__demangle"}, runs);
  bench(HOTFIX_CTL, {"hotfix::json__escape"}, runs);
  return 0;
}
