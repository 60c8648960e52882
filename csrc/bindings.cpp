// pybind11 only: converts arguments, releases the GIL, calls down. No model logic here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu/isa.h"
#include "cpu/parallel.h"
#include "generate/decoder.h"
#include "generate/logits_process.h"
#include "kernels/kernels.h"
#include "model/gpt2.h"

namespace py = pybind11;
using namespace gptcpp;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using TokenArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

Activation parse_activation(const std::string& name) {
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast" || name == "gelu_accurate")
    return Activation::gelu_tanh;
  if (name == "gelu") return Activation::gelu_erf;
  if (name == "quick_gelu") return Activation::quick_gelu;
  if (name == "relu") return Activation::relu;
  if (name == "silu" || name == "swish") return Activation::silu;
  if (name == "tanh") return Activation::tanh;
  if (name == "sigmoid") return Activation::sigmoid;
  if (name == "linear") return Activation::linear;
  throw std::invalid_argument("unsupported activation_function '" + name + "'");
}

// The model plus references to the numpy arrays (often memory-mapped) its raw pointers borrow.
struct PyModel {
  std::unique_ptr<GPT2Model> model;
  std::vector<py::object> keep_alive;
  std::unique_ptr<PrefixCache> prefix_cache;  // null unless enabled
};

const float* borrow(PyModel& m, const py::dict& tensors, const std::string& name, std::vector<int64_t> shape) {
  if (!tensors.contains(name)) throw std::invalid_argument("missing tensor " + name);
  py::array arr = py::reinterpret_borrow<py::array>(tensors[name.c_str()]);
  if (!py::isinstance<py::array_t<float>>(arr) || !(arr.flags() & py::array::c_style))
    throw std::invalid_argument("tensor " + name + " must be a C-contiguous float32 array");
  if (arr.ndim() != static_cast<py::ssize_t>(shape.size()))
    throw std::invalid_argument("tensor " + name + " has the wrong number of dimensions");
  for (size_t i = 0; i < shape.size(); ++i)
    if (arr.shape(i) != shape[i]) throw std::invalid_argument("tensor " + name + " has the wrong shape");
  m.keep_alive.push_back(arr);
  return static_cast<const float*>(arr.data());
}

// A Tuning (cpu/isa.h) as cpu_info() and set_tuning() report it, keyed like set_tuning's arguments.
py::dict tuning_dict(const Tuning& t) {
  py::dict d;
  d["avx512_fp32_chunk_rows"] = t.avx512_fp32_chunk_rows;
  d["avx512_fp32_chunk_k"] = t.avx512_fp32_chunk_k;
  d["avx512_widen_rows"] = t.avx512_widen_rows;
  d["avx512_q8_slices"] = t.avx512_q8_slices;
  return d;
}

// The storage format of a weight array, from its numpy dtype: float32, float16, uint16 (bf16 bits), int8.
DType dtype_of(const py::array& w, const std::string& name) {
  const char kind = w.dtype().kind();
  const py::ssize_t item = w.itemsize();
  if (kind == 'f' && item == 4) return DType::f32;
  if (kind == 'f' && item == 2) return DType::f16;
  if (kind == 'u' && item == 2) return DType::bf16;
  if (kind == 'i' && item == 1) return DType::q8;
  if (kind == 'u' && item == 1) return DType::q4;  // or q6: q8_view tells them apart by shape
  throw std::invalid_argument("tensor " + name + " must be float32, float16, uint16 (bf16), int8 or uint8 (int4, int6)");
}

// q8 / q4 / q6 weights (kernels.h): int8 [ceil(N/64)][Kp/4][64][4] (int4: uint8 [ceil(N/64)][Kp/8][64][4], two
// values a byte; int6: uint8 [ceil(N/64)][3*Kp/16][64][4], told from int4 by that second dimension) and fp16
// scales [ceil(N/64)][Kp/32][64] for a [K,N] matrix, Kp = K rounded up to 32 (qmatmul.inl's layouts). Checked
// in full: a wrong shape must not be read.
WeightView q8_view(const py::array& q, const py::array& scales, int64_t K, int64_t N, const std::string& name) {
  const int64_t nb = (N + kBlockCols - 1) / kBlockCols, Kp = (K + kQuantGroup - 1) / kQuantGroup * kQuantGroup;
  DType dtype = dtype_of(q, name);
  if (dtype == DType::q4 && q.ndim() == 4 && q.shape(1) == 3 * Kp / 16) dtype = DType::q6;
  const int64_t rows = dtype == DType::q4 ? Kp / 8 : dtype == DType::q6 ? 3 * Kp / 16 : Kp / 4;
  if (q.ndim() != 4 || q.shape(0) != nb || q.shape(1) != rows || q.shape(2) != kBlockCols || q.shape(3) != 4)
    throw std::invalid_argument(std::string(dtype == DType::q8 ? "int8" : "int4") + " tensor " + name +
                                " must have shape (" + std::to_string(nb) + ", " + std::to_string(rows) + ", 64, 4)" +
                                (dtype == DType::q8 ? "" : " (int6: (" + std::to_string(nb) + ", " +
                                                               std::to_string(3 * Kp / 16) + ", 64, 4))"));
  if (scales.dtype().kind() != 'f' || scales.itemsize() != 2 || scales.ndim() != 3 || scales.shape(0) != nb ||
      scales.shape(1) != Kp / kQuantGroup || scales.shape(2) != kBlockCols)
    throw std::invalid_argument("scales of " + name + " must be float16 of shape (" + std::to_string(nb) + ", " +
                                std::to_string(Kp / kQuantGroup) + ", 64)");
  if (!(q.flags() & py::array::c_style) || !(scales.flags() & py::array::c_style))
    throw std::invalid_argument("tensor " + name + " must be C-contiguous");
  WeightView w;
  w.data = q.data();
  w.dtype = dtype;
  w.group_scales = static_cast<const uint16_t*>(scales.data());
  w.blocked = true;
  return w;
}

