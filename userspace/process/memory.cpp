#include "process/memory.hpp"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace hotfix {

Result<ProcessMemory> ProcessMemory::open(pid_t pid) {
  auto path = fmt::format("/proc/{}/mem", pid);
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT || err == ESRCH) return fail(fmt::format("no process with pid {}", pid), "check the pid with `ps -p PID`");
    return fail(fmt::format("cannot open {}: {}", path, errno_text(err)), "run hotfix-ctl as root (it needs ptrace access)");
  }
  return ProcessMemory(pid, UniqueFd(fd));
}

Result<void> ProcessMemory::read(uint64_t addr, std::span<uint8_t> out) const {
  ssize_t n = ::pread(fd_.get(), out.data(), out.size(), static_cast<off_t>(addr));
  if (n == static_cast<ssize_t>(out.size())) return {};
  int err = n < 0 ? errno : EIO;
  return fail(fmt::format("cannot read {} bytes at {:#x} in process {}: {}", out.size(), addr, pid_, errno_text(err)),
              "the address must be mapped and readable in the target");
}

Result<std::vector<uint8_t>> ProcessMemory::read(uint64_t addr, size_t len) const {
  std::vector<uint8_t> bytes(len);
  HOTFIX_CHECK(read(addr, std::span<uint8_t>(bytes)));
  return bytes;
}

Result<void> ProcessMemory::write(uint64_t addr, std::span<const uint8_t> bytes) const {
  ssize_t n = ::pwrite(fd_.get(), bytes.data(), bytes.size(), static_cast<off_t>(addr));
  if (n == static_cast<ssize_t>(bytes.size())) return {};
  int err = n < 0 ? errno : EIO;
  return fail(fmt::format("cannot write {} bytes at {:#x} in process {}: {}", bytes.size(), addr, pid_, errno_text(err)),
              "the address must be mapped in the target");
}

Result<std::string> ProcessMemory::read_string(uint64_t addr, size_t max) const {
  std::string s;
  constexpr uint64_t kPage = 4096;
  while (s.size() < max) {
    // Never read across a page boundary in one go: the next page may be unmapped.
    size_t chunk = std::min<uint64_t>(kPage - (addr + s.size()) % kPage, max - s.size());
    std::vector<uint8_t> buf(chunk);
    HOTFIX_CHECK(read(addr + s.size(), std::span<uint8_t>(buf)));
    auto nul = std::find(buf.begin(), buf.end(), 0);
    s.append(buf.begin(), nul);
    if (nul != buf.end()) return s;
  }
  return s;
}

size_t ProcessMemory::read_bulk(uint64_t addr, std::span<uint8_t> out) const {
  iovec local{out.data(), out.size()};
  iovec remote{reinterpret_cast<void*>(addr), out.size()};
  ssize_t n = ::process_vm_readv(pid_, &local, 1, &remote, 1, 0);
  return n > 0 ? static_cast<size_t>(n) : 0;
}

}  // namespace hotfix
