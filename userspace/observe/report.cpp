#include "observe/report.hpp"

#include <algorithm>
#include <numeric>

#include "common/json.hpp"

namespace hotfix {

namespace {

std::string human_ns(double ns) {
  if (ns <= 0) return "-";
  if (ns < 1e3) return fmt::format("{:.0f} ns", ns);
  if (ns < 1e6) return fmt::format("{:.1f} us", ns / 1e3);
  if (ns < 1e9) return fmt::format("{:.1f} ms", ns / 1e6);
  return fmt::format("{:.2f} s", ns / 1e9);
}

std::vector<size_t> rows_by_calls(const WatchSample& s) {
  std::vector<size_t> rows(s.functions->size());
  std::iota(rows.begin(), rows.end(), 0);
  std::stable_sort(rows.begin(), rows.end(), [&](size_t a, size_t b) {
    if (s.interval[a].calls != s.interval[b].calls) return s.interval[a].calls > s.interval[b].calls;
    return s.total[a].calls > s.total[b].calls;
  });
  return rows;
}

}  // namespace

std::string watch__format_table(const WatchSample& s) {
  auto rows = rows_by_calls(s);
  size_t width = 8;
  for (auto& f : *s.functions) width = std::max(width, std::min<size_t>(f.name.size(), 60));
  std::string out = s.final ? fmt::format("final, over {:.1f} s:\n", s.interval_s) : std::string();
  out += fmt::format("{:<{}}  {:>10}  {:>10}  {:>12}  {:>9}  {:>12}\n", "function", width, s.final ? "calls" : "calls",
                     "calls/s", "total", "in-flight", "mean latency");
  bool any = std::any_of(s.total.begin(), s.total.end(), [](auto& c) { return c.calls > 0; });
  for (size_t i : rows) {
    const auto& f = (*s.functions)[i];
    const auto& now = s.interval[i];
    const auto& all = s.total[i];
    if (any && all.calls == 0) continue;
    std::string name = f.name.size() > width ? f.name.substr(0, width - 3) + "..." : f.name;
    double rate = s.interval_s > 0 ? double(now.calls) / s.interval_s : 0;
    std::string inflight = s.inflight_known ? fmt::format("{}", all.inflight()) : "-";
    out += fmt::format("{:<{}}  {:>10}  {:>10.1f}  {:>12}  {:>9}  {:>12}\n", name, width, now.calls, rate, all.calls,
                       inflight, human_ns(now.mean_latency_ns()));
  }
  return out;
}

std::string watch__format_json(const WatchSample& s) {
  std::string fns;
  for (size_t i : rows_by_calls(s)) {
    const auto& f = (*s.functions)[i];
    const auto& now = s.interval[i];
    const auto& all = s.total[i];
    if (!fns.empty()) fns += ",";
    fns += fmt::format(
        R"({{"name":{},"mangled":{},"object":{},"address":"{:#x}","calls":{},"total":{},"inflight":{},"mean_latency_ns":{}}})",
        json__quote(f.name), json__quote(f.mangled), json__quote(f.object), f.address, now.calls, all.calls,
        s.inflight_known ? fmt::format("{}", all.inflight()) : "null",
        now.latency_samples ? fmt::format("{:.0f}", now.mean_latency_ns()) : "null");
  }
  return fmt::format(R"({{"time":{:.3f},"interval_s":{:.3f},{}"functions":[{}]}})", s.time, s.interval_s,
                     s.final ? R"("final":true,)" : "", fns);
}

}  // namespace hotfix
