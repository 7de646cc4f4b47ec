// A small multi-threaded order-pricing service: the sample that tools/demo fixes live.
//
// Four workers price random orders forever; once a second the service prints what it
// charged. The bug: pricing::vip_discount() forgets the VIP discount, so VIP customers
// pay full price. tools/sample/fix_vip.cpp holds the fixed function.
//
// noinline keeps each pricing step a real function, as it would be in a larger service;
// a function the compiler inlined everywhere has no entry left to patch (docs/limits.md).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include <unistd.h>

namespace pricing {

struct Customer {
  int id;
  bool vip;
};

struct Item {
  int sku;
  int quantity;
  double unit_price;
};

// Every order priced, and how much VIPs were charged against list price (for the report).
static std::atomic<long> g_orders{0};
static std::atomic<long> g_vip_cents{0};
static std::atomic<long> g_vip_list_cents{0};

__attribute__((noinline)) double list_price(const Item& item) { return item.quantity * item.unit_price; }

// BUG: VIP customers are promised 20% off, but this returns 0 for everyone.
__attribute__((noinline)) double vip_discount(const Customer& customer) {
  (void)customer;
  return 0.0;
}

__attribute__((noinline)) double price_order(const Customer& customer, const std::vector<Item>& items) {
  double total = 0;
  for (const Item& item : items) total += list_price(item);
  double charged = total * (1.0 - vip_discount(customer));
  g_orders.fetch_add(1, std::memory_order_relaxed);
  if (customer.vip) {
    g_vip_cents.fetch_add(static_cast<long>(charged * 100), std::memory_order_relaxed);
    g_vip_list_cents.fetch_add(static_cast<long>(total * 100), std::memory_order_relaxed);
  }
  return charged;
}

}  // namespace pricing

namespace {

void worker(unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> qty(1, 5), sku(1, 500), customer(1, 100);
  std::vector<pricing::Item> items;
  for (;;) {
    items.clear();
    for (int i = 0, n = qty(rng); i < n; ++i) items.push_back({sku(rng), qty(rng), 10.0 + sku(rng) % 40});
    int id = customer(rng);
    pricing::price_order({id, id % 5 == 0}, items);
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

void report_forever() {
  long last_orders = 0, last_vip = 0, last_list = 0;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    long orders = pricing::g_orders.load(), vip = pricing::g_vip_cents.load(), list = pricing::g_vip_list_cents.load();
    long d_vip = vip - last_vip, d_list = list - last_list;
    double discount = d_list ? 100.0 * (1.0 - double(d_vip) / double(d_list)) : 0.0;
    std::printf("[pricing] %ld orders/s; VIP customers charged %.2f of list %.2f: discount %.0f%%\n",
                orders - last_orders, d_vip / 100.0, d_list / 100.0, discount);
    std::fflush(stdout);
    last_orders = orders, last_vip = vip, last_list = list;
  }
}

}  // namespace

int main() {
  std::printf("[pricing] service up, pid %d, 4 workers\n", static_cast<int>(getpid()));
  std::fflush(stdout);
  std::vector<std::thread> workers;
  for (unsigned i = 0; i < 4; ++i) workers.emplace_back(worker, 1234 + i);
  report_forever();
}
