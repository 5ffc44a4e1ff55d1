// Sessions, token choice, the KV decoder loop, the thinker and the talker.
// Mirrors omni_runtime.bundle.sessions, stages.sampling, stages.kv_decoder, stages.thinker and
// stages.talker: the same graphs fed the same float32 values in the same order.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>

#include "omni_host.h"

namespace omni {

static const Ort::MemoryInfo& cpu_memory() {
    static Ort::MemoryInfo info = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    return info;
}

// ------------------------------------------------------------------------------------ sessions
SessionPool::SessionPool(Bundle& bundle, Ort::Env& env, const std::string& device, int threads)
    : bundle_(bundle), env_(env), threads_(threads) {
    auto providers = Ort::GetAvailableProviders();
    bool has_cuda = std::find(providers.begin(), providers.end(), "CUDAExecutionProvider") != providers.end();
    if (device == "cuda" && !has_cuda)
        throw HostError("CUDA was requested but this ONNX Runtime library has no CUDAExecutionProvider", "",
                        "point the host at a CUDA build of libonnxruntime.so.1 (docs/hosts.md), or use --device cpu");
    // auto: CUDA when the bundle was built for it and the library has the provider
    cuda_ = has_cuda && (device == "cuda" || (device == "auto" && bundle.target() == "cuda"));
}

Ort::Session& SessionPool::get(const std::string& name) {
    auto it = sessions_.find(name);
    if (it != sessions_.end()) return *it->second;
    const GraphSpec& spec = bundle_.graph(name);
    for (auto& rel : spec.files()) bundle_.verify(rel);
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(threads_);
    options.SetInterOpNumThreads(0);
    options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    options.SetLogSeverityLevel(3);
    options.DisableCpuMemArena();  // lazy sessions: a stage's peak is its weights plus live tensors
    if (spec.quantization.is_object() && spec.quantization.contains("accuracy_level") &&
        spec.quantization["accuracy_level"].is_number_integer()) {
        int64_t level = spec.quantization["accuracy_level"].get<int64_t>();
        if (level >= 0 && level <= 4)
            options.AddConfigEntry("session.qdq_matmulnbits_accuracy_level", std::to_string(level).c_str());
    }
    if (cuda_) options.AddConfigEntry("session.use_device_allocator_for_initializers", "1");
    for (auto& kv : spec.session_config) options.AddConfigEntry(kv.first.c_str(), kv.second.c_str());
    if (cuda_) {
        OrtCUDAProviderOptionsV2* cuda = nullptr;
        Ort::ThrowOnError(Ort::GetApi().CreateCUDAProviderOptions(&cuda));
        const char* keys[] = {"arena_extend_strategy", "cudnn_conv_algo_search", "cudnn_conv_use_max_workspace"};
        const char* values[] = {"kSameAsRequested", "HEURISTIC", "0"};
        Ort::ThrowOnError(Ort::GetApi().UpdateCUDAProviderOptions(cuda, keys, values, 3));
        options.AppendExecutionProvider_CUDA_V2(*cuda);
        Ort::GetApi().ReleaseCUDAProviderOptions(cuda);
    }
    std::unique_ptr<Ort::Session> session;
    std::string path = bundle_.path(spec.file);
    try {
        session = std::make_unique<Ort::Session>(env_, path.c_str(), options);
    } catch (const Ort::Exception& e) {
        throw HostError("ONNX Runtime cannot load graph '" + name + "': " + e.what(), path,
                        "rebuild the bundle, or use an ONNX Runtime >= 1.20");
    }
    // the session's inputs and outputs are the manifest's
    Ort::AllocatorWithDefaultOptions allocator;
    std::vector<std::string> problems;
    for (int io = 0; io < 2; ++io) {
        const auto& expected = io == 0 ? spec.inputs : spec.outputs;
        size_t count = io == 0 ? session->GetInputCount() : session->GetOutputCount();
        std::set<std::string> actual;
        for (size_t i = 0; i < count; ++i)
            actual.insert(io == 0 ? session->GetInputNameAllocated(i, allocator).get()
                                  : session->GetOutputNameAllocated(i, allocator).get());
        std::set<std::string> wanted;
        for (auto& t : expected) wanted.insert(t.name);
        for (auto& n : wanted) if (!actual.count(n)) problems.push_back("the manifest's " + std::string(io ? "output" : "input") + " '" + n + "' is missing");
        for (auto& n : actual) if (!wanted.count(n)) problems.push_back("unexpected " + std::string(io ? "output" : "input") + " '" + n + "'");
    }
    if (!problems.empty()) {
        std::string joined;
        for (auto& p : problems) joined += (joined.empty() ? "" : "; ") + p;
        throw HostError("graph '" + name + "' does not match the manifest: " + joined, path,
                        "rebuild the bundle (the graph file and manifest.json come from different builds?)");
    }
    load_log.push_back(name);
    auto& out = *session;
    sessions_[name] = std::move(session);
    return out;
}

void SessionPool::done(const std::string& name) { sessions_.erase(name); }

// ------------------------------------------------------------------------------------ graphs
Tensor Tensor::floats(std::vector<int64_t> shape, std::vector<float> values) {
    Tensor t;
    t.shape = std::move(shape);
    t.f = std::move(values);
    return t;
}

Tensor Tensor::ints(std::vector<int64_t> shape, std::vector<int64_t> values) {
    Tensor t;
    t.shape = std::move(shape);
    t.i = std::move(values);
    t.is_int = true;
    return t;
}

static std::vector<float> to_floats(const Ort::Value& value) {
    auto info = value.GetTensorTypeAndShapeInfo();
    size_t n = info.GetElementCount();
    std::vector<float> out(n);
    if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        if (n) std::memcpy(out.data(), value.GetTensorData<float>(), n * 4);
    } else if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
        const Ort::Float16_t* h = value.GetTensorData<Ort::Float16_t>();
        for (size_t i = 0; i < n; ++i) out[i] = h[i].ToFloat();
    } else {
        throw HostError("a graph output is neither float32 nor float16", "", REBUILD_FIX);
    }
    return out;
}

