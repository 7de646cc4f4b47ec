#include "agent/trigger.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <gelf.h>
#include <libelf.h>

#include <cerrno>
#include <vector>

#include "agent.h"
#include "agent.skel.h"
#include "observe/uprobe_multi.hpp"

namespace hotfix {

struct EntryTrigger::State {
  agent_bpf* skel = nullptr;
  ring_buffer* ring = nullptr;
  std::vector<EntryEvent> batch;
};

Result<EntryPoint> elf__entry_point(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail(fmt::format("cannot open {}: {}", path, errno_text(errno)));
  elf_version(EV_CURRENT);
  Elf* elf = elf_begin(fd.get(), ELF_C_READ, nullptr);
  if (!elf) return fail(fmt::format("{} is not an ELF file", path));
  GElf_Ehdr eh;
  size_t n = 0;
  Result<EntryPoint> out = fail(fmt::format("{}: no loadable segment holds its entry point", path));
  if (gelf_getehdr(elf, &eh) && elf_getphdrnum(elf, &n) == 0) {
    for (size_t i = 0; i < n; ++i) {
      GElf_Phdr ph;
      if (!gelf_getphdr(elf, static_cast<int>(i), &ph) || ph.p_type != PT_LOAD || !(ph.p_flags & PF_X)) continue;
      if (eh.e_entry >= ph.p_vaddr && eh.e_entry < ph.p_vaddr + ph.p_filesz) {
        out = EntryPoint{eh.e_entry, eh.e_entry - ph.p_vaddr + ph.p_offset};
        break;
      }
    }
  }
  elf_end(elf);
  return out;
}

Result<std::unique_ptr<EntryTrigger>> EntryTrigger::open() {
  std::unique_ptr<EntryTrigger> t(new EntryTrigger);
  t->state_ = new State;
  auto* skel = agent_bpf__open();
  if (!skel) return fail(fmt::format("cannot open the agent's BPF object: {}", errno_text(errno)));
  t->state_->skel = skel;
  uprobe_multi__prepare(skel->progs.stop_at_entry);
  if (int err = agent_bpf__load(skel); err != 0)
    return fail(fmt::format("cannot load the agent's BPF program: {}", errno_text(-err)),
                "the agent needs root (CAP_BPF, CAP_PERFMON) and a kernel with uprobe_multi (6.6+) and bpf_send_signal");
  auto on_event = [](void* ctx, void* data, size_t size) -> int {
    if (size < sizeof(agent_event)) return 0;
    auto* e = static_cast<const agent_event*>(data);
    static_cast<State*>(ctx)->batch.push_back({static_cast<pid_t>(e->pid), e->cookie, e->ip});
    return 0;
  };
  t->state_->ring = ring_buffer__new(bpf_map__fd(skel->maps.events), on_event, t->state_, nullptr);
  if (!t->state_->ring) return fail(fmt::format("cannot open the agent's ring buffer: {}", errno_text(errno)));
  return t;
}

EntryTrigger::~EntryTrigger() {
  if (!state_) return;
  if (state_->ring) ring_buffer__free(state_->ring);
  if (state_->skel) agent_bpf__destroy(state_->skel);
  delete state_;
}

Result<UniqueFd> EntryTrigger::arm(const std::string& path, const EntryPoint& entry, uint64_t cookie) {
  UprobeMultiSpec spec;
  spec.path = path;
  spec.offsets = {entry.file_offset};
  spec.cookies = {cookie};
  auto link = uprobe_multi__link(bpf_program__fd(state_->skel->progs.stop_at_entry), spec, 0, false);
  if (!link)
    return fail(fmt::format("cannot probe the entry point of {} (offset {:#x}): {}", path, entry.file_offset,
                            uprobe__refusal_text(link.error().exit_code)));
  return std::move(*link);
}

Result<void> EntryTrigger::poll(std::chrono::milliseconds timeout, const std::function<void(const EntryEvent&)>& fn) {
  state_->batch.clear();
  int n = ring_buffer__poll(state_->ring, static_cast<int>(timeout.count()));
  if (n < 0 && n != -EINTR) return fail(fmt::format("cannot read the agent's ring buffer: {}", errno_text(-n)));
  auto batch = std::move(state_->batch);
  state_->batch.clear();
  for (auto& e : batch) fn(e);
  return {};
}

uint64_t EntryTrigger::dropped() const { return state_->skel->bss->dropped; }

}  // namespace hotfix
