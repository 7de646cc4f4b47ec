#include "support/harness.hpp"

#include <dirent.h>
#include <linux/perf_event.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <bpf/bpf.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "observe/watch.hpp"

namespace hotfix::test {

using namespace std::chrono;

std::string fixture(const std::string& name) { return std::string(HOTFIX_FIXTURES) + "/" + name; }
std::string ctl() { return HOTFIX_CTL; }

void require_root() {
  if (::geteuid() != 0) {
    std::fprintf(stderr, "SKIP: these tests need root (real BPF and ptrace on real processes)\n");
    std::exit(4);
  }
}

Child::Child(std::vector<std::string> argv, bool capture_stderr) {
  int in[2], out[2], err[2];
  if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC) || ::pipe2(err, O_CLOEXEC))
    throw std::runtime_error("pipe failed");
  pid_ = ::fork();
  if (pid_ == 0) {
    ::dup2(in[0], 0);
    ::dup2(out[1], 1);
    if (capture_stderr) ::dup2(err[1], 2);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  ::close(err[1]);
  in_ = in[1], out_ = out[0], err_ = err[0];
}

Child::~Child() {
  if (running()) {
    ::kill(pid_, SIGKILL);
    wait(seconds(10));
  }
  for (int fd : {in_, out_, err_})
    if (fd >= 0) ::close(fd);
}

void Child::send(const std::string& line) {
  std::string s = line + "\n";
  if (::write(in_, s.data(), s.size()) != static_cast<ssize_t>(s.size())) throw std::runtime_error("write to child failed");
}

void Child::close_stdin() {
  if (in_ >= 0) ::close(in_);
  in_ = -1;
}

std::optional<std::string> Child::read_line_from(int fd, std::string& buf, milliseconds timeout) {
  auto deadline = steady_clock::now() + timeout;
  for (;;) {
    auto nl = buf.find('\n');
    if (nl != std::string::npos) {
      std::string line = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      return line;
    }
    auto left = duration_cast<milliseconds>(deadline - steady_clock::now()).count();
    if (left <= 0) return std::nullopt;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left)) <= 0) continue;
    char tmp[4096];
    ssize_t n = ::read(fd, tmp, sizeof tmp);
    if (n <= 0) {
      if (buf.empty()) return std::nullopt;
      std::string line;
      line.swap(buf);
      return line;
    }
    buf.append(tmp, n);
  }
}

std::optional<std::string> Child::read_line(milliseconds timeout) { return read_line_from(out_, out_buf_, timeout); }
std::optional<std::string> Child::read_stderr_line(milliseconds timeout) {
  return read_line_from(err_, err_buf_, timeout);
}

std::optional<std::string> Child::wait_for(const std::string& needle, milliseconds timeout) {
  auto deadline = steady_clock::now() + timeout;
  while (steady_clock::now() < deadline) {
    auto line = read_line(duration_cast<milliseconds>(deadline - steady_clock::now()));
    if (!line) return std::nullopt;
    if (line->find(needle) != std::string::npos) return line;
  }
  return std::nullopt;
}

std::string Child::request(const std::string& line, milliseconds timeout) {
  send(line);
  auto deadline = steady_clock::now() + timeout;
  while (steady_clock::now() < deadline) {
    auto reply = read_line(duration_cast<milliseconds>(deadline - steady_clock::now()));
    if (!reply) break;
    if (reply->rfind("ok", 0) == 0 || reply->rfind("err", 0) == 0) return *reply;
  }
  return "timeout";
}

void Child::signal(int sig) {
  if (running()) ::kill(pid_, sig);
}

bool Child::running() {
  if (status_) return false;
  int st;
  pid_t r = ::waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return false;
  }
  return r == 0;
}

std::optional<int> Child::wait(milliseconds timeout) {
  auto deadline = steady_clock::now() + timeout;
  while (running()) {
    if (steady_clock::now() > deadline) return std::nullopt;
    ::usleep(2000);
  }
  return status_;
}

namespace {
std::string drain(int fd, std::string& buf) {
  std::string all;
  all.swap(buf);
  char tmp[4096];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) break;
    ssize_t n = ::read(fd, tmp, sizeof tmp);
    if (n <= 0) break;
    all.append(tmp, n);
  }
  return all;
}
}  // namespace

std::string Child::drain_stdout() { return drain(out_, out_buf_); }
std::string Child::drain_stderr() { return drain(err_, err_buf_); }

RunResult run(std::vector<std::string> argv, milliseconds timeout) {
  Child c(std::move(argv));
  c.close_stdin();
  RunResult r;
  // Read both pipes while waiting so a chatty child never blocks on a full pipe.
  auto deadline = steady_clock::now() + timeout;
  while (c.running() && steady_clock::now() < deadline) {
    r.out += c.drain_stdout();
    r.err += c.drain_stderr();
  }
  auto code = c.wait(milliseconds(1));
  r.exit_code = code ? *code : -1;
  r.out += c.drain_stdout();
  r.err += c.drain_stderr();
  return r;
}