std::vector<Tensor> run_graph(Ort::Session& session, const GraphSpec& spec, const std::map<std::string, Tensor>& feeds,
                              const std::vector<std::string>& outputs) {
    std::vector<const char*> in_names, out_names;
    std::vector<Ort::Value> in_values;
    std::vector<std::vector<Ort::Float16_t>> halves;
    halves.reserve(feeds.size());
    for (auto& kv : feeds) {
        const Tensor& t = kv.second;
        const TensorSpec* ts = spec.input(kv.first);
        in_names.push_back(kv.first.c_str());
        auto& mem = cpu_memory();
        if (t.is_int) {
            in_values.push_back(Ort::Value::CreateTensor<int64_t>(mem, const_cast<int64_t*>(t.i.data()), t.i.size(),
                                                                  t.shape.data(), t.shape.size()));
        } else if (ts != nullptr && ts->dtype == "float16") {
            halves.emplace_back();
            for (float v : t.f) halves.back().emplace_back(v);
            in_values.push_back(Ort::Value::CreateTensor<Ort::Float16_t>(mem, halves.back().data(), halves.back().size(),
                                                                         t.shape.data(), t.shape.size()));
        } else {
            in_values.push_back(Ort::Value::CreateTensor<float>(mem, const_cast<float*>(t.f.data()), t.f.size(),
                                                                t.shape.data(), t.shape.size()));
        }
    }
    for (auto& n : outputs) out_names.push_back(n.c_str());
    auto results = session.Run(Ort::RunOptions{nullptr}, in_names.data(), in_values.data(), in_values.size(),
                               out_names.data(), out_names.size());
    std::vector<Tensor> out;
    for (auto& r : results) out.push_back(Tensor::floats(r.GetTensorTypeAndShapeInfo().GetShape(), to_floats(r)));
    return out;
}

