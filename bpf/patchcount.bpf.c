// SPDX-License-Identifier: GPL-2.0
/* Hit counting around a patch. New-code hits are counted by the target itself (its islands
 * increment new_hits, an mmapped array; nothing runs here for them). This file holds:
 *   count_old_exit  uprobe_multi on every exit of an OLD function body: only calls still
 *                   running the old code (threads that were inside when the patch landed)
 *                   reach it, so it costs nothing for calls that enter the replacement.
 *   sample_caller   uprobe_multi on a replacement's entry, for `stats --callers` only while
 *                   sampling: records who called. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "patchcount.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1); /* resized to the patch's function count before load */
	__type(key, __u32);
	__type(value, __u64);
} new_hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1); /* resized likewise */
	__type(key, __u32);
	__type(value, __u64);
} old_hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct patchcount_meta);
} meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CALLERS_MAX_STACKS);
	__type(key, struct callers_key);
	__type(value, __u64);
} callers SEC(".maps");

/* The key is too big for the BPF stack next to the helpers' frames: build it per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct callers_key);
} callers_scratch SEC(".maps");

SEC("uprobe")
int count_old_exit(void *ctx)
{
	/* The link's pid filter keeps other processes out; the cookie is the function index. */
	__u32 index = (__u32)bpf_get_attach_cookie(ctx);
	__u64 *hits = bpf_map_lookup_elem(&old_hits, &index);
	if (hits)
		__sync_fetch_and_add(hits, 1);
	return 0;
}

SEC("uprobe")
int sample_caller(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct callers_key *key = bpf_map_lookup_elem(&callers_scratch, &zero);
	if (!key)
		return 0;
	__builtin_memset(key, 0, sizeof(*key));
	__u64 cookie = bpf_get_attach_cookie(ctx);
	key->cookie = (__u32)cookie;
	/* At the entry the return address is on top of the stack: the caller, frame pointers or not.
	 * Past instructions moved to a counting trampoline it is below what they pushed: the
	 * cookie's upper half says how far. */
	if (bpf_probe_read_user(&key->ips[0], sizeof(key->ips[0]), (void *)(PT_REGS_SP(ctx) + (cookie >> 32))) != 0)
		return 0;
	long bytes = bpf_get_stack(ctx, &key->ips[1], sizeof(key->ips) - sizeof(key->ips[0]), BPF_F_USER_STACK);
	key->depth = 1 + (bytes > 0 ? (unsigned int)(bytes / sizeof(__u64)) : 0);
	__u64 one = 1;
	__u64 *count = bpf_map_lookup_elem(&callers, key);
	if (count)
		__sync_fetch_and_add(count, 1);
	else
		bpf_map_update_elem(&callers, key, &one, BPF_NOEXIST);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
