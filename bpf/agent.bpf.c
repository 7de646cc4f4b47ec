// SPDX-License-Identifier: GPL-2.0
/* The agent's trigger (hotfix-ctl agent): a uprobe on the ENTRY POINT of every binary that
 * has persisted patch sets. uprobes are keyed by inode and offset, so this fires in every new
 * process of that file, and only there, once: when the dynamic loader jumps to the program,
 * after every library is loaded and initialised and before any of the program's own code
 * (its constructors included) runs. The program stops the process there with SIGSTOP and
 * tells the agent, which parks it (userspace/process/park.hpp), patches it and lets it go.
 * The event is reserved first: when the ring buffer is full nothing is stopped (the agent's
 * catch-up scan patches such a process later, live), so no process is ever stopped without
 * the agent being told. */
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "agent.h"

#define SIGSTOP_NR 19

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, AGENT_RINGBUF_BYTES);
} events SEC(".maps");

/* Events that did not fit: the agent then scans for unpatched processes. */
unsigned long long dropped = 0;

SEC("uprobe")
int stop_at_entry(struct pt_regs *ctx)
{
	unsigned long long id = bpf_get_current_pid_tgid();
	unsigned int tgid = id >> 32;

	if ((unsigned int)id != tgid) /* only the main thread runs the entry point */
		return 0;
	struct agent_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__sync_fetch_and_add(&dropped, 1);
		return 0;
	}
	e->pid = tgid;
	e->pad = 0;
	e->cookie = bpf_get_attach_cookie(ctx);
	e->ip = PT_REGS_IP(ctx);
	bpf_send_signal(SIGSTOP_NR);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