// A q8 weight's optional outlier rows (kernels.h): int32 channel indices, increasing, below K, and their fp16
// rows [n][N]. Both or neither.
void add_q8_outliers(WeightView& w, const py::object& rows, const py::object& weights, int64_t K, int64_t N,
                     const std::string& name) {
  if (rows.is_none() && weights.is_none()) return;
  if (rows.is_none() || weights.is_none())
    throw std::invalid_argument(name + " has outlier rows or outlier weights, but not both");
  py::array r = rows.cast<py::array>(), v = weights.cast<py::array>();
  if (r.dtype().kind() != 'i' || r.itemsize() != 4 || r.ndim() != 1 || !(r.flags() & py::array::c_style))
    throw std::invalid_argument("outlier rows of " + name + " must be a contiguous int32 vector");
  const int64_t n = r.shape(0);
  if (v.dtype().kind() != 'f' || v.itemsize() != 2 || v.ndim() != 2 || v.shape(0) != n || v.shape(1) != N ||
      !(v.flags() & py::array::c_style))
    throw std::invalid_argument("outlier weights of " + name + " must be float16 of shape (" + std::to_string(n) +
                                ", " + std::to_string(N) + ")");
  const int32_t* idx = static_cast<const int32_t*>(r.data());
  for (int64_t j = 0; j < n; ++j)
    if (idx[j] < 0 || idx[j] >= K || (j > 0 && idx[j] <= idx[j - 1]))
      throw std::invalid_argument("outlier rows of " + name + " must be increasing channel indices below " +
                                  std::to_string(K));
  w.outlier_rows = idx;
  w.n_outlier_rows = static_cast<int>(n);
  w.outlier_weights = static_cast<const uint16_t*>(v.data());
}

// A blocked f32/f16 [K, N] matrix is [ceil(N/64), K, 64]; a blocked bf16 one [ceil(N/64), ceil(K/2), 64, 2].
void check_blocked_shape(const py::array& arr, DType dtype, int64_t K, int64_t N, const std::string& what) {
  const int64_t nb = (N + kBlockCols - 1) / kBlockCols;
  const bool ok = dtype == DType::bf16
                      ? arr.ndim() == 4 && arr.shape(0) == nb && arr.shape(1) == kBf16Rows(static_cast<int>(K)) / 2 &&
                            arr.shape(2) == kBlockCols && arr.shape(3) == 2
                      : arr.ndim() == 3 && arr.shape(0) == nb && arr.shape(1) == K && arr.shape(2) == kBlockCols;
  if (!ok)
    throw std::invalid_argument(what + " must have shape (" + std::to_string(nb) + ", " +
                                (dtype == DType::bf16 ? std::to_string(kBf16Rows(static_cast<int>(K)) / 2) + ", 64, 2)"
                                                      : std::to_string(K) + ", 64)") +
                                (dtype == DType::bf16 ? " (bf16 is blocked in k pairs)" : ""));
}

