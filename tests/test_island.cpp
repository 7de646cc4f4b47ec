// The counting island, executed for real: calls through it reach the target function with
// every argument intact and bump the counter exactly once per call, from several threads.
#include <sys/mman.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <thread>
#include <vector>

#include "arch/arch.hpp"

namespace {

__attribute__((noinline)) long six_args(long a, long b, long c, long d, long e, long f) {
  asm volatile("");
  return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f;
}

struct Island {
  void* page = nullptr;
  Island() { page = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); }
  ~Island() { ::munmap(page, 4096); }
};

}  // namespace

TEST_CASE("a counting island counts each call once and reaches the function with its arguments") {
  Island island;
  REQUIRE(island.page != MAP_FAILED);
  alignas(64) static uint64_t counter = 0;
  auto at = reinterpret_cast<uint64_t>(island.page);
  auto code = hotfix::arch::encode_counting_island(at, reinterpret_cast<uint64_t>(&counter),
                                                   reinterpret_cast<uint64_t>(&six_args));
  REQUIRE(code.size() == hotfix::arch::counting_island_size());
  std::memcpy(island.page, code.data(), code.size());
  auto through = reinterpret_cast<long (*)(long, long, long, long, long, long)>(island.page);

  for (long i = 0; i < 1000; ++i) REQUIRE(through(i, 1, 2, 3, 4, 5) == six_args(i, 1, 2, 3, 4, 5));
  CHECK(counter == 1000);

  std::vector<std::thread> threads;
  std::atomic<int> wrong{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (long i = 0; i < 100000; ++i)
        if (through(i, i, i, i, i, i) != 21 * i) wrong++;
    });
  for (auto& t : threads) t.join();
  CHECK(wrong == 0);
  CHECK(counter == 1000 + 4 * 100000);  // lock inc: no update lost between threads
}
