// token2wav: codes -> mel (DiT velocity graph + ODE) -> waveform (BigVGAN), whole or in the
// official streaming chunks (omni_runtime.stages.token2wav; the C++ host's token2wav.cpp).
using System;
using System.Collections.Generic;
using System.Linq;

namespace OmniHost
{
    class Speaker
    {
        public string Name;
        public long BosToken;
        public float[] SpeakerEmbedding, ReferenceEmbedding, NullReferenceEmbedding;

        public static Speaker Load(Bundle b, string name)
        {
            var t2w = b.Config("token2wav");
            var speakers = (JObject)t2w["speakers"];
            if (!speakers.ContainsKey(name))
                throw new HostError("unknown speaker '" + name + "'", "", "choose one of: " + string.Join(", ", speakers.Order));
            var entry = (JObject)speakers[name];
            var s = new Speaker { Name = name, BosToken = (long)entry["bos_token"] };
            long encEmb = (long)t2w["enc_emb_dim"], enc = (long)t2w["enc_dim"];
            s.SpeakerEmbedding = Read(b, (string)entry["speaker_embedding"], encEmb);
            s.ReferenceEmbedding = Read(b, (string)entry["reference_embedding"], enc);
            s.NullReferenceEmbedding = Read(b, (string)entry["null_reference_embedding"], enc);
            return s;
        }

        static float[] Read(Bundle b, string rel, long size)
        {
            b.Verify(rel);
            var a = NpyArray.Read(b.PathOf(rel));
            if (a.Dtype != "float32" || a.Shape.Length != 1 || a.Shape[0] != size)
                throw new HostError("expected float32 [" + size + "]", b.PathOf(rel), Bundle.RebuildFix);
            return a.Floats();
        }
    }

    // token2wav's initial noise rows: from a .npy [rows, mel_dim], or drawn in row order as
    // numpy.random.default_rng(seed).standard_normal(dtype=float32) draws them (the Python runtime's).
    class Noise
    {
        readonly long mel;
        readonly List<float> rows = new List<float>();
        readonly bool fromFile;
        readonly Pcg64 rng;

        public Noise(long melDim, string file, ulong seed)
        {
            mel = melDim;
            rng = new Pcg64(seed);
            fromFile = !string.IsNullOrEmpty(file);
            if (fromFile)
            {
                var a = NpyArray.Read(file);
                var shape = a.Shape.Length == 3 && a.Shape[0] == 1 ? a.Shape.Skip(1).ToArray() : a.Shape;
                if (a.Dtype != "float32" || shape.Length != 2 || shape[1] != melDim)
                    throw new HostError("noise must be float32 [frames, " + melDim + "]", file,
                                        "write it with omni-export tokenize --noise-seed S (or numpy.save)");
                rows.AddRange(a.Floats());
            }
        }

        public float[] Rows(long start, long stop)
        {
            long have = rows.Count / mel;
            if (stop > have)
            {
                if (fromFile)
                    throw new HostError("the noise file has " + have + " rows, " + stop + " are needed", "",
                                        "write more rows (--noise-frames), or ask for fewer codes");
                while (rows.Count < stop * mel) rows.Add(rng.StandardNormal());  // numpy's, in row order
                rows.RemoveRange((int)(stop * mel), rows.Count - (int)(stop * mel));
            }
            return rows.GetRange((int)(start * mel), (int)((stop - start) * mel)).ToArray();
        }
    }

    static class Token2Wav
    {
        class Ode
        {
            public string Solver;
            public long Steps;
            public float Guidance, Sway;
            public bool SwayGiven;
        }

        static float[] TimeGrid(Ode ode)
        {
            var t = new float[ode.Steps];
            for (long i = 0; i < ode.Steps; ++i) t[i] = (float)((double)i / Math.Max(ode.Steps - 1, 1));
            if (ode.SwayGiven)
            {
                float halfPi = (float)(Math.PI / 2);
                for (long i = 0; i < ode.Steps; ++i)
                {
                    float v = t[i];
                    float c = (float)Math.Cos((float)(halfPi * v));
                    t[i] = (float)(v + (float)(ode.Sway * (float)((float)(c - 1f) + v)));
                }
            }
            return t;
        }