// A weight matrix in its storage format. shape is the checkpoint's: [K,N] for a Conv1D weight, [vocab, n_embd]
// for the embedding / LM head (rows_are_outputs), whose q8 and blocked forms are stored transposed. f32/f16/bf16
// [K,N] may come blocked (see kernels.h), as an array [ceil(N/64), K, 64] (bf16 in k pairs: [ceil(N/64),
// ceil(K/2), 64, 2]); q8 / q4 / q6 bring a "<name>.scale" tensor.
WeightView borrow_matrix(PyModel& m, const py::dict& tensors, const std::string& name, std::vector<int64_t> shape,
                         bool rows_are_outputs = false) {
  if (!tensors.contains(name)) throw std::invalid_argument("missing tensor " + name);
  py::array arr = py::reinterpret_borrow<py::array>(tensors[name.c_str()]);
  if (!(arr.flags() & py::array::c_style)) throw std::invalid_argument("tensor " + name + " must be C-contiguous");
  WeightView w;
  const DType dtype = dtype_of(arr, name);
  w.dtype = dtype;  // q8_view below tells q6 from q4
  if (dtype == DType::q8 || dtype == DType::q4) {
    const std::string sname = name + ".scale";
    if (!tensors.contains(sname)) throw std::invalid_argument("missing tensor " + sname);
    py::array scales = py::reinterpret_borrow<py::array>(tensors[sname.c_str()]);
    const int64_t K = rows_are_outputs ? shape[1] : shape[0], N = rows_are_outputs ? shape[0] : shape[1];
    w = q8_view(arr, scales, K, N, name);
    if (w.dtype == DType::q4 && rows_are_outputs)
      throw std::invalid_argument("tensor " + name + ": the token embedding / LM head may be int8 or int6, not int4");
    m.keep_alive.push_back(scales);
    const std::string rname = name + ".outlier_rows", vname = name + ".outlier_weights";
    py::object rows = tensors.contains(rname) ? py::object(tensors[rname.c_str()]) : py::object(py::none());
    py::object vals = tensors.contains(vname) ? py::object(tensors[vname.c_str()]) : py::object(py::none());
    add_q8_outliers(w, rows, vals, K, N, name);
    if (!rows.is_none()) {
      m.keep_alive.push_back(rows.cast<py::array>());
      m.keep_alive.push_back(vals.cast<py::array>());
    }
  } else if (arr.ndim() == 3 || arr.ndim() == 4) {  // an embedding / LM head blocked is stored transposed
    const int64_t K = rows_are_outputs ? shape[1] : shape[0], N = rows_are_outputs ? shape[0] : shape[1];
    check_blocked_shape(arr, dtype, K, N, "blocked tensor " + name);
    w.blocked = true;
  } else {
    if (arr.ndim() != static_cast<py::ssize_t>(shape.size()))
      throw std::invalid_argument("tensor " + name + " has the wrong number of dimensions");
    for (size_t i = 0; i < shape.size(); ++i)
      if (arr.shape(i) != shape[i]) throw std::invalid_argument("tensor " + name + " has the wrong shape");
  }
  m.keep_alive.push_back(arr);
  w.data = arr.data();
  return w;
}

GPT2Config config_from(const py::dict& d) {
  GPT2Config c;
  c.vocab_size = d["vocab_size"].cast<int>();
  c.n_positions = d["n_positions"].cast<int>();
  c.n_embd = d["n_embd"].cast<int>();
  c.n_layer = d["n_layer"].cast<int>();
  c.n_head = d["n_head"].cast<int>();
  c.n_inner = d["n_inner"].cast<int>();
  c.layer_norm_epsilon = d["layer_norm_epsilon"].cast<float>();
  c.activation = parse_activation(d["activation_function"].cast<std::string>());
  if (d.contains("kv_cache_dtype")) {
    const std::string kv = d["kv_cache_dtype"].cast<std::string>();
    if (kv != "fp32" && kv != "fp16") throw std::invalid_argument("kv_cache_dtype must be 'fp32' or 'fp16', got '" + kv + "'");
    c.kv_dtype = kv == "fp16" ? DType::f16 : DType::f32;
  }
  c.scale_attn_weights = d["scale_attn_weights"].cast<bool>();
  c.scale_attn_by_inverse_layer_idx = d["scale_attn_by_inverse_layer_idx"].cast<bool>();
  return c;
}

std::shared_ptr<PyModel> make_model(const py::dict& config, const py::dict& tensors) {
  auto m = std::make_shared<PyModel>();
  GPT2Config c = config_from(config);
  const int64_t C = c.n_embd, I = c.n_inner, V = c.vocab_size;
  GPT2Weights w;
  w.wte = borrow_matrix(*m, tensors, "wte.weight", {V, C}, true);
  w.wpe = borrow(*m, tensors, "wpe.weight", {c.n_positions, C});
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    LayerWeights lw;
    lw.ln_1_weight = borrow(*m, tensors, p + "ln_1.weight", {C});
    lw.ln_1_bias = borrow(*m, tensors, p + "ln_1.bias", {C});
    lw.attn_weight = borrow_matrix(*m, tensors, p + "attn.c_attn.weight", {C, 3 * C});
    lw.attn_bias = borrow(*m, tensors, p + "attn.c_attn.bias", {3 * C});
    lw.attn_proj_weight = borrow_matrix(*m, tensors, p + "attn.c_proj.weight", {C, C});
    lw.attn_proj_bias = borrow(*m, tensors, p + "attn.c_proj.bias", {C});
    lw.ln_2_weight = borrow(*m, tensors, p + "ln_2.weight", {C});
    lw.ln_2_bias = borrow(*m, tensors, p + "ln_2.bias", {C});
    lw.fc_weight = borrow_matrix(*m, tensors, p + "mlp.c_fc.weight", {C, I});
    lw.fc_bias = borrow(*m, tensors, p + "mlp.c_fc.bias", {I});
    lw.mlp_proj_weight = borrow_matrix(*m, tensors, p + "mlp.c_proj.weight", {I, C});
    lw.mlp_proj_bias = borrow(*m, tensors, p + "mlp.c_proj.bias", {C});
    w.layers.push_back(lw);
  }
  w.ln_f_weight = borrow(*m, tensors, "ln_f.weight", {C});
  w.ln_f_bias = borrow(*m, tensors, "ln_f.bias", {C});
  w.lm_head = tensors.contains("lm_head.weight") ? borrow_matrix(*m, tensors, "lm_head.weight", {V, C}, true) : w.wte;
  m->model = std::make_unique<GPT2Model>(c, w);
  return m;
}

