#include "observe/uprobe_multi.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "process/maps.hpp"

namespace hotfix {

namespace {

// The uprobe_multi part of the kernel's `union bpf_attr` (link_create, Linux 6.6+). Debian's
// uapi headers (6.1) and libbpf 1.1 predate it, so the layout is spelled out here.
constexpr uint32_t kUprobeMultiReturn = 1;  // BPF_F_UPROBE_MULTI_RETURN
constexpr int kKernelENOTSUPP = 524;        // the kernel-internal ENOTSUPP some paths leak

struct LinkCreateUprobeMulti {
  uint32_t prog_fd;
  uint32_t target_fd;
  uint32_t attach_type;
  uint32_t flags;
  alignas(8) uint64_t path;
  uint64_t offsets;
  uint64_t ref_ctr_offsets;
  uint64_t cookies;
  uint32_t cnt;
  uint32_t multi_flags;
  uint32_t pid;
};
static_assert(sizeof(LinkCreateUprobeMulti) == 64);

}  // namespace

void uprobe_multi__prepare(bpf_program* prog) {
  bpf_program__set_expected_attach_type(prog, static_cast<bpf_attach_type>(kAttachUprobeMulti));
}

Result<UniqueFd> uprobe_multi__link(int prog_fd, const UprobeMultiSpec& spec, pid_t pid, bool retprobe) {
  union {
    LinkCreateUprobeMulti link_create;
    unsigned char bytes[sizeof(bpf_attr) > 64 ? sizeof(bpf_attr) : 64];
  } attr;
  std::memset(&attr, 0, sizeof attr);
  auto& lc = attr.link_create;
  lc.prog_fd = static_cast<uint32_t>(prog_fd);
  lc.attach_type = kAttachUprobeMulti;
  lc.path = reinterpret_cast<uint64_t>(spec.path.c_str());
  lc.offsets = reinterpret_cast<uint64_t>(spec.offsets.data());
  lc.cookies = reinterpret_cast<uint64_t>(spec.cookies.data());
  lc.cnt = static_cast<uint32_t>(spec.offsets.size());
  lc.multi_flags = retprobe ? kUprobeMultiReturn : 0;
  lc.pid = static_cast<uint32_t>(pid);
  long fd = ::syscall(__NR_bpf, BPF_LINK_CREATE, &attr, sizeof(LinkCreateUprobeMulti));
  if (fd < 0) {
    int err = errno;
    return std::unexpected(Error{fmt::format("cannot attach {} uprobes to {}: {}", retprobe ? "return" : "entry",
                                             spec.path, errno_text(err)),
                                 "", err});
  }
  return UniqueFd(static_cast<int>(fd));
}

bool uprobe_multi__unsupported(int err) { return err == EINVAL || err == EOPNOTSUPP || err == kKernelENOTSUPP; }

std::string uprobe__target_path(pid_t pid, const std::string& object) {
  // A delivered fix copy is a memfd with no path anywhere: its mapping is the way to its inode.
  if (object.starts_with("/memfd:"))
    if (auto maps = process__read_maps(pid))
      for (auto& m : *maps)
        if (m.path == object) return fmt::format("/proc/{}/map_files/{:x}-{:x}", pid, m.start, m.end);
  return fmt::format("/proc/{}/root{}", pid, object);
}

}  // namespace hotfix
