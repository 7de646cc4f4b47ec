// Fork adoption (patch/adopt.hpp): a patched process forks; the child runs the fix (fork gives it
// the jumps and the library) and, at its first hotfix-ctl verb, gets its own registry and hit
// counters. Parent and child then list, stat and revert independently; a parent's revert adopts
// a fork that still shares its record first; hotfix-ctl killed at every step of an adoption
// leaves parent and child correct.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <thread>

#include "patch/adopt.hpp"
#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;

namespace {

RunResult hctl(std::vector<std::string> args, std::vector<std::string> env = {}) {
  args.insert(args.begin(), ctl());
  if (!env.empty()) {
    env.insert(env.begin(), "/usr/bin/env");
    args.insert(args.begin(), env.begin(), env.end());
  }
  return run(args);
}

// A forked child of the fixture, talked to over two FIFOs; killed when the test ends.
class ForkedChild {
 public:
  ForkedChild(Child& parent, const std::string& dir, int n) {
    std::string in = fmt(dir, n, "in"), out = fmt(dir, n, "out");
    REQUIRE(::mkfifo(in.c_str(), 0600) == 0);
    REQUIRE(::mkfifo(out.c_str(), 0600) == 0);
    // O_RDWR never blocks on a FIFO; the read end is non-blocking and polled with a timeout.
    in_ = ::open(in.c_str(), O_RDWR | O_CLOEXEC);
    out_ = ::open(out.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    REQUIRE(in_ >= 0);
    REQUIRE(out_ >= 0);
    auto reply = parent.request("fork " + in + " " + out);
    std::smatch m;
    REQUIRE(std::regex_search(reply, m, std::regex("ok child=([0-9]+)")));
    pid_ = std::stoi(m[1]);
    REQUIRE(read_line() == "ok child");
  }
  ~ForkedChild() {
    if (pid_ > 0) ::kill(pid_, SIGKILL);
    ::close(in_);
    ::close(out_);
  }
  pid_t pid() const { return pid_; }
  std::string request(const std::string& line) {
    std::string l = line + "\n";
    REQUIRE(::write(in_, l.data(), l.size()) == static_cast<ssize_t>(l.size()));
    return read_line();
  }

 private:
  static std::string fmt(const std::string& dir, int n, const char* what) {
    return dir + "/child" + std::to_string(n) + "." + what;
  }
  std::string read_line() {
    auto deadline = steady_clock::now() + seconds(20);
    for (;;) {
      if (auto nl = buf_.find('\n'); nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      auto left = duration_cast<milliseconds>(deadline - steady_clock::now()).count();
      if (left <= 0) return "timeout";
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
      char chunk[256];
      ssize_t n = ::read(out_, chunk, sizeof chunk);
      if (n > 0) buf_.append(chunk, static_cast<size_t>(n));
      else std::this_thread::sleep_for(milliseconds(5));  // no writer yet (EOF on a FIFO)
    }
  }
  pid_t pid_ = -1;
  int in_ = -1, out_ = -1;
  std::string buf_;
};

struct Fixture {
  Child parent{{fixture("fork_target")}};
  unsigned long answer = 0;
  std::string dir;
  int forks = 0;
  Fixture() {
    char tmpl[] = "/tmp/hotfix-fork-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    dir = tmpl;
    auto fn = parent.read_line();
    REQUIRE(fn);
    std::smatch m;
    REQUIRE(std::regex_search(*fn, m, std::regex("fn answer (0x[0-9a-f]+)")));
    answer = std::stoul(m[1], nullptr, 16);
    REQUIRE(parent.read_line() == std::optional<std::string>("ready"));
  }
  ~Fixture() {
    parent.signal(SIGKILL);
    parent.wait();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(parent.pid()), ec);
  }
  std::unique_ptr<ForkedChild> fork() { return std::make_unique<ForkedChild>(parent, dir, ++forks); }
};

// The registry memfd `pid` maps: (device, inode), the same in two processes that share it.
std::pair<uint64_t, uint64_t> registry_identity(pid_t pid) {
  for (auto& line : lines_of(read_file("/proc/" + std::to_string(pid) + "/maps"))) {
    if (line.find("/memfd:hotfix-registry") == std::string::npos) continue;
    struct stat st{};
    std::string range = line.substr(0, line.find(' '));
    if (::stat(("/proc/" + std::to_string(pid) + "/map_files/" + range).c_str(), &st) != 0) return {0, 0};
    return {st.st_dev, st.st_ino};
  }
  return {0, 0};
}

// fds of `pid` open on a hotfix-registry memfd: none is ever left open.
int registry_fds(pid_t pid) {
  int n = 0;
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec))
    if (std::filesystem::read_symlink(e.path(), ec).string().find("/memfd:hotfix-registry") != std::string::npos) ++n;
  return n;
}