        static float[] SolveMel(Session dit, List<long> codes, float[] y, Speaker spk, Ode ode, long melDim)
        {
            long n = codes.Count, frames = y.Length / melDim, size = frames * melDim;
            bool cfg = !(ode.Guidance < 1e-5f);
            int rows = cfg ? 2 : 1;
            var codeRows = new List<long>(codes);
            var spkRows = new List<float>(spk.SpeakerEmbedding);
            var refRows = new List<float>(spk.ReferenceEmbedding);
            if (cfg)
            {
                codeRows.AddRange(Enumerable.Repeat(0L, codes.Count));
                spkRows.AddRange(new float[spk.SpeakerEmbedding.Length]);
                refRows.AddRange(spk.NullReferenceEmbedding);
            }
            Func<float, float[], float[]> f = (t, x) => {
                var xs = new float[rows * size];
                for (int r = 0; r < rows; ++r) Array.Copy(x, 0, xs, r * size, size);
                var feeds = new Dictionary<string, Tensor> {
                    { "x", Tensor.Floats(new long[] { rows, frames, melDim }, xs) },
                    { "codes", Tensor.Longs(new long[] { rows, n }, codeRows.ToArray()) },
                    { "time", Tensor.Floats(new long[] { rows }, Enumerable.Repeat(t, rows).ToArray()) },
                    { "speaker_embedding", Tensor.Floats(new long[] { rows, spk.SpeakerEmbedding.Length }, spkRows.ToArray()) },
                    { "reference_embedding", Tensor.Floats(new long[] { rows, spk.ReferenceEmbedding.Length }, refRows.ToArray()) },
                };
                var o = SessionPool.Run(dit, feeds, new[] { "velocity" })[0].F;
                if (rows == 1) return o;
                var v = new float[size];
                for (long i = 0; i < size; ++i)
                {
                    float cond = o[i], uncond = o[size + i];
                    v[i] = (float)(cond + (float)((float)(cond - uncond) * ode.Guidance));
                }
                return v;
            };
            var grid = TimeGrid(ode);
            float third = (float)(1.0 / 3), twoThirds = (float)(2.0 / 3);
            var tmp = new float[size];
            for (int s = 0; s + 1 < grid.Length; ++s)
            {
                float t0 = grid[s], t1 = grid[s + 1], dt = (float)(t1 - t0);
                if (ode.Solver == "euler")
                {
                    var v = f(t0, y);
                    for (long i = 0; i < size; ++i) y[i] = (float)(y[i] + (float)(v[i] * dt));
                    continue;
                }
                var k1 = f(t0, y);
                for (long i = 0; i < size; ++i) tmp[i] = (float)(y[i] + (float)((float)(dt * k1[i]) * third));
                var k2 = f((float)(t0 + (float)(dt * third)), tmp);
                for (long i = 0; i < size; ++i) tmp[i] = (float)(y[i] + (float)(dt * (float)(k2[i] - (float)(k1[i] * third))));
                var k3 = f((float)(t0 + (float)(dt * twoThirds)), tmp);
                for (long i = 0; i < size; ++i) tmp[i] = (float)(y[i] + (float)(dt * (float)((float)(k1[i] - k2[i]) + k3[i])));
                var k4 = f(t1, tmp);
                for (long i = 0; i < size; ++i)
                {
                    float sum = (float)((float)(k1[i] + (float)(3f * (float)(k2[i] + k3[i]))) + k4[i]);
                    y[i] = (float)(y[i] + (float)((float)(sum * dt) / 8f));
                }
            }
            var mel = new float[size];
            for (long fr = 0; fr < frames; ++fr) for (long m = 0; m < melDim; ++m) mel[m * frames + fr] = y[fr * melDim + m];
            return mel;
        }

        static float[] Vocode(Session vocoder, float[] mel, long melDim)
        {
            long frames = mel.Length / melDim;
            return SessionPool.Run(vocoder, new Dictionary<string, Tensor> {
                { "mel", Tensor.Floats(new long[] { 1, melDim, frames }, mel) } }, new[] { "waveform" })[0].F;
        }

        static float[] Columns(float[] m, long rows, long a, long b)
        {
            long cols = m.Length / rows;
            var o = new float[rows * (b - a)];
            for (long r = 0; r < rows; ++r) Array.Copy(m, r * cols + a, o, r * (b - a), b - a);
            return o;
        }

        static float[] HCat(float[] a, float[] b, long rows)
        {
            long ca = a.Length / rows, cb = b.Length / rows;
            var o = new float[a.Length + b.Length];
            for (long r = 0; r < rows; ++r)
            {
                Array.Copy(a, r * ca, o, r * (ca + cb), ca);
                Array.Copy(b, r * cb, o, r * (ca + cb) + ca, cb);
            }
            return o;
        }

        static float[] Range(float[] w, long a, long b) { var o = new float[b - a]; Array.Copy(w, a, o, 0, b - a); return o; }

