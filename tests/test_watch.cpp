// hotfix-ctl watch and the uprobe attach layer, against the real `calls` fixture, real BPF.
#include <bpf/bpf.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <functional>
#include <map>
#include <set>
#include <thread>

#include "observe/report.hpp"
#include "observe/uprobe_multi.hpp"
#include "observe/watch.hpp"
#include "support/harness.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono_literals;

namespace {

struct Row {
  long calls = -1, total = -1;
  std::string inflight;  // a number, or "null" without return probes
};

// The value after "key": in a flat JSON object text, up to the next ',' or '}'.
std::string field(const std::string& obj, const std::string& key) {
  auto at = obj.find("\"" + key + "\":");
  if (at == std::string::npos) return {};
  at += key.size() + 3;
  auto end = obj.find_first_of(",}", at);
  std::string v = obj.substr(at, end - at);
  if (v.size() >= 2 && v.front() == '"') v = v.substr(1, v.size() - 2);
  return v;
}

// Rows of one JSON report line, by mangled name.
std::map<std::string, Row> rows_of(const std::string& line) {
  std::map<std::string, Row> rows;
  for (size_t at = line.find("{\"name\""); at != std::string::npos; at = line.find("{\"name\"", at + 1)) {
    std::string obj = line.substr(at, line.find('}', at) - at + 1);
    rows[field(obj, "mangled")] = Row{std::stol(field(obj, "calls")), std::stol(field(obj, "total")), field(obj, "inflight")};
  }
  return rows;
}

std::string final_line(const std::string& out) {
  std::string last;
  size_t start = 0;
  for (size_t nl; (nl = out.find('\n', start)) != std::string::npos; start = nl + 1) {
    std::string line = out.substr(start, nl - start);
    if (line.find("\"final\":true") != std::string::npos) last = line;
  }
  return last;
}

// The fixture, started and answering.
struct Calls {
  Child child{{fixture("calls")}};
  pid_t pid() { return child.pid(); }
  Calls() { REQUIRE(child.request("ready").rfind("ok", 0) == 0); }
  void call(const std::string& name, long n) { REQUIRE(child.request(fmt::format("call {} {}", name, n)).rfind("ok", 0) == 0); }
};

// hotfix-ctl watch as a child; constructed once it has said "watching ...".
struct WatchCtl {
  Child child;
  std::string banner;
  std::string notes;  // the "note:" and "progress:" lines before the banner
  WatchCtl(pid_t pid, std::vector<std::string> extra)
      : child([&] {
          // Exact counts of fast loops: no overhead budget (test_budget tests it).
          std::vector<std::string> argv{ctl(), "watch", "--pid", std::to_string(pid), "--json", "--interval", "0.2",
                                        "--max-overhead", "1e6"};
          argv.insert(argv.end(), extra.begin(), extra.end());
          return argv;
        }()) {
    auto line = child.read_stderr_line(30s);
    while (line && (line->rfind("note: ", 0) == 0 || line->rfind("progress: ", 0) == 0)) {  // notes come first
      notes += *line + "\n";
      line = child.read_stderr_line(30s);
    }
    REQUIRE(line);
    banner = *line;
    INFO(banner << child.drain_stderr());
    REQUIRE(banner.find("watching") != std::string::npos);
  }
  // Stop with SIGINT; returns the rows of the final report.
  std::map<std::string, Row> stop() {
    child.signal(SIGINT);
    std::string out;
    for (int i = 0; i < 200 && child.running(); ++i) out += child.drain_stdout();
    auto code = child.wait(20s);
    out += child.drain_stdout();
    REQUIRE(code == 0);
    auto last = final_line(out);
    INFO(out);
    REQUIRE(!last.empty());
    return rows_of(last);
  }
};

std::set<uint32_t> watch_links() { return bpf_links_of("watch_"); }

// The watch links made since `before` (other tests on the machine make and drop their own).
std::set<uint32_t> new_links(const std::set<uint32_t>& before) {
  std::set<uint32_t> out;
  for (uint32_t id : watch_links())
    if (!before.count(id)) out.insert(id);
  return out;
}

}  // namespace

