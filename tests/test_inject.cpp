// Which thread may run the target's dlopen, and what a misbehaving constructor of fix.so does:
// single-threaded targets waiting in a syscall, sleeping or spinning are patched (strict and
// entry); a stale malloc/fork word on a stack does not refuse a thread, a thread inside malloc
// is never chosen; blocking, crashing, raising and exiting constructors are reported exactly.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "process/maps.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"
#include "support/harness.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix;
using namespace std::chrono;
using hotfix::test::Child;
using hotfix::test::fixture;
using hotfix::test::RunResult;

namespace {

std::map<std::string, long> fields(const std::string& reply) {
  std::map<std::string, long> out;
  std::istringstream in(reply);
  std::string word;
  while (in >> word)
    if (auto eq = word.find('='); eq != std::string::npos) out[word.substr(0, eq)] = std::stol(word.substr(eq + 1));
  return out;
}

RunResult ctl(std::vector<std::string> args, milliseconds timeout = seconds(120)) {
  args.insert(args.begin(), hotfix::test::ctl());
  return hotfix::test::run(std::move(args), timeout);
}

long value_of(Child& c) { return fields(c.request("call"))["value"]; }

bool mapped_containing(pid_t pid, const std::string& needle) {
  auto maps = process__read_maps(pid);
  if (!maps) return false;
  for (auto& m : *maps)
    if (m.path.find(needle) != std::string::npos) return true;
  return false;
}

std::string status_text(pid_t pid, const std::string& key) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(in, line);)
    if (line.rfind(key + ":", 0) == 0) return line.substr(key.size() + 2);
  return "";
}

// Patch inj_single with inj_fix.so, see new calls run the fix, revert, see the old code again.
void patch_and_revert(Child& target, const std::string& consistency) {
  REQUIRE(value_of(target) == 42);
  auto patched = ctl({"patch", "--pid", std::to_string(target.pid()), "--lib", fixture("inj_fix.so"), "--consistency",
                      consistency, "--observe", "0", "--timeout", "10"});
  INFO(patched.out << patched.err);
  REQUIRE(patched.exit_code == 0);
  CHECK(value_of(target) == 1041);
  auto reverted = ctl({"revert", "--pid", std::to_string(target.pid()), "--all", "--consistency", consistency});
  INFO(reverted.out << reverted.err);
  REQUIRE(reverted.exit_code == 0);
  CHECK(value_of(target) == 42);
  CHECK(status_text(target.pid(), "TracerPid") == "0");
  CHECK(target.running());
}

}  // namespace

TEST_CASE("single-threaded targets are patched and reverted while they wait, sleep or spin", "[single]") {
  hotfix::test::require_root();
  for (std::string mode : {"read", "epoll", "sleep", "spin"})
    for (std::string consistency : {"strict", "entry"}) {
      DYNAMIC_SECTION(mode << " " << consistency) {
        Child target({fixture("inj_single"), mode});
        REQUIRE(target.wait_for("ok pid="));
        patch_and_revert(target, consistency);
      }
    }
}

TEST_CASE("a stale fork/malloc word above the stack pointer does not refuse the only thread", "[single][stale]") {
  hotfix::test::require_root();
  for (std::string consistency : {"strict", "entry"}) {
    DYNAMIC_SECTION(consistency) {
      Child target({fixture("inj_single"), "epoll", "stale"});
      auto stale = target.wait_for("ok stale=");
      REQUIRE(stale);
      REQUIRE(fields(*stale)["stale"] > 0);  // the raw scan alone would have refused this thread
      {
        auto t = Tracee::seize(target.pid());
        REQUIRE(t);
        REQUIRE(t->stop_thread(target.pid()));
        auto why = remote__lock_frame(*t, target.pid());
        REQUIRE(why);
        CHECK(*why == "");
        REQUIRE(t->resume_thread(target.pid()));
      }
      patch_and_revert(target, consistency);
    }
  }
}

