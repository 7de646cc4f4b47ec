// Running code inside a traced process: system calls and function calls on ONE stopped
// thread (the others may keep running), and loading a library with the target's own dlopen.
// Every operation restores the thread's registers before returning, success or failure, and
// restores ITSELF if hotfix dies meanwhile: the code runs on a signal frame holding the
// thread's state and ends in rt_sigreturn (see docs/design.md, "Remote execution").
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "process/ptrace.hpp"

namespace hotfix {

// ---- system calls (the thread must be stopped: Tracee::stop_all or stop_thread) ----
// Executes system call `nr` in `tid` at a `syscall; ret` of libc, returning into glibc's
// rt_sigreturn restorer on a frame holding the thread's state; every signal stays pending
// meanwhile. Returns the raw result (negative errno).
Result<long> remote__syscall(Tracee& t, pid_t tid, long nr, std::initializer_list<uint64_t> args,
                             std::chrono::milliseconds timeout = std::chrono::seconds(2));

Result<uint64_t> remote__mmap(Tracee& t, pid_t tid, uint64_t addr, uint64_t len, int prot, int flags, int fd = -1,
                              uint64_t offset = 0);
Result<void> remote__munmap(Tracee& t, pid_t tid, uint64_t addr, uint64_t len);
Result<void> remote__mprotect(Tracee& t, pid_t tid, uint64_t addr, uint64_t len, int prot);
Result<void> remote__close(Tracee& t, pid_t tid, int fd);
// Anonymous private pages within reach of `near` (arch::near_jump_reach(): a jump from
// `near` can reach any byte of them), in a gap of /proc/PID/maps, with MAP_FIXED_NOREPLACE.
Result<uint64_t> remote__mmap_near(Tracee& t, pid_t tid, uint64_t near, uint64_t len, int prot);

// A memfd "name" (close-on-exec) sized `size` (rounded up to pages) in the target, not mapped:
// its fd there. The tracer reaches its pages through /proc/PID/fd/<fd>.
Result<int> remote__memfd_create(Tracee& t, pid_t tid, const std::string& name, uint64_t size);

// A shared memfd mapping in the target: memfd "name" (visible in /proc/PID/fd as
// "/memfd:name"), sized `size`, mapped MAP_SHARED with `prot`. The fd stays open in the target
// so the tracer can map the same pages through /proc/PID/fd/<fd>.
struct RemoteMemfd {
  int fd = -1;           // in the target
  uint64_t address = 0;  // in the target
  uint64_t size = 0;
};
Result<RemoteMemfd> remote__map_memfd(Tracee& t, pid_t tid, const std::string& name, uint64_t size, int prot);

// ---- function calls ----
// Calls `fn(args...)` (at most 6 integer arguments) in `tid` (stopped, usable_for_remote) and
// returns its return value. Other threads keep their state (running or stopped). Every
// signal to the thread stays pending during the call (threads the call creates inherit that
// fully blocked mask) and is delivered when it resumes; a crash inside the call (SIGSEGV...)
// or no return within `timeout` fails the call, restoring the thread's registers (general and
// FP/vector) and mask -- the code it ran may have left state behind, and the error says so.
// Maps a one-page return stub for the call and unmaps it afterwards.
Result<uint64_t> remote__call(Tracee& t, pid_t tid, uint64_t fn, std::span<const uint64_t> args,
                              std::chrono::milliseconds timeout = std::chrono::seconds(5));

// ---- loading libraries with the target's own dynamic loader ----
struct InjectOptions {
  std::chrono::milliseconds choose_timeout = std::chrono::seconds(3);  // to find a safe thread
  std::chrono::milliseconds call_timeout = std::chrono::seconds(10);   // for dlopen itself
  // Everything within `total` (hotfix-ctl's --timeout): half of it to find a safe thread,
  // the rest for the loader call (dlopen runs fix.so's constructors).
  static InjectOptions within(std::chrono::milliseconds total) { return {total / 2, total - total / 2}; }
  // RTLD_NOLOAD: only take a new reference to an object the loader already has under that
  // name (recovery's way to a handle it never journaled); nothing is opened, no constructor runs.
  bool already_loaded = false;
};
struct Injection {
  uint64_t handle = 0;  // dlopen's handle in the target
  pid_t tid = 0;        // the thread that ran it
};
// dlopen(path, RTLD_NOW) in the target, on a thread that holds no loader or malloc lock,
// while every other thread keeps running (so a lock they hold gets released). Requires no
// thread to be stopped by us. Never retried once started: constructors run at most once. On
// failure the target's dlerror() text is in the error. fix.so's constructors run inside the
// call, under the target's loader lock; one that blocks past call_timeout, crashes or ends the
// process is reported with the state it left the target in (see docs/limits.md). A fatal
// signal a constructor raises itself (abort(), raise(SIGSEGV)) is not delivered: the library
// is unloaded again and the call fails.
Result<Injection> remote__inject_library(Tracee& t, const std::string& path, const InjectOptions& opts = {});
// dlclose(handle) the same way (for reverted patches).
Result<void> remote__dlclose(Tracee& t, uint64_t handle, const InjectOptions& opts = {});
// dlsym(handle, name) the same way; 0 if not found.
Result<uint64_t> remote__dlsym(Tracee& t, uint64_t handle, const std::string& name, const InjectOptions& opts = {});

// fn(args...) the same way: on a thread that holds no loader or malloc lock, the others running
// (for library functions that take those locks, e.g. libgcc's __register_frame).
Result<uint64_t> remote__call_safe(Tracee& t, uint64_t fn, std::span<const uint64_t> args, const InjectOptions& opts = {});

// Stop one thread that is not inside the dynamic loader or the malloc/fork/dlopen family of
// libc: not at its pc, and not as a live caller on its stack (a scan of its stack for words
// pointing there, each hit confirmed by a libdw unwind; __libc_start_main below main never
// counts; a thread the unwinder cannot walk past a hit counts as holding the lock). Tries each
// thread in turn (sleeping ones first), letting them run in between, until `timeout`.
Result<pid_t> remote__stop_safe_thread(Tracee& t, std::chrono::milliseconds timeout);

// Why `tid` (stopped) would be unsafe to run the loader on, or "" if safe (same rule).
Result<std::string> remote__lock_frame(Tracee& t, pid_t tid);

}  // namespace hotfix
