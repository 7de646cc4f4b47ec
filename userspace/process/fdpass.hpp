// Handing one of hotfix-ctl's file descriptors to a traced process without any path: the
// target's mount namespace (a container) may have no /sys/fs/bpf, no /run/hotfix, nothing of
// the host's. The target makes a socketpair, hotfix-ctl takes one end with pidfd_getfd and
// sends the fd over it (SCM_RIGHTS), the target receives it with recvmsg.
#pragma once
#include <sys/types.h>

#include <functional>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

class Tracee;

// What a handoff has made in the target so far. hotfix-ctl killed midway leaves these there;
// `note` is told each time they change (before the next step), so that the caller can journal
// them and recovery can close and unmap exactly these (patch/recover.cpp).
struct FdpassLeftovers {
  uint64_t scratch = 0;           // the scratch page (one page, anonymous, read-write)
  int sockets[2] = {-1, -1};      // the target's socketpair
  uint64_t inodes[2] = {0, 0};    // their socket inodes (/proc/PID/fd/N -> "socket:[INODE]")
};
using FdpassNote = std::function<void(const FdpassLeftovers&)>;

// A new fd in the target (close-on-exec) for the same open file as our `fd`. `tid` must be
// stopped. Nothing is left open on either side on failure (nor on success: `note` is last
// told of an empty FdpassLeftovers).
Result<int> fdpass__send_to_target(Tracee& t, pid_t tid, int fd, const FdpassNote& note = {});

// The fds of the socketpair a handoff killed midway made, as its scratch page (still mapped)
// records them: socketpair writes them there before returning, and the handoff clears them
// before closing them, so every one found is a socket of that pair.
std::vector<int> fdpass__sockets_in_scratch(Tracee& t, uint64_t scratch);

// "socket:[INODE]" of /proc/PID/fd/FD: 0 when it is no socket (or gone).
uint64_t fdpass__socket_inode(pid_t pid, int fd);

// Must `pid` be handed its counters' fd instead of opening their pin under `bpffs` itself?
// True when the target has no BPF filesystem at that path (a container: another mount
// namespace with its own /sys or none). A target that sees the same bpffs as hotfix-ctl, or
// another one (then hotfix-ctl is the one with a private view, and its pins are not the
// host's), opens the pin itself, and fails with the reason in the second case.
bool fdpass__target_lacks_bpffs(pid_t pid, const std::string& bpffs);

}  // namespace hotfix