// ------------------------------------------------------------------------------------ rng
// numpy's SeedSequence (mixing constants of numpy/random/bit_generator.pyx) and PCG64 (XSL-RR).
static uint32_t hashmix(uint32_t value, uint32_t& hash_const) {
    value ^= hash_const;
    hash_const *= 0x931e8875u;
    value *= hash_const;
    value ^= value >> 16;
    return value;
}

static uint32_t mix(uint32_t x, uint32_t y) {
    uint32_t result = 0xca01f9ddu * x - 0x4973f715u * y;
    result ^= result >> 16;
    return result;
}

static const unsigned __int128 PCG_MULT =
    (static_cast<unsigned __int128>(0x2360ED051FC65DA4ULL) << 64) | 0x4385DF649FCCF645ULL;

Pcg64::Pcg64(uint64_t seed) {
    std::vector<uint32_t> entropy;
    if (seed == 0) entropy.push_back(0);
    while (seed > 0) {
        entropy.push_back(static_cast<uint32_t>(seed & 0xffffffffu));
        seed >>= 32;
    }
    uint32_t pool[4];
    uint32_t hash_const = 0x43b0d7e5u;
    for (size_t i = 0; i < 4; ++i) pool[i] = hashmix(i < entropy.size() ? entropy[i] : 0, hash_const);
    for (size_t src = 0; src < 4; ++src)
        for (size_t dst = 0; dst < 4; ++dst)
            if (src != dst) pool[dst] = mix(pool[dst], hashmix(pool[src], hash_const));
    for (size_t src = 4; src < entropy.size(); ++src)
        for (size_t dst = 0; dst < 4; ++dst) pool[dst] = mix(pool[dst], hashmix(entropy[src], hash_const));
    uint32_t words[8];
    uint32_t hc = 0x8b51f9ddu;
    for (size_t i = 0; i < 8; ++i) {
        uint32_t v = pool[i % 4];
        v ^= hc;
        hc *= 0x58f38dedu;
        v *= hc;
        v ^= v >> 16;
        words[i] = v;
    }
    uint64_t val[4];
    for (int i = 0; i < 4; ++i) val[i] = static_cast<uint64_t>(words[2 * i]) | (static_cast<uint64_t>(words[2 * i + 1]) << 32);
    unsigned __int128 initstate = (static_cast<unsigned __int128>(val[0]) << 64) | val[1];
    unsigned __int128 initseq = (static_cast<unsigned __int128>(val[2]) << 64) | val[3];
    state_ = 0;
    inc_ = (initseq << 1) | 1;
    state_ = state_ * PCG_MULT + inc_;
    state_ += initstate;
    state_ = state_ * PCG_MULT + inc_;
}

uint64_t Pcg64::next64() {
    state_ = state_ * PCG_MULT + inc_;
    uint64_t hi = static_cast<uint64_t>(state_ >> 64), lo = static_cast<uint64_t>(state_);
    unsigned rot = static_cast<unsigned>(state_ >> 122);
    uint64_t x = hi ^ lo;
    return (x >> rot) | (x << ((64 - rot) & 63));
}

double Pcg64::next_double() { return static_cast<double>(next64() >> 11) * (1.0 / 9007199254740992.0); }

uint32_t Pcg64::next32() {
    if (has32_) {
        has32_ = false;
        return next32_;
    }
    uint64_t v = next64();
    has32_ = true;
    next32_ = static_cast<uint32_t>(v >> 32);
    return static_cast<uint32_t>(v & 0xffffffffu);
}

float Pcg64::next_float() { return static_cast<float>(next32() >> 8) * (1.0f / 16777216.0f); }

