#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#define GPTCPP_LINUX_X86 1
#endif
#if defined(__x86_64__) || defined(_M_X64)
#define GPTCPP_X86 1
#endif

namespace gptcpp {

namespace {

#ifdef GPTCPP_X86
unsigned long long read_xcr0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

// Linux hands out the 8 KB tile state only to processes that ask (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA);
// the grant covers every thread of the process, those started later too.
bool amx_permitted() {
#ifdef GPTCPP_LINUX_X86
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef GPTCPP_X86
  unsigned int a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const unsigned int signature = a;  // family, model, stepping
  const bool osxsave = c & (1u << 27);
  const bool cpu_fma = c & (1u << 12), cpu_f16c = c & (1u << 29), cpu_avx = c & (1u << 28);
  unsigned long long xcr0 = osxsave ? read_xcr0() : 0;
  const bool ymm_state = (xcr0 & 0x6) == 0x6;             // SSE + AVX state saved by the OS
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;           // plus opmask and both ZMM halves
  unsigned int max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    const bool avx_ok = cpu_avx && ymm_state;
    f.avx2 = avx_ok && (b & (1u << 5));
    f.fma = avx_ok && cpu_fma;
    f.f16c = avx_ok && cpu_f16c;
    f.avx512f = zmm_state && (b & (1u << 16));
    f.avx512dq = f.avx512f && (b & (1u << 17));
    f.avx512bw = f.avx512f && (b & (1u << 30));
    f.avx512vl = f.avx512f && (b & (1u << 31));
    f.avx512_vnni = f.avx512f && (c & (1u << 11));
    unsigned int a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    f.avx_vnni = avx_ok && (a1 & (1u << 4));
    f.avx512_bf16 = f.avx512f && (a1 & (1u << 5));
    // AMX: tile, bf16 and int8 (leaf 7 edx bits 24, 22, 25), tile config and data state in XCR0 (bits 17, 18).
    const bool amx_cpu = (d & (1u << 24)) && (d & (1u << 22)) && (d & (1u << 25)) && ((xcr0 >> 17) & 3) == 3;
    f.amx = f.avx512_bf16 && amx_cpu && amx_permitted();
  }
  // Family 19h is Zen 3 and Zen 4; of them only Zen 4 has AVX-512.
  unsigned int vendor[3];
  __cpuid(0, a, vendor[0], vendor[2], vendor[1]);
  const bool amd = std::memcmp(vendor, "AuthenticAMD", 12) == 0;
  const unsigned int base_family = (signature >> 8) & 0xf;
  const unsigned int family = base_family == 0xf ? 0xf + ((signature >> 20) & 0xff) : base_family;
  f.amd_zen4 = amd && family == 0x19 && f.avx512f;
  char brand[49] = {0};
  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    for (unsigned int i = 0; i < 3; ++i) {
      __cpuid(0x80000002 + i, a, b, c, d);
      std::memcpy(brand + 16 * i, &a, 4); std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4); std::memcpy(brand + 16 * i + 12, &d, 4);
    }
  }
  f.brand = brand;
  while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
#endif
  return f;
}

// GPTCPP_HIDE_ISA=avx512[,avx2]: treat those levels as missing, so that the refusal of a level the CPU
// lacks can be tested on any machine.
bool hidden(Isa isa) {
  const char* env = std::getenv("GPTCPP_HIDE_ISA");
  if (env == nullptr) return false;
  std::string list = std::string(",") + env + ",";
  return list.find(std::string(",") + isa_name(isa) + ",") != std::string::npos;
}

bool supports(const CpuFeatures& f, Isa isa) {
  if (isa != Isa::generic && hidden(isa)) return false;
  switch (isa) {
    case Isa::generic: return true;
    case Isa::avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::avx2_vnni: return supports(f, Isa::avx2) && f.avx_vnni;
    case Isa::avx512: return f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
    case Isa::avx512_vnni: return supports(f, Isa::avx512) && f.avx512_vnni;
    case Isa::avx512_bf16: return supports(f, Isa::avx512_vnni) && f.avx512_bf16;
    case Isa::avx512_amx:
#ifdef GPTCPP_NO_AMX
      return false;  // this build's compiler had no AMX
#else
      return supports(f, Isa::avx512_bf16) && f.amx;
#endif
  }
  return false;
}

