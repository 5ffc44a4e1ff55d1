// The manifest and the bundle's files: checks of docs/bundle-format.md, sha256, .npy and WAV.
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include <openssl/evp.h>

#include "omni_host.h"

namespace omni {

const char* REBUILD_FIX = "rebuild the bundle with a matching omni-export (omni-export build)";
const char* COPY_FIX = "copy the bundle again, or rebuild it with omni-export build";

std::string HostError::message() const {
    std::string out = path.empty() ? std::string(what()) : path + ": " + what();
    if (!fix.empty()) out += "\n  fix: " + fix;
    return out;
}

// ------------------------------------------------------------------------------------ files
static bool is_file(const std::string& path, int64_t* size = nullptr) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
    if (size) *size = static_cast<int64_t>(st.st_size);
    return true;
}

static bool is_dir(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

static std::string resolve(const std::string& path) {
    char buffer[PATH_MAX];
    if (realpath(path.c_str(), buffer) == nullptr) return "";
    return buffer;
}

std::string sha256_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw HostError("missing file listed in the manifest", path, COPY_FIX);
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    std::vector<char> chunk(1 << 20);
    while (in) {
        in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
        if (in.gcount() > 0) EVP_DigestUpdate(ctx, chunk.data(), static_cast<size_t>(in.gcount()));
    }
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    EVP_DigestFinal_ex(ctx, digest, &length);
    EVP_MD_CTX_free(ctx);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < length; ++i) {
        out += hex[digest[i] >> 4];
        out += hex[digest[i] & 15];
    }
    return out;
}

int64_t NpyArray::size() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
}

NpyArray read_npy(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw HostError("cannot read this .npy file (missing?)", path, "pass the files omni-export tokenize wrote");
    const char* bad_fix = "write it with numpy.save (little-endian float32/int64, C order), e.g. omni-export tokenize";
    char magic[8];
    in.read(magic, 8);
    if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw HostError("not a .npy file", path, bad_fix);
    uint32_t header_len = 0;
    if (magic[6] == 1) {
        unsigned char b[2];
        in.read(reinterpret_cast<char*>(b), 2);
        header_len = b[0] | (b[1] << 8);
    } else {
        unsigned char b[4];
        in.read(reinterpret_cast<char*>(b), 4);
        header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
    }
    std::string header(header_len, '\0');
    in.read(&header[0], header_len);
    if (!in) throw HostError("truncated .npy header", path, bad_fix);
    NpyArray out;
    auto descr_at = header.find("'descr':");
    auto order_at = header.find("'fortran_order':");
    auto shape_at = header.find("'shape':");
    if (descr_at == std::string::npos || order_at == std::string::npos || shape_at == std::string::npos)
        throw HostError("unreadable .npy header", path, bad_fix);
    auto q1 = header.find('\'', descr_at + 8), q2 = header.find('\'', q1 + 1);
    std::string descr = header.substr(q1 + 1, q2 - q1 - 1);
    size_t item = 0;
    if (descr == "<f4") out.dtype = "float32", item = 4;
    else if (descr == "<i8") out.dtype = "int64", item = 8;
    else if (descr == "<i4") out.dtype = "int32", item = 4;
    else throw HostError("dtype " + descr + " is not supported (float32, int64 or int32)", path, bad_fix);
    if (header.compare(order_at + 16, 6, " False") != 0 && header.compare(order_at + 16, 5, "False") != 0)
        throw HostError("Fortran-ordered arrays are not supported", path, bad_fix);
    auto p1 = header.find('(', shape_at), p2 = header.find(')', p1);
    std::string dims = header.substr(p1 + 1, p2 - p1 - 1);
    std::stringstream ss(dims);
    std::string piece;
    while (std::getline(ss, piece, ',')) {
        if (piece.find_first_not_of(" ") == std::string::npos) continue;
        out.shape.push_back(std::stoll(piece));
    }
    out.data.resize(static_cast<size_t>(out.size()) * item);
    in.read(out.data.data(), static_cast<std::streamsize>(out.data.size()));
    if (static_cast<size_t>(in.gcount()) != out.data.size()) throw HostError("truncated .npy data", path, bad_fix);
    return out;
}

