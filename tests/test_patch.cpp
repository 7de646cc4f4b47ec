// End to end: `hotfix-ctl patch / list / revert` on tests/fixtures/patchee.cpp, a process
// whose eight workers check every result of the functions we patch while we patch them.
// Every refusal must leave the target exactly as it was (see expect_untouched).
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "support/harness.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix::test;
using namespace std::chrono;

namespace {

struct Counts {
  long old_n = 0, new1 = 0, new2 = 0, bad = 0;
  long calls() const { return old_n + new1 + new2 + bad; }
};

bool maps_contain(pid_t pid, const std::string& needle) {
  return read_file("/proc/" + std::to_string(pid) + "/maps").find(needle) != std::string::npos;
}

int json_int(const std::string& json, const std::string& key) {
  std::smatch m;
  if (!std::regex_search(json, m, std::regex("\"" + key + "\":([0-9]+)"))) return -1;
  return std::stoi(m[1]);
}

// How patch and list --json show a replaced function: name, mangled, old address.
std::string fmt_hex_function(const std::string& name, uint64_t address) {
  char old[32];
  std::snprintf(old, sizeof old, "0x%lx", static_cast<unsigned long>(address));
  return "{\"name\":\"" + name + "\",\"mangled\":\"" + name + "\",\"old\":\"" + old + "\"";
}

constexpr size_t kTextBytes = 16;  // the entry jump covers at most the first instructions

// The fixture: its functions' addresses and a way to ask it things.
struct Patchee {
  Child child;
  std::map<std::string, uint64_t> fn;

  Patchee() : child({fixture("patchee")}) {
    for (;;) {
      auto line = child.read_line();
      REQUIRE(line);
      std::istringstream in(*line);
      std::string kind, name, value;
      in >> kind >> name >> value;
      if (kind == "fn") fn[name] = std::stoull(value, nullptr, 16);
      else if (kind == "ready") break;
    }
    REQUIRE(fn.size() == 13);
  }
  ~Patchee() {
    child.signal(SIGKILL);
    child.wait();
    // What the patches the dead process still had leave behind: their bound copies, and
    // their hit counters and old-code probes pinned in bpffs.
    std::error_code ec;
    std::filesystem::remove_all("/run/hotfix/" + std::to_string(pid()), ec);
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(pid()), ec);
    std::filesystem::remove("/tmp/perf-" + std::to_string(pid()) + ".map", ec);  // its islands' perf names
  }
  pid_t pid() const { return child.pid(); }

  std::string ask(const std::string& cmd) { return child.request(cmd); }

  std::map<std::string, Counts> stats() {
    child.send("stats");
    std::map<std::string, Counts> out;
    for (;;) {
      auto line = child.read_line();
      REQUIRE(line);
      if (line->rfind("ok", 0) == 0) break;
      std::istringstream in(*line);
      std::string kind, name;
      Counts c;
      in >> kind >> name >> c.old_n >> c.new1 >> c.new2 >> c.bad;
      if (kind == "stat") out[name] = c;
    }
    REQUIRE(out.size() == 10);
    return out;
  }

  // Zero the counts, let the workers run, and return what they saw since.
  // No bad result since the last reset either (the calls made while we patched).
  std::map<std::string, Counts> fresh_stats(milliseconds settle = milliseconds(20)) {
    for (auto& [name, c] : stats()) {
      INFO(name << ": bad results before this reset");
      REQUIRE(c.bad == 0);
    }
    REQUIRE(ask("reset") == "ok reset");
    std::this_thread::sleep_for(settle);  // calls that started before the reset are counted now
    REQUIRE(ask("reset") == "ok reset");
    for (int i = 0; i < 200; ++i) {
      std::this_thread::sleep_for(milliseconds(20));
      auto s = stats();
      bool all_called = true;
      for (auto& [name, c] : s) all_called &= c.calls() >= 20;
      if (all_called) return s;
    }
    FAIL("the workers of patchee stopped calling");
    return {};
  }