namespace {
// The 256-level float ziggurat tables (Marsaglia & Tsang's construction, as numpy's
// ziggurat_constants.h holds them), computed in double once.
struct Ziggurat {
    uint32_t ki[256];
    float wi[256], fi[256];
    Ziggurat() {
        const double r = 3.6541528853610088, v = 0.00492867323399, m1 = 8388608.0;  // 2^23
        double dn = r, tn = dn, q = v / std::exp(-0.5 * dn * dn);
        ki[0] = static_cast<uint32_t>((dn / q) * m1);
        ki[1] = 0;
        wi[0] = static_cast<float>(q / m1);
        wi[255] = static_cast<float>(dn / m1);
        fi[0] = 1.0f;
        fi[255] = static_cast<float>(std::exp(-0.5 * dn * dn));
        for (int i = 254; i >= 1; --i) {
            dn = std::sqrt(-2.0 * std::log(v / dn + std::exp(-0.5 * dn * dn)));
            ki[i + 1] = static_cast<uint32_t>((dn / tn) * m1);
            tn = dn;
            fi[i] = static_cast<float>(std::exp(-0.5 * dn * dn));
            wi[i] = static_cast<float>(dn / m1);
        }
    }
};
const Ziggurat& ziggurat() {
    static const Ziggurat z;
    return z;
}
}  // namespace

float Pcg64::standard_normal_f() {
    // numpy/random/src/distributions/distributions.c, random_standard_normal_f
    const Ziggurat& z = ziggurat();
    const float r = 3.6541528853610088f, inv_r = 0.27366123732975828f;
    for (;;) {
        uint32_t bits = next32();
        int idx = static_cast<int>(bits & 0xff);
        uint32_t sign = (bits >> 8) & 0x1, rabs = (bits >> 9) & 0x0007fffff;
        float x = static_cast<float>(rabs) * z.wi[idx];
        if (sign) x = -x;
        if (rabs < z.ki[idx]) return x;
        if (idx == 0) {
            for (;;) {
                float xx = -inv_r * std::log1p(-next_float());
                float yy = -std::log1p(-next_float());
                if (yy + yy > xx * xx) return ((rabs >> 8) & 0x1) ? -(r + xx) : r + xx;
            }
        }
        if (((z.fi[idx - 1] - z.fi[idx]) * next_float() + z.fi[idx]) < std::exp(-0.5 * static_cast<double>(x) * x))
            return x;
    }
}

// ------------------------------------------------------------------------------------ sampling
void repetition_penalty(std::vector<float>& scores, const std::vector<int64_t>& history, float penalty) {
    std::vector<char> seen(scores.size(), 0);
    for (int64_t id : history) if (id >= 0 && id < static_cast<int64_t>(scores.size())) seen[id] = 1;
    for (size_t i = 0; i < scores.size(); ++i)
        if (seen[i]) scores[i] = scores[i] < 0 ? scores[i] * penalty : scores[i] / penalty;
}

// numpy's float32 pairwise sum (the reduction of ``exp.sum(dtype=float32)``)
static float pairwise_sum(const float* a, size_t n) {
    if (n < 8) {
        float res = 0.f;
        for (size_t i = 0; i < n; ++i) res += a[i];
        return res;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; ++j) r[j] = a[j];
        size_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; ++j) r[j] += a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; ++i) res += a[i];
        return res;
    }
    size_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

static std::vector<float> softmax(const std::vector<float>& x) {
    float top = -INFINITY;
    for (float v : x) top = std::max(top, v);
    std::vector<float> e(x.size());
    for (size_t i = 0; i < x.size(); ++i) e[i] = std::exp(x[i] - top);
    float sum = e.empty() ? 0.f : e[0] + pairwise_sum(e.data() + 1, e.size() - 1);
    for (auto& v : e) v = v / sum;
    return e;
}

