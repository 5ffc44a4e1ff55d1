// token2wav on the host: codes -> mel (DiT velocity graph + ODE) -> waveform (BigVGAN graph),
// whole or in the official streaming chunks: omni_runtime.stages.token2wav step by step, float32.
#include <algorithm>
#include <cmath>

#include "omni_host.h"

namespace omni {

Speaker load_speaker(Bundle& bundle, const std::string& name) {
    const json& t2w = bundle.data["config"]["token2wav"];
    const json& speakers = t2w["speakers"];
    if (!speakers.contains(name)) {
        std::string names;
        for (auto it = speakers.begin(); it != speakers.end(); ++it) names += (names.empty() ? "" : ", ") + it.key();
        throw HostError("unknown speaker '" + name + "'", "", "choose one of: " + names);
    }
    const json& entry = speakers[name];
    Speaker s;
    s.name = name;
    s.bos_token = entry["bos_token"].get<int64_t>();
    struct Want { const char* key; std::vector<float>* out; int64_t size; };
    for (Want w : {Want{"speaker_embedding", &s.speaker_embedding, t2w["enc_emb_dim"].get<int64_t>()},
                   Want{"reference_embedding", &s.reference_embedding, t2w["enc_dim"].get<int64_t>()},
                   Want{"null_reference_embedding", &s.null_reference_embedding, t2w["enc_dim"].get<int64_t>()}}) {
        std::string rel = entry[w.key].get<std::string>();
        bundle.verify(rel);
        NpyArray a = read_npy(bundle.path(rel));
        if (a.dtype != "float32" || a.shape.size() != 1 || a.shape[0] != w.size)
            throw HostError("expected float32 [" + std::to_string(w.size) + "]", bundle.path(rel), REBUILD_FIX);
        w.out->assign(a.f32(), a.f32() + a.size());
    }
    return s;
}

Noise::Noise(int64_t mel_dim, const std::string& file, uint64_t seed) : mel_(mel_dim), from_file_(!file.empty()), rng_(seed) {
    if (from_file_) {
        NpyArray a = read_npy(file);
        if (a.shape.size() == 3 && a.shape[0] == 1) a.shape.erase(a.shape.begin());
        if (a.dtype != "float32" || a.shape.size() != 2 || a.shape[1] != mel_dim)
            throw HostError("noise must be float32 [frames, " + std::to_string(mel_dim) + "]", file,
                            "write it with omni-export tokenize --noise-seed S (or numpy.save)");
        rows_.assign(a.f32(), a.f32() + a.size());
    }
}

std::vector<float> Noise::rows(int64_t start, int64_t stop) {
    int64_t have = static_cast<int64_t>(rows_.size()) / mel_;
    if (stop > have) {
        if (from_file_)
            throw HostError("the noise file has " + std::to_string(have) + " rows, " + std::to_string(stop) +
                                " are needed", "", "write more rows (--noise-frames), or ask for fewer codes");
        // numpy.random.default_rng(seed).standard_normal(dtype=float32), in row order
        while (static_cast<int64_t>(rows_.size()) < stop * mel_) rows_.push_back(rng_.standard_normal_f());
        rows_.resize(stop * mel_);
    }
    return std::vector<float>(rows_.begin() + start * mel_, rows_.begin() + stop * mel_);
}

namespace {

struct Ode {
    std::string solver;
    int64_t steps;
    float guidance;
    bool sway_given;
    float sway;
};

std::vector<float> time_grid(int64_t steps, bool sway_given, float sway) {
    std::vector<float> t(steps);
    for (int64_t i = 0; i < steps; ++i)
        t[i] = static_cast<float>(static_cast<double>(i) / static_cast<double>(std::max<int64_t>(steps - 1, 1)));
    if (sway_given) {
        const float half_pi = static_cast<float>(M_PI / 2);
        for (auto& v : t) v = v + sway * ((std::cos(half_pi * v) - 1.0f) + v);
    }
    return t;
}

// y [frames, mel] -> mel [mel, frames] after solving the ODE from the noise y0
std::vector<float> solve_mel(Bundle& bundle, Ort::Session& dit, const std::vector<int64_t>& codes, std::vector<float> y,
                             const Speaker& spk, const Ode& ode, int64_t mel_dim) {
    const GraphSpec& spec = bundle.graph("token2wav_dit");
    const int64_t n = static_cast<int64_t>(codes.size()), frames = static_cast<int64_t>(y.size()) / mel_dim;
    const bool cfg = !(ode.guidance < 1e-5f);
    const int64_t rows = cfg ? 2 : 1;
    std::vector<int64_t> code_rows = codes;
    std::vector<float> spk_rows = spk.speaker_embedding, ref_rows = spk.reference_embedding;
    if (cfg) {
        code_rows.insert(code_rows.end(), codes.size(), 0);
        spk_rows.insert(spk_rows.end(), spk.speaker_embedding.size(), 0.f);
        ref_rows.insert(ref_rows.end(), spk.null_reference_embedding.begin(), spk.null_reference_embedding.end());
    }
    const int64_t size = frames * mel_dim;
    auto f = [&](float t, const std::vector<float>& x) {
        std::vector<float> xs;
        for (int64_t r = 0; r < rows; ++r) xs.insert(xs.end(), x.begin(), x.end());
        std::map<std::string, Tensor> feeds;
        feeds["x"] = Tensor::floats({rows, frames, mel_dim}, xs);
        feeds["codes"] = Tensor::ints({rows, n}, code_rows);
        feeds["time"] = Tensor::floats({rows}, std::vector<float>(rows, t));
        feeds["speaker_embedding"] = Tensor::floats({rows, static_cast<int64_t>(spk.speaker_embedding.size())}, spk_rows);
        feeds["reference_embedding"] = Tensor::floats({rows, static_cast<int64_t>(spk.reference_embedding.size())}, ref_rows);
        auto out = run_graph(dit, spec, feeds, {"velocity"})[0].f;
        if (rows == 1) return out;
        std::vector<float> v(size);
        for (int64_t i = 0; i < size; ++i) {
            float cond = out[i], uncond = out[size + i];
            v[i] = cond + (cond - uncond) * ode.guidance;
        }
        return v;
    };
    std::vector<float> t = time_grid(ode.steps, ode.sway_given, ode.sway);
    const float third = static_cast<float>(1.0 / 3), two_thirds = static_cast<float>(2.0 / 3);
    std::vector<float> tmp(size);
    for (size_t s = 0; s + 1 < t.size(); ++s) {
        float t0 = t[s], t1 = t[s + 1], dt = t1 - t0;
        if (ode.solver == "euler") {
            auto v = f(t0, y);
            for (int64_t i = 0; i < size; ++i) y[i] = y[i] + v[i] * dt;
            continue;
        }
        // transformers' RungeKutta4ODESolver._rk4_step (3/8 rule), same order of operations
        auto k1 = f(t0, y);
        for (int64_t i = 0; i < size; ++i) tmp[i] = y[i] + (dt * k1[i]) * third;
        auto k2 = f(t0 + dt * third, tmp);
        for (int64_t i = 0; i < size; ++i) tmp[i] = y[i] + dt * (k2[i] - k1[i] * third);
        auto k3 = f(t0 + dt * two_thirds, tmp);
        for (int64_t i = 0; i < size; ++i) tmp[i] = y[i] + dt * ((k1[i] - k2[i]) + k3[i]);
        auto k4 = f(t1, tmp);
        for (int64_t i = 0; i < size; ++i) y[i] = y[i] + (((k1[i] + 3.0f * (k2[i] + k3[i])) + k4[i]) * dt) / 8.0f;
    }
    std::vector<float> mel(size);
    for (int64_t fr = 0; fr < frames; ++fr)
        for (int64_t m = 0; m < mel_dim; ++m) mel[m * frames + fr] = y[fr * mel_dim + m];
    return mel;
}

std::vector<float> vocode(Bundle& bundle, Ort::Session& vocoder, const std::vector<float>& mel, int64_t mel_dim) {
    int64_t frames = static_cast<int64_t>(mel.size()) / mel_dim;
    return run_graph(vocoder, bundle.graph("token2wav_bigvgan"), {{"mel", Tensor::floats({1, mel_dim, frames}, mel)}},
                     {"waveform"})[0].f;
}

// columns [a, b) of a [rows, cols] row-major matrix
std::vector<float> columns(const std::vector<float>& m, int64_t rows, int64_t a, int64_t b) {
    int64_t cols = static_cast<int64_t>(m.size()) / rows;
    std::vector<float> out;
    for (int64_t r = 0; r < rows; ++r) out.insert(out.end(), m.begin() + r * cols + a, m.begin() + r * cols + b);
    return out;
}

std::vector<float> hcat(const std::vector<float>& a, const std::vector<float>& b, int64_t rows) {
    int64_t ca = static_cast<int64_t>(a.size()) / rows, cb = static_cast<int64_t>(b.size()) / rows;
    std::vector<float> out;
    for (int64_t r = 0; r < rows; ++r) {
        out.insert(out.end(), a.begin() + r * ca, a.begin() + (r + 1) * ca);
        out.insert(out.end(), b.begin() + r * cb, b.begin() + (r + 1) * cb);
    }
    return out;
}

}  // namespace

std::vector<float> token2wav(Bundle& bundle, SessionPool& pool, const std::vector<int64_t>& codes, const Speaker& spk,
                             Noise& noise, bool stream, const std::string& solver_arg,
                             const std::function<void(const std::vector<float>&, bool)>& on_chunk) {
    const json& cfg = bundle.data["config"]["token2wav"];
    const int64_t mel_dim = cfg["mel_dim"], r = cfg["mel_per_code"], hop = cfg["hop_length"];
    const int64_t num_embeds = cfg["num_embeds"], max_frames = cfg["max_mel_frames"];
    for (int64_t c : codes)
        if (c < 0 || c > num_embeds)
            throw HostError("the talker produced code " + std::to_string(c) + ", outside token2wav's codebook 0.." +
                                std::to_string(num_embeds) + ": this bundle's talker and token2wav weights do not "
                                "belong together (a random test model?)", bundle.manifest_path,
                            "build the bundle from a checkpoint whose talker speaks token2wav's codes, or ask for text only");
    const json& ode_cfg = cfg["ode"];
    Ode ode;
    ode.solver = solver_arg.empty() ? ode_cfg[stream ? "stream_solver" : "solver"].get<std::string>() : solver_arg;
    if (ode.solver != "rk4" && ode.solver != "euler")
        throw HostError("unknown solver '" + ode.solver + "'", "", "use one of: rk4, euler");
    ode.steps = ode_cfg["steps"];
    ode.guidance = static_cast<float>(ode_cfg["guidance_scale"].get<double>());
    ode.sway_given = !ode_cfg["sway_coefficient"].is_null();
    ode.sway = ode.sway_given ? static_cast<float>(ode_cfg["sway_coefficient"].get<double>()) : 0.f;
    std::vector<float> audio;
    auto emit = [&](const std::vector<float>& pcm, bool last) {
        audio.insert(audio.end(), pcm.begin(), pcm.end());
        if (on_chunk) on_chunk(pcm, last);
    };
    if (!stream) {
        const int64_t frames = static_cast<int64_t>(codes.size()) * r;
        if (frames > max_frames)
            throw HostError(std::to_string(codes.size()) + " codes make " + std::to_string(frames) +
                                " mel frames, more than the DiT's " + std::to_string(max_frames), "",
                            "stream the audio (--stream-audio), or ask the talker for fewer codes");
        std::vector<float> y0 = noise.rows(0, frames);
        if (frames == 0) {
            emit({}, true);
            return audio;
        }
        std::vector<float> mel = solve_mel(bundle, pool.get("token2wav_dit"), codes, y0, spk, ode, mel_dim);
        pool.done("token2wav_dit");
        emit(vocode(bundle, pool.get("token2wav_bigvgan"), mel, mel_dim), true);
        pool.done("token2wav_bigvgan");
        return audio;
    }
    const json& s = cfg["stream"];
    const int64_t chunk = s["dit_chunk_codes"], left_ctx = s["dit_left_context_codes"],
                  right_ctx = s["dit_right_context_codes"], voc_left_ctx = s["vocoder_left_context_frames"],
                  voc_right = s["vocoder_right_context_frames"];
    Ort::Session& dit = pool.get("token2wav_dit");
    Ort::Session& vocoder = pool.get("token2wav_bigvgan");
    auto solve = [&](const std::vector<int64_t>& buffer, int64_t start) {
        int64_t frames = static_cast<int64_t>(buffer.size()) * r;
        return solve_mel(bundle, dit, buffer, noise.rows(start, start + frames), spk, ode, mel_dim);
    };
    std::vector<float> mel_buffer;  // [mel_dim, frames]
    int64_t voc_left = 0;
    auto on_mel = [&](const std::vector<float>& mel) {
        mel_buffer = hcat(mel_buffer, mel, mel_dim);
        int64_t cols = static_cast<int64_t>(mel_buffer.size()) / mel_dim;
        if (cols > voc_left + voc_right) {
            std::vector<float> wave = vocode(bundle, vocoder, mel_buffer, mel_dim);
            emit(std::vector<float>(wave.begin() + voc_left * hop, wave.end() - voc_right * hop), false);
            voc_left = voc_left_ctx;
            mel_buffer = columns(mel_buffer, mel_dim, std::max<int64_t>(0, cols - (voc_left + voc_right)), cols);
        }
    };
    std::vector<int64_t> buffer;
    int64_t left = 0, start = 0, produced = 0;
    for (int64_t code : codes) {
        buffer.push_back(code);
        if (static_cast<int64_t>(buffer.size()) == left + chunk + right_ctx) {
            std::vector<float> mel = solve(buffer, start);
            int64_t cols = static_cast<int64_t>(mel.size()) / mel_dim;
            mel = columns(mel, mel_dim, left * r, cols - right_ctx * r);
            left = left_ctx;
            buffer = std::vector<int64_t>(buffer.end() - (left + right_ctx), buffer.end());
            produced += static_cast<int64_t>(mel.size()) / mel_dim;
            start = produced - left_ctx * r;
            on_mel(mel);
        }
    }
    if (!buffer.empty()) {
        std::vector<float> mel = solve(buffer, start);
        int64_t cols = static_cast<int64_t>(mel.size()) / mel_dim;
        on_mel(columns(mel, mel_dim, left * r, cols));
    }
    if (mel_buffer.empty()) {
        emit({}, true);
    } else {
        std::vector<float> wave = vocode(bundle, vocoder, mel_buffer, mel_dim);
        emit(std::vector<float>(wave.begin() + voc_left * hop, wave.end()), true);
    }
    pool.done("token2wav_dit");
    pool.done("token2wav_bigvgan");
    return audio;
}

}  // namespace omni