TEST_CASE("watch counts exactly N calls of every kind of function") {
  require_root();
  Calls calls;
  calls.call("c_add", 0);
  REQUIRE(calls.child.request("load") == "ok");
  WatchCtl watch(calls.pid(), {"c_add", "static_helper", "pricing::discount", "Order::add", "Order::total",
                               "scale(int)", "scale(double)", "max_of<int>", "callee_work", "--inflight"});
  CHECK(watch.banner.find("9 functions") != std::string::npos);
  CHECK(watch.banner.find("uprobe_multi") != std::string::npos);
  // Distinct counts, so a probe attached to the wrong function shows.
  const std::vector<std::pair<std::string, std::pair<std::string, long>>> expected = {
      {"c_add", {"c_add", 1001}},
      {"static_helper", {"_ZL13static_helperi", 7}},
      {"pricing::discount", {"_ZN7pricing8discountEdi", 13}},
      {"Order::add", {"_ZN5Order3addEi", 21}},
      {"Order::total", {"_ZNK5Order5totalEv", 4}},
      {"scale(int)", {"_Z5scalei", 33}},
      {"scale(double)", {"_Z5scaled", 55}},
      {"max_of<int>", {"_Z6max_ofIiET_S0_S0_", 89}},
      {"callee_work", {"callee_work", 144}},
  };
  for (auto& [name, want] : expected) calls.call(name, want.second);
  auto rows = watch.stop();
  for (auto& [name, want] : expected) {
    INFO(name);
    REQUIRE(rows.count(want.first));
    CHECK(rows[want.first].calls == want.second);
    CHECK(rows[want.first].total == want.second);
    CHECK(rows[want.first].inflight == "0");
  }
}

TEST_CASE("watch shows K threads in flight inside a function, then none") {
  require_root();
  Calls calls;
  WatchCtl watch(calls.pid(), {"slow_request", "--inflight"});
  REQUIRE(calls.child.request("block slow_request 3") == "ok");
  // Every report taken after the 3 entries must say 3 in flight: none can return yet.
  std::optional<Row> seen;
  for (int i = 0; i < 100 && !seen; ++i) {
    auto line = watch.child.read_line(10s);
    REQUIRE(line);
    auto rows = rows_of(*line);
    if (rows["slow_request"].total == 3) seen = rows["slow_request"];
  }
  REQUIRE(seen);
  CHECK(seen->inflight == "3");
  REQUIRE(calls.child.request("release slow_request") == "ok");
  auto rows = watch.stop();
  CHECK(rows["slow_request"].total == 3);
  CHECK(rows["slow_request"].inflight == "0");
}

TEST_CASE("watch --no-inflight counts entries only") {
  require_root();
  Calls calls;
  WatchCtl watch(calls.pid(), {"c_add", "--no-inflight"});
  calls.call("c_add", 250);
  auto rows = watch.stop();
  CHECK(rows["c_add"].total == 250);
  CHECK(rows["c_add"].inflight == "null");
}

TEST_CASE("the perf-uprobe fallback counts exactly too") {
  require_root();
  Calls calls;
  REQUIRE(calls.child.request("load") == "ok");
  ::setenv("HOTFIX_FORCE_PERF_UPROBES", "1", 1);
  WatchCtl watch(calls.pid(), {"c_add", "scale(double)", "callee_work", "--count", "uprobe"});
  ::unsetenv("HOTFIX_FORCE_PERF_UPROBES");
  CHECK(watch.banner.find("via perf uprobes") != std::string::npos);
  calls.call("c_add", 300);
  calls.call("scale(double)", 17);
  calls.call("callee_work", 9);
  calls.call("scale(int)", 5);  // not watched
  auto rows = watch.stop();
  CHECK(rows["c_add"].total == 300);
  CHECK(rows["_Z5scaled"].total == 17);
  CHECK(rows["callee_work"].total == 9);
  CHECK(rows.count("_Z5scalei") == 0);
}

