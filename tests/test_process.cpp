// The ptrace controller on real multi-threaded processes: stop the world, remote system
// calls, remote calls, library injection, signals, and failures that must leave nothing behind.
#include <signal.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "process/maps.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"
#include "support/harness.hpp"

using namespace hotfix;
using namespace std::chrono;
using hotfix::test::Child;
using hotfix::test::fixture;

namespace {

// "ok a=1 b=2" -> {a:1, b:2}
std::map<std::string, long> fields(const std::string& reply) {
  std::map<std::string, long> out;
  std::istringstream in(reply);
  std::string word;
  while (in >> word)
    if (auto eq = word.find('='); eq != std::string::npos) out[word.substr(0, eq)] = std::stol(word.substr(eq + 1));
  return out;
}

struct Target {
  Child child{{fixture("proc_target")}};
  std::map<std::string, long> tids;
  Target() {
    REQUIRE(child.request("pid").rfind("ok", 0) == 0);
    tids = fields(child.request("tids"));
  }
  pid_t pid() const { return child.pid(); }
  std::map<std::string, long> counters() { return fields(child.request("counters")); }
  // Never call Child::running()/signal() while seized: its waitpid could take our ptrace stops.
  void kill(int sig) { ::kill(child.pid(), sig); }
};

bool mapped(pid_t pid, const std::string& path) {
  auto maps = process__read_maps(pid);
  if (!maps) return false;
  for (auto& m : *maps)
    if (m.path == path) return true;
  return false;
}

// "S pipe_read 0 0x3 ..." : state, wait channel and /proc syscall line, for failure messages.
std::string thread_state(pid_t pid, long tid) {
  auto slurp = [](const std::string& path) {
    std::ifstream in(path);
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return all;
  };
  auto stat = slurp(fmt::format("/proc/{}/task/{}/stat", pid, tid));
  auto close = stat.rfind(')');
  std::string state = close != std::string::npos ? stat.substr(close + 2, 1) : "?";
  return fmt::format("tid {} state {} wchan {} syscall {} {}", tid, state, slurp(fmt::format("/proc/{}/task/{}/wchan", pid, tid)),
                     slurp(fmt::format("/proc/{}/task/{}/syscall", pid, tid)),
                     slurp(fmt::format("/proc/{}/task/{}/status", pid, tid)).find("TracerPid:\t0") != std::string::npos ? "untraced" : "TRACED");
}

// Counters keep moving: the busy thread spins, the sleeper wakes every 300 ms.
void require_progress(Target& t) {
  auto before = t.counters();
  std::this_thread::sleep_for(milliseconds(700));
  auto after = t.counters();
  CHECK(after["busy"] > before["busy"]);
  CHECK(after["sleeps"] > before["sleeps"]);
  CHECK(after["short"] == 0);
  CHECK(after["eintr"] == 0);
}

}  // namespace

TEST_CASE("stop_all stops every thread and resume_all lets them go on unchanged") {
  hotfix::test::require_root();
  Target target;
  {
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    CHECK(t->threads().size() == 4);  // main, reader, sleeper, busy
    CHECK(process__tracer(target.pid()) == ::getpid());
    for (int round = 0; round < 5; ++round) {
      REQUIRE(t->stop_all());
      CHECK(t->all_stopped());
      CHECK(t->last_pause().threads == 4);
      // The blocked reader is at the same place at every stop: it was resumed exactly. It is
      // either inside read() (pc after the syscall instruction, restart pending) or -- when it
      // had not run again since the last resume -- already rewound to the syscall instruction.
      auto* reader = t->find(target.tids["reader"]);
      REQUIRE(reader);
      static uint64_t pc = 0, sp = 0;
      uint64_t at = arch::regs__pc(reader->regs);
      if (arch::regs__in_restartable_syscall(reader->regs)) at -= arch::syscall_instruction().size();
      if (round > 0) {
        CHECK(at == pc);
        CHECK(arch::regs__sp(reader->regs) == sp);
      }
      pc = at, sp = arch::regs__sp(reader->regs);
      REQUIRE(t->resume_all());
      CHECK(t->last_pause().max_pause > nanoseconds(0));
      CHECK(t->last_pause().max_pause <= t->last_pause().window);
    }
  }
  CHECK(process__tracer(target.pid()) == 0);
  require_progress(target);
  // send, not request: request() skips lines before "ok", and the reader may print first.
  target.child.send("feed hello");
  INFO(thread_state(target.pid(), target.tids["reader"]));
  CHECK(target.child.wait_for("got", seconds(5)) == "got hello");
}