SamplingOptions options_from(const py::dict& d) {
  SamplingOptions o;
  for (auto item : d) {
    const std::string k = item.first.cast<std::string>();
    py::handle v = item.second;
    if (k == "do_sample") o.do_sample = v.cast<bool>();
    else if (k == "temperature") o.temperature = v.cast<float>();
    else if (k == "top_k") o.top_k = v.cast<int>();
    else if (k == "top_p") o.top_p = v.cast<float>();
    else if (k == "min_p") o.min_p = v.cast<float>();
    else if (k == "typical_p") o.typical_p = v.cast<float>();
    else if (k == "repetition_penalty") o.repetition_penalty = v.cast<float>();
    else if (k == "presence_penalty") o.presence_penalty = v.cast<float>();
    else if (k == "frequency_penalty") o.frequency_penalty = v.cast<float>();
    else if (k == "no_repeat_ngram_size") o.no_repeat_ngram_size = v.cast<int>();
    else if (k == "bad_words_ids") o.bad_words_ids = v.cast<std::vector<std::vector<int32_t>>>();
    else if (k == "logit_bias") o.logit_bias = v.cast<std::vector<std::pair<int32_t, float>>>();
    else if (k == "min_new_tokens") o.min_new_tokens = v.cast<int>();
    else if (k == "eos_token_ids") o.eos_token_ids = v.cast<std::vector<int32_t>>();
    else if (k == "seed") o.seed = v.cast<uint64_t>();
    else if (k == "min_tokens_to_keep") o.min_tokens_to_keep = v.cast<int>();
    else throw std::invalid_argument("unknown sampling option '" + k + "'");
  }
  return o;
}

py::object finish_name(FinishReason r) {
  switch (r) {
    case FinishReason::length: return py::str("length");
    case FinishReason::stop: return py::str("stop");
    case FinishReason::eos: return py::str("eos");
    default: return py::none();
  }
}

SpeculationOptions speculation_from(const py::dict& d) {
  SpeculationOptions o;
  for (auto item : d) {
    const std::string k = item.first.cast<std::string>();
    if (k == "mode") {
      const std::string m = item.second.cast<std::string>();
      if (m == "none") o.mode = Speculation::none;
      else if (m == "draft") o.mode = Speculation::draft;
      else if (m == "prompt_lookup") o.mode = Speculation::prompt_lookup;
      else throw std::invalid_argument("unknown speculation mode '" + m + "'");
    } else if (k == "num_tokens") o.num_tokens = item.second.cast<int>();
    else if (k == "adaptive") o.adaptive = item.second.cast<bool>();
    else if (k == "max_ngram") o.max_ngram = item.second.cast<int>();
    else throw std::invalid_argument("unknown speculation option '" + k + "'");
  }
  return o;
}

struct PyDecoder {
  std::shared_ptr<PyModel> model, draft;  // keep the weights alive as long as the decoder
  Decoder decoder;
  PyDecoder(std::shared_ptr<PyModel> m, std::shared_ptr<PyModel> d)
      : model(std::move(m)), draft(std::move(d)),
        decoder(*model->model, draft ? draft->model.get() : nullptr, model->prefix_cache.get()) {}
};

float* mutable_data(FloatArray& a) { return a.mutable_data(); }