TEST_CASE("watch ends with a final report when the target exits") {
  require_root();
  Calls calls;
  WatchCtl watch(calls.pid(), {"c_add"});
  calls.call("c_add", 42);
  REQUIRE(calls.child.request("quit") == "ok");
  REQUIRE(calls.child.wait(10s));
  std::string out;
  for (int i = 0; i < 200 && watch.child.running(); ++i) out += watch.child.drain_stdout();
  REQUIRE(watch.child.wait(20s) == 0);
  out += watch.child.drain_stdout();
  CHECK(watch.child.drain_stderr().find(fmt::format("pid {} exited", calls.pid())) != std::string::npos);
  auto last = final_line(out);
  REQUIRE(!last.empty());
  CHECK(rows_of(last)["c_add"].total == 42);
}

TEST_CASE("watch errors: one line, exit 1; usage errors exit 2") {
  require_root();
  auto one_line = [](const std::string& s) { return !s.empty() && s.find('\n') == s.size() - 1; };
  SECTION("no such pid") {
    auto r = run({ctl(), "watch", "--pid", "999999999", "c_add"});
    CHECK(r.exit_code == 1);
    CHECK(one_line(r.err));
    CHECK(r.err.find("no process with pid 999999999") != std::string::npos);
  }
  SECTION("no match, with did-you-mean") {
    Calls calls;
    auto r = run({ctl(), "watch", "--pid", std::to_string(calls.pid()), "c_ad"});
    CHECK(r.exit_code == 1);
    CHECK(one_line(r.err));
    CHECK(r.err.find("c_add") != std::string::npos);
  }
  SECTION("usage") {
    CHECK(run({ctl(), "watch", "--pid", "1"}).exit_code == 2);
    CHECK(run({ctl(), "watch", "c_add"}).exit_code == 2);
    CHECK(run({ctl(), "watch", "--pid", "1", "c_add", "--interval", "0"}).exit_code == 2);
    CHECK(run({ctl(), "watch", "--pid", "1", "c_add", "--interval", "soon"}).exit_code == 2);
    CHECK(run({ctl(), "watch", "--pid", "1", "c_add", "--duration", "-1"}).exit_code == 2);
  }
}

TEST_CASE("no watch link outlives watch, even a SIGKILLed one") {
  require_root();
  Calls calls;
  for (int sig : {SIGINT, SIGKILL}) {
    INFO("signal " << sig);
    std::set<uint32_t> ours;
    {
      auto before = watch_links();
      WatchCtl watch(calls.pid(), {"c_add", "scale(int)", "--inflight"});
      ours = new_links(before);
      CHECK(ours.size() >= 2);  // entry + return link of one object
      watch.child.signal(sig);
      REQUIRE(watch.child.wait(20s));
    }
    for (uint32_t id : watch_links()) CHECK(ours.count(id) == 0);
  }
}

TEST_CASE("a SIGKILLed watch on perf uprobes leaves nothing attached: no link, no breakpoint") {
  require_root();
  Calls calls;
  auto table = SymbolTable::for_pid(calls.pid());
  REQUIRE(table);
  auto fns = symbols__select(*table, {"c_add", "scale(int)"});
  REQUIRE(fns);
  REQUIRE(fns->size() == 2);
  auto entry_bytes = [&] {
    std::vector<unsigned char> out;
    for (auto& f : *fns) out.push_back(read_memory(calls.pid(), f.address, 1).at(0));
    return out;
  };
  std::vector<unsigned char> file;
  for (auto& f : *fns) file.push_back(file_bytes(calls.pid(), f.address, 1).at(0));
  REQUIRE(entry_bytes() == file);
  auto before = watch_links();
  std::set<uint32_t> ours;
  {
    ::setenv("HOTFIX_FORCE_PERF_UPROBES", "1", 1);
    WatchCtl watch(calls.pid(), {"c_add", "scale(int)", "--count", "uprobe", "--inflight"});
    ::unsetenv("HOTFIX_FORCE_PERF_UPROBES");
    CHECK(watch.banner.find("via perf uprobes") != std::string::npos);
    ours = new_links(before);
    CHECK(entry_bytes() == std::vector<unsigned char>{0xcc, 0xcc});
    watch.child.signal(SIGKILL);
    REQUIRE(watch.child.wait(20s));
  }
  // The kernel drops a perf uprobe with the last file descriptor of its event: the killed
  // watch's exit closed them all, so no breakpoint and no link is left.
  for (int i = 0; i < 100 && entry_bytes() != file; ++i) std::this_thread::sleep_for(20ms);
  CHECK(entry_bytes() == file);
  for (uint32_t id : watch_links()) CHECK(ours.count(id) == 0);
  calls.call("c_add", 3);
}

