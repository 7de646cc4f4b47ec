#include "observe/callers.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <thread>

#include "arch/arch.hpp"
#include "common/unique_fd.hpp"
#include "observe/uprobe_multi.hpp"
#include "patchcount.h"
#include "patchcount.skel.h"
#include "process/maps.hpp"

namespace hotfix {

namespace {

Result<patchcount_bpf*> open_sampler() {
  patchcount_bpf* skel = patchcount_bpf__open();
  if (!skel) return fail(fmt::format("cannot open the patchcount BPF object: {}", errno_text(errno)));
  bpf_program__set_autoload(skel->progs.count_old_exit, false);
  uprobe_multi__prepare(skel->progs.sample_caller);
  if (int err = patchcount_bpf__load(skel); err != 0) {
    patchcount_bpf__destroy(skel);
    return fail(fmt::format("cannot load the caller sampler: {}", errno_text(-err)),
                "HOTFIX_DEBUG_LIBBPF=1 shows libbpf's details");
  }
  return skel;
}

std::vector<CallerStack> collect(int map_fd) {
  std::vector<CallerStack> out;
  callers_key key{}, next{};
  bool first = true;
  while (bpf_map_get_next_key(map_fd, first ? nullptr : &key, &next) == 0) {
    first = false;
    key = next;
    uint64_t count = 0;
    if (bpf_map_lookup_elem(map_fd, &key, &count) != 0) continue;
    CallerStack s{key.cookie, count, {}};
    unsigned depth = std::min<unsigned>(key.depth, CALLERS_MAX_DEPTH);
    for (unsigned i = 0; i < depth; ++i)
      if (i != 1) s.frames.push_back(key.ips[i]);  // ips[1] is the probed entry itself
    out.push_back(std::move(s));
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.count > b.count; });
  return out;
}

}  // namespace

Result<CallerProbe> callers__replacement_probe(pid_t pid, uint32_t function, const Function& fn, uint64_t moved) {
  CallerProbe probe{function, fn.object, fn.offset, 0};
  if (!moved) return probe;
  // The moved bytes as the file has them (the process's copy holds the trampoline's jump).
  UniqueFd fd(::open(uprobe__target_path(pid, fn.object).c_str(), O_RDONLY | O_CLOEXEC));
  std::vector<uint8_t> code(moved);
  if (!fd || ::pread(fd.get(), code.data(), moved, static_cast<off_t>(fn.offset)) != static_cast<ssize_t>(moved))
    return fail(fmt::format("cannot read the first instructions of {} in {}: {}", fn.name, fn.object, errno_text(errno)));
  auto depth = arch::stack_depth_after(code, fn.address, moved);
  if (!depth || *depth > 0xffff)
    return fail(fmt::format("cannot sample the callers of {}: its first instructions ({}) move the stack in a way hotfix "
                            "does not follow", fn.name, arch::disassemble(code, fn.address)),
                "its new-code hits are still counted; use `watch` on it for a sample of calls");
  probe.offset += moved;
  probe.sp_offset = *depth;
  return probe;
}

Result<std::vector<CallerStack>> callers__sample(pid_t pid, const std::vector<CallerProbe>& probes,
                                                 std::chrono::milliseconds window,
                                                 const std::function<void()>& attached,
                                                 std::vector<std::string>* skipped) {
  HOTFIX_CHECK(process__check_alive(pid));
  auto skel = HOTFIX_TRY(open_sampler());
  std::unique_ptr<patchcount_bpf, void (*)(patchcount_bpf*)> guard(skel, patchcount_bpf__destroy);
  std::map<std::string, UprobeMultiSpec> by_object;
  for (auto& p : probes) {
    auto& spec = by_object[p.object];
    spec.path = uprobe__target_path(pid, p.object);
    spec.offsets.push_back(p.offset);
    spec.cookies.push_back(static_cast<uint64_t>(p.sp_offset) << 32 | p.function);
  }
  std::vector<UniqueFd> links;
  for (auto& [object, spec] : by_object) {
    // An offset the kernel refuses is left out (and named), not a reason to sample nothing.
    std::vector<RefusedOffset> refused;
    auto linked = uprobe_multi__link_skipping(bpf_program__fd(skel->progs.sample_caller), spec, pid, false, links, refused);
    if (!linked) {
      Error e = linked.error();
      e.exit_code = 1;
      return std::unexpected(e);
    }
    for (auto& r : refused)
      if (skipped) skipped->push_back(fmt::format("{}+{:#x} ({})", object, spec.offsets[r.index], uprobe__refusal_text(r.err)));
  }
  if (attached) attached();
  std::this_thread::sleep_for(window);
  links.clear();  // detach before reading: the table no longer changes
  return collect(bpf_map__fd(skel->maps.callers));
}

}  // namespace hotfix