  long value_of(const std::string& cmd, const std::string& key) {
    auto reply = ask(cmd);
    auto at = reply.find(key + "=");
    REQUIRE(at != std::string::npos);
    return std::stol(reply.substr(at + key.size() + 1));
  }

  std::vector<unsigned char> text(const std::string& name) { return read_memory(pid(), fn.at(name), kTextBytes); }
};

void require_no_bad(const std::map<std::string, Counts>& s) {
  for (auto& [name, c] : s) {
    INFO(name);
    REQUIRE(c.bad == 0);
  }
}

// Every call of `names` went to `version` ("old", "new1", "new2"), none elsewhere; the others are old.
void require_results(Patchee& p, const std::set<std::string>& names, const std::string& version) {
  auto s = p.fresh_stats();
  require_no_bad(s);
  for (auto& [name, c] : s) {
    INFO(name << " old=" << c.old_n << " new1=" << c.new1 << " new2=" << c.new2);
    const std::string want = names.count(name) ? version : "old";
    CHECK(c.old_n == (want == "old" ? c.calls() : 0));
    CHECK(c.new1 == (want == "new1" ? c.calls() : 0));
    CHECK(c.new2 == (want == "new2" ? c.calls() : 0));
  }
}

// hotfix-ctl patch --json; returns the patch id (and its JSON in `json`).
int patch(Patchee& p, const std::string& lib, std::vector<std::string> extra = {}, std::string* json = nullptr) {
  std::vector<std::string> args = {"patch", "--pid", std::to_string(p.pid()), "--lib", fixture(lib), "--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = ctl_run(args);
  INFO("patch " << lib << ": exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  int id = json_int(r.out, "id");
  REQUIRE(id > 0);
  if (json) *json = r.out;
  REQUIRE(status_field(p.pid(), "TracerPid") == 0);
  return id;
}

void revert(Patchee& p, const std::vector<std::string>& which) {
  std::vector<std::string> args = {"revert", "--pid", std::to_string(p.pid())};
  args.insert(args.end(), which.begin(), which.end());
  auto r = ctl_run(args);
  INFO("revert: exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  REQUIRE(status_field(p.pid(), "TracerPid") == 0);
}

std::string hex(const std::vector<unsigned char>& bytes) {
  std::string s;
  char b[4];
  for (auto c : bytes) std::snprintf(b, sizeof b, "%02x ", c), s += b;
  return s;
}

// The first bytes of every target function are what they were in `original`. A revert also
// unpins the uprobes that counted calls still running old code (on the `ret`s of the old
// bodies); the kernel removes their int3 asynchronously (an RCU grace period and a workqueue
// after the unpin), so the bytes may take a moment to settle.
void check_text(Patchee& p, const std::map<std::string, std::vector<unsigned char>>& original) {
  for (auto& [name, bytes] : original) {
    auto now = p.text(name);
    for (int i = 0; i < 500 && now != bytes; ++i) {
      std::this_thread::sleep_for(milliseconds(10));
      now = p.text(name);
    }
    INFO(name << " at 0x" << std::hex << p.fn.at(name) << ": now " << hex(now) << ", was " << hex(bytes));
    CHECK(now == bytes);
  }
}

// What a refusal must leave exactly as it was.
struct Snapshot {
  std::map<std::string, std::vector<unsigned char>> text;
  std::set<std::string> mappings;
  long threads = 0;
  bool operator==(const Snapshot&) const = default;
};

Snapshot snapshot(Patchee& p) {
  Snapshot s;
  for (auto& [name, addr] : p.fn) s.text[name] = p.text(name);
  s.mappings = file_mappings(p.pid());
  s.threads = status_field(p.pid(), "Threads");
  return s;
}

std::vector<std::string> leftovers(pid_t pid) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator("/run/hotfix/" + std::to_string(pid), ec))
    out.push_back(e.path().string());
  return out;
}

void expect_refused(const RunResult& r, const std::string& needle) {
  INFO("exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 1);
  auto err = lines_of(r.err);
  REQUIRE(err.size() == 1);
  CHECK(err[0].rfind("hotfix-ctl: ", 0) == 0);
  CHECK(err[0].find(needle) != std::string::npos);
}

// The target is exactly as `before`, untraced, unpatched, and still answering correctly.
void expect_untouched(Patchee& p, const Snapshot& before) {
  auto after = snapshot(p);
  for (auto& [name, bytes] : before.text) {
    INFO(name);
    CHECK(after.text.at(name) == bytes);
  }
  for (auto& m : after.mappings) {
    INFO("new mapping: " << m);
    CHECK(before.mappings.count(m));
  }
  for (auto& m : before.mappings) {
    INFO("lost mapping: " << m);
    CHECK(after.mappings.count(m));
  }
  CHECK(after.threads == before.threads);
  CHECK(status_field(p.pid(), "TracerPid") == 0);
  CHECK(!maps_contain(p.pid(), "hotfix-registry"));
  CHECK(leftovers(p.pid()).empty());
  require_no_bad(p.fresh_stats());
}

// Start `hotfix-ctl args...` and return once it holds the target with fix.so loaded (its
// bound copy, a memfd named "hotfix:<id>:...", is mapped): it is now in its stop-and-check loop.
std::unique_ptr<Child> start_ctl_and_wait_loaded(Patchee& p, std::vector<std::string> args) {
  args.insert(args.begin(), ctl());
  auto c = std::make_unique<Child>(args);
  c->close_stdin();
  const std::string copy = "/memfd:hotfix:";
  for (int i = 0; i < 2000 && !maps_contain(p.pid(), copy); ++i) {
    REQUIRE(c->running());
    std::this_thread::sleep_for(milliseconds(5));
  }
  REQUIRE(maps_contain(p.pid(), copy));
  return c;
}

// One line on stderr and exit 1 from a hotfix-ctl started as a Child.
void expect_child_refused(Child& c, const std::string& needle) {
  auto code = c.wait(seconds(60));
  REQUIRE(code);
  RunResult r{*code, c.drain_stdout(), c.drain_stderr()};
  expect_refused(r, needle);
}

}  // namespace

TEST_CASE("a patch under load switches every call to the new code; revert switches back", "[patch]") {
  require_root();
  Patchee p;
  require_results(p, {}, "old");
  std::string json;
  int id = patch(p, "fix_v1.so", {"c_answer"}, &json);
  INFO(json);
  CHECK(json.find(fmt_hex_function("c_answer", p.fn.at("c_answer"))) != std::string::npos);
  CHECK(json.find("\"pause_us\":") != std::string::npos);
  CHECK(json_int(json, "attempts") >= 1);
  require_results(p, {"c_answer"}, "new1");
  revert(p, {"--id", std::to_string(id)});
  require_results(p, {}, "old");
}

TEST_CASE("patches stack and revert in order down to the file's bytes", "[patch]") {
  require_root();
  Patchee p;
  auto original = p.text("c_answer");
  REQUIRE(original.size() == kTextBytes);
  REQUIRE(file_bytes(p.pid(), p.fn.at("c_answer"), kTextBytes) == original);

  int v1 = patch(p, "fix_v1.so", {"c_answer"});
  require_results(p, {"c_answer"}, "new1");
  int v2 = patch(p, "fix_v2.so");
  CHECK(v2 == v1 + 1);
  require_results(p, {"c_answer"}, "new2");
  SECTION("newest first") {
    revert(p, {"--id", std::to_string(v2)});
    require_results(p, {"c_answer"}, "new1");
    CHECK(p.text("c_answer") != original);
    revert(p, {"--all"});
  }
  SECTION("the older one first: the newer stays, then reverts to the file's code") {
    revert(p, {"--id", std::to_string(v1)});
    require_results(p, {"c_answer"}, "new2");
    revert(p, {"--id", std::to_string(v2)});
  }
  require_results(p, {}, "old");
  check_text(p, {{"c_answer", original}});
  CHECK(p.text("c_answer") == file_bytes(p.pid(), p.fn.at("c_answer"), kTextBytes));
  CHECK(!maps_contain(p.pid(), "/memfd:hotfix:"));  // both libraries unloaded
}

TEST_CASE("static functions, members, class and namespace patterns, shared libraries", "[patch]") {
  require_root();
  Patchee p;
  auto original = snapshot(p).text;
  struct Case {
    std::string lib, pattern;
    std::set<std::string> changed;
  };
  std::vector<Case> cases = {
      {"fix_v1.so", "static_value", {"static_value"}},
      {"fix_v1.so", "Order::total", {"Order::total"}},
      {"fix_v1.so", "Order::*", {"Order::total", "Order::discount", "Order::weight"}},
      {"fix_v1.so", "pricing::*", {"pricing::tax", "pricing::fee", "pricing::round_price"}},
      {"fix_lib.so", "", {"lib_rate"}},
  };
  for (auto& c : cases) {
    SECTION(c.lib + " " + c.pattern) {
      patch(p, c.lib, c.pattern.empty() ? std::vector<std::string>{} : std::vector<std::string>{c.pattern});
      require_results(p, c.changed, "new1");
      revert(p, {"--all"});
      require_results(p, {}, "old");
      check_text(p, original);
    }
  }
}

TEST_CASE("a fix binds to the target's static variable and static helper", "[patch]") {
  require_root();
  Patchee p;
  REQUIRE(p.ask("tick") == "ok tick=5");
  REQUIRE(p.value_of("counter", "counter") == 0);
  patch(p, "fix_static.so");
  REQUIRE(p.ask("tick") == "ok tick=1005");
  CHECK(p.value_of("counter", "counter") == 11);  // +10 on g_counter, +1 by counter_add
  REQUIRE(p.ask("tick") == "ok tick=1005");
  CHECK(p.value_of("counter", "counter") == 22);
  revert(p, {"--all"});
  REQUIRE(p.ask("tick") == "ok tick=5");
  CHECK(p.value_of("counter", "counter") == 22);
}

TEST_CASE("every refusal exits 1 with one line and leaves the target exactly as it was", "[patch][refuse]") {
  require_root();
  Patchee p;
  const std::string pid = std::to_string(p.pid());
  auto before = snapshot(p);
  auto refuse = [&](const std::string& lib, std::vector<std::string> extra, const std::string& needle) {
    std::vector<std::string> args = {"patch", "--pid", pid, "--lib", lib};
    args.insert(args.end(), extra.begin(), extra.end());
    expect_refused(ctl_run(args), needle);
    expect_untouched(p, before);
  };

  SECTION("no such process") {
    pid_t gone = ::fork();
    if (gone == 0) ::_exit(0);
    REQUIRE(::waitpid(gone, nullptr, 0) == gone);
    expect_refused(ctl_run({"patch", "--pid", std::to_string(gone), "--lib", fixture("fix_v1.so")}),
                   "no process with pid " + std::to_string(gone));
    expect_untouched(p, before);
  }
  SECTION("already traced by another process") {
    int ready[2];
    REQUIRE(::pipe(ready) == 0);
    pid_t tracer = ::fork();
    if (tracer == 0) {
      char ok = ::ptrace(PTRACE_SEIZE, p.pid(), 0, 0) == 0 ? 'y' : 'n';
      (void)!::write(ready[1], &ok, 1);
      ::pause();
      ::_exit(0);
    }
    char ok = 0;
    REQUIRE(::read(ready[0], &ok, 1) == 1);
    ::close(ready[0]), ::close(ready[1]);
    CHECK(ok == 'y');
    auto r = ctl_run({"patch", "--pid", pid, "--lib", fixture("fix_v1.so"), "c_answer"});
    CHECK(status_field(p.pid(), "TracerPid") == tracer);  // still the other tracer's
    ::kill(tracer, SIGKILL);
    ::waitpid(tracer, nullptr, 0);
    expect_refused(r, "already traced by pid " + std::to_string(tracer));
    expect_untouched(p, before);
  }
  SECTION("fix.so missing") { refuse(fixture("no_such_fix.so"), {}, "does not exist"); }
  SECTION("fix.so is not ELF") { refuse(fixture("fix_not_elf.so"), {}, "is not an ELF file"); }
  SECTION("fix.so is for another machine") { refuse(fixture("fix_aarch64.so"), {}, "built for aarch64"); }
  SECTION("fix.so replaces nothing the target has") { refuse(fixture("fix_none.so"), {}, "defines no function"); }
  SECTION("fix.so lacks the replacement for a selected function") {
    refuse(fixture("fix_v2.so"), {"Order::total"}, "no replacement for");
  }
  SECTION("a pattern matches nothing, and the error suggests names") {
    refuse(fixture("fix_v1.so"), {"c_answr"}, "did you mean 'c_answer'");
  }
  SECTION("the function is shorter than the jump") { refuse(fixture("fix_short.so"), {}, "cannot patch short_fn: the 1-byte function is shorter"); }
  SECTION("a branch lands inside the bytes the jump overwrites") {
    refuse(fixture("fix_branch.so"), {}, "cannot patch branchy");
  }
}

// The default observe window runs first: the registry its trampolines made must go too.
TEST_CASE("a strict timeout on a thread parked inside leaves the target exactly as it was", "[patch][refuse]") {
  require_root();
  Patchee p;
  auto before = snapshot(p);
  REQUIRE(p.ask("park c_answer") == "ok parked c_answer");
  expect_refused(ctl_run({"patch", "--pid", std::to_string(p.pid()), "--lib", fixture("fix_v1.so"), "c_answer",
                          "--timeout", "1"}),
                 "is inside c_answer");
  expect_untouched(p, before);
  CHECK(p.ask("unpark") == "ok unparked c_answer old -1553");
}

TEST_CASE("a target that exits in the middle of a patch gives a clean error", "[patch][refuse]") {
  require_root();
  SECTION("it exits by itself") {
    Patchee p;
    REQUIRE(p.ask("park c_answer") == "ok parked c_answer");
    auto c = start_ctl_and_wait_loaded(
        p, {"patch", "--pid", std::to_string(p.pid()), "--lib", fixture("fix_v1.so"), "c_answer", "--timeout", "60"});
    REQUIRE(p.ask("exit_after 300") == "ok exit_after");
    expect_child_refused(*c, "exited with code 3");
    CHECK(p.child.wait() == 3);
  }
  SECTION("it is killed") {
    Patchee p;
    REQUIRE(p.ask("park c_answer") == "ok parked c_answer");
    auto c = start_ctl_and_wait_loaded(
        p, {"patch", "--pid", std::to_string(p.pid()), "--lib", fixture("fix_v1.so"), "c_answer", "--timeout", "60"});
    std::this_thread::sleep_for(milliseconds(100));
    p.child.signal(SIGKILL);
    expect_child_refused(*c, "killed by SIGKILL while hotfix was attached");
    CHECK(p.child.wait() == 128 + SIGKILL);
  }
}

TEST_CASE("strict waits for a thread inside the function; entry mode lets it finish in the old code", "[patch]") {
  require_root();
  Patchee p;
  auto before = snapshot(p);
  const std::string pid = std::to_string(p.pid());
  REQUIRE(p.ask("park c_answer") == "ok parked c_answer");
  auto strict = ctl_run({"patch", "--pid", pid, "--lib", fixture("fix_v1.so"), "c_answer", "--timeout", "1"});
  expect_refused(strict, "strict");
  expect_untouched(p, before);

  int id = patch(p, "fix_v1.so", {"c_answer", "--consistency", "entry"});
  require_results(p, {"c_answer"}, "new1");
  // The parked call entered the old c_answer before the switch and finishes there.
  CHECK(p.ask("unpark") == "ok unparked c_answer old -1553");
  require_results(p, {"c_answer"}, "new1");
  revert(p, {"--id", std::to_string(id)});
  require_results(p, {}, "old");
  check_text(p, before.text);
}

TEST_CASE("no deadlock with the allocator and the loader busy: ten patch/revert rounds", "[patch]") {
  require_root();
  Patchee p;
  auto before = snapshot(p);
  REQUIRE(p.ask("hammer on") == "ok hammer on");
  long loops = 0;
  for (int round = 0; round < 10; ++round) {
    INFO("round " << round);
    patch(p, "fix_v1.so", {round % 2 ? "c_answer" : "pricing::*"});
    require_no_bad(p.stats());
    revert(p, {"--all"});
    require_no_bad(p.stats());
  }
  auto off = p.ask("hammer off");
  loops = std::stol(off.substr(off.find("loops=") + 6));
  CHECK(loops > 0);
  require_results(p, {}, "old");
  check_text(p, before.text);
}

TEST_CASE("signals sent while a patch holds the target are delivered", "[patch][signals]") {
  require_root();
  Patchee p;
  const std::string pid = std::to_string(p.pid());
  REQUIRE(p.ask("park c_answer") == "ok parked c_answer");
  // A strict patch that retries (the parked thread) until we unpark it.
  auto c = start_ctl_and_wait_loaded(p, {"patch", "--pid", pid, "--lib", fixture("fix_v1.so"), "c_answer",
                                         "--timeout", "60", "--json"});
  const int kSignals = 300;
  int usr1_sent = 0, rt_sent = 0;
  for (int i = 0; i < kSignals; ++i) {
    usr1_sent += ::kill(p.pid(), SIGUSR1) == 0;
    rt_sent += ::kill(p.pid(), SIGRTMIN) == 0;  // real-time signals queue: none may be lost
    // 3 s in all: the seeded waiter retries a parked thread only at 0.1, 0.3, 0.7, 1.5, 2.5 s.
    std::this_thread::sleep_for(milliseconds(10));
  }
  REQUIRE(c->running());  // the signals were sent during the patch
  CHECK(p.ask("unpark") == "ok unparked c_answer old -1553");
  auto code = c->wait(seconds(60));
  REQUIRE(code);
  auto out = c->drain_stdout();
  INFO("stdout: " << out << "\nstderr: " << c->drain_stderr());
  REQUIRE(*code == 0);
  CHECK(json_int(out, "attempts") > 5);  // it stopped the target again and again meanwhile
  CHECK(status_field(p.pid(), "TracerPid") == 0);
  long rt = 0, usr1 = 0;
  for (int i = 0; i < 500 && rt < rt_sent; ++i) {
    std::this_thread::sleep_for(milliseconds(10));
    rt = p.value_of("sigcount", "rt");
  }
  usr1 = p.value_of("sigcount", "usr1");
  CHECK(rt == rt_sent);
  CHECK(usr1 >= 1);  // standard signals coalesce while pending
  CHECK(usr1 <= usr1_sent);
  require_results(p, {"c_answer"}, "new1");
}

TEST_CASE("SIGTERM sent while a patch holds the target still terminates it", "[patch][signals]") {
  require_root();
  Patchee p;
  REQUIRE(p.ask("park c_answer") == "ok parked c_answer");
  auto c = start_ctl_and_wait_loaded(
      p, {"patch", "--pid", std::to_string(p.pid()), "--lib", fixture("fix_v1.so"), "c_answer", "--timeout", "60"});
  p.child.signal(SIGTERM);
  CHECK(p.child.wait(seconds(30)) == 128 + SIGTERM);
  expect_child_refused(*c, "killed by SIGTERM while hotfix was attached");
}

TEST_CASE("list and revert from later hotfix-ctl processes", "[patch][cli]") {
  require_root();
  Patchee p;
  const std::string pid = std::to_string(p.pid());
  auto empty = ctl_run({"list", "--pid", pid, "--json"});
  REQUIRE(empty.exit_code == 0);
  CHECK(empty.out == "{\"pid\":" + pid + ",\"patches\":[]}\n");

  int id = patch(p, "fix_v1.so", {"c_answer"});
  auto listed = ctl_run({"list", "--pid", pid, "--json"});
  INFO(listed.out << listed.err);
  REQUIRE(listed.exit_code == 0);
  CHECK(json_int(listed.out, "id") == id);
  CHECK(listed.out.find("\"state\":\"active\"") != std::string::npos);
  CHECK(listed.out.find("\"lib\":\"" + fixture("fix_v1.so") + "\"") != std::string::npos);
  CHECK(listed.out.find(fmt_hex_function("c_answer", p.fn.at("c_answer"))) != std::string::npos);
  auto text = ctl_run({"list", "--pid", pid});
  CHECK(text.exit_code == 0);
  CHECK(text.out.find("c_answer") != std::string::npos);

  auto unknown = ctl_run({"revert", "--pid", pid, "--id", "99"});
  expect_refused(unknown, "99");
  auto usage = ctl_run({"revert", "--pid", pid});
  CHECK(usage.exit_code == 2);
  CHECK(lines_of(usage.err).size() == 1);
  require_results(p, {"c_answer"}, "new1");

  revert(p, {"--id", std::to_string(id)});
  auto after = ctl_run({"list", "--pid", pid, "--json"});
  REQUIRE(after.exit_code == 0);
  CHECK(after.out.find("\"state\":\"reverted\"") != std::string::npos);
  CHECK(after.out.find("\"released\":true") != std::string::npos);
  CHECK(!maps_contain(p.pid(), "/memfd:hotfix:"));  // the bound copy was unloaded
  auto again = ctl_run({"revert", "--pid", pid, "--id", std::to_string(id)});
  expect_refused(again, "already reverted");
  require_results(p, {}, "old");
}

TEST_CASE("a fix library's constructor runs exactly once per patch", "[patch]") {
  require_root();
  Patchee p;
  REQUIRE(p.value_of("ctorcount", "ctor") == 0);
  patch(p, "fix_ctor.so");
  CHECK(p.value_of("ctorcount", "ctor") == 1);
  require_results(p, {"pricing::fee"}, "new1");
  revert(p, {"--all"});
  CHECK(p.value_of("ctorcount", "ctor") == 1);
  patch(p, "fix_ctor.so");
  CHECK(p.value_of("ctorcount", "ctor") == 2);
  revert(p, {"--all"});
  require_results(p, {}, "old");
}

TEST_CASE("a refused patch changes neither the other functions of the patch nor earlier patches", "[patch][refuse]") {
  require_root();
  Patchee p;
  const std::string pid = std::to_string(p.pid());
  int first = patch(p, "fix_v1.so", {"pricing::fee"});
  auto before = snapshot(p);
  REQUIRE(maps_contain(p.pid(), "hotfix-registry"));
  auto listed = ctl_run({"list", "--pid", pid, "--json"});
  REQUIRE(listed.exit_code == 0);

  // One of the three Order functions is busy: none of them may switch.
  REQUIRE(p.ask("park Order::total") == "ok parked Order::total");
  auto r = ctl_run({"patch", "--pid", pid, "--lib", fixture("fix_v1.so"), "Order::*", "--timeout", "1"});
  expect_refused(r, "is inside Order::total");
  auto after = snapshot(p);
  CHECK(after == before);
  CHECK(status_field(p.pid(), "TracerPid") == 0);
  CHECK(ctl_run({"list", "--pid", pid, "--json"}).out == listed.out);  // no record, same next id
  require_results(p, {"pricing::fee"}, "new1");
  CHECK(p.ask("unpark") == "ok unparked Order::total old -5439");

  int second = patch(p, "fix_v1.so", {"Order::*"});
  CHECK(second == first + 1);
  require_results(p, {"pricing::fee", "Order::total", "Order::discount", "Order::weight"}, "new1");
  revert(p, {"--all"});
  require_results(p, {}, "old");
}

TEST_CASE("a Rust function is patched by its hash-less path (legacy and v0 mangling), and reverted", "[patch][rust]") {
  require_root();
  for (std::string variant : {"rs_pricing", "rs_pricing_v0"}) {
    INFO(variant);
    if (::access(fixture(variant).c_str(), X_OK) != 0) {
      WARN("SKIP part: " << fixture(variant) << " was not built: Debian's rustc (/usr/bin/rustc) is not installed");
      continue;
    }
    Child target({fixture(variant)});
    REQUIRE(target.request("ready").rfind("ok", 0) == 0);
    pid_t pid = target.pid();
    auto table = hotfix::SymbolTable::for_pid(pid);
    REQUIRE(table);
    auto found = hotfix::symbols__select(*table, {"main::pricing::discount"});
    REQUIRE(found);
    REQUIRE(found->size() == 1);
    uint64_t entry = found->front().address;
    auto original = file_bytes(pid, entry, 16);
    REQUIRE(original.size() == 16);
    REQUIRE(target.request("discount 1") == "ok 900");  // the bug: 10% off

    // The fix is plain C whose symbol is the legacy-mangled path with another hash.
    auto r = ctl_run({"patch", "--pid", std::to_string(pid), "--lib", fixture("rs_fix.so"), "main::pricing::discount",
                      "--observe", "0", "--json"});
    INFO("patch: exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(r.out.find("main::pricing::discount") != std::string::npos);
    CHECK(status_field(pid, "TracerPid") == 0);
    REQUIRE(target.request("discount 1") == "ok 800");    // new calls run the fix: 20% off
    REQUIRE(target.request("discount 5000").rfind("ok ", 0) == 0);
    REQUIRE(target.request("total 1") == "ok 800");       // and so do calls from other functions

    auto stats = ctl_run({"stats", "--pid", std::to_string(pid), "--json"});
    INFO("stats: " << stats.out << stats.err);
    CHECK(stats.exit_code == 0);
    CHECK(stats.out.find("\"new_hits\":5002") != std::string::npos);

    auto rv = ctl_run({"revert", "--pid", std::to_string(pid), "--all"});
    INFO("revert: " << rv.out << rv.err);
    REQUIRE(rv.exit_code == 0);
    REQUIRE(target.request("discount 1") == "ok 900");
    auto now = read_memory(pid, entry, 16);
    for (int i = 0; i < 500 && now != original; ++i) {
      std::this_thread::sleep_for(milliseconds(10));
      now = read_memory(pid, entry, 16);
    }
    CHECK(now == original);
  }
}

TEST_CASE("a C fix replaces a Rust function by default, matched by path whatever the hash", "[patch][rust]") {
  require_root();
  if (::access(fixture("rs_pricing").c_str(), X_OK) != 0) {
    WARN("SKIP: " << fixture("rs_pricing") << " was not built: Debian's rustc (/usr/bin/rustc) is not installed");
    return;
  }
  Child target({fixture("rs_pricing")});
  REQUIRE(target.request("ready").rfind("ok", 0) == 0);
  for (std::string fix : {"rs_fix.so", "rs_fix_v0.so"}) {  // legacy and v0 spellings of the path
    INFO(fix);
    auto r = ctl_run({"patch", "--pid", std::to_string(target.pid()), "--lib", fixture(fix), "--observe", "0"});
    INFO("patch: exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(r.out.find("main::pricing::discount") != std::string::npos);
    CHECK(r.out.find("::h") == std::string::npos);
    REQUIRE(target.request("discount 1") == "ok 800");
    REQUIRE(ctl_run({"revert", "--pid", std::to_string(target.pid()), "--all"}).exit_code == 0);
    REQUIRE(target.request("discount 1") == "ok 900");
  }
}
