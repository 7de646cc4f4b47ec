#include "process/pidns.hpp"

#include <fmt/format.h>

#include <fstream>
#include <sstream>

#include "process/maps.hpp"

namespace hotfix {

std::vector<pid_t> pidns__chain(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(in, line);) {
    if (!line.starts_with("NSpid:")) continue;
    std::istringstream fields(line.substr(6));
    std::vector<pid_t> out;
    for (long v; fields >> v;) out.push_back(static_cast<pid_t>(v));
    return out;
  }
  // A kernel before 4.1 has no NSpid: the process is only known by this pid.
  return in.is_open() || std::ifstream(fmt::format("/proc/{}/stat", pid)).is_open() ? std::vector<pid_t>{pid}
                                                                                   : std::vector<pid_t>{};
}

pid_t pidns__own_pid(pid_t pid) {
  auto chain = pidns__chain(pid);
  return chain.empty() ? 0 : chain.back();
}

std::string pidns__comm_label(pid_t pid) {
  std::string comm = process__comm(pid);
  pid_t own = pidns__own_pid(pid);
  if (own == 0 || own == pid) return comm;
  return fmt::format("{}; ns pid {}", comm, own);
}

std::string pidns__json_field(pid_t pid) {
  pid_t own = pidns__own_pid(pid);
  return own == 0 || own == pid ? "" : fmt::format(",\"ns_pid\":{}", own);
}

}  // namespace hotfix