        public static float[] Run(Bundle bundle, SessionPool pool, List<long> codes, Speaker spk, Noise noise, bool stream,
                                  string solver, Action<float[], bool> onChunk)
        {
            var cfg = bundle.Config("token2wav");
            long melDim = (long)cfg["mel_dim"], r = (long)cfg["mel_per_code"], hop = (long)cfg["hop_length"];
            long numEmbeds = (long)cfg["num_embeds"], maxFrames = (long)cfg["max_mel_frames"];
            foreach (long c in codes)
                if (c < 0 || c > numEmbeds)
                    throw new HostError("the talker produced code " + c + ", outside token2wav's codebook 0.." + numEmbeds +
                                        ": this bundle's talker and token2wav weights do not belong together (a random test model?)",
                                        bundle.ManifestPath, "build the bundle from a checkpoint whose talker speaks token2wav's codes, "
                                        + "or ask for text only");
            var odeCfg = (JObject)cfg["ode"];
            var ode = new Ode
            {
                Solver = string.IsNullOrEmpty(solver) ? (string)odeCfg[stream ? "stream_solver" : "solver"] : solver,
                Steps = (long)odeCfg["steps"],
                Guidance = (float)Bundle.Num(odeCfg["guidance_scale"]),
                SwayGiven = odeCfg["sway_coefficient"] != null,
            };
            ode.Sway = ode.SwayGiven ? (float)Bundle.Num(odeCfg["sway_coefficient"]) : 0f;
            if (ode.Solver != "rk4" && ode.Solver != "euler") throw new HostError("unknown solver '" + ode.Solver + "'", "", "use one of: rk4, euler");
            var audio = new List<float>();
            Action<float[], bool> emit = (pcm, last) => { audio.AddRange(pcm); if (onChunk != null) onChunk(pcm, last); };
            if (!stream)
            {
                long frames = codes.Count * r;
                if (frames > maxFrames)
                    throw new HostError(codes.Count + " codes make " + frames + " mel frames, more than the DiT's " + maxFrames, "",
                                        "stream the audio (--stream-audio), or ask the talker for fewer codes");
                var y0 = noise.Rows(0, frames);
                if (frames == 0) { emit(new float[0], true); return audio.ToArray(); }
                var melWhole = SolveMel(pool.Get("token2wav_dit"), codes, y0, spk, ode, melDim);
                pool.Done("token2wav_dit");
                emit(Vocode(pool.Get("token2wav_bigvgan"), melWhole, melDim), true);
                pool.Done("token2wav_bigvgan");
                return audio.ToArray();
            }
            var s = (JObject)cfg["stream"];
            long chunk = (long)s["dit_chunk_codes"], leftCtx = (long)s["dit_left_context_codes"], rightCtx = (long)s["dit_right_context_codes"];
            long vocLeftCtx = (long)s["vocoder_left_context_frames"], vocRight = (long)s["vocoder_right_context_frames"];
            var dit = pool.Get("token2wav_dit");
            var vocoder = pool.Get("token2wav_bigvgan");
            var melBuffer = new float[0];
            long vocLeft = 0;
            Action<float[]> onMel = mel => {
                melBuffer = HCat(melBuffer, mel, melDim);
                long cols = melBuffer.Length / melDim;
                if (cols > vocLeft + vocRight)
                {
                    var wave = Vocode(vocoder, melBuffer, melDim);
                    emit(Range(wave, vocLeft * hop, wave.Length - vocRight * hop), false);
                    vocLeft = vocLeftCtx;
                    melBuffer = Columns(melBuffer, melDim, Math.Max(0, cols - (vocLeft + vocRight)), cols);
                }
            };
            var buffer = new List<long>();
            long left = 0, start = 0, produced = 0;
            foreach (long code in codes)
            {
                buffer.Add(code);
                if (buffer.Count == left + chunk + rightCtx)
                {
                    var mel = SolveMel(dit, buffer, noise.Rows(start, start + buffer.Count * r), spk, ode, melDim);
                    long cols = mel.Length / melDim;
                    mel = Columns(mel, melDim, left * r, cols - rightCtx * r);
                    left = leftCtx;
                    buffer = buffer.GetRange(buffer.Count - (int)(left + rightCtx), (int)(left + rightCtx));
                    produced += mel.Length / melDim;
                    start = produced - leftCtx * r;
                    onMel(mel);
                }
            }
            if (buffer.Count > 0)
            {
                var mel = SolveMel(dit, buffer, noise.Rows(start, start + buffer.Count * r), spk, ode, melDim);
                long cols = mel.Length / melDim;
                onMel(Columns(mel, melDim, left * r, cols));
            }
            if (melBuffer.Length == 0) emit(new float[0], true);
            else
            {
                var wave = Vocode(vocoder, melBuffer, melDim);
                emit(Range(wave, vocLeft * hop, wave.Length), true);
            }
            pool.Done("token2wav_dit");
            pool.Done("token2wav_bigvgan");
            return audio.ToArray();
        }
    }
}
