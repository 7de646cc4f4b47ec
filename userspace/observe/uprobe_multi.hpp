// Many uprobes on one object in one BPF link (uprobe_multi, Linux 6.6+): shared by `watch`
// (entry/return counts) and patch hit counting (probes on the old code's exits, callers).
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "common/unique_fd.hpp"

struct bpf_program;

namespace hotfix {

// The uprobe_multi attach type: a program must be loaded with it as its expected attach type
// (its cookie helper reads a different context than a perf uprobe's).
constexpr uint32_t kAttachUprobeMulti = 48;  // BPF_TRACE_UPROBE_MULTI

// Probes of one object: `offsets` are file offsets, `cookies[i]` is what
// bpf_get_attach_cookie() returns at offsets[i].
struct UprobeMultiSpec {
  std::string path;  // as the kernel should open it, e.g. /proc/PID/root/usr/lib/libfoo.so
  std::vector<uint64_t> offsets;
  std::vector<uint64_t> cookies;
};

// Mark `prog` (before load) for uprobe_multi links.
void uprobe_multi__prepare(bpf_program* prog);

// Attach `prog_fd` at every offset of `spec`, firing only in process `pid` (0: every process).
// On failure the Error's exit_code holds the errno (callers turn it into a message and set 1).
Result<UniqueFd> uprobe_multi__link(int prog_fd, const UprobeMultiSpec& spec, pid_t pid, bool retprobe);

// What a kernel without uprobe_multi answers to the program load or the link create.
bool uprobe_multi__unsupported(int err);

// The object as the target sees it, through its root (it may live in a container).
std::string uprobe__target_path(pid_t pid, const std::string& object);

}  // namespace hotfix