TEST_CASE("a thread executing the loader, malloc or free is never judged safe", "[malloc]") {
  hotfix::test::require_root();
  Child target({fixture("proc_target")});
  REQUIRE(target.request("pid").rfind("ok", 0) == 0);
  auto hammer = fields(target.request("hammer " + fixture("libproc_hammer.so")))["hammer"];
  REQUIRE(hammer > 0);
  auto table = SymbolTable::for_pid(target.pid());
  REQUIRE(table);
  auto t = Tracee::seize(target.pid());
  REQUIRE(t);
  int inside = 0, in_syscall = 0;
  std::map<std::string, int> seen;
  for (int i = 0; i < 3000 && (inside < 20 || in_syscall < 20); ++i) {
    REQUIRE(t->stop_thread(hammer));
    uint64_t pc = arch::regs__pc(t->find(hammer)->regs);
    auto why = remote__lock_frame(*t, hammer);
    REQUIRE(why);
    const Function* f = table->function_at(pc);
    std::string name = f ? f->name : "";
    seen[name]++;
    // Executing the loader (ld.so's text: dlopen/dlclose's work) or the bodies of malloc's
    // family (their exported names and aliases): the pc alone proves it, no unwinding needed.
    static const std::set<std::string> malloc_family = {"malloc", "free", "cfree", "calloc", "realloc", "__libc_malloc",
                                                        "__libc_free", "__libc_calloc", "__libc_realloc"};
    bool in_loader = f && f->object.find("ld-linux") != std::string::npos;
    if (in_loader || malloc_family.count(name)) {
      ++inside;
      INFO("pc " << std::hex << pc << " in " << name << " (" << (f ? f->object : "") << ")");
      CHECK_FALSE(why->empty());
    }
    // The hammer makes system calls only inside dlopen/dlclose (its mallocs are small): a
    // stop in a syscall wrapper has the loader as a live caller, found by the unwinder.
    static const std::set<std::string> loader_syscalls = {"mmap64", "munmap", "mprotect", "fstatat64",
                                                          "__GI___open64_nocancel", "__GI___read_nocancel",
                                                          "__GI___close_nocancel"};
    if (loader_syscalls.count(name)) {
      ++in_syscall;
      INFO("pc " << std::hex << pc << " in " << name << ", called by the loader");
      CHECK_FALSE(why->empty());
    }
    REQUIRE(t->resume_thread(hammer));
  }
  std::string names;
  for (auto& [n, k] : seen) names += n + "=" + std::to_string(k) + " ";
  INFO("where the hammer was stopped: " << names);
  CHECK(inside > 0);  // the hammer spends much of its time in the loader and malloc
  CHECK(in_syscall > 0);
}

TEST_CASE("a blocking constructor: hotfix-ctl returns after --timeout and says what state the target is in", "[ctor]") {
  hotfix::test::require_root();
  Child target({fixture("inj_single"), "read"});
  REQUIRE(target.wait_for("ok pid="));
  REQUIRE(value_of(target) == 42);
  auto began = steady_clock::now();
  auto r = ctl({"patch", "--pid", std::to_string(target.pid()), "--lib", fixture("inj_ctor_block.so"), "--observe", "0",
                "--timeout", "2"},
               seconds(60));
  auto took = duration_cast<milliseconds>(steady_clock::now() - began);
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  CHECK(took < seconds(2) + seconds(8));  // bounded by --timeout, not by the constructor's hour
  CHECK(r.err.find("did not return within") != std::string::npos);
  CHECK(r.err.find("loader lock") != std::string::npos);
  CHECK(r.err.find("the target is still running") != std::string::npos);
  // As described: it runs on untraced and unpatched, the half-loaded library stays mapped,
  // and its only thread may still dlopen (the lock is recursive and held by itself).
  CHECK(status_text(target.pid(), "TracerPid") == "0");
  CHECK(value_of(target) == 42);
  CHECK(mapped_containing(target.pid(), "inj_ctor_block.so"));
  CHECK(fields(target.request("dlopen " + fixture("libproc_hammer.so")))["dlopen"] == 1);
  target.send("exit");  // exit() runs _dl_fini, which takes the loader lock: its owner may
  CHECK(target.wait() == 0);
}

