// Instruction-set levels and the one dispatch point. Detection reads cpuid and xgetbv (the OS must have
// enabled the register state, not only the CPU support it); GPTCPP_ISA can force a lower level.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace gptcpp {

// Ordered by preference: the best supported level is the last one the CPU has. A level needs everything
// its name says: avx2 is AVX2 + FMA + F16C, avx512 adds F/BW/VL/DQ, the -vnni levels add the int8 dot
// product (AVX-VNNI on 256-bit registers, AVX512-VNNI), avx512-bf16 adds the bf16 dot product (AVX512-BF16) to
// avx512-vnni (Cooper Lake, Sapphire Rapids and later, Zen 4 and later have both). avx512 does not imply
// avx2-vnni (Skylake-SP has the first and not the second), so each level is checked on its own. avx512-amx adds
// AMX tiles with their bf16 and int8 products (Sapphire Rapids and later) to avx512-bf16, where the OS lets the
// process use them (Linux grants the tile state on request: arch_prctl, asked once at detection).
enum class Isa { generic = 0, avx2 = 1, avx2_vnni = 2, avx512 = 3, avx512_vnni = 4, avx512_bf16 = 5, avx512_amx = 6 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, avx_vnni = false;
  bool amx = false;  // AMX-TILE, AMX-BF16 and AMX-INT8, their state enabled in XCR0 and granted to this process
  bool amd_zen4 = false;  // AMD family 19h with AVX-512: 512-bit operations in two 256-bit halves, a 32 KB L1D
  std::string brand;
};

// Kernel choices that measured differently on CPUs of the same level, read by the kernels at each call (a
// choice never changes a result's bits: the variants do the same operations in the same order). Set from the
// CPU at start-up; tests flip them to run every variant on any machine. Measurements in the kernels.
struct Tuning {
  // (16-bit fields, so that the struct stays 8 bytes, which std::atomic handles without a lock)
  int16_t avx512_fp32_chunk_rows = 16;  // matmul.inl: AVX-512 fp32 batches from this many rows to 48 walk K in chunks
  int16_t avx512_fp32_chunk_k = 128;    // matmul.inl: ... of this many rows of K: 32, 64 or 128
  int16_t avx512_widen_rows = 64;       // matmul.inl: AVX-512 16-bit weights are widened into float32 panels from
                                        // this many rows (0: never)
  bool avx512_q8_slices = true;         // qmatmul.inl: AVX-512 int8 tiles take a column unit's k in L1-sized slices
};
Tuning tuning();
void set_tuning(const Tuning& t);

const CpuFeatures& cpu_features();
const char* isa_name(Isa isa);
// Every level this build knows, in preference order.
std::vector<Isa> all_isas();
// Levels this CPU (and OS) can run, lowest first.
std::vector<Isa> supported_isas();
// Parses a level name; throws std::invalid_argument naming the value for an unknown one.
Isa parse_isa(const std::string& name);
// The level chosen at start-up: GPTCPP_ISA if set (refused with std::runtime_error when the CPU lacks it),
// otherwise the best supported.
Isa selected_isa();
// Changes the level used from now on (tests); refuses a level the CPU lacks.
void set_isa(Isa isa);

}  // namespace gptcpp
