#include "process/maps.hpp"

#include <dirent.h>
#include <linux/capability.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace hotfix {

namespace {
std::string proc_path(pid_t pid, const char* leaf) { return fmt::format("/proc/{}/{}", pid, leaf); }

Result<void> pid_error(pid_t pid, int err) {
  if (err == ENOENT || err == ESRCH) return fail(fmt::format("no process with pid {}", pid), "check the pid with `ps -p PID`");
  if (err == EACCES || err == EPERM)
    return fail(fmt::format("not allowed to inspect pid {}: {}", pid, errno_text(err)), "run hotfix-ctl as root");
  return fail(fmt::format("cannot read /proc/{}: {}", pid, errno_text(err)));
}
}  // namespace

bool process__alive(pid_t pid) {
  std::ifstream stat(proc_path(pid, "stat"));
  std::string line;
  if (!std::getline(stat, line)) return false;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z' && line[close + 2] != 'X';
}

Result<void> process__check_alive(pid_t pid) {
  if (pid <= 0) return fail(fmt::format("no process with pid {}", pid), "give a positive pid");
  if (::access(proc_path(pid, "maps").c_str(), R_OK) != 0) return pid_error(pid, errno);
  if (!process__alive(pid)) return fail(fmt::format("process {} has exited (it is a zombie)", pid), "give the pid of a running process");
  return {};
}

std::string process__comm(pid_t pid) {
  std::ifstream in(proc_path(pid, "comm"));
  std::string comm;
  return std::getline(in, comm) ? comm : "?";
}

Result<std::vector<Mapping>> process__read_maps(pid_t pid) {
  HOTFIX_CHECK(process__check_alive(pid));
  FILE* f = std::fopen(proc_path(pid, "maps").c_str(), "re");
  if (!f) {
    auto r = pid_error(pid, errno);
    return std::unexpected(r.error());
  }
  std::vector<Mapping> maps;
  char* line = nullptr;
  size_t cap = 0;
  while (getline(&line, &cap, f) > 0) {
    Mapping m;
    char perms[8] = {};
    int path_at = 0;
    unsigned long long start, end, off;
    if (std::sscanf(line, "%llx-%llx %7s %llx %*s %*s %n", &start, &end, perms, &off, &path_at) < 4) continue;
    m.start = start, m.end = end, m.offset = off, m.perms = perms;
    std::string path = line + path_at;
    while (!path.empty() && (path.back() == '\n' || path.back() == ' ')) path.pop_back();
    m.path = path;
    maps.push_back(std::move(m));
  }
  std::free(line);
  std::fclose(f);
  if (maps.empty()) return fail(fmt::format("process {} has no mappings (it is exiting)", pid), "give the pid of a running process");
  return maps;
}

Result<std::vector<pid_t>> process__list_threads(pid_t pid) {
  DIR* dir = ::opendir(proc_path(pid, "task").c_str());
  if (!dir) {
    auto r = pid_error(pid, errno);
    return std::unexpected(r.error());
  }
  std::vector<pid_t> tids;
  while (auto* e = ::readdir(dir)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    tids.push_back(static_cast<pid_t>(std::stol(e->d_name)));
  }
  ::closedir(dir);
  std::sort(tids.begin(), tids.end());
  return tids;
}

Result<void> process__check_privileges(bool need_bpf, bool need_ptrace) {
  if (::geteuid() == 0) return {};
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2] = {};
  if (::syscall(SYS_capget, &hdr, data) != 0) return fail("cannot read our capabilities", "run hotfix-ctl as root");
  auto has = [&](int cap) { return (data[cap / 32].effective >> (cap % 32)) & 1; };
  std::vector<std::string> missing;
  if (need_bpf && !has(CAP_BPF) && !has(CAP_SYS_ADMIN)) missing.push_back("CAP_BPF");
  if (need_bpf && !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN)) missing.push_back("CAP_PERFMON");
  if (need_ptrace && !has(CAP_SYS_PTRACE)) missing.push_back("CAP_SYS_PTRACE");
  if (missing.empty()) return {};
  std::string list;
  for (auto& m : missing) list += (list.empty() ? "" : ", ") + m;
  return fail(fmt::format("missing privileges: hotfix-ctl needs {}", list),
              "run it as root (sudo hotfix-ctl ...) or grant the capabilities with setcap");
}

}  // namespace hotfix
