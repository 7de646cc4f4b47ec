// A process seen from its own pid namespace (a container): hotfix addresses every process by
// its host pid, and shows the pid the process knows itself by next to it.
#pragma once
#include <sys/types.h>

#include <string>
#include <vector>

namespace hotfix {

// NSpid of /proc/PID/status: the pid in each pid namespace from ours inward ({pid} when the
// process lives in ours, {} when it is gone).
std::vector<pid_t> pidns__chain(pid_t pid);

// The pid `pid` has in its own, innermost pid namespace (== pid when that is ours; 0 if gone).
pid_t pidns__own_pid(pid_t pid);

// "comm" or, for a process in another pid namespace, "comm; ns pid N": what the headers of
// list, stats and watch put in parentheses after the host pid.
std::string pidns__comm_label(pid_t pid);

// `,"ns_pid":N` for a process in another pid namespace, "" otherwise: what list --json and
// stats --json add after "pid" (so a host process's JSON is as it always was).
std::string pidns__json_field(pid_t pid);

}  // namespace hotfix
