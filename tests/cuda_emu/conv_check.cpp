// The emulator's 16-bit float conversions, for tests/test_cuda_emulated.py to compare with torch's:
// reads 32-bit float bit patterns (hex, one per line) on stdin and prints, per input,
// "<bf16 bits> <fp16 bits>" (__float2bfloat16_rn, __float2half_rn); then, for every 16-bit pattern
// p, "<bits of float(bf16 p)> <bits of float(fp16 p)>".
#include "cuda_emu.h"

#include <cinttypes>

int main() {
  char line[64];
  while (std::fgets(line, sizeof(line), stdin)) {
    const uint32_t x = static_cast<uint32_t>(std::strtoul(line, nullptr, 16));
    const float f = midus_emu_bits<float>(x);
    std::printf("%04x %04x\n", __bfloat16_as_ushort(__float2bfloat16_rn(f)), __half_as_ushort(__float2half_rn(f)));
  }
  for (uint32_t p = 0; p < 65536; ++p)
    std::printf("%08x %08x\n", midus_emu_bits<uint32_t>(__bfloat162float(__ushort_as_bfloat16(uint16_t(p)))),
                midus_emu_bits<uint32_t>(__half2float(__ushort_as_half(uint16_t(p)))));
  return 0;
}