int64_t next_token(std::vector<float> scores, const std::vector<int64_t>& history, const Sampling& cfg, Pcg64* rng) {
    if (cfg.repetition_penalty != 1.0f) repetition_penalty(scores, history, cfg.repetition_penalty);
    if (!cfg.do_sample)
        return static_cast<int64_t>(std::max_element(scores.begin(), scores.end()) - scores.begin());
    const float neg_inf = -INFINITY;
    if (cfg.temperature != 1.0f)
        for (auto& v : scores) v = v / cfg.temperature;
    size_t vocab = scores.size();
    if (cfg.top_k != 0) {
        size_t k = std::min(static_cast<size_t>(cfg.top_k), vocab);
        std::vector<float> copy = scores;
        std::nth_element(copy.begin(), copy.begin() + (vocab - k), copy.end());
        float kth = copy[vocab - k];
        for (auto& v : scores) if (v < kth) v = neg_inf;
    }
    if (cfg.top_p < 1.0f) {
        std::vector<size_t> order(vocab);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return scores[a] < scores[b]; });
        std::vector<float> sorted(vocab);
        for (size_t i = 0; i < vocab; ++i) sorted[i] = scores[order[i]];
        std::vector<float> probs = softmax(sorted);
        double cumulative = 0;
        float cutoff = static_cast<float>(1.0 - static_cast<double>(cfg.top_p));
        std::vector<char> remove(vocab, 0);
        for (size_t i = 0; i < vocab; ++i) {
            cumulative += static_cast<double>(probs[i]);
            remove[order[i]] = static_cast<float>(cumulative) <= cutoff && i != vocab - 1;
        }
        for (size_t i = 0; i < vocab; ++i) if (remove[i]) scores[i] = neg_inf;
    }
    std::vector<float> probs = softmax(scores);
    std::vector<double> cdf(vocab);
    double run = 0;
    for (size_t i = 0; i < vocab; ++i) cdf[i] = run += static_cast<double>(probs[i]);
    double total = cdf.back();
    double draw = rng->next_double();
    int64_t count = 0;
    for (size_t i = 0; i < vocab; ++i) count += (cdf[i] / total) <= draw;
    return count;
}

// ------------------------------------------------------------------------------------ KV decoder
static size_t dtype_bytes(const std::string& dtype, ONNXTensorElementDataType* type) {
    if (dtype == "float32") return *type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 4;
    if (dtype == "float16") return *type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2;
    throw HostError("KV cache dtype " + dtype + " is not supported (float32, float16)", "", REBUILD_FIX);
}

KVDecoder::KVDecoder(Ort::Session& session, const GraphSpec& spec, int64_t prefill_chunk)
    : session_(session), spec_(spec), chunk_(prefill_chunk) {
    for (auto& t : spec.inputs) if (t.name.rfind("past_key_values.", 0) == 0) past_.push_back(t.name);
    for (auto& t : spec.outputs) if (t.name.rfind("present.", 0) == 0) present_.push_back(t.name);
    for (const char* n : {"inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length"})
        if (spec.input(n) == nullptr || past_.empty() || past_.size() != present_.size())
            throw HostError("graph '" + spec.name + "' is not a KV decoder", "", REBUILD_FIX);
    const TensorSpec* first = spec.input(past_[0]);
    kv_heads_ = first->shape[1].get<int64_t>();
    head_dim_ = first->shape[3].get<int64_t>();
    kv_bytes_ = dtype_bytes(first->dtype, &kv_type_);
    layers_ = static_cast<int64_t>(past_.size() / 2);
    const TensorSpec* embeds = spec.input("inputs_embeds");
    embeds_half_ = embeds->dtype == "float16";
    width = embeds->shape[2].get<int64_t>();
    for (auto& t : spec.outputs) {
        if (t.name == "logits" && t.shape.back().is_number()) vocab = t.shape.back().get<int64_t>();
        if (t.name == "last_hidden_state" && t.shape.back().is_number()) hidden_width = t.shape.back().get<int64_t>();
    }
}

KVCache KVDecoder::new_cache(int64_t capacity) {
    KVCache cache;
    cache.capacity = capacity;
    std::vector<int64_t> shape{1, kv_heads_, capacity, head_dim_};
    size_t bytes = static_cast<size_t>(kv_heads_ * capacity * head_dim_) * kv_bytes_;
    cache.keys.resize(layers_);
    cache.values.resize(layers_);
    for (int64_t i = 0; i < layers_; ++i) {
        cache.keys[i].assign(bytes, 0);
        cache.values[i].assign(bytes, 0);
        cache.key_values.push_back(Ort::Value::CreateTensor(cpu_memory(), cache.keys[i].data(), bytes, shape.data(), 4, kv_type_));
        cache.value_values.push_back(Ort::Value::CreateTensor(cpu_memory(), cache.values[i].data(), bytes, shape.data(), 4, kv_type_));
    }
    return cache;
}

