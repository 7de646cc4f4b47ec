// Without privileges every verb that needs them says which, in one line, exit 1 -- and the
// target is untouched. Runs hotfix-ctl as user nobody (setpriv, from util-linux).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>

#include "support/harness.hpp"

using namespace hotfix::test;

namespace {

RunResult as_nobody(std::vector<std::string> args) {
  std::vector<std::string> argv{"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", ctl()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run(argv);
}

void require_setpriv() {
  require_root();
  if (!std::filesystem::exists("/usr/bin/setpriv")) {
    std::fprintf(stderr, "SKIP: /usr/bin/setpriv (util-linux) is needed to run hotfix-ctl unprivileged\n");
    std::exit(4);
  }
}

void expect_one_line(const RunResult& r, const std::string& needle) {
  INFO("exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 1);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  CHECK(r.err.find("missing privileges") != std::string::npos);
  CHECK(r.err.find(needle) != std::string::npos);
}

}  // namespace

TEST_CASE("watch without CAP_BPF/CAP_PERFMON names what it needs") {
  require_setpriv();
  Child target({fixture("calls")});
  REQUIRE(target.request("ready").rfind("ok", 0) == 0);
  expect_one_line(as_nobody({"watch", "--pid", std::to_string(target.pid()), "c_add", "--duration", "1"}), "CAP_BPF");
}

TEST_CASE("patch and revert without CAP_SYS_PTRACE name what they need and change nothing") {
  require_setpriv();
  Child target({fixture("calls")});
  REQUIRE(target.request("ready").rfind("ok", 0) == 0);
  auto pid = std::to_string(target.pid());
  auto maps_before = run({"/bin/cat", "/proc/" + pid + "/maps"}).out;
  expect_one_line(as_nobody({"patch", "--pid", pid, "--lib", fixture("libcallee.so")}), "CAP_SYS_PTRACE");
  expect_one_line(as_nobody({"revert", "--pid", pid, "--all"}), "CAP_SYS_PTRACE");
  CHECK(run({"/bin/cat", "/proc/" + pid + "/maps"}).out == maps_before);
  CHECK(target.request("call c_add 3").rfind("ok", 0) == 0);
}
