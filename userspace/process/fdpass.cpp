#include "process/fdpass.hpp"

#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>

#include "common/unique_fd.hpp"
#include "process/memory.hpp"
#include "process/remote.hpp"

namespace hotfix {

namespace {

// Where the pieces sit on the scratch page in the target.
constexpr uint64_t kPairAt = 0;       // int sv[2] from socketpair
constexpr uint64_t kMsgAt = 64;       // struct msghdr
constexpr uint64_t kIovAt = 192;      // struct iovec
constexpr uint64_t kByteAt = 256;     // the one byte of payload
constexpr uint64_t kControlAt = 320;  // cmsg buffer

// The fixed head of a struct cmsghdr (whose flexible array cannot sit in a Result).
struct CmsgHead {
  size_t len;
  int level;
  int type;
};
static_assert(sizeof(CmsgHead) == CMSG_LEN(0));

Result<long> checked_call(Tracee& t, pid_t tid, long nr, std::initializer_list<uint64_t> args, const char* what) {
  long r = HOTFIX_TRY(remote__syscall(t, tid, nr, args));
  if (r < 0)
    return fail(fmt::format("{} in pid {} failed: {}", what, t.pid(), errno_text(static_cast<int>(-r))),
                "a seccomp filter or an fd limit of the target refuses it; patch with --no-count");
  return r;
}

template <class T>
Result<T> read_value(Tracee& t, uint64_t addr) {
  auto bytes = HOTFIX_TRY(t.memory().read(addr, sizeof(T)));
  T v{};
  std::memcpy(&v, bytes.data(), sizeof(T));
  return v;
}

template <class T>
Result<void> write_value(Tracee& t, uint64_t addr, const T& v) {
  std::vector<uint8_t> bytes(sizeof(T));
  std::memcpy(bytes.data(), &v, sizeof(T));
  return t.memory().write(addr, bytes);
}

// Our copy of the target's socket end `target_fd`.
Result<UniqueFd> take_end(pid_t pid, int target_fd) {
  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) return fail(fmt::format("pidfd_open({}) failed: {}", pid, errno_text(errno)), "run as root");
  UniqueFd end(static_cast<int>(::syscall(SYS_pidfd_getfd, pidfd.get(), target_fd, 0)));
  if (!end) return fail(fmt::format("pidfd_getfd on pid {} failed: {}", pid, errno_text(errno)), "run as root");
  return end;
}

Result<void> send_fd(int sock, int fd) {
  char byte = 'h';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  if (::sendmsg(sock, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) != 1)
    return fail(fmt::format("cannot send an fd to the target: {}", errno_text(errno)));
  return {};
}

// recvmsg in the target on `sock` (a datagram is already queued: it does not block).
Result<int> receive_fd(Tracee& t, pid_t tid, uint64_t scratch, int sock) {
  iovec iov{reinterpret_cast<void*>(scratch + kByteAt), 1};
  msghdr msg{};
  msg.msg_iov = reinterpret_cast<iovec*>(scratch + kIovAt);
  msg.msg_iovlen = 1;
  msg.msg_control = reinterpret_cast<void*>(scratch + kControlAt);
  msg.msg_controllen = CMSG_SPACE(sizeof(int));
  HOTFIX_CHECK(write_value(t, scratch + kIovAt, iov));
  HOTFIX_CHECK(write_value(t, scratch + kMsgAt, msg));
  long n = HOTFIX_TRY(checked_call(t, tid, SYS_recvmsg,
                                   {static_cast<uint64_t>(sock), scratch + kMsgAt, MSG_DONTWAIT | MSG_CMSG_CLOEXEC},
                                   "recvmsg"));
  auto got = HOTFIX_TRY(read_value<msghdr>(t, scratch + kMsgAt));
  auto c = HOTFIX_TRY(read_value<CmsgHead>(t, scratch + kControlAt));
  if (n != 1 || (got.msg_flags & MSG_CTRUNC) || c.level != SOL_SOCKET || c.type != SCM_RIGHTS ||
      c.len != CMSG_LEN(sizeof(int)))
    return fail(fmt::format("pid {} did not receive the fd hotfix sent it", t.pid()), "retry");
  // CMSG_DATA of a cmsghdr at kControlAt: right after the (aligned) header.
  return HOTFIX_TRY(read_value<int>(t, scratch + kControlAt + CMSG_LEN(0)));
}

}  // namespace

std::vector<int> fdpass__sockets_in_scratch(Tracee& t, uint64_t scratch) {
  std::vector<int> out;
  auto pair = read_value<std::array<int, 2>>(t, scratch + kPairAt);
  if (!pair) return out;
  for (int fd : *pair)
    if (fd >= 0 && fdpass__socket_inode(t.pid(), fd)) out.push_back(fd);
  return out;
}

uint64_t fdpass__socket_inode(pid_t pid, int fd) {
  char link[128];
  ssize_t n = ::readlink(fmt::format("/proc/{}/fd/{}", pid, fd).c_str(), link, sizeof link - 1);
  if (n <= 0) return 0;
  link[n] = 0;
  unsigned long long inode = 0;
  return std::sscanf(link, "socket:[%llu]", &inode) == 1 ? inode : 0;
}

Result<int> fdpass__send_to_target(Tracee& t, pid_t tid, int fd, const FdpassNote& note) {
  const uint64_t page = static_cast<uint64_t>(::getpagesize());
  FdpassLeftovers left;
  auto tell = [&] {
    if (note) note(left);
  };
  uint64_t scratch = HOTFIX_TRY(remote__mmap(t, tid, 0, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
  int pair[2] = {-1, -1};
  // No fd yet: the pair's slot says so. socketpair writes the fds there before it returns,
  // so from here on recovery finds them in the page even if we are killed before `tell`.
  if (auto ok = write_value(t, scratch + kPairAt, pair); !ok) {
    (void)remote__munmap(t, tid, scratch, page);
    return std::unexpected(ok.error());
  }
  left.scratch = scratch;
  tell();
  auto passed = [&]() -> Result<int> {
    HOTFIX_TRY(checked_call(t, tid, SYS_socketpair, {AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, scratch + kPairAt},
                            "socketpair"));
    auto sv = HOTFIX_TRY(t.memory().read(scratch + kPairAt, sizeof pair));
    std::memcpy(pair, sv.data(), sizeof pair);
    for (int i = 0; i < 2; ++i) left.sockets[i] = pair[i], left.inodes[i] = fdpass__socket_inode(t.pid(), pair[i]);
    tell();
    UniqueFd ours = HOTFIX_TRY(take_end(t.pid(), pair[1]));
    HOTFIX_CHECK(send_fd(ours.get(), fd));
    return receive_fd(t, tid, scratch, pair[0]);
  }();
  // The slot is cleared before the closes: once closed, those numbers may be the target's own.
  // The ones told (fd and inode) still name ours until each is closed.
  const int none[2] = {-1, -1};
  (void)write_value(t, scratch + kPairAt, none);
  for (int end : pair)
    if (end >= 0) (void)remote__close(t, tid, end);
  // Told before the munmap: once unmapped, the target may map something of its own there.
  left = FdpassLeftovers{};
  tell();
  (void)remote__munmap(t, tid, scratch, page);
  return passed;
}

bool fdpass__target_lacks_bpffs(pid_t pid, const std::string& bpffs) {
  struct statfs fs {};
  if (::statfs(fmt::format("/proc/{}/root{}", pid, bpffs).c_str(), &fs) != 0) return true;  // no such directory
  return static_cast<unsigned long>(fs.f_type) != BPF_FS_MAGIC;
}

}  // namespace hotfix