TEST_CASE("attach layer: 1000 functions, one link per object and direction, exact counts") {
  require_root();
  Child many({fixture("calls_many")});
  REQUIRE(many.request("ready").rfind("ok", 0) == 0);
  auto table = SymbolTable::for_pid(many.pid());
  REQUIRE(table);
  auto fns = symbols__select(*table, {"many_*"});
  REQUIRE(fns);
  REQUIRE(fns->size() == 1000);
  for (auto mechanism : {ProbeMechanism::uprobe_multi, ProbeMechanism::perf}) {
    INFO(probe_mechanism__name(mechanism));
    // Perf uprobes take ~0.1 s each to detach: exercise them on a few functions only.
    std::vector<Function> subset(fns->begin(), fns->begin() + (mechanism == ProbeMechanism::perf ? 3 : 1000));
    if (mechanism == ProbeMechanism::perf) subset.push_back(fns->back());
    auto watch = Watch::attach(many.pid(), subset, WatchOptions{.returns = true, .mechanism = mechanism});
    REQUIRE(watch);
    CHECK(watch->mechanism() == mechanism);
    CHECK(watch->link_count() == (mechanism == ProbeMechanism::uprobe_multi ? 2 : 2 * subset.size()));
    REQUIRE(many.request("call").rfind("ok", 0) == 0);  // many_0(1); many_999(2)
    auto counts = watch->read();
    REQUIRE(counts);
    long total = 0;
    for (size_t i = 0; i < subset.size(); ++i) {
      long want = (subset[i].name == "many_0" || subset[i].name == "many_999") ? 1 : 0;
      INFO(subset[i].name);
      CHECK((*counts)[i].calls == static_cast<uint64_t>(want));
      CHECK((*counts)[i].inflight() == 0);
      total += static_cast<long>((*counts)[i].calls);
    }
    CHECK(total == 2);
  }
}

TEST_CASE("attach layer: a dead pid is refused with a clear error") {
  require_root();
  pid_t dead;
  {
    Calls calls;
    dead = calls.pid();
  }
  Function f;
  f.name = "c_add";
  f.object = fixture("calls");
  f.offset = 0x1000;
  auto watch = Watch::attach(dead, {f});
  REQUIRE(!watch);
  CHECK(watch.error().exit_code == 1);
  CHECK(watch.error().what.find(std::to_string(dead)) != std::string::npos);
}

TEST_CASE("by default, C++ code is watched without return probes, so exceptions stay safe") {
  require_root();
  Calls calls;
  WatchCtl watch(calls.pid(), {"thrower", "catcher"});
  CHECK(calls.child.request("call catcher 5") == "ok -1");  // every call threw and was caught
  CHECK(calls.child.running());
  auto rows = watch.stop();
  CHECK(rows["_Z7throweri"].total == 5);
  CHECK(rows["_Z7catcheri"].inflight == "null");
}

TEST_CASE("entry probes (--no-inflight) are safe for code that throws through them") {
  require_root();
  Calls calls;
  WatchCtl watch(calls.pid(), {"thrower", "catcher", "--no-inflight"});
  CHECK(calls.child.request("call catcher 5") == "ok -1");  // every call threw and was caught
  CHECK(calls.child.running());
  auto rows = watch.stop();
  CHECK(rows["_Z7throweri"].total == 5);
  CHECK(rows["_Z7catcheri"].total == 5);
}

