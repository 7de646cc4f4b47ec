#include "process/targets.hpp"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "patch/journal.hpp"
#include "patch/registry.hpp"

namespace hotfix {

namespace {

// Every numeric entry of /proc: thread-group leaders only (threads live under task/).
std::vector<pid_t> all_processes() {
  std::vector<pid_t> out;
  DIR* d = ::opendir("/proc");
  if (!d) return out;
  while (auto* e = ::readdir(d)) {
    char* end = nullptr;
    long v = std::strtol(e->d_name, &end, 10);
    if (end && *end == '\0' && v > 0) out.push_back(static_cast<pid_t>(v));
  }
  ::closedir(d);
  return out;
}

std::vector<pid_t> read_pids(const std::string& file) {
  std::vector<pid_t> out;
  std::ifstream in(file);
  for (long v; in >> v;)
    if (v > 0) out.push_back(static_cast<pid_t>(v));
  return out;
}

std::string unit_name(std::string unit) {
  if (unit.find('.') == std::string::npos) unit += ".service";
  return unit;
}

}  // namespace

Result<std::vector<pid_t>> targets__by_exe(const std::string& path, std::vector<pid_t>* replaced) {
  struct stat want {};
  if (::stat(path.c_str(), &want) != 0)
    return fail(fmt::format("cannot use --exe {}: {}", path, errno_text(errno)), "give the path of the program's file");
  std::error_code ec;
  std::string canonical = std::filesystem::weakly_canonical(path, ec).string();
  std::vector<pid_t> out;
  for (pid_t p : all_processes()) {
    struct stat st {};
    std::string exe = fmt::format("/proc/{}/exe", p);
    if (::stat(exe.c_str(), &st) == 0 && st.st_dev == want.st_dev && st.st_ino == want.st_ino) {
      out.push_back(p);
      continue;
    }
    if (!replaced) continue;
    char link[4096];
    ssize_t n = ::readlink(exe.c_str(), link, sizeof link - 1);
    if (n <= 0) continue;  // a kernel thread, or gone
    std::string target(link, static_cast<size_t>(n));
    if (target == canonical + " (deleted)") replaced->push_back(p);
  }
  return out;
}

Result<std::vector<pid_t>> targets__by_unit(const std::string& unit_arg) {
  const std::string unit = unit_name(unit_arg);
  const std::filesystem::path root = "/sys/fs/cgroup";
  std::set<pid_t> pids;
  bool found = false;
  std::error_code ec;
  auto opts = std::filesystem::directory_options::skip_permission_denied;
  for (auto it = std::filesystem::recursive_directory_iterator(root, opts, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (!it->is_directory(ec) || it->is_symlink(ec) || it->path().filename() != unit) continue;
    found = true;
    // The unit's own cgroup and every sub-cgroup of it (a delegated unit has some).
    for (auto sub = std::filesystem::recursive_directory_iterator(it->path(), opts, ec);
         !ec && sub != std::filesystem::recursive_directory_iterator(); sub.increment(ec))
      if (sub->path().filename() == "cgroup.procs")
        for (pid_t p : read_pids(sub->path())) pids.insert(p);
    for (pid_t p : read_pids(it->path() / "cgroup.procs")) pids.insert(p);
    it.disable_recursion_pending();
  }
  if (!found)
    return fail(fmt::format("no cgroup named {} under {}", unit, root.string()),
                "check the unit's name (`systemctl status NAME`); it has no cgroup while it is stopped");
  return std::vector<pid_t>(pids.begin(), pids.end());
}

std::vector<pid_t> targets__descendants(pid_t pid) {
  std::vector<pid_t> out;
  std::set<pid_t> seen{pid};
  std::vector<pid_t> todo{pid};
  while (!todo.empty()) {
    pid_t p = todo.back();
    todo.pop_back();
    std::error_code ec;
    for (auto& task : std::filesystem::directory_iterator(fmt::format("/proc/{}/task", p), ec))
      for (pid_t c : read_pids(task.path() / "children"))
        if (seen.insert(c).second) out.push_back(c), todo.push_back(c);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<pid_t> targets__with_registry() {
  std::vector<pid_t> out;
  const std::string needle = std::string("/memfd:") + kRegistryName;
  for (pid_t p : all_processes()) {
    if (p == ::getpid()) continue;
    std::ifstream in(fmt::format("/proc/{}/maps", p));
    for (std::string line; std::getline(in, line);)
      if (line.find(needle) != std::string::npos) {
        out.push_back(p);
        break;
      }
  }
  return out;
}

bool targets__same_process(pid_t pid, uint64_t start) {
  auto now = process__start_time(pid);
  return now && (start == 0 || *now == start);
}

Result<ResolvedTargets> targets__resolve(const TargetSpec& spec) {
  ResolvedTargets r;
  std::set<pid_t> pids(spec.pids.begin(), spec.pids.end());
  for (auto& exe : spec.exes) {
    std::vector<pid_t> replaced;
    auto found = HOTFIX_TRY(targets__by_exe(exe, &replaced));
    if (!replaced.empty())
      r.notes.push_back(fmt::format("{} process(es) run an older {} that was replaced or deleted on disk (pid {}{}); "
                                    "they run different code and are not included: restart them, or name them with --pid",
                                    replaced.size(), exe, replaced.front(), replaced.size() > 1 ? ", ..." : ""));
    if (found.empty())
      return fail(fmt::format("no process runs {}{}", exe, replaced.empty() ? "" : " (only older, replaced copies of it)"),
                  "start the program, or check the path (`ls -l /proc/PID/exe` shows what a process runs)");
    pids.insert(found.begin(), found.end());
  }
  for (auto& unit : spec.units) {
    auto found = HOTFIX_TRY(targets__by_unit(unit));
    if (found.empty())
      return fail(fmt::format("the cgroup of {} holds no process", unit_name(unit)), "start the unit first");
    pids.insert(found.begin(), found.end());
  }
  if (spec.children) {
    std::set<pid_t> roots = pids;
    for (pid_t p : roots)
      for (pid_t c : targets__descendants(p)) pids.insert(c);
  }
  pids.erase(::getpid());  // never ourselves (a --unit holding the operator's shell holds us too)
  r.pids.assign(pids.begin(), pids.end());
  return r;
}

}  // namespace hotfix