RunResult ctl_run(std::vector<std::string> args, milliseconds timeout) {
  args.insert(args.begin(), ctl());
  return run(std::move(args), timeout);
}

RunResult ctl_run(std::vector<std::string> args, const std::string& env, milliseconds timeout) {
  args.insert(args.begin(), ctl());
  if (!env.empty()) args.insert(args.begin(), {"/usr/bin/env", env});
  return run(std::move(args), timeout);
}

std::set<uint32_t> bpf_links_of(const std::string& prefix) {
  std::set<uint32_t> ours;
  for (uint32_t id : hotfix::bpf__link_ids()) {
    int fd = bpf_link_get_fd_by_id(id);
    if (fd < 0) continue;
    bpf_link_info link{};
    uint32_t len = sizeof link;
    if (bpf_obj_get_info_by_fd(fd, &link, &len) == 0) {
      int prog = bpf_prog_get_fd_by_id(link.prog_id);
      bpf_prog_info info{};
      uint32_t plen = sizeof info;
      if (prog >= 0 && bpf_obj_get_info_by_fd(prog, &info, &plen) == 0 && std::string(info.name).rfind(prefix, 0) == 0)
        ours.insert(id);
      if (prog >= 0) ::close(prog);
    }
    ::close(fd);
  }
  return ours;
}

std::vector<unsigned char> read_memory(pid_t pid, unsigned long addr, size_t len) {
  std::vector<unsigned char> buf(len);
  iovec local{buf.data(), len}, remote{reinterpret_cast<void*>(addr), len};
  if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(len)) buf.clear();
  return buf;
}

int count_processes(const std::string& exe_path) {
  int n = 0;
  DIR* d = ::opendir("/proc");
  while (auto* e = ::readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    char link[4096];
    ssize_t len = ::readlink((std::string("/proc/") + e->d_name + "/exe").c_str(), link, sizeof link - 1);
    if (len > 0 && std::string(link, len) == exe_path) n++;
  }
  ::closedir(d);
  return n;
}

std::vector<unsigned char> file_bytes(pid_t pid, unsigned long addr, size_t len) {
  FILE* maps = std::fopen(("/proc/" + std::to_string(pid) + "/maps").c_str(), "r");
  if (!maps) return {};
  std::vector<unsigned char> bytes;
  char line[4096 + 256];
  while (std::fgets(line, sizeof line, maps)) {
    unsigned long start, end, offset, inode;
    char perms[8], path[4096] = "";
    unsigned dev_major, dev_minor;
    if (std::sscanf(line, "%lx-%lx %7s %lx %x:%x %lu %4095s", &start, &end, perms, &offset, &dev_major, &dev_minor,
                    &inode, path) < 8 || addr < start || addr >= end)
      continue;
    if (FILE* f = std::fopen(path, "rb")) {
      bytes.resize(len);
      if (std::fseek(f, static_cast<long>(addr - start + offset), SEEK_SET) != 0 ||
          std::fread(bytes.data(), 1, len, f) != len)
        bytes.clear();
      std::fclose(f);
    }
    break;
  }
  std::fclose(maps);
  return bytes;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

long status_field(pid_t pid, const std::string& key) {
  std::istringstream in(read_file("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(in, line);)
    if (line.rfind(key + ":", 0) == 0) return std::stol(line.substr(key.size() + 1));
  return -1;
}

std::set<std::string> file_mappings(pid_t pid) {
  std::set<std::string> out;
  std::istringstream in(read_file("/proc/" + std::to_string(pid) + "/maps"));
  for (std::string line; std::getline(in, line);)
    if (line.find(" /") != std::string::npos) out.insert(line);
  return out;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(line);
  return out;
}

ForeignUprobe::ForeignUprobe(const std::string& path, unsigned long offset) {
  int type = std::atoi(read_file("/sys/bus/event_source/devices/uprobe/type").c_str());
  if (type <= 0) return;
  perf_event_attr attr{};
  attr.size = sizeof attr;
  attr.type = static_cast<uint32_t>(type);
  attr.config1 = reinterpret_cast<uint64_t>(path.c_str());
  attr.config2 = offset;
  fd = static_cast<int>(::syscall(SYS_perf_event_open, &attr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC));
  if (fd >= 0) ::ioctl(fd, PERF_EVENT_IOC_ENABLE, 0);
}

ForeignUprobe::~ForeignUprobe() {
  if (fd >= 0) ::close(fd);
}

unsigned long file_offset(pid_t pid, unsigned long addr, std::string& path) {
  for (auto& line : lines_of(read_file("/proc/" + std::to_string(pid) + "/maps"))) {
    unsigned long start, end, off;
    char p[4096] = "";
    if (std::sscanf(line.c_str(), "%lx-%lx %*s %lx %*s %*s %4095s", &start, &end, &off, p) == 4 && addr >= start &&
        addr < end) {
      path = p;
      return addr - start + off;
    }
  }
  return 0;
}

}  // namespace hotfix::test
