// Real processes for real tests: spawn fixtures and hotfix-ctl, talk to them over pipes,
// and always clean up (a Child is killed and reaped when it goes out of scope).
#pragma once
#include <sys/types.h>

#include <chrono>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace hotfix::test {

// The path of a built fixture program or library.
std::string fixture(const std::string& name);
// The hotfix-ctl binary under test.
std::string ctl();

// Exit with the SKIP code (4) and a reason unless we run as root with BPF and ptrace.
void require_root();

class Child {
 public:
  // Start argv[0] with args; stdin/stdout/stderr are pipes we hold.
  explicit Child(std::vector<std::string> argv, bool capture_stderr = true);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  void send(const std::string& line);  // writes line + '\n' to its stdin
  void close_stdin();
  // Next line of stdout; nullopt on EOF or timeout.
  std::optional<std::string> read_line(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  // Read stdout lines until one contains `needle`; returns that line.
  std::optional<std::string> wait_for(const std::string& needle,
                                      std::chrono::milliseconds timeout = std::chrono::seconds(20));
  // Send a request and return the first reply line that starts with "ok" or "err".
  std::string request(const std::string& line, std::chrono::milliseconds timeout = std::chrono::seconds(30));
  void signal(int sig);
  // Wait for exit; returns the exit code (128+sig for a signal), or nullopt on timeout.
  std::optional<int> wait(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  std::string drain_stdout();  // everything left on stdout after exit
  std::string drain_stderr();  // everything on stderr so far
  std::optional<std::string> read_stderr_line(std::chrono::milliseconds timeout = std::chrono::seconds(20));
  bool running();

 private:
  std::optional<std::string> read_line_from(int fd, std::string& buf, std::chrono::milliseconds timeout);
  pid_t pid_ = -1;
  int in_ = -1, out_ = -1, err_ = -1;
  std::string out_buf_, err_buf_;
  std::optional<int> status_;
};

struct RunResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
// Run a command to completion (with a timeout) and capture everything.
RunResult run(std::vector<std::string> argv, std::chrono::milliseconds timeout = std::chrono::seconds(120));
// Run hotfix-ctl with `args` to completion; `env` ("NAME=value", e.g. a crash point) is set for it alone.
RunResult ctl_run(std::vector<std::string> args, std::chrono::milliseconds timeout = std::chrono::seconds(120));
RunResult ctl_run(std::vector<std::string> args, const std::string& env,
                  std::chrono::milliseconds timeout = std::chrono::seconds(120));

// The BPF links that exist now whose program's name starts with `prefix` ("watch_" for watch's
// probes): other tests on the machine make links of their own, so a test compares these sets.
std::set<uint32_t> bpf_links_of(const std::string& prefix);

// Bytes of `pid`'s memory at `addr` (process_vm_readv).
std::vector<unsigned char> read_memory(pid_t pid, unsigned long addr, size_t len);

// The bytes the FILE mapped at `addr` of `pid` holds there (path and offset from
// /proc/PID/maps): what a patched entry must show again after revert. Empty if unmapped.
std::vector<unsigned char> file_bytes(pid_t pid, unsigned long addr, size_t len);

// The whole text of a file ("" if it cannot be read), e.g. /proc/PID/maps.
std::string read_file(const std::string& path);
// The number in "Key:\t..." of /proc/PID/status (-1 when absent), e.g. "TracerPid", "Threads".
long status_field(pid_t pid, const std::string& key);
// The lines of /proc/PID/maps that map a file or a memfd (anything with a '/' path).
std::set<std::string> file_mappings(pid_t pid);
// The non-empty lines of `text`.
std::vector<std::string> lines_of(const std::string& text);

// How many live processes run this executable (to prove nothing is left behind).
int count_processes(const std::string& exe_path);

// A uprobe of "another tool" (what bpftrace and perf make): a perf uprobe event on
// `path`+`offset`, enabled, in every process that maps the file; closed (and so removed) when
// destroyed, or when the test process dies. fd < 0 (errno set) when the kernel refused it.
struct ForeignUprobe {
  int fd = -1;
  ForeignUprobe(const std::string& path, unsigned long offset);
  ~ForeignUprobe();
  ForeignUprobe(const ForeignUprobe&) = delete;
  ForeignUprobe& operator=(const ForeignUprobe&) = delete;
};
// The file and file offset that `addr` of `pid` maps (from /proc/PID/maps); offset 0 if none.
unsigned long file_offset(pid_t pid, unsigned long addr, std::string& path);

}  // namespace hotfix::test