TEST_CASE("remote system calls run on one thread and restore it") {
  hotfix::test::require_root();
  Target target;
  pid_t reader = static_cast<pid_t>(target.tids["reader"]);
  pid_t sleeper = static_cast<pid_t>(target.tids["sleeper"]);
  {
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    REQUIRE(t->stop_all());
    auto pid = remote__syscall(*t, reader, SYS_getpid, {});
    REQUIRE(pid);
    CHECK(*pid == target.pid());
    auto tid = remote__syscall(*t, sleeper, SYS_gettid, {});
    REQUIRE(tid);
    CHECK(*tid == sleeper);

    auto page = remote__mmap(*t, reader, 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    REQUIRE(page);
    std::vector<uint8_t> bytes{1, 2, 3, 4, 5};
    REQUIRE(t->memory().write(*page, bytes));
    CHECK(hotfix::test::read_memory(target.pid(), *page, 5) == std::vector<unsigned char>{1, 2, 3, 4, 5});
    REQUIRE(remote__mprotect(*t, reader, *page, 4096, PROT_READ));
    REQUIRE(remote__munmap(*t, reader, *page, 4096));
    CHECK(hotfix::test::read_memory(target.pid(), *page, 5).empty());

    // Pages near the executable's text, for jump islands.
    auto maps = process__read_maps(target.pid());
    REQUIRE(maps);
    uint64_t text = 0;
    for (auto& m : *maps)
      if (m.executable() && m.path == fixture("proc_target")) text = m.start;
    REQUIRE(text);
    auto island = remote__mmap_near(*t, sleeper, text, 4096, PROT_READ | PROT_EXEC);
    REQUIRE(island);
    int64_t distance = static_cast<int64_t>(*island) - static_cast<int64_t>(text);
    CHECK(std::llabs(distance) < arch::near_jump_reach());
    REQUIRE(remote__munmap(*t, sleeper, *island, 4096));

    auto shared = remote__map_memfd(*t, reader, "hotfix-registry", 8192, PROT_READ | PROT_WRITE);
    REQUIRE(shared);
    CHECK(shared->fd >= 0);
    CHECK(mapped(target.pid(), "/memfd:hotfix-registry (deleted)"));
    char link[256] = {};
    CHECK(::readlink(fmt::format("/proc/{}/fd/{}", target.pid(), shared->fd).c_str(), link, sizeof link - 1) > 0);
    CHECK(std::string(link) == "/memfd:hotfix-registry (deleted)");

    // A bad call fails cleanly and the thread is unharmed.
    auto bad = remote__munmap(*t, reader, 1, 4096);
    REQUIRE_FALSE(bad);
    CHECK(bad.error().what.find("munmap") != std::string::npos);
    REQUIRE(t->resume_all());
  }
  CHECK(process__tracer(target.pid()) == 0);
  require_progress(target);
  // The reader was inside read() the whole time: it still gets exactly what is written.
  target.child.send("feed after");
  INFO(thread_state(target.pid(), reader));
  CHECK(target.child.wait_for("got", seconds(5)) == "got after");
  CHECK(target.counters()["eintr"] == 0);
}

TEST_CASE("stop_thread stops one thread while the others keep running") {
  hotfix::test::require_root();
  Target target;
  pid_t reader = static_cast<pid_t>(target.tids["reader"]);
  auto t = Tracee::seize(target.pid());
  REQUIRE(t);
  REQUIRE(t->stop_thread(reader));
  auto before = target.counters();  // main thread answers: it runs
  std::this_thread::sleep_for(milliseconds(100));
  CHECK(target.counters()["busy"] > before["busy"]);
  auto r = remote__syscall(*t, reader, SYS_getppid, {});
  REQUIRE(r);
  CHECK(*r == ::getpid());
  REQUIRE(t->resume_thread(reader));
  REQUIRE(t->detach());
  CHECK(process__tracer(target.pid()) == 0);
}

TEST_CASE("inject_library runs the constructor exactly once and maps the library") {
  hotfix::test::require_root();
  Target target;
  std::string lib = fixture("libproc_ctor.so");
  {
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    auto inj = remote__inject_library(*t, lib);
    REQUIRE(inj);
    CHECK(inj->handle != 0);
    CHECK(mapped(target.pid(), lib));
    auto fn = remote__dlsym(*t, inj->handle, "proc_ctor_answer");
    REQUIRE(fn);
    CHECK(*fn != 0);
    auto missing = remote__dlsym(*t, inj->handle, "no_such_symbol");
    REQUIRE(missing);
    CHECK(*missing == 0);
    // The same library again: the loader only bumps its reference count.
    auto again = remote__inject_library(*t, lib);
    REQUIRE(again);
    CHECK(again->handle == inj->handle);
    REQUIRE(remote__dlclose(*t, again->handle));
    CHECK(target.counters()["ctor"] == 1);
    REQUIRE(remote__dlclose(*t, inj->handle));
  }
  CHECK(process__tracer(target.pid()) == 0);
  CHECK_FALSE(mapped(target.pid(), lib));
  CHECK(target.counters()["ctor"] == 1);
  require_progress(target);
}

TEST_CASE("inject_library reports dlopen's own error and leaves the target intact") {
  hotfix::test::require_root();
  Target target;
  {
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    auto not_elf = remote__inject_library(*t, fixture("proc_target.c.missing"));
    REQUIRE_FALSE(not_elf);
    CHECK(not_elf.error().what.find("cannot see") != std::string::npos);
    // A file that exists but is not a library: the target's dlerror() text comes back.
    std::string junk = fmt::format("/tmp/hotfix-test-junk-{}.so", ::getpid());
    std::ofstream(junk) << std::string(8192, 'x');
    auto bad = remote__inject_library(*t, junk);
    ::unlink(junk.c_str());
    REQUIRE_FALSE(bad);
    CHECK(bad.error().what.find(fmt::format("dlopen(\"{}\")", junk)) != std::string::npos);
    INFO(bad.error().what);
    CHECK(bad.error().what.find("invalid ELF header") != std::string::npos);
    auto relative = remote__inject_library(*t, "libproc_ctor.so");
    REQUIRE_FALSE(relative);
    CHECK(relative.error().exit_code == 2);
    // Not while we hold a thread: that thread may hold the lock dlopen needs.
    REQUIRE(t->stop_all());
    auto held = remote__inject_library(*t, fixture("libproc_ctor.so"));
    REQUIRE_FALSE(held);
    CHECK(held.error().hint.find("resume_all") != std::string::npos);
    REQUIRE(t->resume_all());
  }
  CHECK(process__tracer(target.pid()) == 0);
  require_progress(target);
}

TEST_CASE("injection while another thread hammers malloc and dlopen never deadlocks") {
  hotfix::test::require_root();
  Target target;
  auto hammer = fields(target.child.request("hammer " + fixture("libproc_hammer.so")));
  REQUIRE(hammer["hammer"] > 0);
  std::string lib = fixture("libproc_ctor.so");
  for (int i = 1; i <= 20; ++i) {
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    auto inj = remote__inject_library(*t, lib);
    REQUIRE(inj);
    CHECK(inj->tid != hammer["hammer"]);  // the hammer is nearly always inside malloc or the loader
    REQUIRE(remote__dlclose(*t, inj->handle));
    REQUIRE(t->detach());
    CHECK(target.counters()["ctor"] == i);  // once per load (dlclose unloaded it)
  }
  auto before = target.counters()["hammer"];
  std::this_thread::sleep_for(milliseconds(200));
  CHECK(target.counters()["hammer"] > before);
  CHECK(process__tracer(target.pid()) == 0);
}

TEST_CASE("a signal sent while the threads are stopped is delivered after resume") {
  hotfix::test::require_root();
  Target target;
  pid_t reader = static_cast<pid_t>(target.tids["reader"]);
  {
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    REQUIRE(t->stop_all());
    target.kill(SIGUSR1);
    REQUIRE(t->resume_all());
    REQUIRE(t->pump(milliseconds(200)));  // the thread that takes it stops for us: let it through
    CHECK(target.counters()["usr1"] == 1);

    // Pending while we run a system call on a thread: that thread dequeues it mid-step.
    REQUIRE(t->stop_all());
    target.kill(SIGUSR1);
    REQUIRE(remote__syscall(*t, reader, SYS_getpid, {}));
    REQUIRE(t->resume_all());
    REQUIRE(t->pump(milliseconds(200)));
    CHECK(target.counters()["usr1"] == 2);

    // Still pending when we detach: delivered then.
    REQUIRE(t->stop_all());
    target.kill(SIGUSR1);
  }
  CHECK(process__tracer(target.pid()) == 0);
  std::this_thread::sleep_for(milliseconds(100));
  CHECK(target.counters()["usr1"] == 3);
  require_progress(target);
}

TEST_CASE("SIGTERM sent while the threads are stopped still terminates the target") {
  hotfix::test::require_root();
  Target target;
  {
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    REQUIRE(t->stop_all());
    target.kill(SIGTERM);
    REQUIRE(t->resume_all());
  }
  CHECK(target.child.wait(seconds(10)) == 128 + SIGTERM);
}

TEST_CASE("a target already traced by someone else is refused and left alone") {
  hotfix::test::require_root();
  Target target;
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  pid_t helper = ::fork();
  if (helper == 0) {  // a second tracer, as gdb would be; killed by the test
    char ok = ::ptrace(PTRACE_SEIZE, target.pid(), nullptr, nullptr) == 0 ? 'y' : static_cast<char>(errno);
    (void)!::write(ready[1], &ok, 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char ok = 0;
  REQUIRE(::read(ready[0], &ok, 1) == 1);
  ::close(ready[0]);
  INFO("helper's PTRACE_SEIZE: " << (ok == 'y' ? "ok" : std::strerror(ok)));
  REQUIRE(ok == 'y');
  auto t = Tracee::seize(target.pid());
  REQUIRE_FALSE(t);
  CHECK(t.error().what.find(fmt::format("already traced by pid {}", helper)) != std::string::npos);
  CHECK(t.error().hint.find("detach") != std::string::npos);
  ::kill(helper, SIGKILL);
  ::waitpid(helper, nullptr, 0);
  CHECK(process__tracer(target.pid()) == 0);
  require_progress(target);
}

TEST_CASE("a target exiting while attached gives a clean error") {
  hotfix::test::require_root();
  SECTION("it exits by itself between stops") {
    Target target;
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    target.child.send("exit 50");
    Result<void> r;
    for (int i = 0; i < 2000 && r; ++i) {
      r = t->stop_all();
      if (r) r = t->resume_all();
      std::this_thread::sleep_for(milliseconds(1));
    }
    REQUIRE_FALSE(r);
    INFO(r.error().what);
    CHECK(r.error().what.find("exited with code 0 while hotfix was attached") != std::string::npos);
    t->detach();
    CHECK(target.child.wait(seconds(10)) == 0);
  }
  SECTION("it is killed while stopped") {
    Target target;
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    REQUIRE(t->stop_all());
    target.kill(SIGKILL);
    auto r = remote__syscall(*t, static_cast<pid_t>(target.tids["reader"]), SYS_getpid, {});
    REQUIRE_FALSE(r);
    auto pumped = t->pump(milliseconds(2000));  // until the kernel has finished it off
    REQUIRE_FALSE(pumped);
    CHECK(pumped.error().what.find("killed by SIGKILL while hotfix was attached") != std::string::npos);
    auto again = t->stop_all();
    REQUIRE_FALSE(again);
    CHECK(again.error().what == pumped.error().what);
    CHECK(target.child.wait(seconds(10)) == 128 + SIGKILL);
  }
  SECTION("no such process") {
    auto t = Tracee::seize(999999);
    REQUIRE_FALSE(t);
    CHECK(t.error().what.find("no process with pid 999999") != std::string::npos);
  }
}

TEST_CASE("a job-control stopped target is refused") {
  hotfix::test::require_root();
  Target target;
  target.kill(SIGSTOP);
  for (int i = 0; i < 100 && process__tracer(target.pid()) == 0; ++i) {
    std::ifstream st(fmt::format("/proc/{}/stat", target.pid()));
    std::string line;
    std::getline(st, line);
    if (line.find(") T") != std::string::npos) break;
    std::this_thread::sleep_for(milliseconds(10));
  }
  auto t = Tracee::seize(target.pid());
  REQUIRE_FALSE(t);
  CHECK(t.error().hint.find("kill -CONT") != std::string::npos);
  target.kill(SIGCONT);
  CHECK(process__tracer(target.pid()) == 0);
  require_progress(target);
}