template <class F>
void with_isa(const std::string& isa, F&& f) {
  const KernelTable& k = kernels_for(parse_isa(isa));
  bool ok = false;
  for (Isa i : supported_isas()) ok |= i == k.isa;
  if (!ok) throw std::runtime_error("this CPU cannot run the " + isa + " kernels");
  f(k);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "gptcpp C++ core";
  selected_isa();  // a GPTCPP_ISA the CPU cannot run fails the import with its reason, not a crash later
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::length_error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("cpu_info", []() {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["brand"] = f.brand;
    py::dict feats;
    feats["avx2"] = f.avx2; feats["fma"] = f.fma; feats["f16c"] = f.f16c; feats["avx512f"] = f.avx512f;
    feats["avx512bw"] = f.avx512bw; feats["avx512vl"] = f.avx512vl; feats["avx512dq"] = f.avx512dq;
    feats["avx512_vnni"] = f.avx512_vnni; feats["avx512_bf16"] = f.avx512_bf16; feats["avx_vnni"] = f.avx_vnni;
    feats["amx"] = f.amx;
    d["features"] = feats;
    py::list sup;
    for (Isa i : supported_isas()) sup.append(isa_name(i));
    d["supported_isas"] = sup;
    d["isa"] = isa_name(selected_isa());
    d["amd_zen4"] = f.amd_zen4;
    d["tuning"] = tuning_dict(tuning());
    return d;
  });
  // Kernel variants chosen by CPU (cpu/isa.h Tuning): tests run each on any machine. Returns the previous
  // settings; a setting left out keeps its value.
  m.def("set_tuning", [](py::object fp32_chunk_rows, py::object q8_slices, py::object fp32_chunk_k,
                         py::object widen_rows) {
    const Tuning old = tuning();
    Tuning t = old;
    // A row count from lo to 32767 (the fields are 16-bit); `rule` says what is allowed.
    auto rows_setting = [](const py::object& o, int lo, const std::string& rule) {
      const int rows = o.cast<int>();
      if (rows < lo || rows > 32767) throw std::invalid_argument(rule + ", got " + std::to_string(rows));
      return static_cast<int16_t>(rows);
    };
    if (!fp32_chunk_rows.is_none())
      t.avx512_fp32_chunk_rows =
          rows_setting(fp32_chunk_rows, 2, "avx512_fp32_chunk_rows must be at least 2 (and at most 32767)");
    if (!widen_rows.is_none())
      t.avx512_widen_rows = rows_setting(widen_rows, 0, "avx512_widen_rows must be 0 (never) or a row count");
    if (!fp32_chunk_k.is_none()) {
      const int k = fp32_chunk_k.cast<int>();
      if (k != 32 && k != 64 && k != 128)
        throw std::invalid_argument("avx512_fp32_chunk_k must be 32, 64 or 128, got " + std::to_string(k));
      t.avx512_fp32_chunk_k = static_cast<int16_t>(k);
    }
    if (!q8_slices.is_none()) t.avx512_q8_slices = q8_slices.cast<bool>();
    set_tuning(t);
    return tuning_dict(old);
  }, py::arg("avx512_fp32_chunk_rows") = py::none(), py::arg("avx512_q8_slices") = py::none(),
     py::arg("avx512_fp32_chunk_k") = py::none(), py::arg("avx512_widen_rows") = py::none());
  m.def("isa", []() { return std::string(isa_name(selected_isa())); }, "the instruction set level in use");
  m.def("set_isa", [](const std::string& name) { set_isa(parse_isa(name)); });
  m.def("all_isas", []() {
    std::vector<std::string> names;
    for (Isa i : all_isas()) names.push_back(isa_name(i));
    return names;
  });

  py::class_<KVCache, std::shared_ptr<KVCache>>(m, "KVCache")
      .def_property_readonly("length", &KVCache::length)
      .def_property_readonly("capacity", &KVCache::capacity)
      .def("truncate", &KVCache::truncate)
      .def("share_prefix_from", &KVCache::share_prefix_from, py::arg("other"), py::arg("n"))
      .def_property_readonly("blocks_held", &KVCache::blocks_held)
      .def_property_readonly("blocks_shared", &KVCache::blocks_shared);

  py::class_<PyModel, std::shared_ptr<PyModel>>(m, "Model")
      .def(py::init(&make_model), py::arg("config"), py::arg("tensors"))
      .def_property("threads", [](const PyModel& p) { return p.model->threads(); },
                    [](PyModel& p, int n) { p.model->set_threads(n); })
      .def("new_cache", [](PyModel& p, int capacity) { return std::make_shared<KVCache>(p.model->config(), capacity); })
      .def("enable_prefix_cache",
           [](PyModel& p, int64_t tokens) {
             p.prefix_cache = tokens > 0 ? std::make_unique<PrefixCache>(p.model->config(), tokens) : nullptr;
           })
      .def_property_readonly("prefix_cache_tokens",
                             [](const PyModel& p) { return p.prefix_cache ? p.prefix_cache->cached_tokens() : 0; })
      .def_property_readonly("prefix_cache_entries",
                             [](const PyModel& p) { return p.prefix_cache ? p.prefix_cache->entries() : 0; })
      .def(
          "forward",
          [](PyModel& p, std::vector<std::shared_ptr<KVCache>> caches, std::vector<TokenArray> tokens, bool all_logits,
             bool hidden) {
            if (caches.size() != tokens.size()) throw std::invalid_argument("one token array per cache");
            std::vector<ForwardItem> items;
            for (size_t i = 0; i < caches.size(); ++i)
              items.push_back({caches[i].get(), tokens[i].data(), static_cast<int>(tokens[i].size()),
                               all_logits ? static_cast<int>(tokens[i].size()) : 1});
            const int64_t rows = GPT2Model::logit_rows(items);
            const auto& c = p.model->config();
            FloatArray logits({rows, static_cast<int64_t>(c.vocab_size)});
            FloatArray hid = hidden ? FloatArray({rows, static_cast<int64_t>(c.n_embd)}) : FloatArray();
            float* lp = mutable_data(logits);
            float* hp = hidden ? mutable_data(hid) : nullptr;
            {
              py::gil_scoped_release release;
              p.model->forward(items, lp, hp);
            }
            py::object h = hidden ? py::object(hid) : py::object(py::none());
            return py::make_tuple(logits, h);
          },
          py::arg("caches"), py::arg("tokens"), py::arg("all_logits") = true, py::arg("hidden") = false);

  py::class_<PyDecoder>(m, "Decoder")
      .def(py::init<std::shared_ptr<PyModel>, std::shared_ptr<PyModel>>(), py::arg("model"), py::arg("draft") = nullptr)
      .def("add",
           [](PyDecoder& d, std::vector<int32_t> prompt, const py::dict& options, int max_new_tokens, int logprobs,
              uint64_t stream, const py::dict& speculation) {
             return d.decoder.add(std::move(prompt), options_from(options), max_new_tokens, logprobs, stream,
                                  speculation_from(speculation));
           },
           py::arg("prompt"), py::arg("options"), py::arg("max_new_tokens"), py::arg("logprobs") = -1,
           py::arg("stream") = 0, py::arg("speculation") = py::dict())
      .def_property_readonly("proposed", [](const PyDecoder& d) { return d.decoder.proposed(); })
      .def_property_readonly("accepted", [](const PyDecoder& d) { return d.decoder.accepted(); })
      .def_property_readonly("prefix_hits", [](const PyDecoder& d) { return d.decoder.prefix_hits(); })
      .def("step",
           [](PyDecoder& d) {
             std::vector<StepOutput> out;
             {
               py::gil_scoped_release release;
               out = d.decoder.step();
             }
             py::list res;
             for (const auto& o : out) {
               py::object lp = py::none();
               if (o.has_logprobs) lp = py::make_tuple(o.logprobs.logprob, o.logprobs.top);
               res.append(py::make_tuple(o.id, o.token, finish_name(o.finish), lp, o.proposed, o.accepted));
             }
             return res;
           })
      .def("cancel", [](PyDecoder& d, int64_t id) { d.decoder.cancel(id); })
      .def_property_readonly("live", [](const PyDecoder& d) { return d.decoder.live(); });

  m.def(
      "beam_search",
      [](std::shared_ptr<PyModel> p, std::vector<int32_t> prompt, const py::dict& options, int num_beams,
         int max_new_tokens, float length_penalty, int early_stopping, int num_return) {
        SamplingOptions o = options_from(options);
        std::vector<BeamHypothesis> hyps;
        {
          py::gil_scoped_release release;
          hyps = beam_search(*p->model, prompt, o, num_beams, max_new_tokens, length_penalty,
                             static_cast<EarlyStopping>(early_stopping), num_return);
        }
        py::list res;
        for (auto& h : hyps) res.append(py::make_tuple(h.tokens, h.score));
        return res;
      },
      py::arg("model"), py::arg("prompt"), py::arg("options"), py::arg("num_beams"), py::arg("max_new_tokens"),
      py::arg("length_penalty") = 1.0f, py::arg("early_stopping") = 0, py::arg("num_return") = 1);

  // Logits processing on a single row, for tests against transformers' processors.
  m.def("process_logits",
        [](FloatArray logits, std::vector<int32_t> tokens, int n_prompt, const py::dict& options, bool warp) {
          FloatArray out(logits.size());
          std::memcpy(out.mutable_data(), logits.data(), sizeof(float) * logits.size());
          SamplingOptions o = options_from(options);
          const int V = static_cast<int>(logits.size());
          apply_penalties(out.mutable_data(), V, tokens.data(), static_cast<int>(tokens.size()), n_prompt, o);
          if (warp) apply_warpers(out.mutable_data(), V, o);
          return out;
        });
  m.def("sample_token", [](FloatArray logits, double u) {
    return sample_token(logits.data(), static_cast<int>(logits.size()), u);
  });
  m.def("uniform", &uniform);

  m.def(
      "memory_read_bandwidth",
      [](int64_t megabytes, int repeats, int threads) {
        // Best of `repeats` timed passes of every thread reading its share of a buffer far larger than the
        // caches; returns bytes per second.
        // The buffer is backed by huge pages where the OS allows it, as numpy's large arrays (the weights) are:
        // with 4 KiB pages the hardware prefetchers stop at every page boundary, and the probe read 44 GB/s
        // where decoding streamed 54 (Zen 5).
        const int64_t n = megabytes * (1 << 20) / 4;
        constexpr size_t kHuge = size_t{2} << 20;
        const size_t bytes = (static_cast<size_t>(n) * 4 + kHuge - 1) / kHuge * kHuge;
        std::unique_ptr<float, void (*)(float*)> buf(static_cast<float*>(std::aligned_alloc(kHuge, bytes)),
                                                     [](float* p) { std::free(p); });
        if (!buf) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
        madvise(buf.get(), bytes, MADV_HUGEPAGE);
#endif
        double best = 0.0;
        volatile float sink = 0.0f;
        {
          py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
          for (int64_t i = 0; i < n; ++i) buf.get()[i] = static_cast<float>(i & 7);
          const KernelTable& k = kernels();
          for (int r = 0; r < repeats; ++r) {
            const auto t0 = std::chrono::steady_clock::now();
            float total = 0.0f;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(+ : total)
            {
              const int64_t nt = thread_count(), t = thread_index();
              const int64_t b = n * t / nt, e = n * (t + 1) / nt;
              total += k.read_sum(buf.get() + b, e - b);
            }
            const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            sink = sink + total;
            best = std::max(best, static_cast<double>(n) * 4.0 / dt);
          }
        }
        return best;
      },
      py::arg("megabytes") = 512, py::arg("repeats") = 5, py::arg("threads") = 0);

  // Kernel entry points for tests: each runs one kernel of the named instruction-set level.
  py::module_ k = m.def_submodule("kernels", "single kernels by instruction-set level, for tests");
  // matmul: weight float32, float16 or uint16 (bf16) as [K, N] or blocked ([ceil(N/64), K, 64]; bf16
  // [ceil(N/64), ceil(K/2), 64, 2]); or int8 in the q8 / q4 / q6 layout with its fp16 scales.
  k.def("matmul", [](const std::string& isa, FloatArray inp, py::array weight, py::object bias, FloatArray out,
                     bool accumulate, py::object scales, py::object outlier_rows, py::object outlier_weights) {
    const int M = static_cast<int>(inp.shape(0)), K = static_cast<int>(inp.shape(1)), N = static_cast<int>(out.shape(1));
    if (!(weight.flags() & py::array::c_style)) throw std::invalid_argument("weight must be C-contiguous");
    if (out.shape(0) != M) throw std::invalid_argument("shape mismatch");
    WeightView wv;
    if (dtype_of(weight, "weight") == DType::q8 || dtype_of(weight, "weight") == DType::q4) {
      if (scales.is_none()) throw std::invalid_argument("int8 / int4 / int6 weights need scales");
      wv = q8_view(weight, scales.cast<py::array>(), K, N, "weight");
      add_q8_outliers(wv, outlier_rows, outlier_weights, K, N, "weight");
    } else {
      const bool blocked = weight.ndim() == 3 || weight.ndim() == 4;
      wv.dtype = dtype_of(weight, "weight");
      if (blocked)
        check_blocked_shape(weight, wv.dtype, K, N, "blocked weight");
      else if (weight.ndim() != 2 || weight.shape(0) != K || weight.shape(1) != N)
        throw std::invalid_argument("shape mismatch");
      wv.data = weight.data();
      wv.blocked = blocked;
    }
    FloatArray b = bias.is_none() ? FloatArray() : bias.cast<FloatArray>();
    if (!bias.is_none() && b.size() != N) throw std::invalid_argument("bias must have N values");
    FloatArray o(out);
    with_isa(isa, [&](const KernelTable& t) {
      t.matmul_forward(o.mutable_data(), inp.data(), wv, bias.is_none() ? nullptr : b.data(), M, K, N, K, N, N, accumulate);
    });
    return o;
  }, py::arg("isa"), py::arg("inp"), py::arg("weight"), py::arg("bias"), py::arg("out"), py::arg("accumulate"),
     py::arg("scales") = py::none(), py::arg("outlier_rows") = py::none(), py::arg("outlier_weights") = py::none());
  // matmul_nt: weight [N, K] float32, float16 or uint16 (bf16).
  k.def("matmul_nt", [](const std::string& isa, FloatArray inp, py::array weight) {
    const int M = static_cast<int>(inp.shape(0)), K = static_cast<int>(inp.shape(1)), N = static_cast<int>(weight.shape(0));
    if (weight.ndim() != 2 || weight.shape(1) != K) throw std::invalid_argument("shape mismatch");
    if (!(weight.flags() & py::array::c_style)) throw std::invalid_argument("weight must be C-contiguous");
    WeightView wv;
    wv.data = weight.data();
    wv.dtype = dtype_of(weight, "weight");
    if (wv.dtype == DType::q8 || wv.dtype == DType::q4)
      throw std::invalid_argument("int8 / int4 weights are multiplied by matmul, in their own layout");
    FloatArray o({M, N});
    with_isa(isa, [&](const KernelTable& t) { t.matmul_nt_forward(o.mutable_data(), inp.data(), wv, M, K, N, N); });
    return o;
  }, py::arg("isa"), py::arg("inp"), py::arg("weight"));
  k.def("layernorm", [](const std::string& isa, FloatArray inp, FloatArray w, FloatArray b, float eps) {
    const int M = static_cast<int>(inp.shape(0)), C = static_cast<int>(inp.shape(1));
    if (w.size() != C || b.size() != C) throw std::invalid_argument("weight and bias must have C values");
    FloatArray o({M, C});
    with_isa(isa, [&](const KernelTable& t) { t.layernorm_forward(o.mutable_data(), inp.data(), w.data(), b.data(), M, C, eps); });
    return o;
  });
  k.def("activation", [](const std::string& isa, FloatArray x, const std::string& act) {
    FloatArray o(x.size());
    std::memcpy(o.mutable_data(), x.data(), sizeof(float) * x.size());
    with_isa(isa, [&](const KernelTable& t) { t.activation_forward(o.mutable_data(), x.size(), parse_activation(act)); });
    return o;
  });
  k.def("attention", [](const std::string& isa, FloatArray q, FloatArray kk, FloatArray v, int pos0, float scale,
                        const std::string& kv_dtype) {
    // q [T, hd]; k, v [pos0 + T, hd]; kv_dtype "fp32" or "fp16" (k and v rounded to half, as the cache does)
    const int T = static_cast<int>(q.shape(0)), hd = static_cast<int>(q.shape(1));
    if (kk.ndim() != 2 || v.ndim() != 2 || kk.shape(0) != pos0 + T || v.shape(0) != pos0 + T || kk.shape(1) != hd ||
        v.shape(1) != hd)
      throw std::invalid_argument("k and v must be [pos0 + T, hd]");
    if (kv_dtype != "fp32" && kv_dtype != "fp16") throw std::invalid_argument("kv_dtype must be fp32 or fp16");
    const bool half = kv_dtype == "fp16";
    FloatArray o({T, hd});
    const int n_keys = pos0 + T;
    // The cache's blocks: keys transposed [hd][64], values [64][hd], each block a separate allocation, the
    // unused positions of the last block NaN: they must not reach any result.
    const int blocks = (n_keys + kBlockCols - 1) / kBlockCols;
    if (blocks > kMaxKVBlocks) throw std::invalid_argument("too many keys");
    const size_t per = static_cast<size_t>(hd) * kBlockCols;
    std::vector<std::vector<float>> kt(blocks, std::vector<float>(per, std::numeric_limits<float>::quiet_NaN()));
    std::vector<std::vector<float>> vt(blocks, std::vector<float>(per, std::numeric_limits<float>::quiet_NaN()));
    for (int j = 0; j < n_keys; ++j)
      for (int d = 0; d < hd; ++d) {
        kt[j / kBlockCols][static_cast<size_t>(d) * kBlockCols + j % kBlockCols] = kk.data()[static_cast<size_t>(j) * hd + d];
        vt[j / kBlockCols][static_cast<size_t>(j % kBlockCols) * hd + d] = v.data()[static_cast<size_t>(j) * hd + d];
      }
    std::vector<std::vector<uint16_t>> kt16(blocks, std::vector<uint16_t>(per)), vt16(blocks, std::vector<uint16_t>(per));
    const void* kb[kMaxKVBlocks];
    const void* vb[kMaxKVBlocks];
    with_isa(isa, [&](const KernelTable& t) {
      for (int b = 0; b < blocks; ++b) {
        if (half) {
          t.to_f16(kt16[b].data(), kt[b].data(), static_cast<int>(per));
          t.to_f16(vt16[b].data(), vt[b].data(), static_cast<int>(per));
        }
        kb[b] = half ? static_cast<const void*>(kt16[b].data()) : kt[b].data();
        vb[b] = half ? static_cast<const void*>(vt16[b].data()) : vt[b].data();
      }
      t.attention_forward(o.mutable_data(), q.data(), kb, vb, half ? DType::f16 : DType::f32, T, pos0, hd, hd, hd,
                          scale);
    });
    return o;
  }, py::arg("isa"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos0"), py::arg("scale"),
     py::arg("kv_dtype") = "fp32");
  // to_f16: float32 -> IEEE half bits (uint16), rounded to nearest even; and max |x|.
  k.def("to_f16", [](const std::string& isa, FloatArray x) {
    py::array_t<uint16_t> o(x.size());
    float mx = 0;
    with_isa(isa, [&](const KernelTable& t) { mx = t.to_f16(o.mutable_data(), x.data(), static_cast<int>(x.size())); });
    return py::make_tuple(o, mx);
  });
  // stealing_ranges: units [0, n) shared by `threads` threads in chunks of `chunk` (cpu/parallel.h), thread 0
  // spinning `slow_us` microseconds before each of its ranges; returns how often each unit ran and how many
  // units each thread ran. With slow_us, thread 0 starts only once every thread of the team has (or after a
  // second): on a busy host the others could otherwise start after it had done most of its share, and nothing
  // would be left to move.
  k.def("stealing_ranges", [](int64_t n, int64_t chunk, int threads, double slow_us) {
    if (n < 0 || threads < 1) throw std::invalid_argument("n >= 0 and threads >= 1 please");
    py::array_t<int32_t> runs(n), per_thread(threads);
    std::fill_n(runs.mutable_data(), n, 0);
    std::fill_n(per_thread.mutable_data(), threads, 0);
    int32_t* r = runs.mutable_data();
    int32_t* pt = per_thread.mutable_data();
    {
      py::gil_scoped_release release;
      StealingRanges ranges(n, chunk, threads);
      std::atomic<int> started{0};
#pragma omp parallel num_threads(threads)
      {
        const int t = thread_index(), nt = thread_count();
        started.fetch_add(1);
        if (t == 0 && slow_us > 0) {
          const auto t0 = std::chrono::steady_clock::now();
          while (started.load() < nt && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(1)) {
          }
        }
        ranges.run(t, nt, [&](int64_t b, int64_t e) {
          if (t == 0) {
            const auto t0 = std::chrono::steady_clock::now();
            while (std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() < slow_us) {
            }
          }
          for (int64_t u = b; u < e; ++u) {
#pragma omp atomic
            r[u] += 1;
          }
          pt[t] += static_cast<int32_t>(e - b);
        });
      }
    }
    return py::make_tuple(runs, per_thread);
  }, py::arg("n"), py::arg("chunk"), py::arg("threads"), py::arg("slow_us") = 0.0);
  k.def("logsumexp", [](const std::string& isa, FloatArray x) {
    float mx = 0, lse = 0;
    with_isa(isa, [&](const KernelTable& t) { t.logsumexp(x.data(), static_cast<int>(x.size()), &mx, &lse); });
    return py::make_tuple(mx, lse);
  });
}
