// Handing one of hotfix-ctl's file descriptors to a traced process without any path: the
// target's mount namespace (a container) may have no /sys/fs/bpf, no /run/hotfix, nothing of
// the host's. The target makes a socketpair, hotfix-ctl takes one end with pidfd_getfd and
// sends the fd over it (SCM_RIGHTS), the target receives it with recvmsg.
#pragma once
#include <sys/types.h>

#include <string>

#include "common/error.hpp"

namespace hotfix {

class Tracee;

// A new fd in the target (close-on-exec) for the same open file as our `fd`. `tid` must be
// stopped. Nothing is left open on either side on failure.
Result<int> fdpass__send_to_target(Tracee& t, pid_t tid, int fd);

// Must `pid` be handed its counters' fd instead of opening their pin under `bpffs` itself?
// True when the target has no BPF filesystem at that path (a container: another mount
// namespace with its own /sys or none). A target that sees the same bpffs as hotfix-ctl, or
// another one (then hotfix-ctl is the one with a private view, and its pins are not the
// host's), opens the pin itself, and fails with the reason in the second case.
bool fdpass__target_lacks_bpffs(pid_t pid, const std::string& bpffs);

}  // namespace hotfix