namespace {

// A fixture that answers "ready"; nullptr (and a WARN saying why) when it was not built.
std::unique_ptr<Child> start_optional(const std::string& name, const std::string& why_missing) {
  if (::access(fixture(name).c_str(), X_OK) != 0) {
    WARN("SKIP part: " << fixture(name) << " was not built: " << why_missing);
    return nullptr;
  }
  auto c = std::make_unique<Child>(std::vector<std::string>{fixture(name)});
  REQUIRE(c->request("ready").rfind("ok", 0) == 0);
  return c;
}

// Every row of one JSON report line whose mangled name is `mangled` (a name may be in
// several objects, or twice in one: memcpy's IFUNC and its compat version).
std::vector<Row> rows_named(const std::string& line, const std::string& mangled) {
  std::vector<Row> out;
  for (size_t at = line.find("{\"name\""); at != std::string::npos; at = line.find("{\"name\"", at + 1)) {
    std::string obj = line.substr(at, line.find('}', at) - at + 1);
    if (field(obj, "mangled") == mangled)
      out.push_back(Row{std::stol(field(obj, "calls")), std::stol(field(obj, "total")), field(obj, "inflight")});
  }
  return out;
}

long sum_calls(const std::vector<Row>& rows) {
  long n = 0;
  for (auto& r : rows) n += r.total;
  return n;
}

// The final JSON line of a watch that ran while `drive` talked to the target.
std::string final_json(pid_t pid, std::vector<std::string> args, const std::function<void()>& drive) {
  WatchCtl watch(pid, std::move(args));
  drive();
  watch.child.signal(SIGINT);
  std::string out;
  for (int i = 0; i < 200 && watch.child.running(); ++i) out += watch.child.drain_stdout();
  REQUIRE(watch.child.wait(20s) == 0);
  out += watch.child.drain_stdout();
  return final_line(out);
}

}  // namespace

TEST_CASE("watch memcpy counts the calls of the IFUNC's implementation, not its resolver") {
  require_root();
  auto target = start_optional("libc_names", "see tests/fixtures/calls.cmake");
  REQUIRE(target);
  constexpr long N = 5000;
  std::string last;
  std::string line = final_json(target->pid(), {"memcpy", "free", "--object", "libc.so.6"}, [&] {
    REQUIRE(target->request(fmt::format("memcpy {}", N)).rfind("ok", 0) == 0);
    REQUIRE(target->request(fmt::format("free {}", N)).rfind("ok", 0) == 0);
  });
  INFO(line);
  // libc's own copies (stdio's) run the same implementation: at least N, and not many more.
  long memcpy_calls = sum_calls(rows_named(line, "memcpy"));
  CHECK(memcpy_calls >= N);
  CHECK(memcpy_calls <= N + 100);
  // free is shown as free (not cfree, its compat alias) and counted.
  CHECK(line.find("\"name\":\"free\"") != std::string::npos);
  CHECK(line.find("cfree") == std::string::npos);
  long free_calls = sum_calls(rows_named(line, "free"));
  CHECK(free_calls >= N);
  CHECK(free_calls <= N + 100);
}

