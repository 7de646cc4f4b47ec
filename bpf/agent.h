/* Types shared by bpf/agent.bpf.c and userspace/agent/trigger.cpp (plain C). */
#ifndef HOTFIX_AGENT_H
#define HOTFIX_AGENT_H

/* One new process of an armed binary, stopped (SIGSTOP) at the executable's entry point. */
struct agent_event {
	unsigned int pid;             /* tgid */
	unsigned int pad;
	unsigned long long cookie;    /* the armed binary's index (userspace's table) */
	unsigned long long ip;        /* runtime address of the entry point */
};

#define AGENT_RINGBUF_BYTES (256 * 1024)

#endif
