// TMRoPE position ids and rope deltas: omni_runtime.prompt.rope (transformers' get_rope_index),
// step by step.
#include <algorithm>
#include <cmath>

#include "omni_host.h"

namespace omni {

int64_t audio_output_length(int64_t frames) { return ((frames - 1) / 2 + 1 - 2) / 2 + 1; }

namespace {

using Parts = std::vector<std::array<std::vector<int64_t>, 3>>;

int64_t next_start(const Parts& parts) {
    if (parts.empty()) return 0;
    int64_t top = INT64_MIN;
    for (auto& axis : parts.back())
        for (int64_t v : axis) top = std::max(top, v);
    return top + 1;
}

std::array<std::vector<int64_t>, 3> span(int64_t length, int64_t start) {
    std::array<std::vector<int64_t>, 3> out;
    for (auto& axis : out)
        for (int64_t i = 0; i < length; ++i) axis.push_back(start + i);
    return out;
}

std::array<std::vector<int64_t>, 3> vision_positions(int64_t start, const std::array<int64_t, 3>& grid, int64_t merge,
                                                     const std::vector<int64_t>& t_index) {
    int64_t gh = grid[1] / merge, gw = grid[2] / merge;
    std::array<std::vector<int64_t>, 3> out;
    for (int64_t t : t_index)
        for (int64_t h = 0; h < gh; ++h)
            for (int64_t w = 0; w < gw; ++w) {
                out[0].push_back(t + start);
                out[1].push_back(h + start);
                out[2].push_back(w + start);
            }
    return out;
}

std::vector<std::pair<size_t, size_t>> chunks(const std::vector<int64_t>& t, int64_t per_chunk, int64_t offset) {
    std::vector<std::pair<size_t, size_t>> out;
    size_t start = 0;
    int64_t chunk = 1;
    for (size_t i = 0; i < t.size(); ++i)
        if (t[i] - offset >= chunk * per_chunk) {
            out.emplace_back(start, i);
            start = i;
            ++chunk;
        }
    out.emplace_back(start, t.size());
    return out;
}

std::vector<int64_t> video_t_index(int64_t grid_t, float second_per_grid, int64_t per_second) {
    // float32 as transformers computes it, then truncated toward zero
    std::vector<int64_t> out;
    for (int64_t i = 0; i < grid_t; ++i)
        out.push_back(static_cast<int64_t>(std::trunc(static_cast<float>(i) * second_per_grid * static_cast<float>(per_second))));
    return out;
}

std::array<std::vector<int64_t>, 3> slice(const std::array<std::vector<int64_t>, 3>& p, size_t a, size_t b) {
    std::array<std::vector<int64_t>, 3> out;
    for (int k = 0; k < 3; ++k) out[k].assign(p[k].begin() + a, p[k].begin() + b);
    return out;
}

}  // namespace

std::vector<int64_t> rope_index(const std::vector<int64_t>& tokens, const RopeConfig& cfg, const RopeInputs& media,
                                int64_t* delta) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    std::vector<int64_t> out(3 * n);
    if (!media.any_vision()) {  // text (and audio): plain positions
        for (int a = 0; a < 3; ++a)
            for (int64_t i = 0; i < n; ++i) out[a * n + i] = i;
        *delta = 0;
        return out;
    }
    const bool aiv = media.use_audio_in_video;
    int64_t image_count = 0, video_count = 0, audio_count = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (tokens[i] == cfg.audio_start) ++audio_count;
        if (tokens[i] == cfg.vision_start && i + 1 < n) {
            if (tokens[i + 1] == cfg.image_token) ++image_count;
            if (tokens[i + 1] == (aiv ? cfg.audio_start : cfg.video_token)) ++video_count;
        }
    }
    int64_t remain_image = image_count, remain_video = video_count, remain_audio = audio_count;
    int64_t total = image_count + audio_count + (aiv ? 0 : video_count);
    size_t ci = 0, cv = 0, ca = 0;
    int64_t st = 0, end = n + 1;
    Parts parts;
    auto find = [&](int64_t token, int64_t remain) -> int64_t {
        if (remain > 0) {
            auto it = std::find(tokens.begin() + st, tokens.end(), token);
            if (it != tokens.end()) return it - tokens.begin();
        }
        return end;
    };
    auto need = [](size_t index, size_t count, const char* what) {
        if (index >= count)
            throw HostError(std::string("the prompt has more ") + what + " placeholders than the inputs describe", "",
                            "write the prompt and its media inputs with omni-export tokenize");
    };
    for (int64_t k = 0; k < total; ++k) {
        int64_t ed_image = find(cfg.image_token, remain_image), ed_video = find(cfg.video_token, remain_video),
                ed_audio = find(cfg.audio_token, remain_audio);
        int64_t first = std::min({ed_image, ed_video, ed_audio});
        if (first == ed_audio) {
            need(ca, media.audio_seqlens.size(), "audio");
            int64_t text = first - st - 1;
            if (text) parts.push_back(span(text, next_start(parts)));
            parts.push_back(span(1, next_start(parts)));
            int64_t length = audio_output_length(media.audio_seqlens[ca]);
            parts.push_back(span(length, next_start(parts)));
            parts.push_back(span(1, next_start(parts)));
            st += text + 2 + length;
            ++ca;
            --remain_audio;
        } else if (first == ed_image) {
            need(ci, media.image_grid_thw.size(), "image");
            int64_t text = first - st - 1;
            if (text) parts.push_back(span(text, next_start(parts)));
            parts.push_back(span(1, next_start(parts)));
            auto grid = media.image_grid_thw[ci];
            std::vector<int64_t> t_index;
            for (int64_t t = 0; t < grid[0]; ++t) t_index.push_back(t * cfg.position_id_per_seconds);
            parts.push_back(vision_positions(next_start(parts), grid, cfg.spatial_merge_size, t_index));
            parts.push_back(span(1, next_start(parts)));
            st += text + 2 + grid[0] * grid[1] * grid[2] / (cfg.spatial_merge_size * cfg.spatial_merge_size);
            ++ci;
            --remain_image;
        } else if (!aiv) {
            need(cv, media.video_grid_thw.size(), "video");
            int64_t text = first - st - 1;
            if (text) parts.push_back(span(text, next_start(parts)));
            parts.push_back(span(1, next_start(parts)));
            auto grid = media.video_grid_thw[cv];
            auto t_index = video_t_index(grid[0], media.second_per_grids.at(cv), cfg.position_id_per_seconds);
            parts.push_back(vision_positions(next_start(parts), grid, cfg.spatial_merge_size, t_index));
            parts.push_back(span(1, next_start(parts)));
            st += text + 2 + grid[0] * grid[1] * grid[2] / (cfg.spatial_merge_size * cfg.spatial_merge_size);
            ++cv;
            --remain_video;
        } else {  // video with its audio track, interleaved in chunks of seconds_per_chunk
            need(cv, media.video_grid_thw.size(), "video");
            need(ca, media.audio_seqlens.size(), "audio");
            int64_t text = first - st - 2;
            if (text) parts.push_back(span(text, next_start(parts)));
            int64_t start = next_start(parts);
            parts.push_back(span(1, start));
            parts.push_back(span(1, start));
            start = next_start(parts);
            int64_t length = audio_output_length(media.audio_seqlens[ca]);
            auto audio_pos = span(length, start);
            auto grid = media.video_grid_thw[cv];
            auto t_index = video_t_index(grid[0], media.second_per_grids.at(cv), cfg.position_id_per_seconds);
            auto video_pos = vision_positions(start, grid, cfg.spatial_merge_size, t_index);
            int64_t per_chunk = cfg.position_id_per_seconds * cfg.seconds_per_chunk;
            auto vc = chunks(video_pos[0], per_chunk, start), ac = chunks(audio_pos[0], per_chunk, start);
            for (size_t j = 0; j < std::max(vc.size(), ac.size()); ++j) {
                if (j < vc.size()) parts.push_back(slice(video_pos, vc[j].first, vc[j].second));
                if (j < ac.size()) parts.push_back(slice(audio_pos, ac[j].first, ac[j].second));
            }
            start = next_start(parts);
            parts.push_back(span(1, start));
            parts.push_back(span(1, start));
            st += text + 4 + length + grid[0] * grid[1] * grid[2] / (cfg.spatial_merge_size * cfg.spatial_merge_size);
            ++ca;
            ++cv;
            --remain_video;
            --remain_audio;
        }
    }
    if (st < n) parts.push_back(span(n - st, next_start(parts)));
    int64_t filled = 0, top = INT64_MIN;
    for (auto& p : parts) {
        int64_t len = static_cast<int64_t>(p[0].size());
        if (filled + len > n)
            throw HostError("the media inputs describe more tokens than the prompt holds", "",
                            "write the prompt and its media inputs with omni-export tokenize");
        for (int a = 0; a < 3; ++a)
            for (int64_t i = 0; i < len; ++i) {
                out[a * n + filled + i] = p[a][i];
                top = std::max(top, p[a][i]);
            }
        filled += len;
    }
    if (filled != n)
        throw HostError("the media inputs do not match the prompt's placeholders", "",
                        "write the prompt and its media inputs with omni-export tokenize");
    *delta = top + 1 - n;
    return out;
}

}  // namespace omni
