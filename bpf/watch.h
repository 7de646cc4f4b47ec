/* Types shared by bpf/watch.bpf.c and userspace/observe (plain C, no kernel headers). */
#ifndef HOTFIX_WATCH_H
#define HOTFIX_WATCH_H

/* One slot per watched function, indexed by the probe's BPF cookie, in a per-CPU array:
 * no atomics on the hot path, exact once summed over CPUs. */
struct watch_counters {
	unsigned long long calls;           /* entry probe hits */
	unsigned long long returns;         /* return probe hits whose entry was seen */
	unsigned long long latency_ns;      /* sum over outermost calls that returned */
	unsigned long long latency_samples; /* how many outermost calls were timed */
	unsigned long long untracked;       /* entries not recorded: the in-flight table was full */
};

/* Set in an entry probe's cookie (above the slot index) when the function has no return
 * probe: its calls are counted but not tracked, or they would stay "in flight" forever. */
#define WATCH_COOKIE_NO_RETURN (1ULL << 63)

/* A call in progress: key of the in-flight table. */
struct watch_frame_key {
	unsigned long long pid_tgid;
	unsigned long long cookie;
};

struct watch_frame {
	unsigned long long entry_ns; /* when the outermost call entered */
	unsigned long long depth;    /* recursion depth of this thread in this function */
};

#define WATCH_MAX_FRAMES 65536

#endif
