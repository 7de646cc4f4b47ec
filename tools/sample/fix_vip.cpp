// The fix for the sample service's VIP bug: the same function, same name and signature,
// now with the promised 20% discount. Build: g++ -g -O2 -shared -fPIC fix_vip.cpp -o fix_vip.so
namespace pricing {

struct Customer {
  int id;
  bool vip;
};

double vip_discount(const Customer& customer) { return customer.vip ? 0.20 : 0.0; }

}  // namespace pricing
