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

// Whether this kernel has uprobe_multi links, asked once per process with a known-good probe
// (a plain function of this program, in this process). An error only for reasons that would
// stop any probe (no privileges, no BPF). Only this decides the fallback to perf uprobes: a
// failed link of real functions names an offset the kernel refuses, not a missing feature.
Result<bool> uprobe_multi__available();

// The errors with which the kernel refuses one offset: an instruction it cannot probe
// (ENOTSUPP 524, e.g. a `lock`-prefixed one), one it cannot decode (ENOEXEC: data in .text),
// an offset it rejects (EINVAL), EOPNOTSUPP.
bool uprobe__refuses_offset(int err);
// The errno as a reason a person can read ("the kernel cannot probe its first instruction").
std::string uprobe__refusal_text(int err);

// An offset of a spec that the kernel refused: its index in spec.offsets and the errno.
struct RefusedOffset {
  size_t index = 0;
  int err = 0;
};

// Attach like uprobe_multi__link, but when the kernel refuses the link because of some of
// its offsets, find them by bisection (the link is all or nothing), link the rest in as few
// links as bisection leaves, and list the refused ones in `refused`. `links` gets every link
// made, also when an error (not an offset's refusal) ends the attach half way.
Result<void> uprobe_multi__link_skipping(int prog_fd, const UprobeMultiSpec& spec, pid_t pid, bool retprobe,
                                         std::vector<UniqueFd>& links, std::vector<RefusedOffset>& refused);

// The object as the target sees it, through its root (it may live in a container).
std::string uprobe__target_path(pid_t pid, const std::string& object);

}  // namespace hotfix