void write_wav(const std::string& path, const std::vector<float>& audio, int sample_rate) {
    std::string dir = ".", name = path;
    auto slash = path.rfind('/');
    if (slash != std::string::npos) dir = path.substr(0, slash).empty() ? "/" : path.substr(0, slash),
                                    name = path.substr(slash + 1);
    std::string tmp = dir + "/." + name + ".XXXXXX.partial";
    std::vector<char> templ(tmp.begin(), tmp.end());
    templ.push_back('\0');
    int fd = mkstemps(templ.data(), 8);
    if (fd < 0) throw HostError("cannot write the WAV file (" + std::string(std::strerror(errno)) + ")", path,
                                "check the directory exists and is writable, or choose another --wav path");
    tmp = templ.data();
    auto u32 = [](std::string& s, uint32_t v) { for (int i = 0; i < 4; ++i) s += static_cast<char>((v >> (8 * i)) & 255); };
    auto u16 = [](std::string& s, uint16_t v) { s += static_cast<char>(v & 255); s += static_cast<char>(v >> 8); };
    uint32_t data_bytes = static_cast<uint32_t>(audio.size() * 4);
    std::string head = "RIFF";
    u32(head, 4 + (8 + 16) + (8 + 4) + (8 + data_bytes));
    head += "WAVEfmt ";
    u32(head, 16);
    u16(head, 3);  // WAVE_FORMAT_IEEE_FLOAT
    u16(head, 1);
    u32(head, static_cast<uint32_t>(sample_rate));
    u32(head, static_cast<uint32_t>(sample_rate) * 4);
    u16(head, 4);
    u16(head, 32);
    head += "fact";
    u32(head, 4);
    u32(head, static_cast<uint32_t>(audio.size()));
    head += "data";
    u32(head, data_bytes);
    bool ok = write(fd, head.data(), head.size()) == static_cast<ssize_t>(head.size());
    if (ok && data_bytes) ok = write(fd, audio.data(), data_bytes) == static_cast<ssize_t>(data_bytes);
    mode_t mask = umask(0);
    umask(mask);
    ok = ok && fchmod(fd, 0666 & ~mask) == 0 && close(fd) == 0;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::string why = std::strerror(errno);
        unlink(tmp.c_str());
        throw HostError("cannot write the WAV file (" + why + ")", path,
                        "check the disk space and permissions, or choose another --wav path");
    }
}

// ------------------------------------------------------------------------------------ manifest
static std::string relpath_problem(const std::string& rel) {
    if (rel.empty()) return "is empty";
    if (rel.find('\\') != std::string::npos) return "contains a backslash (use '/')";
    if (rel.find('\0') != std::string::npos) return "contains a NUL character";
    if (rel[0] == '/') return "is absolute";
    if (rel.find(':') != std::string::npos) return "contains ':' (a drive letter or stream name)";
    std::vector<std::string> parts;
    std::string part;
    std::stringstream ss(rel + "/");
    while (std::getline(ss, part, '/')) parts.push_back(part);
    if (!rel.empty() && rel.back() == '/') parts.push_back("");
    for (auto& p : parts) if (p == "..") return "contains a '..' part";
    for (auto& p : parts) if (p.empty()) return "contains an empty part";
    for (auto& p : parts) if (p == ".") return "contains a '.' part";
    return "";
}

static HostError manifest_error(const Bundle& b, const std::string& problem, const std::string& fix = REBUILD_FIX) {
    return HostError(problem, b.manifest_path, fix);
}