std::vector<float> KVDecoder::step(KVCache& cache, const std::vector<float>& embeds, int64_t seq,
                                   const std::vector<int64_t>& positions, std::vector<float>* hidden) {
    if (cache.length + seq > cache.capacity)
        throw HostError("the KV cache holds " + std::to_string(cache.capacity) + " positions, " +
                            std::to_string(cache.length + seq) + " were asked", "",
                        "allocate the cache for the prompt plus max_new_tokens");
    if (hidden) hidden->clear();
    std::vector<float> logits;
    for (int64_t start = 0; start < seq; start += chunk_) {
        int64_t stop = std::min(seq, start + chunk_), n = stop - start;
        std::vector<int64_t> pos(3 * n);
        for (int a = 0; a < 3; ++a)
            std::copy(positions.begin() + a * seq + start, positions.begin() + a * seq + stop, pos.begin() + a * n);
        std::vector<float> h;
        logits = run(cache, embeds.data() + start * width, n, pos, hidden ? &h : nullptr);
        if (hidden) hidden->insert(hidden->end(), h.begin(), h.end());
    }
    return logits;
}

std::vector<float> KVDecoder::run(KVCache& cache, const float* embeds, int64_t seq, const std::vector<int64_t>& positions,
                                  std::vector<float>* hidden) {
    int64_t total = cache.length + seq;
    auto& mem = cpu_memory();
    std::vector<int64_t> embeds_shape{1, seq, width}, pos_shape{3, 1, seq}, one{1};
    std::vector<float> embeds_copy(embeds, embeds + seq * width);
    std::vector<Ort::Float16_t> embeds_half;
    std::vector<int64_t> pos = positions;
    int32_t seqlens = static_cast<int32_t>(total - 1), total32 = static_cast<int32_t>(total);
    Ort::IoBinding binding(session_);
    Ort::Value embeds_value{nullptr};
    if (embeds_half_) {
        for (float v : embeds_copy) embeds_half.emplace_back(v);
        embeds_value = Ort::Value::CreateTensor<Ort::Float16_t>(mem, embeds_half.data(), embeds_half.size(),
                                                                embeds_shape.data(), 3);
    } else {
        embeds_value = Ort::Value::CreateTensor<float>(mem, embeds_copy.data(), embeds_copy.size(), embeds_shape.data(), 3);
    }
    Ort::Value pos_value = Ort::Value::CreateTensor<int64_t>(mem, pos.data(), pos.size(), pos_shape.data(), 3);
    Ort::Value seqlens_value = Ort::Value::CreateTensor<int32_t>(mem, &seqlens, 1, one.data(), 1);
    Ort::Value total_value = Ort::Value::CreateTensor<int32_t>(mem, &total32, 1, nullptr, 0);
    binding.BindInput("inputs_embeds", embeds_value);
    binding.BindInput("position_ids", pos_value);
    binding.BindInput("seqlens_k", seqlens_value);
    binding.BindInput("total_sequence_length", total_value);
    binding.BindOutput("logits", mem);  // bound first: the outputs come back in binding order
    binding.BindOutput("last_hidden_state", mem);
    for (int64_t i = 0; i < layers_; ++i) {
        binding.BindInput(past_[2 * i].c_str(), cache.key_values[i]);
        binding.BindInput(past_[2 * i + 1].c_str(), cache.value_values[i]);
        binding.BindOutput(present_[2 * i].c_str(), cache.key_values[i]);
        binding.BindOutput(present_[2 * i + 1].c_str(), cache.value_values[i]);
    }
    session_.Run(Ort::RunOptions{nullptr}, binding);
    auto outputs = binding.GetOutputValues();
    cache.length = total;
    std::vector<float> all = to_floats(outputs[0]);
    auto shape = outputs[0].GetTensorTypeAndShapeInfo().GetShape();
    int64_t v = shape.back();
    if (hidden) *hidden = to_floats(outputs[1]);
    return std::vector<float>(all.end() - v, all.end());  // the last position's logits
}

