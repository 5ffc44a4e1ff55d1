// omni-host: the command-line sample of the C++ host (docs/hosts.md).
//
//   omni-host BUNDLE (--prompt-ids 1,2,3 | --inputs DIR/inputs.json) [--max-new-tokens N]
//             [--greedy | --sample] [--seed S] [--temperature T] [--top-k K] [--top-p P]
//             [--repetition-penalty R] [--device auto|cpu|cuda] [--threads N] [--json]
//             [--wav OUT [--speaker NAME] [--stream-audio] [--solver rk4|euler] [--noise F.npy]
//                        [--talker-max-new-tokens N] [--max-speech-seconds S]]
//
// Prints {"token_ids": [...], "codes": [...], "finish_reason": ...} with --json. Bad input (a
// missing bundle or file, another schema version, a path leaving the bundle, a sha256 mismatch,
// an id outside the vocabulary, a prompt longer than the context, bad flags): one message on
// stderr and exit code 2, no partial WAV.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "omni_host.h"

using omni::HostError;
using omni::json;

namespace {

const char* USAGE =
    "usage: omni-host BUNDLE (--prompt-ids 1,2,3 | --inputs FILE) [--max-new-tokens N] [--greedy | --sample]\n"
    "                 [--seed S] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]\n"
    "                 [--device auto|cpu|cuda] [--threads N] [--json]\n"
    "                 [--wav OUT [--speaker NAME] [--stream-audio] [--solver rk4|euler] [--noise F.npy]\n"
    "                            [--talker-max-new-tokens N] [--max-speech-seconds S]]\n";

HostError usage(const std::string& problem) { return HostError(problem, "", "see `omni-host --help`"); }

struct Options {
    std::string bundle, prompt_ids, inputs, wav, speaker, solver, noise, device = "auto";
    std::optional<int64_t> max_new_tokens, talker_max_new_tokens, seed, top_k;
    std::optional<double> temperature, top_p, repetition_penalty, max_speech_seconds;
    bool greedy = false, sample = false, stream_audio = false, json = false;
    int threads = 0;
    int64_t timing = 0;
};

int64_t parse_int(const std::string& flag, const std::string& text) {
    try {
        size_t used = 0;
        long long v = std::stoll(text, &used);
        if (used != text.size()) throw std::invalid_argument(text);
        return v;
    } catch (const std::exception&) {
        throw usage(flag + ": invalid integer '" + text + "'");
    }
}

double parse_number(const std::string& flag, const std::string& text) {
    try {
        size_t used = 0;
        double v = std::stod(text, &used);
        if (used != text.size() || !std::isfinite(v)) throw std::invalid_argument(text);
        return v;
    } catch (const std::exception&) {
        throw usage(flag + ": invalid number '" + text + "'");
    }
}

Options parse(int argc, char** argv) {
    Options o;
    std::vector<std::string> args(argv + 1, argv + argc);
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= args.size()) throw usage(a + " needs a value");
            return args[++i];
        };
        if (a == "-h" || a == "--help") {
            std::cout << USAGE;
            std::exit(0);
        } else if (a == "--prompt-ids") o.prompt_ids = value();
        else if (a == "--inputs") o.inputs = value();
        else if (a == "--max-new-tokens") o.max_new_tokens = parse_int(a, value());
        else if (a == "--talker-max-new-tokens") o.talker_max_new_tokens = parse_int(a, value());
        else if (a == "--seed") o.seed = parse_int(a, value());
        else if (a == "--top-k") o.top_k = parse_int(a, value());
        else if (a == "--temperature") o.temperature = parse_number(a, value());
        else if (a == "--top-p") o.top_p = parse_number(a, value());
        else if (a == "--repetition-penalty") o.repetition_penalty = parse_number(a, value());
        else if (a == "--max-speech-seconds") o.max_speech_seconds = parse_number(a, value());
        else if (a == "--wav") o.wav = value();
        else if (a == "--speaker") o.speaker = value();
        else if (a == "--solver") o.solver = value();
        else if (a == "--noise") o.noise = value();
        else if (a == "--device") o.device = value();
        else if (a == "--threads") o.threads = static_cast<int>(parse_int(a, value()));
        else if (a == "--greedy") o.greedy = true;
        else if (a == "--sample") o.sample = true;
        else if (a == "--stream-audio") o.stream_audio = true;
        else if (a == "--json") o.json = true;
        else if (!a.empty() && a[0] == '-') throw usage("unknown option " + a);
        else if (o.bundle.empty()) o.bundle = a;
        else throw usage("unexpected argument '" + a + "'");
    }
    if (o.bundle.empty()) throw usage("the BUNDLE directory is missing");
    if (o.prompt_ids.empty() == o.inputs.empty())
        throw usage("pass exactly one of --prompt-ids IDS and --inputs FILE (written by omni-export tokenize)");
    if (o.greedy && o.sample) throw usage("--greedy and --sample conflict");
    bool implied = o.temperature || o.top_k || o.top_p || o.seed;
    if (o.greedy && implied) throw usage("--greedy conflicts with --seed, --temperature, --top-k, --top-p (sampling options)");
    if (o.max_new_tokens && *o.max_new_tokens < 1)
        throw HostError("--max-new-tokens must be an integer >= 1, got " + std::to_string(*o.max_new_tokens), "",
                        "ask for at least 1 new token (--max-new-tokens >= 1)");
    if (o.talker_max_new_tokens && *o.talker_max_new_tokens < 1)
        throw usage("--talker-max-new-tokens must be >= 1");
    if (o.seed && *o.seed < 0) throw usage("--seed must be >= 0");
    if (o.device != "auto" && o.device != "cpu" && o.device != "cuda") throw usage("--device must be auto, cpu or cuda");
    if (o.max_speech_seconds && *o.max_speech_seconds <= 0) throw usage("--max-speech-seconds must be > 0");
    if (o.wav.empty()) {
        for (auto& flag : {std::make_pair("--speaker", !o.speaker.empty()), std::make_pair("--stream-audio", o.stream_audio),
                           std::make_pair("--solver", !o.solver.empty()), std::make_pair("--noise", !o.noise.empty()),
                           std::make_pair("--talker-max-new-tokens", bool(o.talker_max_new_tokens)),
                           std::make_pair("--max-speech-seconds", bool(o.max_speech_seconds))})
            if (flag.second) throw HostError(std::string(flag.first) + " needs --wav", "",
                                             std::string("add --wav OUT.wav to hear the answer, or drop ") + flag.first);
    } else {
        std::string dir = o.wav.find('/') == std::string::npos ? "." : o.wav.substr(0, o.wav.rfind('/'));
        if (dir.empty()) dir = "/";
        struct stat st;
        if (stat(o.wav.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
            throw HostError("is a directory", o.wav, "pass a file name for --wav, e.g. --wav answer.wav");
        if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
            throw HostError("directory does not exist, so --wav cannot write into it", dir,
                            "create the directory first (mkdir -p), or choose another --wav path");
        if (access(dir.c_str(), W_OK | X_OK) != 0)
            throw HostError("no write access to the directory of --wav", dir, "choose a --wav path you can write to");
    }
    return o;
}

std::vector<int64_t> parse_ids(const std::string& text) {
    std::vector<int64_t> ids;
    std::stringstream ss(text);
    std::string piece;
    while (std::getline(ss, piece, ',')) {
        if (piece.empty()) throw usage("--prompt-ids: empty id in '" + text.substr(0, 40) + "'");
        ids.push_back(parse_int("--prompt-ids", piece));
    }
    return ids;
}

std::string dir_of(const std::string& path) {
    auto slash = path.rfind('/');
    return slash == std::string::npos ? "." : path.substr(0, slash);
}

omni::Tensor npy_tensor(const omni::NpyArray& a) {
    if (a.dtype == "float32") return omni::Tensor::floats(a.shape, std::vector<float>(a.f32(), a.f32() + a.size()));
    std::vector<int64_t> values(a.size());
    if (a.dtype == "int64") values.assign(a.i64(), a.i64() + a.size());
    else for (int64_t i = 0; i < a.size(); ++i) values[i] = reinterpret_cast<const int32_t*>(a.data.data())[i];
    return omni::Tensor::ints(a.shape, values);
}

// The prompt of --inputs (omni-export tokenize): ids, encoder rows merged at the placeholders,
// TMRoPE positions. Each encoder session is released right after it runs.
omni::Prompt media_prompt(omni::Bundle& bundle, omni::SessionPool& pool, const json& inputs, const std::string& base,
                          const std::string& file) {
    omni::Prompt prompt;
    for (auto& id : inputs.at("prompt_ids")) prompt.ids.push_back(id.get<int64_t>());
    const json encoders = inputs.value("encoders", json::object());
    if (encoders.empty()) return prompt;
    const json rope = inputs.value("rope", json::object());
    omni::RopeInputs media;
    for (auto& g : rope.value("image_grid_thw", json::array())) media.image_grid_thw.push_back({g[0].get<int64_t>(), g[1].get<int64_t>(), g[2].get<int64_t>()});
    for (auto& g : rope.value("video_grid_thw", json::array())) media.video_grid_thw.push_back({g[0].get<int64_t>(), g[1].get<int64_t>(), g[2].get<int64_t>()});
    for (auto& v : rope.value("audio_seqlens", json::array())) media.audio_seqlens.push_back(v.get<int64_t>());
    for (auto& v : rope.value("second_per_grids", json::array())) media.second_per_grids.push_back(v.get<float>());
    media.use_audio_in_video = rope.value("use_audio_in_video", false);
    const json& tmrope = bundle.data["config"]["thinker"];
    omni::RopeConfig cfg{bundle.special("image"), bundle.special("video"), bundle.special("audio"),
                         bundle.special("vision_bos"), bundle.special("audio_bos"),
                         tmrope.value("spatial_merge_size", static_cast<int64_t>(2)),
                         tmrope.value("position_id_per_seconds", static_cast<int64_t>(25)),
                         tmrope.value("seconds_per_chunk", static_cast<int64_t>(2))};
    std::map<std::string, std::vector<float>> rows;  // "audio", "image", "video" -> [n, width]
    for (auto& enc : {std::make_pair("audio_encoder", "audio_embeds"), std::make_pair("vision_encoder", "vision_embeds")}) {
        if (!encoders.contains(enc.first)) continue;
        std::map<std::string, omni::Tensor> feeds;
        for (auto it = encoders[enc.first].begin(); it != encoders[enc.first].end(); ++it) {
            std::string name = it.value().get<std::string>();
            if (name.empty() || name[0] == '/' || name.find("..") != std::string::npos)
                throw HostError("unsafe input file name '" + name + "'", file, "rewrite it with omni-export tokenize");
            feeds[it.key()] = npy_tensor(omni::read_npy(base + "/" + name));
        }
        auto out = omni::run_graph(pool.get(enc.first), bundle.graph(enc.first), feeds, {enc.second})[0].f;
        pool.done(enc.first);
        if (std::string(enc.first) == "audio_encoder") {
            rows["audio"] = out;
        } else {
            int64_t width = bundle.data["config"]["thinker"]["hidden_size"];
            int64_t merge = cfg.spatial_merge_size * cfg.spatial_merge_size, image_rows = 0;
            for (auto& g : media.image_grid_thw) image_rows += g[0] * g[1] * g[2] / merge;
            image_rows = std::min<int64_t>(image_rows * width, static_cast<int64_t>(out.size()));
            rows["image"].assign(out.begin(), out.begin() + image_rows);
            rows["video"].assign(out.begin() + image_rows, out.end());
        }
    }
    auto embeds = omni::run_graph(pool.get("thinker_embedding"), bundle.graph("thinker_embedding"),
                                  {{"input_ids", omni::Tensor::ints({1, static_cast<int64_t>(prompt.ids.size())}, prompt.ids)}},
                                  {"inputs_embeds"})[0].f;
    const int64_t W = static_cast<int64_t>(embeds.size() / prompt.ids.size());
    for (auto& kind : {std::make_pair("audio", cfg.audio_token), std::make_pair("image", cfg.image_token),
                       std::make_pair("video", cfg.video_token)}) {
        const std::vector<float>& r = rows[kind.first];
        int64_t n = 0;
        for (int64_t id : prompt.ids) n += id == kind.second;
        if (n * W != static_cast<int64_t>(r.size()))
            throw HostError(std::to_string(n) + " <|" + kind.first + "|> placeholder(s) in the prompt but the encoder "
                                "produced " + std::to_string(r.size() / W) + " row(s)", file,
                            "write the prompt and its media inputs together with omni-export tokenize");
        int64_t k = 0;
        for (size_t i = 0; i < prompt.ids.size(); ++i)
            if (prompt.ids[i] == kind.second) {
                std::copy(r.begin() + k * W, r.begin() + (k + 1) * W, embeds.begin() + i * W);
                ++k;
            }
    }
    prompt.embeds = embeds;
    prompt.positions = omni::rope_index(prompt.ids, cfg, media, &prompt.rope_delta);
    return prompt;
}

std::string json_list(const std::vector<int64_t>& v) {
    return json(v).dump();
}

int run(const Options& o) {
    omni::Bundle bundle = omni::Bundle::open(o.bundle);
    const omni::DecoderConfig thinker = bundle.decoder_config("thinker");
    json inputs;
    std::vector<int64_t> ids;
    if (!o.inputs.empty()) {
        std::ifstream in(o.inputs);
        if (!in) throw HostError("cannot read the inputs file (missing?)", o.inputs,
                                 "write it with omni-export tokenize BUNDLE --prompt TEXT --out DIR");
        try {
            inputs = json::parse(in);
        } catch (const json::exception& e) {
            throw HostError(std::string("invalid JSON: ") + e.what(), o.inputs, "write it with omni-export tokenize");
        }
        if (!inputs.is_object() || !inputs.contains("prompt_ids") || !inputs["prompt_ids"].is_array())
            throw HostError("no prompt_ids list", o.inputs, "write it with omni-export tokenize");
        for (auto& id : inputs["prompt_ids"]) {
            if (!id.is_number_integer()) throw HostError("prompt_ids holds a non-integer", o.inputs, "write it with omni-export tokenize");
            ids.push_back(id.get<int64_t>());
        }
    } else {
        ids = parse_ids(o.prompt_ids);
    }
    if (ids.empty()) throw HostError("the prompt has no token ids", "", "pass at least one id");
    for (int64_t id : ids)
        if (id < 0 || id >= thinker.vocab_size)
            throw HostError("prompt id " + std::to_string(id) + " is outside the vocabulary 0.." +
                                std::to_string(thinker.vocab_size - 1), "",
                            "pass ids made by omni-export tokenize for this bundle");
    // the context budget (omni_runtime.runner.OmniRunner.token_budget)
    const int64_t context = thinker.max_position_embeddings, P = static_cast<int64_t>(ids.size()), room = context - P;
    if (room < 1)
        throw HostError("the prompt is " + std::to_string(P) + " tokens but the model's context holds " +
                            std::to_string(context) + " positions: no room is left for an answer", "",
                        "shorten the prompt to fit in " + std::to_string(context - 1) + " tokens");
    int64_t limit;
    std::string limit_reason = "length";
    if (o.max_new_tokens) {
        if (*o.max_new_tokens > room)
            throw HostError("--max-new-tokens " + std::to_string(*o.max_new_tokens) + " does not fit: the prompt takes " +
                                std::to_string(P) + " of the model's " + std::to_string(context) +
                                " context positions, so at most " + std::to_string(room) + " new tokens are possible", "",
                            "ask for at most " + std::to_string(room) + " new tokens, or shorten the prompt");
        limit = *o.max_new_tokens;
    } else {
        limit = bundle.data["generation"].value("max_new_tokens", static_cast<int64_t>(512));
        if (limit > room) limit = room, limit_reason = "context";
    }
    // decoding (omni_runtime.cli.sampling_for)
    omni::Sampling sampling = bundle.generation_sampling();
    if (o.temperature) sampling.temperature = static_cast<float>(*o.temperature);
    if (o.top_k) sampling.top_k = *o.top_k;
    if (o.top_p) sampling.top_p = static_cast<float>(*o.top_p);
    if (o.repetition_penalty) sampling.repetition_penalty = static_cast<float>(*o.repetition_penalty);
    if (o.greedy) sampling.do_sample = false;
    else if (o.sample || o.temperature || o.top_k || o.top_p || o.seed) sampling.do_sample = true;
    if (sampling.do_sample && !(sampling.temperature > 0))
        throw HostError("--temperature must be > 0 when sampling", "", "use --temperature > 0, or --greedy");
    if (!(sampling.top_p > 0 && sampling.top_p <= 1)) throw usage("--top-p must be in (0, 1]");
    if (sampling.top_k < 0) throw usage("--top-k must be >= 0 (0 = off)");
    if (!(sampling.repetition_penalty > 0)) throw usage("--repetition-penalty must be > 0");
    std::optional<uint64_t> seed;
    if (o.seed) seed = static_cast<uint64_t>(*o.seed);
    // speech options, checked before any graph runs
    const bool speech = !o.wav.empty();
    omni::Sampling talker_sampling;
    int64_t max_codes = 0;
    std::string speech_limit = "length";
    omni::Speaker speaker;
    if (speech) {
        if (!bundle.has_speech())
            throw HostError("this bundle has no speech output (no talker or token2wav graphs), so --wav cannot be written",
                            bundle.manifest_path, "leave out --wav for a text answer, or rebuild the bundle with a talker");
        const json& tcfg = bundle.data["config"]["talker"]["sampling"];
        talker_sampling.do_sample = tcfg.value("do_sample", true);
        talker_sampling.temperature = tcfg.value("temperature", 0.9f);
        talker_sampling.top_k = tcfg.value("top_k", static_cast<int64_t>(40));
        talker_sampling.top_p = tcfg.value("top_p", 0.8f);
        talker_sampling.repetition_penalty = tcfg.value("repetition_penalty", 1.05f);
        if (o.greedy) talker_sampling.do_sample = false;
        max_codes = o.talker_max_new_tokens ? *o.talker_max_new_tokens : tcfg.value("max_new_tokens", static_cast<int64_t>(4096));
        const json& t2w = bundle.data["config"]["token2wav"];
        if (o.max_speech_seconds) {
            double per_second = t2w["sample_rate"].get<double>() / (t2w["mel_per_code"].get<double>() * t2w["hop_length"].get<double>());
            int64_t seconds_codes = std::max<int64_t>(1, static_cast<int64_t>(*o.max_speech_seconds * per_second));
            if (seconds_codes < max_codes) max_codes = seconds_codes, speech_limit = "seconds";
        }
        if (!o.stream_audio && max_codes * t2w["mel_per_code"].get<int64_t>() > t2w["max_mel_frames"].get<int64_t>())
            throw HostError(std::to_string(max_codes) + " talker codes can make more mel frames than token2wav solves at once",
                            "", "stream the audio (--stream-audio), or ask for fewer codes (--talker-max-new-tokens)");
        speaker = omni::load_speaker(bundle, o.speaker.empty() ? t2w["default_speaker"].get<std::string>() : o.speaker);
    }
    std::string noise_file = o.noise;
    if (noise_file.empty() && inputs.is_object() && inputs.contains("noise") && speech)
        noise_file = dir_of(o.inputs) + "/" + inputs["noise"].get<std::string>();

    Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "omni-host");
    omni::SessionPool pool(bundle, env, o.device, o.threads);
    auto started = std::chrono::steady_clock::now();
    omni::Prompt prompt = inputs.is_object() ? media_prompt(bundle, pool, inputs, dir_of(o.inputs), o.inputs) : omni::Prompt{};
    if (!inputs.is_object()) prompt.ids = ids;
    pool.get("thinker_embedding");  // loaded before the clock starts: prefill and decode are timed alone
    pool.get("thinker_decoder");
    omni::Generation gen = omni::thinker_generate(bundle, pool, prompt, limit, limit_reason, sampling, seed, speech);
    std::vector<float> text_rows;
    if (speech) text_rows = omni::talker_text_rows(bundle, pool, speaker.bos_token);  // while the thinker is loaded
    pool.done("thinker_embedding");
    pool.done("thinker_decoder");
    json out;
    out["prompt_ids"] = ids;
    out["token_ids"] = gen.token_ids;
    out["finish_reason"] = gen.finish_reason;
    out["codes"] = nullptr;
    out["prefill_seconds"] = gen.prefill_seconds;
    out["decode_seconds"] = gen.decode_seconds;  // the tokens after the first
    if (speech) {
        std::vector<int64_t> codes = omni::talker_generate(bundle, pool, gen.states, text_rows, talker_sampling, seed, max_codes);
        pool.done("talker_embedding");
        pool.done("talker_decoder");
        const json& t2w = bundle.data["config"]["token2wav"];
        omni::Noise noise(t2w["mel_dim"].get<int64_t>(), noise_file, o.seed ? static_cast<uint64_t>(*o.seed) : 0);
        double first_audio = -1;
        auto on_chunk = [&](const std::vector<float>&, bool) {
            if (first_audio < 0)
                first_audio = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
        };
        std::vector<float> audio = omni::token2wav(bundle, pool, codes, speaker, noise, o.stream_audio, o.solver, on_chunk);
        int sample_rate = t2w["sample_rate"].get<int>();
        omni::write_wav(o.wav, audio, sample_rate);
        out["codes"] = codes;
        out["speaker"] = speaker.name;
        out["sample_rate"] = sample_rate;
        out["audio_seconds"] = static_cast<double>(audio.size()) / sample_rate;
        out["first_audio_seconds"] = first_audio;
        out["speech_finish_reason"] = static_cast<int64_t>(codes.size()) >= max_codes ? speech_limit : "eos";
        out["wav"] = o.wav;
    }
    if (o.json) {
        std::cout << out.dump() << std::endl;
    } else {
        std::cout << "token_ids: " << json_list(gen.token_ids) << " (" << gen.finish_reason
                  << "; text: omni-export detokenize BUNDLE IDS)" << std::endl;
        if (speech) std::cerr << "wrote " << o.wav << ": " << out["audio_seconds"].get<double>() << " s of audio ("
                              << speaker.name << ")" << std::endl;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse(argc, argv));
    } catch (const HostError& e) {
        std::cerr << "error: " << e.message() << std::endl;
        return 2;
    } catch (const Ort::Exception& e) {
        std::cerr << "error: onnxruntime: " << e.what() << std::endl;
        return 1;
    } catch (const std::exception& e) {
        std::cerr << "error: " << e.what() << std::endl;
        return 1;
    }
}
