// The trust boundary of hotfix-ctl (docs/safety.md, "Trust boundary"): who may provide a fix,
// the bytes checked are the bytes the target runs, the audit log, root-only state, what
// unprivileged users are told, and delivery into another mount namespace. Real processes,
// fixes built with plain gcc into directories whose owners and modes each test sets.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>
#include <thread>

#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;
namespace fs = std::filesystem;

namespace {

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;
const std::string kAuditLog = "/var/log/hotfix/audit.log";

struct ScratchDir {
  fs::path path;
  ScratchDir() {
    char tmpl[] = "/tmp/hotfix-trust-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    path = tmpl;
    ::chmod(tmpl, 0755);  // others (a target running as nobody) may read what is in here
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& leaf) const { return (path / leaf).string(); }
};

// A fix the way a user builds one: plain gcc, C.
void build_fix(const std::string& out, const std::string& code, std::vector<std::string> extra = {}) {
  std::string src = out + ".c";
  { std::ofstream(src) << code; }
  std::vector<std::string> argv{"/usr/bin/gcc", "-O2", "-g", "-shared", "-fPIC", src, "-o", out};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto r = run(argv);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  fs::remove(src);
  REQUIRE(::chmod(out.c_str(), 0644) == 0);
}

const char* kGoodFix = "int trust_answer(int x) { return x + 1000; }\n";

// The evil fix: a different answer, and a constructor that leaves a mark the moment it runs.
void build_evil(const std::string& out, const std::string& marker) {
  build_fix(out,
            "#include <fcntl.h>\n#include <unistd.h>\n"
            "__attribute__((constructor)) static void mark(void) {\n"
            "  int fd = open(MARKER, O_WRONLY | O_CREAT | O_APPEND, 0644);\n"
            "  if (fd >= 0) { (void)write(fd, \"ran\\n\", 4); close(fd); }\n}\n"
            "int trust_answer(int x) { (void)x; return 666; }\n",
            {"-DMARKER=\"" + marker + "\""});
}

struct Target {
  Child child;
  explicit Target(std::vector<std::string> argv = {fixture("trust_target")}) : child(std::move(argv)) {
    REQUIRE(child.request("ready").rfind("ok", 0) == 0);
  }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    fs::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
  std::string answer() { return child.request("call"); }
};

std::string maps_of(pid_t pid) { return read_file("/proc/" + std::to_string(pid) + "/maps"); }
long tracer_of(pid_t pid) {
  std::istringstream in(read_file("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("TracerPid:", 0) == 0) return std::stol(line.substr(10));
  return -1;
}

// Refused with one line naming `needles`, and the target exactly as before: old answer, no
// fix mapped, no registry, not traced.
void expect_refused_untouched(const RunResult& r, Target& t, const std::vector<std::string>& needles) {
  INFO("exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 1);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  CHECK(r.err.find("--allow-untrusted-lib") != std::string::npos);
  for (auto& n : needles) CHECK(r.err.find(n) != std::string::npos);
  CHECK(t.answer() == "ok 42");
  auto maps = maps_of(t.pid());
  CHECK(maps.find("/memfd:hotfix") == std::string::npos);
  CHECK(tracer_of(t.pid()) == 0);
}

std::string field(const std::string& json, const std::string& key) {
  std::smatch m;
  if (!std::regex_search(json, m, std::regex("\"" + key + "\":(\"(?:[^\"\\\\]|\\\\.)*\"|\\[[^\\]]*\\]|[^,}]*)"))) return "<missing>";
  return m[1];
}

// The audit lines appended since `offset` that are about `verb` of `pid` (0: any pid).
std::vector<std::string> audit_lines(size_t offset, const std::string& verb, pid_t pid) {
  std::vector<std::string> out;
  std::string all = read_file(kAuditLog);
  std::istringstream in(offset <= all.size() ? all.substr(offset) : "");
  for (std::string line; std::getline(in, line);)
    if (field(line, "verb") == "\"" + verb + "\"" && (!pid || field(line, "pid") == std::to_string(pid))) out.push_back(line);
  return out;
}
size_t audit_size() {
  struct stat st;
  return ::stat(kAuditLog.c_str(), &st) == 0 ? static_cast<size_t>(st.st_size) : 0;
}

std::string sha256sum(const std::string& path) {
  auto r = run({"/usr/bin/sha256sum", path});
  return r.out.substr(0, 64);
}

// How /proc/PID/maps names patch `id` of good.so delivered by memfd.
std::string fmt_memfd(int id, const std::string& sha) {
  return "/memfd:hotfix:" + std::to_string(id) + ":" + sha + ":good.so (deleted)";
}

int patch_id(const std::string& json) {
  std::smatch m;
  return std::regex_search(json, m, std::regex("\"id\":([0-9]+)")) ? std::stoi(m[1]) : -1;
}

void revert_all(Target& t) {
  auto r = ctl_run({"revert", "--pid", std::to_string(t.pid()), "--all"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
}

mode_t mode_of(const std::string& path) {
  struct stat st;
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  CHECK(st.st_uid == 0);
  return st.st_mode & 07777;
}

}  // namespace

TEST_CASE("a fix.so someone else could change is refused, naming the path and the problem; --allow-untrusted-lib "
          "loads it and the audit log records the override", "[trust]") {
  require_root();
  ::unsetenv("SUDO_UID");
  ScratchDir dir;
  Target t;
  const std::string pid = std::to_string(t.pid());
  struct Case {
    const char* name;
    std::function<std::string()> setup;  // returns the --lib path
    std::vector<std::string> needles;
  };
  auto good_at = [&](const std::string& path) {
    build_fix(path, kGoodFix);
    return path;
  };
  auto sub = [&](const std::string& name, mode_t mode, uid_t owner) {
    std::string d = dir / name;
    REQUIRE(::mkdir(d.c_str(), 0755) == 0);
    REQUIRE(::chown(d.c_str(), owner, owner == 0 ? 0 : kNogroup) == 0);
    REQUIRE(::chmod(d.c_str(), mode) == 0);
    return d;
  };
  std::vector<Case> cases = {
      {"mode 0666", [&] { auto p = good_at(dir / "w666.so"); ::chmod(p.c_str(), 0666); return p; },
       {dir / "w666.so", "writable by others (mode 0666)"}},
      {"mode 0664", [&] { auto p = good_at(dir / "w664.so"); ::chmod(p.c_str(), 0664); return p; },
       {dir / "w664.so", "writable by its group (mode 0664)"}},
      {"owned by nobody", [&] { auto p = good_at(dir / "nobody.so"); REQUIRE(::chown(p.c_str(), kNobody, kNogroup) == 0); return p; },
       {dir / "nobody.so", "owned by uid 65534"}},
      {"in a 0777 directory", [&] { return good_at(sub("open", 0777, 0) + "/fix.so"); },
       {"the directory " + dir / "open", "writable by others (mode 0777)"}},
      {"in a nobody-owned directory", [&] { return good_at(sub("theirs", 0755, kNobody) + "/fix.so"); },
       {"the directory " + dir / "theirs", "owned by uid 65534"}},
      {"through a nobody-owned symlink", [&] {
         auto real = good_at(dir / "real.so");
         std::string link = dir / "link.so";
         REQUIRE(::symlink(real.c_str(), link.c_str()) == 0);
         REQUIRE(::lchown(link.c_str(), kNobody, kNogroup) == 0);
         return link;
       }, {"the symlink " + dir / "link.so", "owned by uid 65534"}},
      {"through a symlink into a 0777 directory", [&] {
         auto real = good_at(sub("bad", 0777, 0) + "/fix.so");
         std::string link = dir / "into-bad.so";
         REQUIRE(::symlink(real.c_str(), link.c_str()) == 0);
         return link;
       }, {dir / "into-bad.so", "the directory " + dir / "bad", "writable by others (mode 0777)"}},
      {"owned by nobody in a sticky world-writable directory", [&] {
         auto p = good_at(sub("sticky", 01777, 0) + "/fix.so");
         REQUIRE(::chown(p.c_str(), kNobody, kNogroup) == 0);
         return p;
       }, {dir / "sticky/fix.so", "owned by uid 65534", "in the sticky directory"}},
  };
  for (auto& c : cases) {
    SECTION(c.name) {
      std::string lib = c.setup();
      expect_refused_untouched(ctl_run({"patch", "--pid", pid, "--lib", lib, "--observe", "0"}), t, c.needles);

      size_t offset = audit_size();
      auto r = ctl_run({"patch", "--pid", pid, "--lib", lib, "--observe", "0", "--allow-untrusted-lib", "--json"});
      INFO(r.out << r.err);
      REQUIRE(r.exit_code == 0);
      CHECK(t.answer() == "ok 1041");
      auto lines = audit_lines(offset, "patch", t.pid());
      REQUIRE(lines.size() == 1);
      CHECK(field(lines[0], "allow_untrusted_lib") == "true");
      CHECK(field(lines[0], "untrusted").find(c.needles.back()) != std::string::npos);
      CHECK(field(lines[0], "result") == "\"ok\"");
      revert_all(t);
      CHECK(t.answer() == "ok 42");
    }
  }
}

TEST_CASE("trusted places are accepted: a root-owned fix in a sticky /tmp-like directory, the invoking user's own "
          "file (SUDO_UID)", "[trust]") {
  require_root();
  ::unsetenv("SUDO_UID");
  ScratchDir dir;
  Target t;
  const std::string pid = std::to_string(t.pid());
  std::string sticky = dir / "sticky";
  REQUIRE(::mkdir(sticky.c_str(), 01777) == 0);
  ::chmod(sticky.c_str(), 01777);
  build_fix(sticky + "/fix.so", kGoodFix);
  auto r = ctl_run({"patch", "--pid", pid, "--lib", sticky + "/fix.so", "--observe", "0"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(t.answer() == "ok 1041");
  revert_all(t);

  std::string theirs = dir / "theirs.so";
  build_fix(theirs, kGoodFix);
  REQUIRE(::chown(theirs.c_str(), kNobody, kNogroup) == 0);
  auto as_sudo = run({"/usr/bin/env", "SUDO_UID=65534", ctl(), "patch", "--pid", pid, "--lib", theirs, "--observe", "0"});
  INFO(as_sudo.out << as_sudo.err);
  REQUIRE(as_sudo.exit_code == 0);
  CHECK(t.answer() == "ok 1041");
  revert_all(t);
}

TEST_CASE("swapping a good and an evil fix.so during patches never runs the evil one", "[trust][toctou]") {
  require_root();
  ::unsetenv("SUDO_UID");
  ScratchDir dir;
  Target t;
  const std::string pid = std::to_string(t.pid());
  const std::string lib = dir / "fix.so", other = dir / "other.so", marker = dir / "evil-ran";
  build_fix(lib, kGoodFix);
  build_evil(other, marker);
  REQUIRE(::chown(other.c_str(), kNobody, kNogroup) == 0);  // the attacker's file

  std::atomic<bool> stop{false};
  std::atomic<long> swaps{0};
  std::thread racer([&] {
    while (!stop) {
      if (::renameat2(AT_FDCWD, lib.c_str(), AT_FDCWD, other.c_str(), RENAME_EXCHANGE) == 0) ++swaps;
      std::this_thread::yield();
    }
  });
  struct StopRacer {
    std::atomic<bool>& stop;
    std::thread& racer;
    ~StopRacer() {
      stop = true;
      racer.join();
    }
  } stop_racer{stop, racer};

  const char* env = std::getenv("HOTFIX_TOCTOU_ROUNDS");
  const int rounds = env ? std::atoi(env) : 100;
  int applied = 0, refused = 0;
  for (int i = 0; i < rounds; ++i) {
    auto r = ctl_run({"patch", "--pid", pid, "--lib", lib, "--observe", "0", "--no-count"});
    INFO("round " << i << " exit " << r.exit_code << "\n" << r.out << r.err);
    if (r.exit_code == 0) {
      ++applied;
      REQUIRE(t.answer() == "ok 1041");
      revert_all(t);
    } else {
      ++refused;
      REQUIRE(r.exit_code == 1);
      REQUIRE(r.err.find("owned by uid 65534") != std::string::npos);
    }
    REQUIRE(t.answer() == "ok 42");
    REQUIRE_FALSE(fs::exists(marker));
  }
  INFO("applied " << applied << ", refused " << refused << ", swaps " << swaps.load());
  CHECK(applied + refused == rounds);
  CHECK(swaps.load() > rounds);  // the race really ran
  CHECK(applied > 0);
  CHECK(maps_of(t.pid()).find("/memfd:hotfix:") == std::string::npos);  // every copy unloaded
  WARN("toctou: " << rounds << " rounds, " << applied << " applied the good fix, " << refused << " refused the evil one");
}

TEST_CASE("the audit log has one line per patch, revert and gc, field by field; copies and pins are root-only",
          "[trust][audit]") {
  require_root();
  ::unsetenv("SUDO_UID");
  ScratchDir dir;
  auto t = std::make_unique<Target>();
  const pid_t tpid = t->pid();
  const std::string pid = std::to_string(tpid);
  const std::string lib = dir / "good.so";
  build_fix(lib, kGoodFix);
  std::string exe = fs::read_symlink("/proc/" + pid + "/exe").string();
  std::smatch m;
  std::string notes = run({"/usr/bin/readelf", "-n", exe}).out;
  REQUIRE(std::regex_search(notes, m, std::regex("Build ID: ([0-9a-f]+)")));
  std::string build_id = m[1];
  std::string loginuid = read_file("/proc/self/loginuid");
  std::string sha = sha256sum(lib);

  size_t offset = audit_size();
  auto r = ctl_run({"patch", "--pid", pid, "--lib", lib, "--observe", "0", "--json"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  int id = patch_id(r.out);
  CHECK(t->answer() == "ok 1041");
  CHECK(field(r.out, "sha256") == "\"" + sha + "\"");

  // Root-only: the log, the pins (and no copy on disk at all: the target holds a sealed memfd).
  CHECK(mode_of("/var/log/hotfix") == 0700);
  CHECK(mode_of(kAuditLog) == 0600);
  CHECK(mode_of("/sys/fs/bpf/hotfix") == 0700);
  CHECK(mode_of("/sys/fs/bpf/hotfix/" + pid) == 0700);
  std::string pins = "/sys/fs/bpf/hotfix/" + pid + "/" + std::to_string(id);
  CHECK(mode_of(pins) == 0700);
  int files = 0;
  for (auto& e : fs::directory_iterator(pins)) {
    INFO(e.path());
    CHECK(mode_of(e.path().string()) == 0600);
    ++files;
  }
  CHECK(files >= 3);
  CHECK_FALSE(fs::exists("/run/hotfix/" + pid));
  CHECK(maps_of(tpid).find(fmt_memfd(id, sha)) != std::string::npos);

  auto patched = audit_lines(offset, "patch", tpid);
  REQUIRE(patched.size() == 1);
  const std::string& a = patched[0];
  INFO(a);
  CHECK(field(a, "uid") == "0");
  CHECK(field(a, "loginuid") == loginuid);
  CHECK(field(a, "exe") == "\"" + exe + "\"");
  CHECK(field(a, "build_id") == "\"" + build_id + "\"");
  CHECK(field(a, "library") == "\"" + lib + "\"");
  CHECK(field(a, "sha256") == "\"" + sha + "\"");
  CHECK(field(a, "functions") == "[\"trust_answer\"]");
  CHECK(field(a, "ids") == "[" + std::to_string(id) + "]");
  CHECK(field(a, "result") == "\"ok\"");
  CHECK(std::regex_match(field(a, "pause_us"), std::regex("[0-9]+\\.[0-9]")));
  CHECK(field(a, "allow_untrusted_lib") == "false");

  offset = audit_size();
  revert_all(*t);
  CHECK(t->answer() == "ok 42");
  auto reverted = audit_lines(offset, "revert", tpid);
  REQUIRE(reverted.size() == 1);
  INFO(reverted[0]);
  CHECK(field(reverted[0], "uid") == "0");
  CHECK(field(reverted[0], "loginuid") == loginuid);
  CHECK(field(reverted[0], "exe") == "\"" + exe + "\"");
  CHECK(field(reverted[0], "build_id") == "\"" + build_id + "\"");
  CHECK(field(reverted[0], "sha256") == "\"" + sha + "\"");
  CHECK(field(reverted[0], "functions") == "[\"trust_answer\"]");
  CHECK(field(reverted[0], "ids") == "[" + std::to_string(id) + "]");
  CHECK(field(reverted[0], "result") == "\"ok\"");
  CHECK(std::regex_match(field(reverted[0], "pause_us"), std::regex("[0-9]+\\.[0-9]")));

  // A refusal is audited too, with its error line.
  offset = audit_size();
  ::chmod(lib.c_str(), 0666);
  CHECK(ctl_run({"patch", "--pid", pid, "--lib", lib, "--observe", "0"}).exit_code == 1);
  auto refusal = audit_lines(offset, "patch", tpid);
  REQUIRE(refusal.size() == 1);
  CHECK(field(refusal[0], "result").find("refusing the fix library") != std::string::npos);
  ::chmod(lib.c_str(), 0644);

  // gc after the target is gone: its pins (the patch above left counters of the patch).
  REQUIRE(ctl_run({"patch", "--pid", pid, "--lib", lib, "--observe", "0"}).exit_code == 0);
  t->child.signal(SIGKILL);  // gone, its pins still there (t's destructor would remove them)
  t->child.wait();
  offset = audit_size();
  auto gc = ctl_run({"gc"});
  INFO(gc.out << gc.err);
  CHECK(gc.exit_code == 0);
  std::vector<std::string> ours;
  for (auto& line : audit_lines(offset, "gc", 0))
    if (line.find("/sys/fs/bpf/hotfix/" + pid + "/") != std::string::npos) ours.push_back(line);
  REQUIRE(ours.size() == 1);
  CHECK(field(ours[0], "uid") == "0");
  CHECK(field(ours[0], "loginuid") == loginuid);
  CHECK(field(ours[0], "result") == "\"ok\"");
}

TEST_CASE("an unprivileged user is told it cannot see a root process's patches, never that there are none",
          "[trust][nonroot]") {
  require_root();
  ::unsetenv("SUDO_UID");
  ScratchDir dir;
  Target t;
  const std::string pid = std::to_string(t.pid());
  build_fix(dir / "good.so", kGoodFix);
  REQUIRE(ctl_run({"patch", "--pid", pid, "--lib", dir / "good.so", "--observe", "0"}).exit_code == 0);
  for (const char* verb : {"list", "stats"}) {
    auto r = run({"/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", ctl(), verb, "--pid", pid});
    INFO(verb << ": exit " << r.exit_code << "\n" << r.out << r.err);
    CHECK(r.exit_code == 1);
    CHECK(r.err.find("cannot read the hotfix state of pid " + pid + ": permission denied; run as root") != std::string::npos);
    CHECK(r.out.find("no hotfix patches") == std::string::npos);
  }
  revert_all(t);
}

TEST_CASE("a target in another mount namespace (private /run and /tmp) is patched and reverted", "[trust][mntns]") {
  require_root();
  ::unsetenv("SUDO_UID");
  ScratchDir dir;  // in OUR /tmp: the target cannot see it
  build_fix(dir / "good.so", kGoodFix);
  Target t({"/usr/bin/unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
            // The fixture is opened first: the build tree itself may live under /tmp.
            "exec 3< \"$0\" && mount -t tmpfs none /run && mount -t tmpfs none /tmp && exec /proc/self/fd/3",
            fixture("trust_target")});
  const std::string pid = std::to_string(t.pid());
  REQUIRE(fs::read_symlink("/proc/" + pid + "/ns/mnt") != fs::read_symlink("/proc/self/ns/mnt"));
  REQUIRE_FALSE(fs::exists("/proc/" + pid + "/root" + (dir / "good.so")));
  auto r = ctl_run({"patch", "--pid", pid, "--lib", dir / "good.so", "--observe", "0"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(t.answer() == "ok 1041");
  revert_all(t);
  CHECK(t.answer() == "ok 42");
  CHECK(maps_of(t.pid()).find("/memfd:hotfix:") == std::string::npos);
}

TEST_CASE("a target running as nobody is patched with counting although the pins are root-only", "[trust][nonroot]") {
  require_root();
  ::unsetenv("SUDO_UID");
  ScratchDir dir;
  build_fix(dir / "good.so", kGoodFix);
  Target t({"/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", fixture("trust_target")});
  const std::string pid = std::to_string(t.pid());
  auto r = ctl_run({"patch", "--pid", pid, "--lib", dir / "good.so", "--observe", "0", "--json"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  int id = patch_id(r.out);
  for (int i = 0; i < 5; ++i) CHECK(t.answer() == "ok 1041");
  auto stats = ctl_run({"stats", "--pid", pid, "--json"});
  INFO(stats.out << stats.err);
  CHECK(stats.out.find("\"new_hits\":5") != std::string::npos);
  CHECK(mode_of("/sys/fs/bpf/hotfix/" + pid + "/" + std::to_string(id)) == 0700);
  CHECK_FALSE(fs::exists("/sys/fs/bpf/hotfix-handoff-" + pid + "-" + std::to_string(id)));  // removed once mapped
  revert_all(t);
}

// The registry lives in the target, so whoever runs as the target's user can rewrite it (here
// the nobody-owned process itself does, with a valid checksum). Root's hotfix-ctl must not act
// on it: revert and a new patch refuse as tampering, write nothing, delete nothing.
TEST_CASE("a registry forged by the target's user is refused as tampering; nothing is written or deleted",
          "[trust][forged]") {
  require_root();
  ::unsetenv("SUDO_UID");
  ScratchDir dir;
  build_fix(dir / "good.so", kGoodFix);
  Target t({"/usr/bin/setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", fixture("trust_target")});
  const std::string pid = std::to_string(t.pid());
  auto r = ctl_run({"patch", "--pid", pid, "--lib", dir / "good.so", "--observe", "0"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  REQUIRE(t.answer() == "ok 1041");
  REQUIRE(t.child.request("forge") == "ok forged");
  auto maps_before = maps_of(t.pid());
  for (auto verb : {"revert", "patch"}) {
    std::vector<std::string> args = {verb, "--pid", pid};
    if (std::string(verb) == "revert") args.push_back("--all");
    else args.insert(args.end(), {"--lib", dir / "good.so", "--observe", "0"});
    auto refused = ctl_run(args);
    INFO(verb << ": " << refused.out << refused.err);
    CHECK(refused.exit_code == 1);
    CHECK(std::count(refused.err.begin(), refused.err.end(), '\n') == 1);
    CHECK(refused.err.find("tampering") != std::string::npos);
  }
  auto listed = ctl_run({"list", "--pid", pid});
  CHECK(listed.err.find("not root's") != std::string::npos);
  CHECK(t.answer() == "ok 1041");  // still the fix: nothing (the forged int3s above all) was written
  CHECK(maps_of(t.pid()) == maps_before);
  CHECK(tracer_of(t.pid()) == 0);
}
