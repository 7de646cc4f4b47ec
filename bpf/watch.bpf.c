// SPDX-License-Identifier: GPL-2.0
/* Call counting for `hotfix-ctl watch`: one entry program and one return program, attached
 * to many functions at once (uprobe_multi) or one by one (perf uprobes). The BPF cookie of
 * each attachment is the function's index into the counters array. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "watch.h"

/* Knobs, set by userspace before load (libbpf-tools style). */
const volatile unsigned int target_tgid = 0;
/* Track calls in a per-thread table: pairs each return with its entry (exact in-flight) and
 * times outermost calls. Off when there are no return probes. */
const volatile unsigned int track_frames = 0;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1); /* resized to the number of functions before load */
	__type(key, unsigned int);
	__type(value, struct watch_counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, WATCH_MAX_FRAMES);
	__type(key, struct watch_frame_key);
	__type(value, struct watch_frame);
} frames SEC(".maps");

static __always_inline struct watch_counters *slot(unsigned long long cookie)
{
	unsigned int index = (unsigned int)cookie;
	return bpf_map_lookup_elem(&counters, &index);
}

static __always_inline int ours(unsigned long long pid_tgid)
{
	/* uprobe_multi filters by pid too, but perf uprobes on a shared library would also
	 * fire in other processes' copies of it without this. */
	return target_tgid == 0 || (pid_tgid >> 32) == target_tgid;
}

/* The counters of the probed function, or NULL for a hit in another process. */
static __always_inline struct watch_counters *our_slot(void *ctx, unsigned long long *pid_tgid,
						       unsigned long long *cookie)
{
	*pid_tgid = bpf_get_current_pid_tgid();
	if (!ours(*pid_tgid))
		return NULL;
	*cookie = bpf_get_attach_cookie(ctx);
	return slot(*cookie);
}

static __always_inline void enter(void *ctx)
{
	unsigned long long pid_tgid, cookie;
	struct watch_counters *c = our_slot(ctx, &pid_tgid, &cookie);
	if (!c)
		return;
	c->calls++;
	if (!track_frames || (cookie & WATCH_COOKIE_NO_RETURN))
		return;
	struct watch_frame_key key = { .pid_tgid = pid_tgid, .cookie = cookie };
	struct watch_frame *f = bpf_map_lookup_elem(&frames, &key);
	if (f) {
		f->depth++; /* recursion: only the outermost call is timed */
		return;
	}
	struct watch_frame fresh = { .entry_ns = bpf_ktime_get_ns(), .depth = 1 };
	if (bpf_map_update_elem(&frames, &key, &fresh, BPF_NOEXIST) != 0)
		c->untracked++;
}

static __always_inline void leave(void *ctx)
{
	unsigned long long pid_tgid, cookie;
	struct watch_counters *c = our_slot(ctx, &pid_tgid, &cookie);
	if (!c)
		return;
	struct watch_frame_key key = { .pid_tgid = pid_tgid, .cookie = cookie };
	struct watch_frame *f = bpf_map_lookup_elem(&frames, &key);
	/* A return whose entry we never saw (the call began while the probes were being
	 * attached) is not counted, so calls - returns stays the number in flight. */
	if (!f)
		return;
	c->returns++;
	if (--f->depth > 0)
		return;
	c->latency_ns += bpf_ktime_get_ns() - f->entry_ns;
	c->latency_samples++;
	bpf_map_delete_elem(&frames, &key);
}

SEC("uprobe")
int watch_entry(void *ctx)
{
	enter(ctx);
	return 0;
}

SEC("uretprobe")
int watch_return(void *ctx)
{
	leave(ctx);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