TEST_CASE("a constructor raising SIGSEGV: the signal is held back, the library unloaded, the target runs on", "[ctor]") {
  hotfix::test::require_root();
  Child target({fixture("inj_single"), "read"});
  REQUIRE(target.wait_for("ok pid="));
  auto r = ctl({"patch", "--pid", std::to_string(target.pid()), "--lib", fixture("inj_ctor_raise.so"), "--observe", "0",
                "--timeout", "5"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("raised SIGSEGV") != std::string::npos);
  CHECK(r.err.find("unloaded again") != std::string::npos);
  CHECK(value_of(target) == 42);
  CHECK_FALSE(mapped_containing(target.pid(), "inj_ctor_raise.so"));
  CHECK(status_text(target.pid(), "TracerPid") == "0");
  CHECK(target.running());
}

TEST_CASE("a constructor that faults: reported as a crash in the constructor, with the target's state", "[ctor]") {
  hotfix::test::require_root();
  Child target({fixture("inj_single"), "read"});
  REQUIRE(target.wait_for("ok pid="));
  auto r = ctl({"patch", "--pid", std::to_string(target.pid()), "--lib", fixture("inj_ctor_fault.so"), "--observe", "0",
                "--timeout", "5"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("failed inside the library's constructors") != std::string::npos);
  CHECK(r.err.find("SIGSEGV") != std::string::npos);
  CHECK(r.err.find("the target is still running") != std::string::npos);
  CHECK(value_of(target) == 42);
  CHECK(status_text(target.pid(), "TracerPid") == "0");
  CHECK(target.running());
}

TEST_CASE("a constructor that calls exit(): reported as the target ending inside dlopen", "[ctor]") {
  hotfix::test::require_root();
  Child target({fixture("inj_single"), "read"});
  REQUIRE(target.wait_for("ok pid="));
  auto r = ctl({"patch", "--pid", std::to_string(target.pid()), "--lib", fixture("inj_ctor_exit.so"), "--observe", "0",
                "--timeout", "5"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("the target ended while dlopen") != std::string::npos);
  CHECK(r.err.find("exit()") != std::string::npos);
  CHECK(target.wait() == 3);
}

TEST_CASE("preflight refuses a fix with an unresolvable symbol before touching the target, also in --dry-run", "[preflight]") {
  hotfix::test::require_root();
  Child target({fixture("inj_single"), "read"});
  REQUIRE(target.wait_for("ok pid="));
  for (bool dry : {true, false}) {
    std::vector<std::string> args{"patch", "--pid", std::to_string(target.pid()), "--lib", fixture("inj_needs_missing.so"),
                                  "--observe", "0"};
    if (dry) args.push_back("--dry-run");
    auto r = ctl(args);
    INFO(r.out << r.err);
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("inj_no_such_helper") != std::string::npos);
    CHECK_FALSE(mapped_containing(target.pid(), "inj_needs_missing"));
  }
  CHECK(value_of(target) == 42);
}

TEST_CASE("preflight refuses a fix whose DT_NEEDED library the target would not find, also in --dry-run", "[preflight]") {
  hotfix::test::require_root();
  Child target({fixture("inj_single"), "read"});
  REQUIRE(target.wait_for("ok pid="));
  for (bool dry : {true, false}) {
    std::vector<std::string> args{"patch", "--pid", std::to_string(target.pid()), "--lib", fixture("inj_needs_dep.so"),
                                  "--observe", "0"};
    if (dry) args.push_back("--dry-run");
    auto r = ctl(args);
    INFO(r.out << r.err);
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("needs libinj_dep.so (DT_NEEDED), which process " + std::to_string(target.pid()) +
                     " would not find") != std::string::npos);
    CHECK_FALSE(mapped_containing(target.pid(), "inj_needs_dep"));
    CHECK(r.out.find("loaded ") == std::string::npos);  // refused before dlopen
  }
  CHECK(value_of(target) == 42);
  CHECK(status_text(target.pid(), "TracerPid") == "0");
}

TEST_CASE("a thread blocked inside dl_iterate_phdr's callback is refused; without CFI the reason says so", "[iterate]") {
  hotfix::test::require_root();
  for (std::string variant : {"cfi", "nocfi"}) {
    DYNAMIC_SECTION(variant) {
      Child target({fixture("inj_iterate_" + variant)});
      REQUIRE(target.wait_for("ok inside"));
      std::this_thread::sleep_for(milliseconds(100));  // into the callback's read()
      auto t = Tracee::seize(target.pid());
      REQUIRE(t);
      REQUIRE(t->stop_thread(target.pid()));
      auto why = remote__lock_frame(*t, target.pid());
      REQUIRE(why);
      INFO(*why);
      CHECK(why->find("dl_iterate_phdr") != std::string::npos);
      if (variant == "cfi") CHECK(why->find("is a live caller on its stack") != std::string::npos);
      else CHECK(why->find("cannot be proven stale, so it counts as held") != std::string::npos);
      REQUIRE(t->resume_thread(target.pid()));
      auto chosen = remote__stop_safe_thread(*t, milliseconds(300));
      REQUIRE_FALSE(chosen);
      CHECK(chosen.error().what.find("dl_iterate_phdr") != std::string::npos);
      REQUIRE(t->detach());
      CHECK(status_text(target.pid(), "TracerPid") == "0");
    }
  }
}

TEST_CASE("a blocking constructor in a multi-threaded target: its other threads' dlopen blocks, as the message says", "[ctor]") {
  hotfix::test::require_root();
  Child target({fixture("proc_target")});
  REQUIRE(target.request("pid").rfind("ok", 0) == 0);
  std::string message;
  {
    auto t = Tracee::seize(target.pid());
    REQUIRE(t);
    auto inj = remote__inject_library(*t, fixture("inj_ctor_block.so"), InjectOptions::within(milliseconds(1500)));
    REQUIRE_FALSE(inj);
    message = inj.error().what;
    REQUIRE(t->detach());
  }
  INFO(message);
  CHECK(message.find("did not return within") != std::string::npos);
  CHECK(message.find("its other threads will block in dlopen") != std::string::npos);
  CHECK(status_text(target.pid(), "TracerPid") == "0");
  // The other threads run on (the command loop answers), but a new dlopen blocks for good.
  auto hammer = fields(target.request("hammer " + fixture("libproc_hammer.so")));
  REQUIRE(hammer["hammer"] > 0);
  auto before = fields(target.request("counters"));
  std::this_thread::sleep_for(milliseconds(500));
  auto after = fields(target.request("counters"));
  CHECK(after["busy"] > before["busy"]);
  // Stuck in its first dlopen behind the held loader lock (unheld, it loops thousands of
  // times in 500 ms: test_process's hammer test).
  CHECK(after["hammer"] == before["hammer"]);
}