static const json& need(const Bundle& b, const json& obj, const std::string& key, const std::string& where,
                        json::value_t type) {
    if (!obj.is_object() || !obj.contains(key))
        throw manifest_error(b, where + " is missing key '" + key + "'");
    const json& value = obj.at(key);
    bool ok = value.type() == type ||
              (type == json::value_t::number_integer && value.is_number_unsigned()) ||
              (type == json::value_t::number_float && value.is_number());
    if (!ok) throw manifest_error(b, where + "." + key + " has the wrong type (" + value.type_name() + ")");
    return value;
}

static int64_t need_int(const Bundle& b, const json& obj, const std::string& key, const std::string& where) {
    return need(b, obj, key, where, json::value_t::number_integer).get<int64_t>();
}

static void check_relpath(const Bundle& b, const std::string& rel, const std::string& where) {
    std::string problem = relpath_problem(rel);
    if (!problem.empty()) throw manifest_error(b, "unsafe path '" + rel + "' in " + where + ": it " + problem);
    if (!b.data.at("files").contains(rel))
        throw manifest_error(b, where + " '" + rel + "' is not listed in the manifest's files");
}

Bundle Bundle::open(const std::string& dir) {
    Bundle b;
    if (!is_dir(dir))
        throw HostError("bundle directory does not exist (or is not a directory)", dir,
                        "pass the directory omni-export build wrote (it holds manifest.json)");
    b.root = resolve(dir);
    b.manifest_path = b.root + "/manifest.json";
    if (!is_file(b.manifest_path))
        throw HostError("not a bundle: no manifest.json (an unfinished or partial copy?)", b.manifest_path, COPY_FIX);
    std::ifstream in(b.manifest_path);
    try {
        b.data = json::parse(in);
    } catch (const json::exception& e) {
        throw manifest_error(b, std::string("invalid JSON: ") + e.what());
    }
    const json& d = b.data;
    if (!d.is_object()) throw manifest_error(b, "the manifest is not a JSON object");
    if (!d.contains("schema") || d["schema"] != "omni-export.bundle")
        throw manifest_error(b, "not an omni-export bundle manifest (schema is not \"omni-export.bundle\")");
    if (!d.contains("schema_version") || !d["schema_version"].is_number_integer() || d["schema_version"] != 2) {
        std::string found = d.contains("schema_version") ? d["schema_version"].dump() : "missing";
        throw manifest_error(b, "manifest schema_version " + found + ", this host reads schema_version 2",
                             "rebuild the bundle with an omni-export that writes schema_version 2 (or use a host "
                             "of the bundle's version)");
    }
    for (const char* key : {"files", "tokenizer", "special_tokens", "generation", "config", "graphs"})
        need(b, d, key, "the manifest", json::value_t::object);
    // files: safe paths that stay inside the bundle, present with their size
    for (auto it = d["files"].begin(); it != d["files"].end(); ++it) {
        const std::string& rel = it.key();
        std::string problem = relpath_problem(rel);
        if (!problem.empty()) throw manifest_error(b, "unsafe path '" + rel + "' in files: it " + problem);
        int64_t bytes = need_int(b, it.value(), "bytes", "files[\"" + rel + "\"]");
        const json& sha = need(b, it.value(), "sha256", "files[\"" + rel + "\"]", json::value_t::string);
        if (sha.get<std::string>().size() != 64)
            throw manifest_error(b, "files[\"" + rel + "\"].sha256 is not 64 hex digits");
        std::string full = b.root + "/" + rel;
        int64_t size = 0;
        if (!is_file(full, &size)) throw HostError("missing file listed in the manifest", full, COPY_FIX);
        std::string real = resolve(full);
        if (real.compare(0, b.root.size() + 1, b.root + "/") != 0)
            throw manifest_error(b, "unsafe path '" + rel + "' in files: it resolves outside the bundle (a symlink?)");
        if (size != bytes)
            throw HostError("wrong size: " + std::to_string(size) + " bytes, the manifest says " +
                                std::to_string(bytes) + " (truncated or replaced?)", full, COPY_FIX);
    }
    // graphs: listed files, unique IO names
    for (auto it = d["graphs"].begin(); it != d["graphs"].end(); ++it) {
        GraphSpec g;
        g.name = it.key();
        std::string where = "graphs." + g.name;
        const json& entry = it.value();
        g.file = need(b, entry, "file", where, json::value_t::string).get<std::string>();
        check_relpath(b, g.file, where + ".file");
        for (auto& extra : need(b, entry, "external_data", where, json::value_t::array)) {
            if (!extra.is_string()) throw manifest_error(b, where + ".external_data holds a non-string");
            g.external_data.push_back(extra.get<std::string>());
            check_relpath(b, g.external_data.back(), where + ".external_data");
        }
        g.quantization = entry.value("quantization", json());
        for (const char* io : {"inputs", "outputs"}) {
            std::set<std::string> seen;
            for (auto& t : need(b, entry, io, where, json::value_t::array)) {
                TensorSpec spec;
                spec.name = need(b, t, "name", where + "." + io, json::value_t::string).get<std::string>();
                spec.dtype = need(b, t, "dtype", where + "." + io, json::value_t::string).get<std::string>();
                for (auto& axis : need(b, t, "shape", where + "." + io, json::value_t::array)) spec.shape.push_back(axis);
                if (!seen.insert(spec.name).second)
                    throw manifest_error(b, where + "." + io + " has duplicate name '" + spec.name + "'");
                (std::string(io) == "inputs" ? g.inputs : g.outputs).push_back(spec);
            }
        }
        if (entry.contains("session_config") && entry["session_config"].is_object())
            for (auto kv = entry["session_config"].begin(); kv != entry["session_config"].end(); ++kv)
                if (kv.value().is_string()) g.session_config[kv.key()] = kv.value().get<std::string>();
        b.graphs[g.name] = g;
    }
    for (const char* key : {"thinker_embedding", "thinker_decoder"})
        if (!b.has(key)) throw manifest_error(b, std::string("the manifest has no graph '") + key + "'");
    const json& config = d["config"];
    need(b, config, "thinker", "config", json::value_t::object);
    for (const char* block : {"thinker", "talker"}) {
        if (!config.contains(block)) continue;
        const json& cfg = config[block];
        std::string where = std::string("config.") + block;
        int64_t sum = 0;
        for (auto& v : need(b, cfg, "mrope_section", where, json::value_t::array)) sum += v.get<int64_t>();
        if (sum * 2 != need_int(b, cfg, "head_dim", where))
            throw manifest_error(b, where + ".mrope_section must sum to " + where + ".head_dim/2");
    }
    if (config.contains("token2wav")) {
        const json& t2w = config["token2wav"];
        const json& speakers = need(b, t2w, "speakers", "config.token2wav", json::value_t::object);
        std::string def = need(b, t2w, "default_speaker", "config.token2wav", json::value_t::string).get<std::string>();
        if (!speakers.contains(def))
            throw manifest_error(b, "config.token2wav.default_speaker '" + def + "' is not one of its speakers");
        for (auto it = speakers.begin(); it != speakers.end(); ++it)
            for (const char* key : {"speaker_embedding", "reference_embedding", "null_reference_embedding"})
                check_relpath(b, need(b, it.value(), key, "config.token2wav.speakers." + it.key(),
                                      json::value_t::string).get<std::string>(),
                              "config.token2wav.speakers." + it.key() + "." + key);
    }
    // the decoders' KV layout agrees with their config blocks (the KV decoder relies on it)
    for (auto pair : {std::make_pair("thinker", "thinker_decoder"), std::make_pair("talker", "talker_decoder")}) {
        if (!config.contains(pair.first) || !b.has(pair.second)) continue;
        DecoderConfig cfg = b.decoder_config(pair.first);
        const GraphSpec& g = b.graphs.at(pair.second);
        for (int64_t i = 0; i < cfg.num_hidden_layers; ++i)
            for (const char* kind : {"key", "value"}) {
                std::string past = "past_key_values." + std::to_string(i) + "." + kind;
                const TensorSpec* t = g.input(past);
                if (t == nullptr || t->shape.size() != 4)
                    throw manifest_error(b, std::string("config.") + pair.first + ".num_hidden_layers is " +
                                                std::to_string(cfg.num_hidden_layers) + " but graph '" + pair.second +
                                                "' has no input '" + past + "' of rank 4: they must agree");
                if ((t->shape[1].is_number() && t->shape[1] != cfg.num_key_value_heads) ||
                    (t->shape[3].is_number() && t->shape[3] != cfg.head_dim) || t->dtype != cfg.kv_dtype)
                    throw manifest_error(b, std::string("config.") + pair.first + " (num_key_value_heads, head_dim, "
                                                "kv_dtype) disagrees with graph '" + pair.second + "' input '" + past +
                                                "': they must agree");
            }
    }
    return b;
}

