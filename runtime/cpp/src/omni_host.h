// omni-host: a C++17 host for omni-export bundles, driven by manifest.json alone.
//
// The reusable part (this header): the manifest (checked as docs/bundle-format.md says), sessions
// created on demand and released after use, the KV decoder loop driven by the manifest's IO
// names, TMRoPE position ids and rope deltas, greedy and seeded token choice, the thinker, the
// talker and token2wav (whole and streamed). It mirrors the Python runtime
// (runtime/omni_runtime/stages/*.py, prompt/rope.py) operation by operation in float32, so the
// same bundle gives the same token ids, codes and waveform. main.cpp is the command-line sample.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <onnxruntime_cxx_api.h>

namespace omni {

using json = nlohmann::json;

// ------------------------------------------------------------------------------------ errors
// A user-facing error: a problem, the path it concerns and how to fix it (the Python runtime's
// OmniError). The command line prints it as one message and exits with code 2.
struct HostError : std::runtime_error {
    std::string path, fix;
    HostError(const std::string& problem, const std::string& path_, const std::string& fix_)
        : std::runtime_error(problem), path(path_), fix(fix_) {}
    std::string message() const;
};

extern const char* REBUILD_FIX;
extern const char* COPY_FIX;

// ------------------------------------------------------------------------------------ arrays
// A little-endian C-order .npy array (float32, int64 or int32), read without pickle.
struct NpyArray {
    std::string dtype;  // "float32", "int64", "int32"
    std::vector<int64_t> shape;
    std::vector<char> data;
    int64_t size() const;
    const float* f32() const { return reinterpret_cast<const float*>(data.data()); }
    const int64_t* i64() const { return reinterpret_cast<const int64_t*>(data.data()); }
};
NpyArray read_npy(const std::string& path);
// 32-bit float mono WAV, written to a temporary file beside ``path`` and renamed when complete.
void write_wav(const std::string& path, const std::vector<float>& audio, int sample_rate);
std::string sha256_file(const std::string& path);

// ------------------------------------------------------------------------------------ manifest
struct TensorSpec {
    std::string name, dtype;
    std::vector<json> shape;  // ints for fixed axes, names for dynamic ones
};

struct GraphSpec {
    std::string name, file;
    std::vector<std::string> external_data;
    json quantization;
    std::vector<TensorSpec> inputs, outputs;
    std::map<std::string, std::string> session_config;
    std::vector<std::string> files() const;
    const TensorSpec* input(const std::string& name) const;
};

struct DecoderConfig {
    int64_t hidden_size = 0, num_hidden_layers = 0, num_key_value_heads = 0, head_dim = 0, vocab_size = 0;
    int64_t max_position_embeddings = 0;
    std::string kv_dtype;
};

struct Sampling {
    bool do_sample = false;
    float temperature = 1.0f;
    int64_t top_k = 0;
    float top_p = 1.0f;
    float repetition_penalty = 1.0f;
};

struct Bundle {
    std::string root;           // the resolved bundle directory
    std::string manifest_path;  // root/manifest.json
    json data;
    std::map<std::string, GraphSpec> graphs;
    std::set<std::string> verified;  // files whose sha256 matched (checked before first use)

