// bench_stats: what hit counting costs a patched function, per call, on one thread.
//   direct      the replacement called directly (no patch): the floor
//   patched     old entry -> `jmp rel32` -> plain island (jmp [rip]) -> replacement: a patch
//               without counting
//   counted     old entry -> `jmp rel32` -> counting island (arch::encode_counting_island:
//               push rax; movabs; lock inc [rax]; pop rax; jmp [rip]) -> replacement, the
//               counter being slot 0 of a real pinned BPF_F_MMAPABLE new_hits map mapped
//               MAP_SHARED (exactly what `hotfix-ctl patch` sets up in the target)
//   trampoline  old entry -> `jmp rel32` -> a copy of the replacement whose entry jumps to a
//               counting trampoline (arch::encode_counting_trampoline: lock inc, its moved
//               first instructions, jmp back), counter slot 1: what `patch` does when the
//               replacement's prologue can move, so calls from inside fix.so count too
//   uprobe      the replacement counted by an entry uprobe (uprobe_multi, `watch`'s program)
// All in this process, in one run. Usage: bench_stats [--quick]   (as root)
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <span>
#include <stdexcept>
#include <fmt/core.h>
#include <string>

#include "arch/arch.hpp"
#include "observe/patchcount.hpp"
#include "observe/watch.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix;
using clk = std::chrono::steady_clock;

extern "C" __attribute__((noipa)) int bench_replacement(int x) { return x * 3 + 1; }

namespace {

using Fn = int (*)(int);

__attribute__((noinline)) double ns_per_call(Fn fn, long calls) {
  volatile int sink = 0;
  for (long i = 0; i < calls / 10; ++i) sink = sink + fn(static_cast<int>(i));  // warm up
  auto t0 = clk::now();
  for (long i = 0; i < calls; ++i) sink = sink + fn(static_cast<int>(i));
  return std::chrono::duration<double, std::nano>(clk::now() - t0).count() / double(calls);
}

// Best of a few rounds: the least disturbed by the other engineers' work on this machine.
double best_of(Fn fn, long calls, int rounds = 5) {
  double best = 1e18;
  for (int r = 0; r < rounds; ++r) best = std::min(best, ns_per_call(fn, calls));
  return best;
}

// An executable page laid out like a patched function: `entry` jumps to an island that goes
// on to the replacement.
struct FakePatch {
  uint8_t* page = nullptr;
  size_t size = 0;
  Fn patched = nullptr;  // entry -> plain island
  Fn counted = nullptr;  // entry -> counting island
  Fn trampolined = nullptr;  // entry -> replacement copy -> counting trampoline

  FakePatch(uint64_t counter, std::span<const uint8_t> body) {
    size = static_cast<size_t>(::getpagesize());
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap");
    page = static_cast<uint8_t*>(p);
    auto base = reinterpret_cast<uint64_t>(page);
    auto to = reinterpret_cast<uint64_t>(&bench_replacement);
    put(0x100, arch::encode_island_jump(base + 0x100, to));
    put(0x200, arch::encode_counting_island(base + 0x200, counter, to));
    put(0x000, *arch::encode_entry_jump(base + 0x000, base + 0x100));
    put(0x040, *arch::encode_entry_jump(base + 0x040, base + 0x200));
    put(0x400, {body.begin(), body.end()});
    auto tramp = arch::encode_counting_trampoline(body, base + 0x400, base + 0x800, counter + PatchCounters::value_stride);
    if (!tramp) throw std::runtime_error(tramp.error().line());
    put(0x800, tramp->code);
    put(0x400, *arch::encode_entry_jump(base + 0x400, base + 0x800));
    put(0x080, *arch::encode_entry_jump(base + 0x080, base + 0x400));
    trampolined = reinterpret_cast<Fn>(page + 0x80);
    ::mprotect(page, size, PROT_READ | PROT_EXEC);
    patched = reinterpret_cast<Fn>(page);
    counted = reinterpret_cast<Fn>(page + 0x40);
  }
  ~FakePatch() { ::munmap(page, size); }
  void put(size_t at, const std::vector<uint8_t>& bytes) { std::memcpy(page + at, bytes.data(), bytes.size()); }
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const long calls = quick ? 10'000'000 : 100'000'000;
  const long probed_calls = quick ? 100'000 : 1'000'000;
  const pid_t self = ::getpid();
  const uint32_t id = 1;

