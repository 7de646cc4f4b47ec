// A strict patch that has to wait is gentle (tests/fixtures/waiter_target.c): a thread that
// never leaves the function is named early and the process is stopped at most ~50 times a
// second until --timeout; a thread that was inside before the probes came is waited for (the
// waiter is seeded from the blocked stop); progress is one updating line on a terminal and
// one line per change of blocker otherwise.
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;

namespace {

// The runtime address of `symbol` in the target's executable (nm value + load base).
uint64_t symbol_address(pid_t pid, const std::string& symbol) {
  auto r = run({"/usr/bin/nm", fixture("waiter_target")});
  std::smatch m;
  REQUIRE(std::regex_search(r.out, m, std::regex("([0-9a-f]+) T " + symbol + "\n")));
  uint64_t value = std::stoull(m[1], nullptr, 16);
  std::istringstream maps(read_file("/proc/" + std::to_string(pid) + "/maps"));
  std::string exe = std::filesystem::canonical(fixture("waiter_target")).string();
  for (std::string line; std::getline(maps, line);)
    if (line.find(exe) != std::string::npos && line.find(" 00000000 ") != std::string::npos)
      return std::stoull(line.substr(0, line.find('-')), nullptr, 16) + value;
  FAIL("no mapping of " << exe);
  return 0;
}

struct Target {
  Child child{{fixture("waiter_target")}};
  Target() { REQUIRE(child.wait_for("ready")); }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    std::filesystem::remove_all("/run/hotfix/" + std::to_string(pid()), ec);
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
  std::string ask(const std::string& cmd) { return child.request(cmd); }
  // The last results of the outside callers of wt_loop and wt_hold (1: old code, 2: the fix).
  std::pair<int, int> last_results() {
    long a, c;
    int b, d;
    auto reply = ask("calls");
    REQUIRE(std::sscanf(reply.c_str(), "ok %ld %d %ld %d", &a, &b, &c, &d) == 4);
    return {b, d};
  }
  std::vector<unsigned char> text(const std::string& fn) { return read_memory(pid(), symbol_address(pid(), fn), 16); }
};

// What a refusal must leave as it was: the text, the mappings, the threads, no tracer.
struct Snapshot {
  std::vector<unsigned char> loop_text, hold_text;
  std::set<std::string> mappings;
  long threads = 0;
};
Snapshot snapshot(Target& t) { return {t.text("wt_loop"), t.text("wt_hold"), file_mappings(t.pid()), status_field(t.pid(), "Threads")}; }
void expect_untouched(Target& t, const Snapshot& before) {
  auto after = snapshot(t);
  CHECK(after.loop_text == before.loop_text);
  CHECK(after.hold_text == before.hold_text);
  CHECK(after.mappings == before.mappings);
  CHECK(after.threads == before.threads);
  CHECK(status_field(t.pid(), "TracerPid") == 0);
  CHECK(t.last_results() == std::pair{1, 1});
}

std::vector<std::string> patch_args(Target& t, const std::string& fn, const std::string& timeout) {
  return {ctl(), "patch", "--pid", std::to_string(t.pid()), "--lib", fixture("fix_waiter.so"), fn, "--timeout", timeout,
          "--observe", "0"};
}

size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

// "... on each of the last 8 of 9 attempts in 3000 ms": the number of stops.
int attempts_in(const std::string& err) {
  std::smatch m;
  if (!std::regex_search(err, m, std::regex("of ([0-9]+) attempts in"))) return -1;
  return std::stoi(m[1]);
}

const std::string kStuckLine = "at the same place on each of the last";

}  // namespace

TEST_CASE("a thread looping inside the function: named early, stopped at most ~50 times/s, entry mode works",
          "[wait]") {
  require_root();
  Target t;
  REQUIRE(t.ask("loop") == "ok looping");
  auto before = snapshot(t);
  auto r = run(patch_args(t, "wt_loop", "3"));
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 1);
  // The error names the function and the way out.
  CHECK(r.err.find("inside wt_loop") != std::string::npos);
  CHECK(r.err.find(kStuckLine) != std::string::npos);
  CHECK(r.err.find("--consistency entry") != std::string::npos);
  // ... and so did one progress line, long before the timeout ("N s left").
  std::smatch early;
  REQUIRE(std::regex_search(r.out, early, std::regex(kStuckLine + " [0-9]+ attempts; still waiting, ([0-9.]+) s left")));
  CHECK(std::stod(early[1]) > 1.0);
  CHECK(r.out.find("--consistency entry") != std::string::npos);
  int attempts = attempts_in(r.err);
  std::printf("looping blocker, --timeout 3: %d stops\n", attempts);
  CHECK(attempts >= 3);
  CHECK(attempts <= 50 * 3 + 5);
  // stdout is a pipe: one line per change of blocker, not per attempt; never a \r.
  CHECK(r.out.find('\r') == std::string::npos);
  CHECK(count(r.out, kStuckLine) == 1);
  size_t waiting = count(r.out, "; retrying, ");
  CHECK(waiting >= 1);
  CHECK(waiting <= 3);
  CHECK(static_cast<int>(waiting) < attempts);
  expect_untouched(t, before);

  // Entry mode switches at once: the looping call stays in the old code, new calls run the fix.
  auto entry = run([&] { auto a = patch_args(t, "wt_loop", "3"); a.push_back("--consistency"); a.push_back("entry"); return a; }());
  INFO("entry stdout: " << entry.out << "\nentry stderr: " << entry.err);
  REQUIRE(entry.exit_code == 0);
  for (int i = 0; i < 100 && t.last_results().first != 2; ++i) std::this_thread::sleep_for(milliseconds(10));
  CHECK(t.last_results() == std::pair{2, 1});
  CHECK(status_field(t.pid(), "TracerPid") == 0);
}

TEST_CASE("a thread inside before the probes came is waited for: the waiter is seeded from the blocked stop",
          "[wait]") {
  require_root();
  Target t;
  REQUIRE(t.ask("hold 300") == "ok holding");  // inside wt_hold for 300 ms from now
  auto began = steady_clock::now();
  auto args = patch_args(t, "wt_hold", "20");
  args.push_back("--json");
  auto r = run(args);
  double ms = duration<double, std::milli>(steady_clock::now() - began).count();
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  std::smatch m;
  REQUIRE(std::regex_search(r.out, m, std::regex("\"attempts\":([0-9]+)")));
  int attempts = std::stoi(m[1]);
  std::printf("thread held inside for 300 ms: patched after %.0f ms in %d attempts\n", ms, attempts);
  CHECK(attempts >= 2);   // the first stop found it inside
  CHECK(attempts <= 15);  // unseeded, the waiter read "quiet" at once: hundreds of stops
  for (int i = 0; i < 100 && t.last_results().second != 2; ++i) std::this_thread::sleep_for(milliseconds(10));
  CHECK(t.last_results() == std::pair{1, 2});
}

TEST_CASE("on a terminal, the retries rewrite one line", "[wait]") {
  require_root();
  Target t;
  REQUIRE(t.ask("loop") == "ok looping");
  std::string cmd;
  for (auto& a : patch_args(t, "wt_loop", "2")) cmd += "'" + a + "' ";
  auto r = run({"/usr/bin/script", "-qec", cmd, "/dev/null"});
  INFO("output: " << r.out);
  CHECK(r.exit_code == 1);
  CHECK(count(r.out, "\rattempt ") >= 3);  // every attempt, over the same line
  CHECK(r.out.find("\033[K") != std::string::npos);
  CHECK(count(r.out, kStuckLine) == 2);  // the warning on a line of its own, then the error
}