    // Read and check manifest.json (HostError naming the file and the fix otherwise).
    static Bundle open(const std::string& dir);
    std::string path(const std::string& relpath) const;
    void verify(const std::string& relpath);  // sha256 of a listed file, once
    bool has(const std::string& graph) const { return graphs.count(graph) > 0; }
    const GraphSpec& graph(const std::string& name) const;
    DecoderConfig decoder_config(const std::string& block) const;
    Sampling generation_sampling() const;
    std::string target() const;
    bool has_speech() const;
    int64_t special(const std::string& name) const;
};

// ------------------------------------------------------------------------------------ sessions
// Sessions created on demand; ``done`` frees a session at once (the Python runtime's "lazy"
// policy): the encoders after the prefill, the thinker after its text, the talker and token2wav
// after the speech. Before a graph's first load its files are checked against their sha256 and
// the session's inputs/outputs against the manifest.
class SessionPool {
public:
    SessionPool(Bundle& bundle, Ort::Env& env, const std::string& device, int threads);
    Ort::Session& get(const std::string& graph);
    void done(const std::string& graph);
    bool cuda() const { return cuda_; }
    std::vector<std::string> load_log;  // graph names, in creation order

private:
    Bundle& bundle_;
    Ort::Env& env_;
    bool cuda_ = false;
    int threads_ = 0;
    std::map<std::string, std::unique_ptr<Ort::Session>> sessions_;
};

// Run a graph on named float32 / int64 inputs; outputs by name (float32 copies).
struct Tensor {
    std::vector<int64_t> shape;
    std::vector<float> f;
    std::vector<int64_t> i;
    bool is_int = false;
    static Tensor floats(std::vector<int64_t> shape, std::vector<float> values);
    static Tensor ints(std::vector<int64_t> shape, std::vector<int64_t> values);
};
std::vector<Tensor> run_graph(Ort::Session& session, const GraphSpec& spec, const std::map<std::string, Tensor>& feeds,
                              const std::vector<std::string>& outputs);

// ------------------------------------------------------------------------------------ decoding
// Host-side RNG: numpy's PCG64 seeded through SeedSequence, so ``rng.random()`` draws equal
// numpy.random.default_rng(seed)'s (the Python runtime's sampling draws).
class Pcg64 {
public:
    explicit Pcg64(uint64_t seed);
    uint64_t next64();
    double next_double();
    uint32_t next32();  // numpy's buffered halves: the low 32 bits of a draw, then its high 32
    float next_float();
    // numpy's float32 standard_normal (Generator.standard_normal(dtype=float32): its ziggurat)
    float standard_normal_f();

private:
    unsigned __int128 state_, inc_;
    bool has32_ = false;
    uint32_t next32_ = 0;
};

// transformers' logits processing (repetition penalty; temperature, top-k, top-p when sampling)
// and the choice: argmax (lowest id on ties) or a draw from the softmax.
void repetition_penalty(std::vector<float>& scores, const std::vector<int64_t>& history, float penalty);
int64_t next_token(std::vector<float> scores, const std::vector<int64_t>& history, const Sampling& cfg, Pcg64* rng);

struct KVCache {
    std::vector<std::vector<char>> keys, values;  // [1, kv_heads, capacity, head_dim] per layer
    std::vector<Ort::Value> key_values, value_values;
    int64_t capacity = 0, length = 0;
};

// One KV-cached decoder graph (thinker_decoder, talker_decoder), run over buffers bound in place
// as both past and present (GroupQueryAttention writes the new positions into them).
class KVDecoder {
public:
    KVDecoder(Ort::Session& session, const GraphSpec& spec, int64_t prefill_chunk = 256);
    KVCache new_cache(int64_t capacity);
    // Append ``embeds`` [seq, width] at ``positions`` [3][seq]; logits of the last position.
    std::vector<float> step(KVCache& cache, const std::vector<float>& embeds, int64_t seq,
                            const std::vector<int64_t>& positions, std::vector<float>* hidden);
    int64_t width = 0, hidden_width = 0, vocab = 0;

private:
    std::vector<float> run(KVCache& cache, const float* embeds, int64_t seq, const std::vector<int64_t>& positions,
                           std::vector<float>* hidden);
    Ort::Session& session_;
    const GraphSpec& spec_;
    int64_t chunk_;
    std::vector<std::string> past_, present_;
    int64_t kv_heads_ = 0, head_dim_ = 0, layers_ = 0;
    ONNXTensorElementDataType kv_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    size_t kv_bytes_ = 4;
    bool embeds_half_ = false;
};

// ------------------------------------------------------------------------------------ prompts
struct RopeInputs {
    std::vector<std::array<int64_t, 3>> image_grid_thw, video_grid_thw;
    std::vector<int64_t> audio_seqlens;
    std::vector<float> second_per_grids;
    bool use_audio_in_video = false;
    bool any_vision() const { return !image_grid_thw.empty() || !video_grid_thw.empty(); }
};
struct RopeConfig {
    int64_t image_token, video_token, audio_token, vision_start, audio_start;
    int64_t spatial_merge_size = 2, position_id_per_seconds = 25, seconds_per_chunk = 2;
};
// TMRoPE position ids [3][seq] (axis-major) and the rope delta of one prompt
// (transformers' get_rope_index, omni_runtime.prompt.rope.rope_index).
std::vector<int64_t> rope_index(const std::vector<int64_t>& tokens, const RopeConfig& cfg, const RopeInputs& media,
                                int64_t* delta);
int64_t audio_output_length(int64_t frames);

// A prompt: ids, and for media the merged embeddings and TMRoPE positions.
struct Prompt {
    std::vector<int64_t> ids;
    std::vector<float> embeds;      // [seq, hidden], empty for text
    std::vector<int64_t> positions;  // [3][seq], empty for text
    int64_t rope_delta = 0;
};

// ------------------------------------------------------------------------------------ stages
struct ThinkerStates {
    std::vector<int64_t> prompt_ids, token_ids;
    std::vector<float> embeds, hidden;  // [P + R - 1, hidden]
    std::vector<int64_t> prompt_positions;  // [3][P]
};
struct Generation {
    std::vector<int64_t> token_ids;
    std::string finish_reason;
    double prefill_seconds = 0, decode_seconds = 0;  // up to the first token; the tokens after it
    ThinkerStates states;
};

Generation thinker_generate(Bundle& bundle, SessionPool& pool, const Prompt& prompt, int64_t max_new_tokens,
                            const std::string& limit_reason, const Sampling& sampling, std::optional<uint64_t> seed,
                            bool keep_states);
// The thinker embeddings of the speaker's bos, the text eos and the text pad [3, width].
std::vector<float> talker_text_rows(Bundle& bundle, SessionPool& pool, int64_t speaker_bos);
std::vector<int64_t> talker_generate(Bundle& bundle, SessionPool& pool, const ThinkerStates& states,
                                     const std::vector<float>& text_rows, const Sampling& sampling,
                                     std::optional<uint64_t> seed, int64_t max_new_tokens);

struct Speaker {
    std::string name;
    int64_t bos_token = 0;
    std::vector<float> speaker_embedding, reference_embedding, null_reference_embedding;
};
Speaker load_speaker(Bundle& bundle, const std::string& name);

// token2wav's initial noise rows [mel_dim] numbered from 0: from a .npy [rows, mel_dim], or drawn
// in row order as numpy.random.default_rng(seed).standard_normal(dtype=float32) draws them (the
// Python runtime's NoiseSequence).
class Noise {
public:
    Noise(int64_t mel_dim, const std::string& file, uint64_t seed);
    std::vector<float> rows(int64_t start, int64_t stop);

private:
    int64_t mel_;
    std::vector<float> rows_;
    bool from_file_;
    Pcg64 rng_;
};

// codes -> waveform: whole (one ODE run, rk4 by default) or streamed in the official chunks
// (euler by default); ``on_chunk`` receives each chunk.
std::vector<float> token2wav(Bundle& bundle, SessionPool& pool, const std::vector<int64_t>& codes,
                             const Speaker& speaker, Noise& noise, bool stream, const std::string& solver,
                             const std::function<void(const std::vector<float>&, bool)>& on_chunk);

}  // namespace omni