// ------------------------------------------------------------------------------------ thinker
static std::vector<float> embed(SessionPool& pool, Bundle& bundle, const std::string& graph,
                                const std::vector<int64_t>& ids) {
    auto out = run_graph(pool.get(graph), bundle.graph(graph),
                         {{"input_ids", Tensor::ints({1, static_cast<int64_t>(ids.size())}, ids)}}, {"inputs_embeds"});
    return out[0].f;
}

Generation thinker_generate(Bundle& bundle, SessionPool& pool, const Prompt& prompt, int64_t max_new_tokens,
                            const std::string& limit_reason, const Sampling& sampling, std::optional<uint64_t> seed,
                            bool keep_states) {
    const int64_t P = static_cast<int64_t>(prompt.ids.size());
    std::vector<int64_t> eos;
    for (auto& e : bundle.data["generation"]["eos_token_ids"]) eos.push_back(e.get<int64_t>());
    Pcg64 rng(seed.value_or(0));
    KVDecoder decoder(pool.get("thinker_decoder"), bundle.graph("thinker_decoder"));
    const int64_t W = decoder.width;
    KVCache cache = decoder.new_cache(P + max_new_tokens);
    std::vector<float> embeds = prompt.embeds.empty() ? embed(pool, bundle, "thinker_embedding", prompt.ids) : prompt.embeds;
    std::vector<int64_t> positions = prompt.positions;
    if (positions.empty()) {
        positions.resize(3 * P);
        for (int a = 0; a < 3; ++a)
            for (int64_t i = 0; i < P; ++i) positions[a * P + i] = i;
    }
    Generation gen;
    gen.finish_reason = limit_reason;
    auto started = std::chrono::steady_clock::now();
    std::vector<float> hidden;
    std::vector<float> logits = decoder.step(cache, embeds, P, positions, keep_states ? &hidden : nullptr);
    ThinkerStates& st = gen.states;
    if (keep_states) {
        st.prompt_ids = prompt.ids;
        st.prompt_positions = positions;
        st.embeds = embeds;  // placeholders of audio/image/video zeroed, as the talker is fed
        std::set<int64_t> placeholders{bundle.special("audio"), bundle.special("image"), bundle.special("video")};
        for (int64_t i = 0; i < P; ++i)
            if (placeholders.count(prompt.ids[i])) std::fill(st.embeds.begin() + i * W, st.embeds.begin() + (i + 1) * W, 0.f);
        st.hidden = hidden;
    }
    std::vector<int64_t> history = prompt.ids;
    for (int64_t step = 0; step < max_new_tokens; ++step) {
        int64_t token = next_token(logits, history, sampling, &rng);
        gen.token_ids.push_back(token);
        if (step == 0) gen.prefill_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
        if (std::find(eos.begin(), eos.end(), token) != eos.end()) {
            gen.finish_reason = "eos";
            break;
        }
        if (step == max_new_tokens - 1) break;
        history.push_back(token);
        std::vector<float> e = embed(pool, bundle, "thinker_embedding", {token});
        if (keep_states) st.embeds.insert(st.embeds.end(), e.begin(), e.end());
        int64_t p = cache.length + prompt.rope_delta;
        logits = decoder.step(cache, e, 1, {p, p, p}, keep_states ? &hidden : nullptr);
        if (keep_states) st.hidden.insert(st.hidden.end(), hidden.begin(), hidden.end());
    }
    st.token_ids = gen.token_ids;
    gen.decode_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() - gen.prefill_seconds;
    return gen;
}

// ------------------------------------------------------------------------------------ talker
std::vector<float> talker_text_rows(Bundle& bundle, SessionPool& pool, int64_t speaker_bos) {
    const json& text = bundle.data["config"]["talker"]["text"];
    return embed(pool, bundle, "thinker_embedding",
                 {speaker_bos, text["eos"].get<int64_t>(), text["pad"].get<int64_t>()});
}

