// Handing one of hotfix-ctl's file descriptors to a traced process without any path: the
// target's mount namespace (a container) may have no /sys/fs/bpf, no /run/hotfix, nothing of
// the host's. The target makes a socketpair, hotfix-ctl takes one end with pidfd_getfd and
// sends the fd over it (SCM_RIGHTS), the target receives it with recvmsg.
#pragma once
#include <sys/types.h>

#include "common/error.hpp"

namespace hotfix {

class Tracee;

// A new fd in the target (close-on-exec) for the same open file as our `fd`. `tid` must be
// stopped. Nothing is left open on either side on failure.
Result<int> fdpass__send_to_target(Tracee& t, pid_t tid, int fd);

// Does `pid` live in another mount namespace than hotfix-ctl (/proc/PID/ns/mnt)? Paths on the
// host then mean nothing to it. False when it cannot be told.
bool fdpass__other_mount_namespace(pid_t pid);

}  // namespace hotfix
