// Self-restoring remote execution: the kernel's x86-64 signal frame (struct rt_sigframe, as
// arch/x86/kernel/signal_64.c builds it), gadgets in glibc that end in rt_sigreturn, and the
// register conventions of code that runs on such a frame. Layouts are the kernel's uapi ones
// (asm/sigcontext.h, asm/ucontext.h, asm/fpu/signal.h), restated here so that glibc's
// conflicting <signal.h> definitions stay out of the way.
#include <elf.h>
#include <sys/ptrace.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstring>

#include "arch/x86_64/regs.hpp"
#include "arch/x86_64/writer.hpp"

namespace hotfix::arch {
namespace {

struct KernelStack {  // stack_t
  uint64_t ss_sp;
  int32_t ss_flags;
  int32_t pad;
  uint64_t ss_size;
};
struct SigContext {  // struct sigcontext (64-bit)
  uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
  uint64_t di, si, bp, bx, dx, ax, cx, sp, ip, flags;
  uint16_t cs, gs, fs, ss;
  uint64_t err, trapno, oldmask, cr2;
  uint64_t fpstate;
  uint64_t reserved1[8];
};
struct UContext {  // struct ucontext (kernel's, 8-byte sigset)
  uint64_t uc_flags;
  uint64_t uc_link;
  KernelStack uc_stack;
  SigContext uc_mcontext;
  uint64_t uc_sigmask;
};
struct RtSigframe {
  uint64_t pretcode;
  UContext uc;
  unsigned char info[128];  // siginfo_t; rt_sigreturn never reads it
};
static_assert(sizeof(SigContext) == 256);
static_assert(offsetof(UContext, uc_mcontext) == 40);
static_assert(offsetof(RtSigframe, uc) == 8);
static_assert(sizeof(RtSigframe) == 440, "struct rt_sigframe of x86-64 is 440 bytes");

struct FpxSwBytes {  // struct _fpx_sw_bytes, in the FXSAVE area's software-reserved bytes
  uint32_t magic1;
  uint32_t extended_size;
  uint64_t xfeatures;
  uint32_t xstate_size;
  uint32_t padding[7];
};
static_assert(sizeof(FpxSwBytes) == 48);
constexpr size_t kSwReservedOffset = 464;
constexpr size_t kXsaveHeaderEnd = 512 + 64;
constexpr uint32_t kFpXstateMagic1 = 0x46505853;
constexpr uint32_t kFpXstateMagic2 = 0x46505845;
constexpr uint64_t kFeaturesFpSse = 0x3;

constexpr uint64_t kUcFpXstate = 0x1, kUcSigcontextSs = 0x2, kUcStrictRestoreSs = 0x4;
constexpr int32_t kSsDisable = 2;
constexpr uint64_t kRedZone = 128;
constexpr long kNrRtSigreturn = 15;
constexpr long kErestartRestartBlock = 516;

// glibc's __restore_rt, the sa_restorer of every handler it installs: mov rax, 15; syscall.
constexpr uint8_t kRestoreRt[] = {0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05};
// syscall; ret -- the tail of many glibc wrappers (getpid...).
constexpr uint8_t kSyscallRet[] = {0x0f, 0x05, 0xc3};

uint64_t round_down(uint64_t v, uint64_t a) { return v & ~(a - 1); }

// The registers the frame makes the thread resume with. An interrupted syscall the kernel
// would restart is restarted by re-executing it (pc back on the syscall instruction, its number
// in rax), since rt_sigreturn disarms the kernel's restart logic (orig_ax = -1) and also resets
// the restart block, so a -ERESTART_RESTARTBLOCK call (relative sleeps) re-runs from its start.
RegsBuffer frame_regs(const RegsBuffer& saved) {
  RegsBuffer r = saved;
  auto& u = r.get().u;
  if (regs__in_restartable_syscall(r)) {
    u.rax = u.orig_rax;
    u.rip -= syscall_instruction().size();
  }
  u.orig_rax = static_cast<uint64_t>(-1);
  return r;
}

}  // namespace

std::span<const uint8_t> sigreturn_code() { return kRestoreRt; }
std::span<const uint8_t> syscall_return_gadget() { return kSyscallRet; }
long sigreturn_syscall_nr() { return kNrRtSigreturn; }

std::vector<uint8_t> encode_call_return_stub() {
  // A called function returns here with rsp just above the frame's pretcode slot: keep its
  // return value in that slot (rt_sigreturn reads none of it), then rt_sigreturn.
  x86::Writer w;
  w.mov_rsp_offset_rax(-8);
  w.mov_eax_u32(static_cast<uint32_t>(kNrRtSigreturn));
  w.syscall();
  return w.code();
}

size_t sigframe__altstack_size() { return sizeof(KernelStack); }
std::vector<uint8_t> sigframe__no_altstack() {
  KernelStack s{0, kSsDisable, 0, 0};
  std::vector<uint8_t> out(sizeof s);
  std::memcpy(out.data(), &s, sizeof s);
  return out;
}

Result<SelfRestoreFrame> sigframe__build(const RegsBuffer& saved, uint64_t sigmask, const ExtendedRegs& xstate,
                                         std::span<const uint8_t> altstack, uint64_t return_address) {
  size_t xsize = xstate.bytes.size();
  if (xsize < kXsaveHeaderEnd)
    return fail(fmt::format("the thread's XSAVE area is {} bytes, too small for a signal frame", xsize));
  if (altstack.size() != sizeof(KernelStack)) return fail("internal error: sigaltstack state of the wrong size");
  const auto& u = saved.get().u;
  // Placement as the kernel's get_sigframe(): below the red zone, the FP area 64-byte aligned
  // (XRSTOR needs it), the frame so that its end is 16-byte aligned minus the return address.
  uint64_t fp_addr = round_down(u.rsp - kRedZone - (xsize + sizeof(uint32_t)), 64);
  uint64_t sp = round_down(fp_addr - sizeof(RtSigframe), 16) - 8;

  SelfRestoreFrame out;
  out.sp = sp;
  out.fpstate = fp_addr;
  out.resumed = frame_regs(saved);
  out.altstack_addr = sp + offsetof(RtSigframe, uc) + offsetof(UContext, uc_stack);
  out.result_slot = sp;
  out.bytes.assign(fp_addr + xsize + sizeof(uint32_t) - sp, 0);

  const auto& r = out.resumed.get().u;
  RtSigframe f{};
  f.pretcode = return_address;
  f.uc.uc_flags = kUcFpXstate | kUcSigcontextSs | kUcStrictRestoreSs;
  std::memcpy(&f.uc.uc_stack, altstack.data(), sizeof(KernelStack));
  auto& sc = f.uc.uc_mcontext;
  sc.r8 = r.r8, sc.r9 = r.r9, sc.r10 = r.r10, sc.r11 = r.r11, sc.r12 = r.r12, sc.r13 = r.r13, sc.r14 = r.r14;
  sc.r15 = r.r15, sc.di = r.rdi, sc.si = r.rsi, sc.bp = r.rbp, sc.bx = r.rbx, sc.dx = r.rdx, sc.ax = r.rax;
  sc.cx = r.rcx, sc.sp = r.rsp, sc.ip = r.rip, sc.flags = r.eflags;
  sc.cs = static_cast<uint16_t>(r.cs), sc.ss = static_cast<uint16_t>(r.ss);
  sc.oldmask = sigmask;
  sc.fpstate = fp_addr;
  f.uc.uc_sigmask = sigmask;
  std::memcpy(out.bytes.data(), &f, sizeof f);

  // The FP area: the regset's standard-format XSAVE image, with the software bytes that tell
  // rt_sigreturn it is a full XSAVE image (else it restores only x87/SSE), and magic2 after it.
  uint8_t* fp = out.bytes.data() + (fp_addr - sp);
  std::memcpy(fp, xstate.bytes.data(), xsize);
  FpxSwBytes sw{};
  std::memcpy(&sw, fp + kSwReservedOffset, sizeof sw);  // the kernel puts its own sw bytes in the regset
  sw.magic1 = kFpXstateMagic1;
  sw.xstate_size = static_cast<uint32_t>(xsize);
  sw.extended_size = static_cast<uint32_t>(xsize + sizeof(uint32_t));
  if ((sw.xfeatures & kFeaturesFpSse) != kFeaturesFpSse) {
    uint64_t xstate_bv = 0;
    std::memcpy(&xstate_bv, fp + 512, sizeof xstate_bv);
    sw.xfeatures |= xstate_bv | kFeaturesFpSse;
  }
  std::memcpy(fp + kSwReservedOffset, &sw, sizeof sw);
  uint32_t magic2 = kFpXstateMagic2;
  std::memcpy(fp + xsize, &magic2, sizeof magic2);
  return out;
}

void regs__prepare_syscall_on_frame(RegsBuffer& r, uint64_t gadget, long nr, std::span<const uint64_t> args,
                                    uint64_t sp) {
  regs__prepare_syscall(r, gadget, nr, args);
  r.get().u.rsp = sp;
}

Result<void> regs__prepare_call_on_frame(RegsBuffer& r, uint64_t fn, std::span<const uint64_t> args, uint64_t sp) {
  auto& u = r.get().u;
  unsigned long long* slots[] = {&u.rdi, &u.rsi, &u.rdx, &u.rcx, &u.r8, &u.r9};
  if (args.size() > std::size(slots))
    return fail(fmt::format("a remote call takes at most {} arguments, not {}", std::size(slots), args.size()));
  for (size_t i = 0; i < args.size(); ++i) *slots[i] = args[i];
  u.rsp = sp;  // the frame's pretcode is the return address; (sp + 8) % 16 == 0 as at any call
  u.rip = fn;
  u.rax = 0;  // varargs: number of vector registers used
  u.orig_rax = static_cast<uint64_t>(-1);
  return {};
}

long regs__syscall_nr(const RegsBuffer& r) { return static_cast<long>(r.get().u.orig_rax); }

void regs__end_syscall(RegsBuffer& r, long result) {
  r.get().u.rax = static_cast<uint64_t>(result);
  r.get().u.orig_rax = static_cast<uint64_t>(-1);  // the kernel restarts nothing
}

bool regs__restart_needs_block(const RegsBuffer& r) {
  return regs__in_restartable_syscall(r) && -static_cast<long>(r.get().u.rax) == kErestartRestartBlock;
}

RegsBuffer regs__resume_by_hand(const RegsBuffer& saved) {
  RegsBuffer r = saved;
  regs__restart_syscall(r);
  r.get().u.orig_rax = static_cast<uint64_t>(-1);
  return r;
}

std::string regs__diff(const RegsBuffer& actual, const RegsBuffer& expected) {
  const auto& a = actual.get().u;
  const auto& e = expected.get().u;
  std::string out;
  auto cmp = [&](const char* name, uint64_t x, uint64_t y) {
    if (x != y) out += fmt::format("{}{} {:#x} (expected {:#x})", out.empty() ? "" : ", ", name, x, y);
  };
  cmp("rax", a.rax, e.rax), cmp("rbx", a.rbx, e.rbx), cmp("rcx", a.rcx, e.rcx), cmp("rdx", a.rdx, e.rdx);
  cmp("rsi", a.rsi, e.rsi), cmp("rdi", a.rdi, e.rdi), cmp("rbp", a.rbp, e.rbp), cmp("rsp", a.rsp, e.rsp);
  cmp("r8", a.r8, e.r8), cmp("r9", a.r9, e.r9), cmp("r10", a.r10, e.r10), cmp("r11", a.r11, e.r11);
  cmp("r12", a.r12, e.r12), cmp("r13", a.r13, e.r13), cmp("r14", a.r14, e.r14), cmp("r15", a.r15, e.r15);
  cmp("rip", a.rip, e.rip), cmp("cs", a.cs, e.cs), cmp("ss", a.ss, e.ss);
  cmp("fs_base", a.fs_base, e.fs_base), cmp("gs_base", a.gs_base, e.gs_base);
  // The flags a user program can change (the kernel's FIX_EFLAGS less RF and TF).
  constexpr uint64_t kUserFlags = 0x40000 | 0x800 | 0x400 | 0x80 | 0x40 | 0x10 | 0x4 | 0x1;
  cmp("eflags", a.eflags & kUserFlags, e.eflags & kUserFlags);
  return out;
}

}  // namespace hotfix::arch