std::vector<int64_t> talker_generate(Bundle& bundle, SessionPool& pool, const ThinkerStates& out,
                                     const std::vector<float>& text, const Sampling& sampling,
                                     std::optional<uint64_t> seed, int64_t max_new_tokens) {
    const json& cfg = bundle.data["config"]["talker"];
    const int64_t codec_bos = cfg["codec"]["bos"], codec_pad = cfg["codec"]["pad"], codec_mask = cfg["codec"]["mask"];
    const int64_t vocab = cfg["vocab_size"];
    std::vector<int64_t> eos, suppress;
    for (auto& e : cfg["eos_token_ids"]) eos.push_back(e.get<int64_t>());
    for (auto& s : cfg["suppress_tokens"]) if (s >= 0 && s < vocab) suppress.push_back(s.get<int64_t>());
    const int64_t P = static_cast<int64_t>(out.prompt_ids.size()), R = static_cast<int64_t>(out.token_ids.size());
    if (R < 2) return {};
    const int64_t W = cfg["embedding_size"];
    const int64_t F = P + R - 1;
    std::vector<float> states(F * W);
    for (int64_t i = 0; i < F * W; ++i) states[i] = out.hidden[i] + out.embeds[i];
    Pcg64 rng(seed.value_or(0));
    auto codec = [&](const std::vector<int64_t>& ids) { return embed(pool, bundle, "talker_embedding", ids); };
    // prefill: the prompt's states, speaker bos + codec pad, first reply state + codec bos
    std::vector<float> prefill(states.begin(), states.begin() + P * W);
    prefill.insert(prefill.end(), text.begin(), text.begin() + W);
    prefill.insert(prefill.end(), states.begin() + P * W, states.begin() + (P + 1) * W);
    std::vector<float> special = codec({codec_pad, codec_bos});
    for (int64_t i = 0; i < 2 * W; ++i) prefill[P * W + i] += special[i];
    int64_t top = -1;
    for (int64_t v : out.prompt_positions) top = std::max(top, v);
    const int64_t S = P + 2;
    std::vector<int64_t> positions(3 * S);
    for (int a = 0; a < 3; ++a) {
        for (int64_t i = 0; i < P; ++i) positions[a * S + i] = out.prompt_positions[a * P + i];
        positions[a * S + P] = top + 1;
        positions[a * S + P + 1] = top + 2;
    }
    // dual track: the rest of the reply, the text eos, then the text pad for ever after
    std::vector<float> reply(states.begin() + (P + 1) * W, states.end());
    reply.insert(reply.end(), text.begin() + W, text.begin() + 2 * W);
    const int64_t reply_rows = static_cast<int64_t>(reply.size()) / W;
    const int64_t delta = top + 3 - (P + 2);
    KVDecoder decoder(pool.get("talker_decoder"), bundle.graph("talker_decoder"));
    KVCache cache = decoder.new_cache(S + max_new_tokens);
    std::vector<float> logits = decoder.step(cache, prefill, S, positions, nullptr);
    std::vector<int64_t> history(P, codec_mask);
    history.push_back(codec_pad);
    history.push_back(codec_bos);
    Sampling warp = sampling;
    warp.repetition_penalty = 1.0f;
    std::vector<int64_t> codes;
    bool stopped = false;
    for (int64_t step = 0; step < max_new_tokens; ++step) {
        // transformers' order: repetition penalty, suppressed tokens, then the sampling warpers
        std::vector<float> scores = logits;
        if (sampling.repetition_penalty != 1.0f) repetition_penalty(scores, history, sampling.repetition_penalty);
        for (int64_t s : suppress) scores[s] = -INFINITY;
        int64_t code = next_token(scores, history, warp, &rng);
        codes.push_back(code);
        if (std::find(eos.begin(), eos.end(), code) != eos.end()) {
            stopped = true;
            break;
        }
        if (step == max_new_tokens - 1) break;
        history.push_back(code);
        std::vector<float> e = codec({code});
        const float* extra = step < reply_rows ? &reply[step * W] : &text[2 * W];
        for (int64_t i = 0; i < W; ++i) e[i] += extra[i];
        int64_t p = cache.length + delta;
        logits = decoder.step(cache, e, 1, {p, p, p}, nullptr);
    }
    if (stopped) codes.pop_back();
    return codes;
}

}  // namespace omni
