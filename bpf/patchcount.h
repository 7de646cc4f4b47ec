/* Types shared by bpf/patchcount.bpf.c and userspace/observe/patchcount.cpp (plain C). */
#ifndef HOTFIX_PATCHCOUNT_H
#define HOTFIX_PATCHCOUNT_H

/* Maps of one patch, pinned under /sys/fs/bpf/hotfix/<pid>/<patch id>/:
 *   new_hits  BPF_F_MMAPABLE array of u64, index = function index in the PatchRecord: the
 *             target maps it and its counting islands `lock inc` slot i (no trap).
 *   old_hits  array of u64, same index: uprobes on the old code's exits add 1.
 *   meta      one struct patchcount_meta: whose counters these are (for gc).
 *   old_exits[.N]  the uprobe_multi link(s) counting old_hits; unlinking detaches. */

/* Identity of the counted process: a pid reused by another process has another start time. */
struct patchcount_meta {
	unsigned long long start_time; /* /proc/PID/stat field 22 (clock ticks since boot) */
	unsigned long long created_ns; /* CLOCK_REALTIME when the counters were created */
	unsigned int pid;
	unsigned int patch_id;
	unsigned int nfunctions;
	unsigned int exit_probes;      /* uprobes on old-code exits, once attached */
};

/* --callers: who calls a replacement, sampled by a uprobe on its entry. ips[0] is the return
 * address on the stack at entry (the caller: exact); ips[1..] come from bpf_get_stack()
 * (user frame pointers: ips[1] is the entry itself, then the caller's callers where frame
 * pointers exist). */
#define CALLERS_MAX_DEPTH 16
struct callers_key {
	unsigned int cookie; /* function index */
	unsigned int depth;  /* valid entries of ips */
	unsigned long long ips[CALLERS_MAX_DEPTH];
};
#define CALLERS_MAX_STACKS 16384

#endif