std::string Bundle::path(const std::string& relpath) const { return root + "/" + relpath; }

void Bundle::verify(const std::string& relpath) {
    if (verified.count(relpath)) return;
    const json& files = data.at("files");
    if (!files.contains(relpath))
        throw HostError("'" + relpath + "' is not listed in the manifest's files", manifest_path, REBUILD_FIX);
    std::string expected = files[relpath]["sha256"].get<std::string>();
    for (auto& c : expected) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    std::string actual = sha256_file(path(relpath));
    if (actual != expected)
        throw HostError("corrupt: sha256 mismatch (manifest says " + expected + ", file has " + actual + ")",
                        path(relpath), COPY_FIX);
    verified.insert(relpath);
}

const GraphSpec& Bundle::graph(const std::string& name) const {
    auto it = graphs.find(name);
    if (it == graphs.end())
        throw HostError("the bundle has no graph '" + name + "'", manifest_path,
                        "rebuild the bundle with a recipe that exports it");
    return it->second;
}

DecoderConfig Bundle::decoder_config(const std::string& block) const {
    const json& cfg = data["config"][block];
    std::string where = "config." + block;
    DecoderConfig out;
    out.hidden_size = need_int(*this, cfg, "hidden_size", where);
    out.num_hidden_layers = need_int(*this, cfg, "num_hidden_layers", where);
    out.num_key_value_heads = need_int(*this, cfg, "num_key_value_heads", where);
    out.head_dim = need_int(*this, cfg, "head_dim", where);
    out.vocab_size = need_int(*this, cfg, "vocab_size", where);
    out.max_position_embeddings = need_int(*this, cfg, "max_position_embeddings", where);
    out.kv_dtype = need(*this, cfg, "kv_dtype", where, json::value_t::string).get<std::string>();
    return out;
}

