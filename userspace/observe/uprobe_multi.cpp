#include "observe/uprobe_multi.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fcntl.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "arch/arch.hpp"
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

}  // namespace hotfix

// The known-good probe site for uprobe_multi__available: an ordinary function of this program
// that nothing else probes. Outside the namespace, unmangled, so that it is easy to recognise.
extern "C" __attribute__((noinline, used)) int hotfix_uprobe_multi_canary(int x) {
  asm volatile("" : "+r"(x));  // a body the compiler cannot fold away
  return x + 1;
}

namespace hotfix {

namespace {

// The smallest program a uprobe_multi link accepts: `return 0`, with that expected attach type.
Result<UniqueFd> load_canary_program() {
  const bpf_insn insns[] = {
      {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .src_reg = 0, .off = 0, .imm = 0},
      {.code = BPF_JMP | BPF_EXIT, .dst_reg = 0, .src_reg = 0, .off = 0, .imm = 0},
  };
  LIBBPF_OPTS(bpf_prog_load_opts, opts, .expected_attach_type = static_cast<bpf_attach_type>(kAttachUprobeMulti));
  int fd = bpf_prog_load(BPF_PROG_TYPE_KPROBE, "hotfix_canary", "GPL", insns, 2, &opts);
  if (fd < 0) return std::unexpected(Error{"cannot load a uprobe_multi program", "", errno});
  return UniqueFd(fd);
}

// The canary as the kernel opens it: its mapping's file and file offset in this process.
Result<UprobeMultiSpec> canary_spec() {
  auto at = reinterpret_cast<uint64_t>(&hotfix_uprobe_multi_canary);
  for (auto& m : HOTFIX_TRY(process__read_maps(::getpid())))
    if (m.contains(at) && m.file_backed()) return UprobeMultiSpec{m.path, {at - m.start + m.offset}, {0}};
  return fail("cannot find this program's own code in /proc/self/maps");
}

Result<bool> probe_uprobe_multi() {
  auto prog = load_canary_program();
  if (!prog) {
    int err = prog.error().exit_code;
    if (uprobe_multi__unsupported(err) || err == E2BIG) return false;  // an older kernel: no such attach type
    return fail(fmt::format("cannot load a BPF program: {}", errno_text(err)),
                err == EPERM || err == EACCES ? "run hotfix-ctl as root (it needs CAP_BPF and CAP_PERFMON)"
                                              : "check that the kernel has BPF and uprobes (CONFIG_UPROBE_EVENTS)");
  }
  auto spec = HOTFIX_TRY(canary_spec());
  auto link = uprobe_multi__link(prog->get(), spec, ::getpid(), false);
  if (link) return true;
  int err = link.error().exit_code;
  if (uprobe_multi__unsupported(err) || err == ENOSYS) return false;
  return fail(fmt::format("cannot attach a uprobe to this program's own code: {}", errno_text(err)),
              err == EPERM || err == EACCES ? "run hotfix-ctl as root (it needs CAP_BPF and CAP_PERFMON)"
                                            : "check that the kernel has uprobes (CONFIG_UPROBE_EVENTS)");
}

}  // namespace

Result<bool> uprobe_multi__available() {
  static const Result<bool> verdict = probe_uprobe_multi();
  return verdict;
}

bool uprobe__refuses_offset(int err) {
  return err == EINVAL || err == EOPNOTSUPP || err == kKernelENOTSUPP || err == ENOEXEC;
}

std::string uprobe__refusal_text(int err) {
  if (err == kKernelENOTSUPP) return "the kernel cannot probe its first instruction (ENOTSUPP)";
  if (err == ENOEXEC) return "the kernel cannot decode its first instruction (ENOEXEC)";
  if (err == EINVAL) return "the kernel rejects the offset (EINVAL)";
  return errno_text(err);
}

namespace {

UprobeMultiSpec part_of(const UprobeMultiSpec& spec, size_t lo, size_t hi) {
  return {spec.path, {spec.offsets.begin() + lo, spec.offsets.begin() + hi}, {spec.cookies.begin() + lo, spec.cookies.begin() + hi}};
}

// Link offsets [lo, hi) of `spec`; on an offset's refusal, halve and retry each half. The
// kernel registers the offsets in order and undoes them all on the first refusal, so a
// refused range costs no more than the probes before its first bad offset.
Result<void> link_range(int prog_fd, const UprobeMultiSpec& spec, size_t lo, size_t hi, pid_t pid, bool retprobe,
                        std::vector<UniqueFd>& links, std::vector<RefusedOffset>& refused) {
  if (lo >= hi) return {};
  auto link = uprobe_multi__link(prog_fd, part_of(spec, lo, hi), pid, retprobe);
  if (link) {
    links.push_back(std::move(*link));
    return {};
  }
  int err = link.error().exit_code;
  if (!uprobe__refuses_offset(err) || !process__alive(pid)) return std::unexpected(link.error());
  if (hi - lo == 1) {
    refused.push_back({lo, err});
    return {};
  }
  size_t mid = lo + (hi - lo) / 2;
  HOTFIX_CHECK(link_range(prog_fd, spec, lo, mid, pid, retprobe, links, refused));
  return link_range(prog_fd, spec, mid, hi, pid, retprobe, links, refused);
}

// Offsets whose first instruction the kernel will likely refuse go first, one link each: a
// refused link undoes the probes registered before the bad offset and waits for an RCU grace
// period (~70 ms here), but one with nothing before it costs microseconds. Bisecting a link
// of thousands that holds one bad offset costs ~log2(n) such waits, per bad offset.
UprobeMultiSpec suspects_first(const UprobeMultiSpec& spec, std::vector<size_t>& order, size_t& suspects) {
  UniqueFd fd(::open(spec.path.c_str(), O_RDONLY | O_CLOEXEC));
  std::vector<size_t> rest;
  order.clear();
  for (size_t i = 0; i < spec.offsets.size(); ++i) {
    uint8_t code[16];
    ssize_t n = fd ? ::pread(fd.get(), code, sizeof code, static_cast<off_t>(spec.offsets[i])) : -1;
    (n > 0 && arch::uprobe_likely_refused({code, static_cast<size_t>(n)}) ? order : rest).push_back(i);
  }
  suspects = order.size();
  order.insert(order.end(), rest.begin(), rest.end());
  UprobeMultiSpec sorted{spec.path, {}, {}};
  for (size_t i : order) sorted.offsets.push_back(spec.offsets[i]), sorted.cookies.push_back(spec.cookies[i]);
  return sorted;
}

}  // namespace

Result<void> uprobe_multi__link_skipping(int prog_fd, const UprobeMultiSpec& spec, pid_t pid, bool retprobe,
                                         std::vector<UniqueFd>& links, std::vector<RefusedOffset>& refused) {
  size_t suspects = 0;
  std::vector<size_t> order;  // sorted index -> spec index
  auto sorted = suspects_first(spec, order, suspects);
  std::vector<RefusedOffset> found;
  for (size_t i = 0; i < suspects; ++i) HOTFIX_CHECK(link_range(prog_fd, sorted, i, i + 1, pid, retprobe, links, found));
  HOTFIX_CHECK(link_range(prog_fd, sorted, suspects, sorted.offsets.size(), pid, retprobe, links, found));
  // Back to indexes of `spec`: the caller's order, not ours.
  for (auto& r : found) refused.push_back({order[r.index], r.err});
  return {};
}

std::string uprobe__target_path(pid_t pid, const std::string& object) {
  // A delivered fix copy is a memfd with no path anywhere: its mapping is the way to its inode.
  if (object.starts_with("/memfd:"))
    if (auto maps = process__read_maps(pid))
      for (auto& m : *maps)
        if (m.path == object) return fmt::format("/proc/{}/map_files/{:x}-{:x}", pid, m.start, m.end);
  return fmt::format("/proc/{}/root{}", pid, object);
}

}  // namespace hotfix