TEST_CASE("watch tables cut long names with an ellipsis and hide never-called rows beyond --top") {
  require_root();
  auto target = start_optional("libc_names", "see tests/fixtures/calls.cmake");
  REQUIRE(target);
  const std::string long_one = "a_function_with_a_name_so_long_that_no_table_column_should_ever_have_to_show_it_whole_one";
  Child watch({ctl(), "watch", "--pid", std::to_string(target->pid()), "a_function_*", "--top", "1",
               "--interval", "60"});
  auto banner = watch.read_stderr_line(30s);
  while (banner && banner->rfind("note: ", 0) == 0) banner = watch.read_stderr_line(30s);
  REQUIRE(banner);
  REQUIRE(banner->find("watching") != std::string::npos);
  REQUIRE(target->request("long 7").rfind("ok", 0) == 0);
  watch.signal(SIGINT);
  REQUIRE(watch.wait(20s) == 0);
  std::string out = watch.drain_stdout();
  INFO(out);
  // 2 functions, --top 1: the called one shows, the other is counted as hidden.
  CHECK(out.find(long_one) == std::string::npos);
  CHECK(out.find(long_one.substr(0, 59) + "\u2026") != std::string::npos);
  CHECK(out.find("(1 more function not shown: 1 never called") != std::string::npos);
  // With --top 0 every row shows, the never-called one too.
  Child all({ctl(), "watch", "--pid", std::to_string(target->pid()), "a_function_*", "--top", "0", "--duration", "0.5"});
  REQUIRE(all.wait(30s) == 0);
  std::string table = all.drain_stdout();
  INFO(table);
  const std::string cut = long_one.substr(0, 59) + "\u2026";  // both names cut at the same column
  size_t rows = 0;
  for (size_t at = table.find(cut); at != std::string::npos; at = table.find(cut, at + 1)) rows++;
  CHECK(rows == 2);
  CHECK(table.find("not shown") == std::string::npos);
  // --json keeps the names whole.
  Child json({ctl(), "watch", "--pid", std::to_string(target->pid()), "a_function_*", "--json", "--duration", "0.5"});
  REQUIRE(json.wait(30s) == 0);
  CHECK(json.drain_stdout().find(long_one) != std::string::npos);
}

TEST_CASE("a Rust program is watched by hash-less path, legacy and v0 mangling, counts exact") {
  require_root();
  for (std::string variant : {"rs_pricing", "rs_pricing_v0"}) {
    INFO(variant);
    auto target = start_optional(variant, "Debian's rustc (/usr/bin/rustc) is not installed");
    if (!target) continue;
    std::string line = final_json(target->pid(), {"main::pricing::discount", "pricing::Order::total"}, [&] {
      REQUIRE(target->request("discount 1234").rfind("ok ", 0) == 0);
      REQUIRE(target->request("total 56").rfind("ok ", 0) == 0);
    });
    INFO(line);
    long discount = -1, total = -1;
    for (size_t at = line.find("{\"name\""); at != std::string::npos; at = line.find("{\"name\"", at + 1)) {
      std::string obj = line.substr(at, line.find('}', at) - at + 1);
      std::string name = field(obj, "name");
      if (name == "main::pricing::discount") discount = std::stol(field(obj, "total"));
      if (name == "<main::pricing::Order>::total" || name == "main::pricing::Order::total")
        total = std::stol(field(obj, "total"));
    }
    CHECK(discount == 1234 + 56);  // Order::total calls discount once per call
    CHECK(total == 56);
    CHECK(line.find("::h") == std::string::npos);  // shown without the hash, like rustfilt
  }
}
// The fixture with a function the kernel refuses to probe (its first instruction is lock-prefixed).
struct Unprobeable {
  Child child{{fixture("unprobeable")}};
  pid_t pid() { return child.pid(); }
  Unprobeable() { REQUIRE(child.request("ready").rfind("ok", 0) == 0); }
};

TEST_CASE("this kernel's uprobe_multi is found with a known-good probe, once") {
  require_root();
  auto available = uprobe_multi__available();
  REQUIRE(available);
  CHECK(*available);  // Linux 6.6+: tools/check runs on one
  auto again = uprobe_multi__available();  // cached: asked once per process
  CHECK((again && *again));
}