Sampling Bundle::generation_sampling() const {
    const json& g = data["generation"];
    Sampling s;
    s.do_sample = g.value("do_sample", false);
    s.temperature = g.value("temperature", 1.0f);
    s.top_k = g.value("top_k", static_cast<int64_t>(0));
    s.top_p = g.value("top_p", 1.0f);
    s.repetition_penalty = g.value("repetition_penalty", 1.0f);
    return s;
}

std::string Bundle::target() const {
    return data.contains("target") && data["target"].is_string() ? data["target"].get<std::string>() : "cpu";
}

bool Bundle::has_speech() const {
    const json& c = data["config"];
    return c.contains("talker") && c.contains("token2wav") && c["talker"].value("enable_audio_output", false) &&
           has("talker_embedding") && has("talker_decoder") && has("token2wav_dit") && has("token2wav_bigvgan");
}

int64_t Bundle::special(const std::string& name) const {
    return need_int(*this, data["special_tokens"], name, "special_tokens");
}

std::vector<std::string> GraphSpec::files() const {
    std::vector<std::string> out{file};
    out.insert(out.end(), external_data.begin(), external_data.end());
    return out;
}

const TensorSpec* GraphSpec::input(const std::string& n) const {
    for (auto& t : inputs) if (t.name == n) return &t;
    return nullptr;
}

}  // namespace omni
