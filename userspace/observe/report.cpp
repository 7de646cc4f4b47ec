#include "observe/report.hpp"

#include <algorithm>
#include <map>
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

std::string basename_of(const std::string& path) { return path.substr(path.rfind('/') + 1); }

// Row labels: the name, and where a name appears more than once (memcpy in libc and in
// ld.so, a static helper in two files) the object and file offset that tell them apart.
std::vector<std::string> row_labels(const std::vector<Function>& fs) {
  std::map<std::string, int> seen;
  for (auto& f : fs) seen[f.name]++;
  std::vector<std::string> out;
  for (auto& f : fs)
    out.push_back(seen[f.name] > 1 ? fmt::format("{} ({}+{:#x})", f.name, basename_of(f.object), f.offset) : f.name);
  return out;
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

// In flight: calls the probes saw enter and not return, plus threads inside from before.
int64_t inflight_of(const WatchSample& s, size_t i) {
  return s.total[i].inflight() + (i < s.seeded.size() ? s.seeded[i] : 0);
}
size_t inflight_unknown(const WatchSample& s, size_t i) { return i < s.seeded_unknown.size() ? s.seeded_unknown[i] : 0; }

ReturnProbes returns_of(const WatchSample& s, size_t i) {
  if (i < s.returns.size()) return s.returns[i];
  return s.inflight_known ? ReturnProbes::on : ReturnProbes::off;
}

}  // namespace

std::string watch__format_table(const WatchSample& s) {
  auto rows = rows_by_calls(s);
  size_t n = rows.size();
  bool crowded = s.top && n > s.top;
  if (crowded) {
    std::erase_if(rows, [&](size_t i) { return s.total[i].calls == 0; });
    if (rows.size() > s.top) rows.resize(s.top);
  }
  auto labels = row_labels(*s.functions);
  size_t width = 8;
  for (size_t i : rows) width = std::max(width, std::min(labels[i].size(), kTableNameWidth));
  std::string out = s.final ? fmt::format("final, over {:.1f} s:\n", s.interval_s) : std::string();
  out += fmt::format("{:<{}}  {:>10}  {:>10}  {:>12}  {:>9}  {:>12}\n", "function", width, "calls", "calls/s", "total",
                     "in-flight", "mean latency");
  for (size_t i : rows) {
    const auto& now = s.interval[i];
    const auto& all = s.total[i];
    double rate = s.interval_s > 0 ? double(now.calls) / s.interval_s : 0;
    auto returns = returns_of(s, i);
    std::string inflight = returns == ReturnProbes::on ? fmt::format("{}{}", inflight_of(s, i), inflight_unknown(s, i) ? "+?" : "") : "-";
    std::string latency = human_ns(now.mean_latency_ns());
    if (returns == ReturnProbes::go) inflight = latency = "n/a (Go)";
    out += fmt::format("{:<{}}  {:>10}  {:>10.1f}  {:>12}  {:>9}  {:>12}\n", symbols__shorten(labels[i], width), width,
                       now.calls, rate, all.calls, inflight, latency);
  }
  if (size_t hidden = n - rows.size()) {
    size_t never = static_cast<size_t>(std::count_if(s.total.begin(), s.total.end(), [](auto& c) { return c.calls == 0; }));
    out += fmt::format("({} more function{} not shown: {} never called; --top N shows more, --json all)\n", hidden,
                       hidden == 1 ? "" : "s", never);
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
        R"({{"name":{},"mangled":{},"object":{},"address":"{:#x}","calls":{},"total":{},"inflight":{}{},"mean_latency_ns":{}{}}})",
        json__quote(f.name), json__quote(f.mangled), json__quote(f.object), f.address, now.calls, all.calls,
        returns_of(s, i) == ReturnProbes::on ? fmt::format("{}", inflight_of(s, i)) : "null",
        inflight_unknown(s, i) ? fmt::format(R"(,"inflight_unknown":{})", inflight_unknown(s, i)) : "",
        now.latency_samples ? fmt::format("{:.0f}", now.mean_latency_ns()) : "null",
        returns_of(s, i) == ReturnProbes::go ? R"(,"inflight_na":"Go")" : "");
  }
  return fmt::format(R"({{"time":{:.3f},"interval_s":{:.3f},{}"functions":[{}]}})", s.time, s.interval_s,
                     s.final ? R"("final":true,)" : "", fns);
}

std::string watch__skipped_line(const std::vector<SkippedFunction>& skipped) {
  constexpr size_t kNamed = 64;  // watch '*' on redis-server skips 34: all named
  std::vector<std::string> reasons;  // in order of first appearance
  std::map<std::string, std::string> named;
  for (size_t i = 0; i < std::min(skipped.size(), kNamed); ++i) {
    const auto& f = skipped[i].function;
    auto slash = f.object.rfind('/');
    std::string object = slash == std::string::npos ? f.object : f.object.substr(slash + 1);
    auto& names = named[skipped[i].reason];
    if (names.empty()) reasons.push_back(skipped[i].reason);
    names += fmt::format("{}{} ({}+{:#x})", names.empty() ? "" : ", ", f.name, object, f.offset);
  }
  std::string out = fmt::format("skipped {} function{} the kernel cannot probe, watching the others", skipped.size(),
                                skipped.size() == 1 ? "" : "s");
  for (auto& r : reasons) out += fmt::format("; {}: {}", r, named[r]);
  if (skipped.size() > kNamed) out += fmt::format("; and {} more", skipped.size() - kNamed);
  return out;
}

}  // namespace hotfix