Isa best_isa() {
  Isa best = Isa::generic;
  for (Isa i : supported_isas()) best = i;
  return best;
}

Isa initial_isa() {
  const char* env = std::getenv("GPTCPP_ISA");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return best_isa();
  Isa want = parse_isa(env);
  if (!supports(cpu_features(), want))
    throw std::runtime_error(std::string("GPTCPP_ISA=") + env + " asks for an instruction set this CPU lacks");
  return want;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

namespace {
// The defaults were measured on Zen 5. Zen 4 (2 threads, gpt2, in one process alternating with them): fp32
// batches of 16-23 rows faster in plain passes than in chunks (matmul.inl), int8 tiles faster over the whole
// k than in slices (qmatmul.inl). The Intel Xeon with AMX (48 KB L1D, 2 MB L2; the same way): fp32 chunks of
// 32 rows of K rather than 128, gpt2 fp32 batch-16 decode 471-480 -> 529 tok/s (64: 497-501), batch-32 even.
// Widened 16-bit panels, measured on that Xeon, are slower on Zen 4, whose 32 KB L1D a 128-row float32 panel
// fills (64 or 32 rows were no better): gpt2 fp16 pp512, alternating processes, 1,009-1,044 tok/s without
// against 851-1,013 with them (faster in 4 of 4 rounds); in one process, alternating, median 1,053 against
// 1,012 (7 of 8). int8 and int4 (whose attention reads a half KV cache the same way) even.
Tuning initial_tuning() {
  Tuning t;
  if (cpu_features().amd_zen4) {
    t.avx512_fp32_chunk_rows = 24;
    t.avx512_widen_rows = 0;
    t.avx512_q8_slices = false;
  }
  if (cpu_features().amx) t.avx512_fp32_chunk_k = 32;
  return t;
}

static_assert(sizeof(Tuning) <= 8, "Tuning is read and written whole, without a lock");

std::atomic<Tuning>& current_tuning() {
  static std::atomic<Tuning> t{initial_tuning()};
  return t;
}
}  // namespace

Tuning tuning() { return current_tuning().load(std::memory_order_relaxed); }

void set_tuning(const Tuning& t) { current_tuning().store(t); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::generic: return "generic";
    case Isa::avx2: return "avx2";
    case Isa::avx2_vnni: return "avx2-vnni";
    case Isa::avx512: return "avx512";
    case Isa::avx512_vnni: return "avx512-vnni";
    case Isa::avx512_bf16: return "avx512-bf16";
    case Isa::avx512_amx: return "avx512-amx";
  }
  return "?";
}

constexpr Isa kAllIsas[] = {Isa::generic, Isa::avx2, Isa::avx2_vnni, Isa::avx512, Isa::avx512_vnni, Isa::avx512_bf16,
                               Isa::avx512_amx};

std::vector<Isa> all_isas() { return std::vector<Isa>(std::begin(kAllIsas), std::end(kAllIsas)); }

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa i : kAllIsas)
    if (supports(cpu_features(), i)) out.push_back(i);
  return out;
}

Isa parse_isa(const std::string& name) {
  std::string known;
  for (Isa i : kAllIsas) {
    if (name == isa_name(i)) return i;
    known += (known.empty() ? "" : ", ") + std::string(isa_name(i));
  }
  throw std::invalid_argument("unknown instruction set level '" + name + "' (known: " + known + ")");
}

Isa selected_isa() { return static_cast<Isa>(current().load()); }

void set_isa(Isa isa) {
  if (!supports(cpu_features(), isa))
    throw std::runtime_error(std::string("this CPU cannot run the ") + isa_name(isa) + " kernels");
  current().store(static_cast<int>(isa));
}

}  // namespace gptcpp