TEST_CASE("an unprobeable function is skipped and named; the others are counted exactly, on both mechanisms") {
  require_root();
  Unprobeable target;
  auto table = SymbolTable::for_pid(target.pid());
  REQUIRE(table);
  auto fns = symbols__select(*table, {"refcount_up", "plain_count", "plain_other"});
  REQUIRE(fns);
  REQUIRE(fns->size() == 3);
  for (auto mechanism : {ProbeMechanism::uprobe_multi, ProbeMechanism::perf}) {
    INFO(probe_mechanism__name(mechanism));
    auto watch = Watch::attach(target.pid(), *fns, WatchOptions{.returns = true, .mechanism = mechanism});
    REQUIRE(watch);
    CHECK(watch->mechanism() == mechanism);  // a refused offset is no reason to fall back
    REQUIRE(watch->skipped().size() == 1);
    CHECK(watch->skipped()[0].function.name == "refcount_up");
    CHECK(watch->skipped()[0].err == 524);  // the kernel's ENOTSUPP
    REQUIRE(watch->functions().size() == 2);
    REQUIRE(target.child.request("call 77").rfind("ok", 0) == 0);
    auto counts = watch->read();
    REQUIRE(counts);
    for (size_t i = 0; i < 2; ++i) {
      INFO(watch->functions()[i].name);
      CHECK(watch->functions()[i].name != "refcount_up");
      CHECK((*counts)[i].calls == 77);
      CHECK((*counts)[i].inflight() == 0);
    }
    auto line = watch__skipped_line(watch->skipped());
    CHECK(line.find("skipped 1 function the kernel cannot probe") != std::string::npos);
    CHECK(line.find("refcount_up (unprobeable+0x") != std::string::npos);
    CHECK(line.find("ENOTSUPP") != std::string::npos);
  }
}

TEST_CASE("watch names the unprobeable function in one note and watches the rest") {
  require_root();
  Unprobeable target;
  WatchCtl watch(target.pid(), {"refcount_up", "plain_count", "plain_other", "--count", "uprobe"});
  CHECK(watch.banner.find("watching 2 functions") != std::string::npos);
  CHECK(watch.banner.find("uprobe_multi") != std::string::npos);
  INFO(watch.notes);
  size_t note = watch.notes.find("note: skipped 1 function the kernel cannot probe");
  REQUIRE(note != std::string::npos);
  std::string line = watch.notes.substr(note, watch.notes.find('\n', note) - note);
  CHECK(line.find("refcount_up") != std::string::npos);
  REQUIRE(target.child.request("call 250") == "ok 250");
  auto rows = watch.stop();
  CHECK(rows["plain_count"].total == 250);
  CHECK(rows["plain_other"].total == 250);
  CHECK(rows.count("refcount_up") == 0);
}

TEST_CASE("a SIGKILLed watch of 1000 functions leaves no link and the file's bytes") {
  require_root();
  Child many({fixture("calls_many")});
  REQUIRE(many.request("ready").rfind("ok", 0) == 0);
  auto table = SymbolTable::for_pid(many.pid());
  REQUIRE(table);
  auto fns = symbols__select(*table, {"many_*"});
  REQUIRE(fns);
  auto before = watch_links();
  std::set<uint32_t> ours;
  auto text = [&] {
    std::vector<unsigned char> bytes;
    for (auto& f : *fns) {
      auto b = read_memory(many.pid(), f.address, 1);
      bytes.insert(bytes.end(), b.begin(), b.end());
    }
    return bytes;
  };
  auto original = text();
  CHECK(std::count(original.begin(), original.end(), 0xcc) == 0);
  {
    WatchCtl watch(many.pid(), {"many_*", "--count", "uprobe"});
    CHECK(watch.banner.find("watching 1000 functions") != std::string::npos);
    auto during = text();
    CHECK(std::count(during.begin(), during.end(), 0xcc) == 1000);  // every entry holds a breakpoint
    ours = new_links(before);
    CHECK(!ours.empty());
    watch.child.signal(SIGKILL);
    REQUIRE(watch.child.wait(20s));
  }
  // Links are file descriptors: the kernel released them when the killed watch's files closed.
  for (uint32_t id : watch_links()) CHECK(ours.count(id) == 0);
  CHECK(text() == original);
  REQUIRE(many.request("call").rfind("ok", 0) == 0);
}
