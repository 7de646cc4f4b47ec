#include "patch/deliver.hpp"

#include <fcntl.h>
#include <link.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <set>

#include "common/crashpoint.hpp"
#include "common/paths.hpp"
#include "common/sha256.hpp"
#include "common/unique_fd.hpp"
#include "process/memory.hpp"
#include "process/remote.hpp"

#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U
#endif
#ifndef F_SEAL_EXEC
#define F_SEAL_EXEC 0x0020
#endif

namespace hotfix {

namespace {

constexpr size_t kMaxMemfdName = 249;  // NAME_MAX minus "memfd:"
constexpr const char* kFdPrefix = "/proc/self/fd/";

// Names the loader of the target already has for our earlier deliveries ("/proc/self/fd/N"),
// from the link map (_r_debug.r_map -> l_next ...). Best effort: an unreadable list is empty,
// and a collision is still caught after dlopen (our memfd would not be mapped).
std::set<std::string> loaded_fd_names(const Tracee& t, const SymbolTable& table) {
  std::set<std::string> out;
  const Function* r_debug = nullptr;
  for (auto& v : table.variables())
    if (v.mangled == "_r_debug" && v.object.find("/ld-") != std::string::npos) r_debug = &v;
  if (!r_debug) return out;
  auto word = [&](uint64_t addr) -> uint64_t {
    auto b = t.memory().read(addr, sizeof(uint64_t));
    uint64_t v = 0;
    if (b) std::copy(b->begin(), b->end(), reinterpret_cast<uint8_t*>(&v));
    return v;
  };
  uint64_t map = word(r_debug->address + offsetof(struct r_debug, r_map));
  for (int i = 0; map && i < 4096; ++i) {
    if (auto name = t.memory().read_string(word(map + offsetof(struct link_map, l_name)), 4096);
        name && name->starts_with(kFdPrefix))
      out.insert(*name);
    map = word(map + offsetof(struct link_map, l_next));
  }
  return out;
}

int fd_of(const std::string& name) { return std::stoi(name.substr(std::string(kFdPrefix).size())); }

Result<long> syscall_ok(Tracee& t, pid_t tid, long nr, std::initializer_list<uint64_t> args, const char* what) {
  long r = HOTFIX_TRY(remote__syscall(t, tid, nr, args));
  if (r < 0) return fail(fmt::format("{} in pid {} failed: {}", what, t.pid(), errno_text(static_cast<int>(-r))));
  return r;
}

// memfd_create(name) in the target, at an fd number no loaded object is named after.
Result<int> create_in_target(Tracee& t, pid_t tid, const std::string& name, const std::set<std::string>& taken) {
  const uint64_t page = static_cast<uint64_t>(::getpagesize());
  uint64_t scratch = HOTFIX_TRY(remote__mmap(t, tid, 0, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
  auto created = [&]() -> Result<int> {
    std::vector<uint8_t> cname(name.begin(), name.end());
    cname.push_back(0);
    HOTFIX_CHECK(t.memory().write(scratch, cname));
    // MFD_EXEC: a kernel with vm.memfd_noexec would otherwise refuse to map it executable.
    long fd = HOTFIX_TRY(remote__syscall(t, tid, SYS_memfd_create, {scratch, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC}));
    if (fd == -EINVAL)  // a kernel before 6.3 has no MFD_EXEC (and maps memfds executable anyway)
      fd = HOTFIX_TRY(remote__syscall(t, tid, SYS_memfd_create, {scratch, MFD_CLOEXEC | MFD_ALLOW_SEALING}));
    if (fd < 0) return fail(fmt::format("memfd_create in pid {} failed: {}", t.pid(), errno_text(static_cast<int>(-fd))));
    return static_cast<int>(fd);
  }();
  (void)remote__munmap(t, tid, scratch, page);
  int fd = HOTFIX_TRY(std::move(created));
  if (!taken.count(kFdPrefix + std::to_string(fd))) return fd;
  int above = 0;
  for (auto& n : taken) above = std::max(above, fd_of(n));
  auto moved = syscall_ok(t, tid, SYS_fcntl, {static_cast<uint64_t>(fd), F_DUPFD_CLOEXEC, static_cast<uint64_t>(above + 1)},
                          "fcntl(F_DUPFD_CLOEXEC)");
  (void)remote__close(t, tid, fd);
  return static_cast<int>(HOTFIX_TRY(std::move(moved)));
}

// Write and seal through our own open of the target's fd, after making sure it is our memfd
// (the target's threads run meanwhile and could have reused the number).
Result<void> fill(pid_t pid, int fd, const std::string& name, std::span<const uint8_t> bytes) {
  std::string proc = fmt::format("/proc/{}/fd/{}", pid, fd);
  UniqueFd ours(::open(proc.c_str(), O_RDWR | O_CLOEXEC));
  if (!ours) return fail(fmt::format("cannot open {}: {}", proc, errno_text(errno)), "run as root");
  char link[512] = {};
  ssize_t n = ::readlink(fmt::format("/proc/self/fd/{}", ours.get()).c_str(), link, sizeof link - 1);
  struct stat st;
  if (n <= 0 || std::string(link, static_cast<size_t>(n)) != "/memfd:" + name + " (deleted)" ||
      ::fstat(ours.get(), &st) != 0 || st.st_size != 0)
    return fail(fmt::format("fd {} of pid {} is not the memfd hotfix just created there", fd, pid), "retry");
  for (size_t done = 0; done < bytes.size();) {
    ssize_t w = ::pwrite(ours.get(), bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return fail(fmt::format("cannot write the fix library into pid {}: {}", pid, errno_text(errno)));
    done += static_cast<size_t>(w);
  }
  int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL;
  if (::fcntl(ours.get(), F_ADD_SEALS, seals | F_SEAL_EXEC) != 0 && ::fcntl(ours.get(), F_ADD_SEALS, seals) != 0)
    return fail(fmt::format("cannot seal the fix library's memfd in pid {}: {}", pid, errno_text(errno)));
  std::vector<uint8_t> back(bytes.size());
  if (::pread(ours.get(), back.data(), back.size(), 0) != static_cast<ssize_t>(back.size()) ||
      !std::equal(back.begin(), back.end(), bytes.begin()) || ::fstat(ours.get(), &st) != 0 ||
      static_cast<size_t>(st.st_size) != bytes.size())
    return fail(fmt::format("the fix library's memfd in pid {} does not hold the bytes written", pid), "retry");
  return {};
}

// Only characters that /proc/PID/maps shows as they are and that read well in a log.
std::string safe_name(const std::string& library) {
  auto slash = library.rfind('/');
  std::string base = slash == std::string::npos ? library : library.substr(slash + 1);
  for (char& c : base)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-' && c != '+') c = '_';
  return base.empty() ? "fix" : base;
}

}  // namespace

std::string deliver__memfd_name(uint32_t id, const std::string& sha256, const std::string& library) {
  std::string name = fmt::format("hotfix:{}:{}:{}", id, sha256, safe_name(library));
  return name.substr(0, kMaxMemfdName);
}

std::string deliver__sha256_of(const std::string& mapped) {
  if (!mapped.starts_with(kFixCopyPrefix)) return "";
  auto id_end = mapped.find(':', std::string(kFixCopyPrefix).size());
  if (id_end == std::string::npos || mapped.size() < id_end + 1 + 64) return "";
  return mapped.substr(id_end + 1, 64);
}

Result<DeliveredFix> deliver__into(Tracee& t, const SymbolTable& table, const std::string& name,
                                   std::span<const uint8_t> bytes) {
  DeliveredFix d;
  d.sha256 = sha256__hex(bytes);
  d.mapped = "/memfd:" + name;
  auto taken = loaded_fd_names(t, table);
  pid_t tid = t.threads().front().tid;
  HOTFIX_CHECK(t.stop_thread(tid));
  crashpoint("patch: before memfd_create in the target");
  auto fd = create_in_target(t, tid, name, taken);
  auto resumed = t.resume_thread(tid);
  d.fd = HOTFIX_TRY(std::move(fd));
  auto filled = resumed ? fill(t.pid(), d.fd, name, bytes) : Result<void>(std::unexpected(resumed.error()));
  if (!filled) {
    (void)deliver__close(t, d);
    return std::unexpected(filled.error());
  }
  d.dlopen_path = kFdPrefix + std::to_string(d.fd);
  return d;
}

Result<void> deliver__close(Tracee& t, DeliveredFix& d) {
  if (d.fd < 0) return {};
  pid_t tid = t.threads().front().tid;
  HOTFIX_CHECK(t.stop_thread(tid));
  auto closed = remote__close(t, tid, d.fd);
  auto resumed = t.resume_thread(tid);
  d.fd = -1;
  HOTFIX_CHECK(closed);
  return resumed;
}

}  // namespace hotfix
