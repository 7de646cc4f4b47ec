#include "patch/counting.hpp"

#include <bpf/bpf.h>
#include <linux/bpf.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "process/fdpass.hpp"
#include "process/remote.hpp"

namespace hotfix {

namespace {

// The target opens the pin itself: bpf(BPF_OBJ_GET, {pathname}) needs the path and the
// attribute in its memory, so both go on a scratch page that is unmapped right after.
Result<int> remote_obj_get(Tracee& t, pid_t tid, const std::string& path) {
  const uint64_t page = 4096;
  uint64_t scratch = HOTFIX_TRY(remote__mmap(t, tid, 0, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
  auto obj_get = [&]() -> Result<int> {
    union bpf_attr attr;
    std::memset(&attr, 0, sizeof attr);
    attr.pathname = scratch + 64;
    std::vector<uint8_t> bytes(64 + path.size() + 1, 0);
    std::memcpy(bytes.data(), &attr, 16);  // pathname, bpf_fd, file_flags: the BPF_OBJ_GET fields
    std::memcpy(bytes.data() + 64, path.c_str(), path.size());
    HOTFIX_CHECK(t.memory().write(scratch, bytes));
    long fd = HOTFIX_TRY(remote__syscall(t, tid, SYS_bpf, {BPF_OBJ_GET, scratch, 16}));
    if (fd < 0)
      return fail(fmt::format("the target could not open its hit counters {}: {}", path, errno_text(static_cast<int>(-fd))),
                  "check that bpffs is mounted and the pin is readable by the target's user, or patch with --no-count");
    return static_cast<int>(fd);
  }();
  (void)remote__munmap(t, tid, scratch, page);
  return obj_get;
}

// The ids the target's file accesses run as (the 4th field of Uid:/Gid: in /proc/PID/status).
std::pair<uid_t, gid_t> filesystem_ids(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  uid_t uid = 0;
  gid_t gid = 0;
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string key;
    unsigned long real, effective, saved, fsid;
    if (!(fields >> key >> real >> effective >> saved >> fsid)) continue;
    if (key == "Uid:") uid = static_cast<uid_t>(fsid);
    if (key == "Gid:") gid = static_cast<gid_t>(fsid);
  }
  return {uid, gid};
}

// new_hits as an fd of the target. A target in another mount namespace (a container) that has
// no bpffs is handed our own fd (process/fdpass.hpp); otherwise it opens the pin,
// which keeps the path visible in an strace of the target and needs no socket.
Result<int> open_in_target(Tracee& t, pid_t tid, const PatchCounters& counters, const FdpassNote& note) {
  if (fdpass__target_lacks_bpffs(t.pid(), kBpffsMount)) return fdpass__send_to_target(t, tid, counters.new_hits.get(), note);
  auto [uid, gid] = filesystem_ids(t.pid());
  std::string path = counters.new_hits_path;
  if (uid != 0) path = HOTFIX_TRY(patchcount__handoff(counters, uid, gid));
  auto got = remote_obj_get(t, tid, path);
  if (uid != 0) patchcount__handoff_done(path);
  return got;
}

}  // namespace

Result<int> counting__remote_obj_get(Tracee& t, pid_t tid, const std::string& path) { return remote_obj_get(t, tid, path); }

Result<TargetCounters> counting__map_into(Tracee& t, pid_t tid, uint32_t id, uint32_t nfunctions,
                                          const CountingNote& note) {
  return counting__map_at(t, tid, id, nfunctions, 0, note);
}

Result<TargetCounters> counting__map_at(Tracee& t, pid_t tid, uint32_t id, uint32_t nfunctions, uint64_t address,
                                        const CountingNote& note) {
  TargetCounters tc;
  tc.counters = HOTFIX_TRY(patchcount__create(t.pid(), id, nfunctions));
  CountingLeftovers left;
  bpf_map_info info{};
  uint32_t info_len = sizeof info;
  if (::bpf_obj_get_info_by_fd(tc.counters.new_hits.get(), &info, &info_len) == 0) left.map_id = info.id;
  if (note) note(left);
  auto handoff_note = [&](const FdpassLeftovers& h) {
    left.handoff = h;
    if (note) note(left);
  };
  auto mapped = [&]() -> Result<void> {
    int fd = HOTFIX_TRY(open_in_target(t, tid, tc.counters, handoff_note));
    tc.length = tc.counters.mmap_size();
    // MAP_FIXED replaces what is at `address` in one step: a counting island's `lock inc`
    // finds either the old page or the new one there, never a hole.
    int flags = MAP_SHARED | (address ? MAP_FIXED : 0);
    auto at = remote__mmap(t, tid, address, tc.length, PROT_READ | PROT_WRITE, flags, fd, 0);
    (void)remote__close(t, tid, fd);  // the mapping keeps the map alive
    tc.address = HOTFIX_TRY(std::move(at));
    return {};
  }();
  if (!mapped) {
    (void)patchcount__remove(t.pid(), id);
    return std::unexpected(mapped.error());
  }
  return tc;
}

}  // namespace hotfix