uint64_t new_hits(pid_t pid) {
  auto s = hctl({"stats", "--pid", std::to_string(pid), "--json"});
  INFO("stats: " << s.out << s.err);
  REQUIRE(s.exit_code == 0);
  std::smatch m;
  REQUIRE(std::regex_search(s.out, m, std::regex("\"new_hits\":([0-9]+)")));
  return std::stoull(m[1]);
}

std::string list_json(pid_t pid) {
  auto l = hctl({"list", "--pid", std::to_string(pid), "--json"});
  INFO("list: " << l.out << l.err);
  REQUIRE(l.exit_code == 0);
  return l.out;
}

bool active(const std::string& json) { return json.find("\"state\":\"active\"") != std::string::npos; }

void patch(pid_t pid) {
  auto p = hctl({"patch", "--pid", std::to_string(pid), "--lib", fixture("fork_fix.so"), "answer", "--observe", "0"});
  INFO("patch: " << p.out << p.err);
  REQUIRE(p.exit_code == 0);
}

void revert(pid_t pid) {
  auto r = hctl({"revert", "--pid", std::to_string(pid), "--all"});
  INFO("revert: " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

}  // namespace

TEST_CASE("after fork, parent and child list, stat and revert independently", "[fork]") {
  require_root();
  Fixture f;
  const auto file = file_bytes(f.parent.pid(), f.answer, 5);
  patch(f.parent.pid());
  REQUIRE(f.parent.request("call 100") == "ok answer=1003");
  const auto jump = read_memory(f.parent.pid(), f.answer, 5);
  REQUIRE(jump != file);

  auto child = f.fork();
  // What fork gives: the fixed code, and the parent's registry mapping itself.
  CHECK(child->request("call 1") == "ok answer=1003");
  CHECK(registry_identity(child->pid()) == registry_identity(f.parent.pid()));
  const auto parent_maps = read_file("/proc/" + std::to_string(f.parent.pid()) + "/maps");
  const auto parent_list = list_json(f.parent.pid());
  const uint64_t parent_hits = new_hits(f.parent.pid());  // 100, plus the child's one call before adoption

  // The child's first verb adopts: its list shows the patch as its own, in a registry of its own.
  auto listed = hctl({"list", "--pid", std::to_string(child->pid()), "--json"});
  INFO("list child: " << listed.out << listed.err);
  REQUIRE(listed.exit_code == 0);
  CHECK(listed.err.find("adopted the hotfix record inherited from pid " + std::to_string(f.parent.pid())) != std::string::npos);
  CHECK(active(listed.out));
  CHECK(listed.out.find("\"owner\":" + std::to_string(child->pid())) != std::string::npos);
  CHECK(registry_identity(child->pid()) != registry_identity(f.parent.pid()));
  CHECK(registry_fds(child->pid()) == 0);
  CHECK(std::filesystem::exists("/sys/fs/bpf/hotfix/" + std::to_string(child->pid()) + "/1/new_hits"));

  // Counts are separate from here on.
  REQUIRE(child->request("call 30") == "ok answer=1003");
  REQUIRE(f.parent.request("call 70") == "ok answer=1003");
  CHECK(new_hits(child->pid()) == 30);
  CHECK(new_hits(f.parent.pid()) == parent_hits + 70);

  // The child's revert restores the child's bytes only.
  revert(child->pid());
  CHECK(child->request("call 1") == "ok answer=3");
  CHECK(read_memory(child->pid(), f.answer, 5) == file);
  CHECK(!active(list_json(child->pid())));
  CHECK(f.parent.request("call 1") == "ok answer=1003");
  CHECK(read_memory(f.parent.pid(), f.answer, 5) == jump);
  CHECK(list_json(f.parent.pid()) == parent_list);
  CHECK(read_file("/proc/" + std::to_string(f.parent.pid()) + "/maps") == parent_maps);  // islands, copy, counters
  CHECK(std::filesystem::exists("/sys/fs/bpf/hotfix/" + std::to_string(f.parent.pid()) + "/1/new_hits"));
  CHECK(!std::filesystem::exists("/sys/fs/bpf/hotfix/" + std::to_string(child->pid()) + "/1"));

  // And the parent's revert leaves the (reverted) child alone.
  const auto child_maps = read_file("/proc/" + std::to_string(child->pid()) + "/maps");
  revert(f.parent.pid());
  CHECK(f.parent.request("call 1") == "ok answer=3");
  CHECK(read_memory(f.parent.pid(), f.answer, 5) == file);
  CHECK(read_file("/proc/" + std::to_string(child->pid()) + "/maps") == child_maps);
  CHECK(status_field(f.parent.pid(), "TracerPid") == 0);
  CHECK(status_field(child->pid(), "TracerPid") == 0);
}

TEST_CASE("a parent's revert adopts a fork that still shares its record: the fork stays patched", "[fork]") {
  require_root();
  Fixture f;
  patch(f.parent.pid());
  auto child = f.fork();
  const auto jump = read_memory(child->pid(), f.answer, 5);
  REQUIRE(registry_identity(child->pid()) == registry_identity(f.parent.pid()));
  auto r = hctl({"revert", "--pid", std::to_string(f.parent.pid()), "--all"});
  INFO("revert parent: " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK((r.out + r.err).find("adopted the hotfix record") != std::string::npos);
  CHECK(f.parent.request("call 1") == "ok answer=3");
  // The child was adopted before the parent's record changed: still patched, and it says so.
  CHECK(child->request("call 1") == "ok answer=1003");
  CHECK(read_memory(child->pid(), f.answer, 5) == jump);
  CHECK(active(list_json(child->pid())));
  revert(child->pid());
  CHECK(child->request("call 1") == "ok answer=3");
  CHECK(read_memory(child->pid(), f.answer, 5) == file_bytes(child->pid(), f.answer, 5));
}

TEST_CASE("hotfix-ctl killed at every step of an adoption: parent and child both correct", "[fork]") {
  require_root();
  Fixture f;
  patch(f.parent.pid());
  const auto jump = read_memory(f.parent.pid(), f.answer, 5);
  const auto parent_list = list_json(f.parent.pid());
  const auto parent_maps = read_file("/proc/" + std::to_string(f.parent.pid()) + "/maps");
  const auto parent_registry = registry_identity(f.parent.pid());

  // Count the crash points of one adoption.
  size_t points = 0;
  {
    auto child = f.fork();
    auto counted = hctl({"list", "--pid", std::to_string(child->pid())}, {"HOTFIX_CRASH_LIST=1"});
    REQUIRE(counted.exit_code == 0);
    for (auto& l : lines_of(counted.err))
      if (l.rfind("crashpoint ", 0) == 0) ++points;
    CHECK(counted.err.find("adopt: registry swapped") != std::string::npos);
  }
  REQUIRE(points >= 5);
  for (size_t k = 1; k <= points; ++k) {
    INFO("killed at crash point " << k);
    auto child = f.fork();
    auto killed = hctl({"list", "--pid", std::to_string(child->pid())}, {"HOTFIX_CRASH_AT=" + std::to_string(k)});
    CHECK(killed.exit_code != 0);
    // The parent: not touched.
    CHECK(f.parent.request("call 1") == "ok answer=1003");
    CHECK(read_memory(f.parent.pid(), f.answer, 5) == jump);
    CHECK(registry_identity(f.parent.pid()) == parent_registry);
    CHECK(list_json(f.parent.pid()) == parent_list);
    CHECK(read_file("/proc/" + std::to_string(f.parent.pid()) + "/maps") == parent_maps);
    // The child: still the fixed code, and the next verb finishes (or redoes) the adoption.
    CHECK(child->request("call 1") == "ok answer=1003");
    auto again = list_json(child->pid());
    CHECK(active(again));
    CHECK(again.find("\"owner\":" + std::to_string(child->pid())) != std::string::npos);
    CHECK(registry_identity(child->pid()) != parent_registry);
    CHECK(registry_fds(child->pid()) == 0);
    CHECK(status_field(child->pid(), "TracerPid") == 0);
    if (k == points) {  // the last one also reverts: the child's own record and memory work
      revert(child->pid());
      CHECK(child->request("call 1") == "ok answer=3");
      CHECK(f.parent.request("call 1") == "ok answer=1003");
    }
  }
  revert(f.parent.pid());
  CHECK(f.parent.request("call 1") == "ok answer=3");
}

TEST_CASE("a fork inherits a watch's trampoline: its calls are not the parent's, and it goes when the watch ends", "[fork]") {
  require_root();
  Fixture f;
  const auto file = file_bytes(f.parent.pid(), f.answer, 5);
  Child watch({ctl(), "watch", "--pid", std::to_string(f.parent.pid()), "answer", "--duration", "6", "--interval", "1",
               "--json"});
  for (int i = 0; i < 500 && read_memory(f.parent.pid(), f.answer, 5) == file; ++i)
    std::this_thread::sleep_for(milliseconds(10));
  const auto jump = read_memory(f.parent.pid(), f.answer, 5);
  REQUIRE(jump != file);  // the watch's trampoline is in
  auto child = f.fork();
  REQUIRE(read_memory(child->pid(), f.answer, 5) == jump);
  auto listed = hctl({"list", "--pid", std::to_string(child->pid())});
  INFO("list child: " << listed.out << listed.err);
  REQUIRE(listed.exit_code == 0);
  CHECK(listed.err.find("inherited watch") != std::string::npos);
  REQUIRE(child->request("call 50") == "ok answer=3");  // counted in the child's own map, not the watch's
  REQUIRE(f.parent.request("call 7") == "ok answer=3");
  REQUIRE(watch.wait(seconds(30)) == std::optional<int>(0));
  std::string out = watch.drain_stdout();
  INFO("watch: " << out);
  std::smatch m;
  std::string last;
  for (auto& l : lines_of(out))
    if (l.find("\"final\":true") != std::string::npos) last = l;
  REQUIRE(std::regex_search(last, m, std::regex("\"calls\":([0-9]+)")));
  CHECK(std::stoull(m[1]) == 7);
  CHECK(read_memory(f.parent.pid(), f.answer, 5) == file);  // the watch took its trampoline out of the parent
  CHECK(read_memory(child->pid(), f.answer, 5) == jump);    // and never touched the child
  // The child's next verb removes what the ended watch left there.
  auto again = hctl({"list", "--pid", std::to_string(child->pid())});
  INFO("list child again: " << again.out << again.err);
  REQUIRE(again.exit_code == 0);
  CHECK(again.err.find("removed what an ended watch") != std::string::npos);
  CHECK(read_memory(child->pid(), f.answer, 5) == file);
  CHECK(child->request("call 1") == "ok answer=3");
  CHECK(registry_fds(child->pid()) == 0);
}

TEST_CASE("adopt__mismatch: a record the child's text no longer agrees with is named", "[fork]") {
  hotfix::Registry r;
  hotfix::PatchRecord p;
  p.id = 1;
  hotfix::FunctionRecord fr;
  fr.mangled = "answer";
  fr.old_address = 0x1000;
  fr.original = {0x55, 0x48, 0x89, 0xe5, 0x90};
  fr.written = {0xe9, 1, 2, 3, 4};
  p.functions.push_back(fr);
  r.patches.push_back(p);
  std::vector<uint8_t> live = fr.written;
  auto read = [&](uint64_t, size_t) { return std::optional(live); };
  CHECK(hotfix::adopt__mismatch(r, read).empty());  // active, jump there
  live = fr.original;                                // patched in the parent after the fork
  CHECK(hotfix::adopt__mismatch(r, read).find("patch 1 is active in the record but its jump is not at answer") == 0);
  r.patches[0].state = hotfix::PatchState::reverted;  // reverted: the file's bytes agree
  CHECK(hotfix::adopt__mismatch(r, read).empty());
  live = fr.written;  // reverted in the parent after the fork: the child still has the jump
  CHECK(hotfix::adopt__mismatch(r, read).find("patch 1 is reverted in the record but its jump is still at answer") == 0);
  auto unreadable = [](uint64_t, size_t) { return std::optional<std::vector<uint8_t>>(); };
  CHECK(hotfix::adopt__mismatch(r, unreadable).find("cannot be read") != std::string::npos);
}