  auto table = SymbolTable::for_pid(self);
  const Function* fn = table ? table->function_at(reinterpret_cast<uint64_t>(&bench_replacement)) : nullptr;
  if (!fn || !fn->size || fn->size > 0x300) {
    fmt::print(stderr, "bench_stats: bench_replacement not found in this process's symbols\n");
    return 1;
  }
  std::vector<uint8_t> body(fn->size);
  std::memcpy(body.data(), reinterpret_cast<const void*>(fn->address), fn->size);
  auto counters = patchcount__create(self, id, 2);
  if (!counters) {
    fmt::print(stderr, "bench_stats: {}\n", counters.error().line());
    return 1;
  }
  void* map = ::mmap(nullptr, counters->mmap_size(), PROT_READ | PROT_WRITE, MAP_SHARED, counters->new_hits.get(), 0);
  if (map == MAP_FAILED) {
    fmt::print(stderr, "bench_stats: cannot mmap new_hits: {}\n", std::strerror(errno));
    (void)patchcount__remove(self, id);
    return 1;
  }
  FakePatch fake(reinterpret_cast<uint64_t>(map), body);

  double direct = best_of(&bench_replacement, calls);
  double patched = best_of(fake.patched, calls);
  double counted = best_of(fake.counted, calls);
  double trampolined = best_of(fake.trampolined, calls);
  auto hits = patchcount__read(self, id);
  uint64_t counted_calls = hits && *hits ? (*hits)->functions[0].new_hits : 0;
  uint64_t trampolined_calls = hits && *hits ? (*hits)->functions[1].new_hits : 0;

  double uprobe = 0;
  {
    auto watch = fn ? Watch::attach(self, {*fn}, WatchOptions{.returns = false}) : fail("bench_replacement not found");
    if (!watch) fmt::print(stderr, "bench_stats: uprobe case skipped: {}\n", watch.error().line());
    else uprobe = best_of(&bench_replacement, probed_calls, 3);
  }
  ::munmap(map, counters->mmap_size());
  (void)patchcount__remove(self, id);

  long expected = 5 * (calls + calls / 10);
  fmt::print("hit counting, ns per call of a patched function, one thread (best of rounds; {} calls)\n", calls);
  fmt::print("  {:<58} {:>8.2f} ns\n", "direct call of the replacement (floor)", direct);
  fmt::print("  {:<58} {:>8.2f} ns\n", "patched, no counting (entry jmp -> island -> replacement)", patched);
  fmt::print("  {:<58} {:>8.2f} ns   {:+.2f} ns over patched\n", "patched, counting island (lock inc on mmapped BPF array)",
             counted, counted - patched);
  fmt::print("  {:<58} {:>8.2f} ns   {:+.2f} ns over patched\n", "patched, counting trampoline at the replacement's entry",
             trampolined, trampolined - patched);
  if (uprobe > 0)
    fmt::print("  {:<58} {:>8.2f} ns   {:+.2f} ns over direct\n", "uprobe-counted (entry uprobe, uprobe_multi)", uprobe,
               uprobe - direct);
  fmt::print("ratios: counted/patched {:.2f}x", counted / patched);
  if (uprobe > 0) fmt::print(", uprobe/counted {:.0f}x", uprobe / counted);
  fmt::print(", trampoline/patched {:.2f}x", trampolined / patched);
  bool exact = counted_calls == static_cast<uint64_t>(expected) && trampolined_calls == static_cast<uint64_t>(expected);
  fmt::print("\ncheck: the counters saw {} and {} calls, expected {} each ({})\n", counted_calls, trampolined_calls, expected,
             exact ? "exact" : "MISMATCH");
  return exact ? 0 : 1;
}
