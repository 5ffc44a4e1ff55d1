// OmniHost.exe: the C# host for Debian's mono (`mono OmniHost.exe BUNDLE ...`), the same flags and
// JSON as the C++ omni-host (docs/hosts.md). Bad input: one message on stderr, exit code 2.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Globalization;
using System.IO;
using System.Linq;

namespace OmniHost
{
    class Options
    {
        public string Bundle, PromptIds, Inputs, Wav, Speaker, Solver, Noise, Device = "auto";
        public long? MaxNewTokens, TalkerMaxNewTokens, Seed, TopK;
        public double? Temperature, TopP, RepetitionPenalty, MaxSpeechSeconds;
        public bool Greedy, Sample, StreamAudio, Json;
        public int Threads;
    }

    static class Program
    {
        const string Usage =
            "usage: mono OmniHost.exe BUNDLE (--prompt-ids 1,2,3 | --inputs FILE) [--max-new-tokens N] [--greedy | --sample]\n" +
            "                 [--seed S] [--temperature T] [--top-k K] [--top-p P] [--repetition-penalty R]\n" +
            "                 [--device auto|cpu] [--threads N] [--json]\n" +
            "                 [--wav OUT [--speaker NAME] [--stream-audio] [--solver rk4|euler] [--noise F.npy]\n" +
            "                            [--talker-max-new-tokens N] [--max-speech-seconds S]]\n";

        static HostError UsageError(string problem) { return new HostError(problem, "", "see `mono OmniHost.exe --help`"); }

        static long ParseLong(string flag, string text)
        {
            long v;
            if (!long.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out v))
                throw UsageError(flag + ": invalid integer '" + text + "'");
            return v;
        }

        static double ParseDouble(string flag, string text)
        {
            double v;
            if (!double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out v) || double.IsInfinity(v) || double.IsNaN(v))
                throw UsageError(flag + ": invalid number '" + text + "'");
            return v;
        }

        static Options Parse(string[] args)
        {
            var o = new Options();
            for (int i = 0; i < args.Length; ++i)
            {
                string a = args[i];
                Func<string> value = () => { if (i + 1 >= args.Length) throw UsageError(a + " needs a value"); return args[++i]; };
                switch (a)
                {
                    case "-h": case "--help": Console.Write(Usage); Environment.Exit(0); break;
                    case "--prompt-ids": o.PromptIds = value(); break;
                    case "--inputs": o.Inputs = value(); break;
                    case "--max-new-tokens": o.MaxNewTokens = ParseLong(a, value()); break;
                    case "--talker-max-new-tokens": o.TalkerMaxNewTokens = ParseLong(a, value()); break;
                    case "--seed": o.Seed = ParseLong(a, value()); break;
                    case "--top-k": o.TopK = ParseLong(a, value()); break;
                    case "--temperature": o.Temperature = ParseDouble(a, value()); break;
                    case "--top-p": o.TopP = ParseDouble(a, value()); break;
                    case "--repetition-penalty": o.RepetitionPenalty = ParseDouble(a, value()); break;
                    case "--max-speech-seconds": o.MaxSpeechSeconds = ParseDouble(a, value()); break;
                    case "--wav": o.Wav = value(); break;
                    case "--speaker": o.Speaker = value(); break;
                    case "--solver": o.Solver = value(); break;
                    case "--noise": o.Noise = value(); break;
                    case "--device": o.Device = value(); break;
                    case "--threads": o.Threads = (int)ParseLong(a, value()); break;
                    case "--greedy": o.Greedy = true; break;
                    case "--sample": o.Sample = true; break;
                    case "--stream-audio": o.StreamAudio = true; break;
                    case "--json": o.Json = true; break;
                    default:
                        if (a.StartsWith("-")) throw UsageError("unknown option " + a);
                        if (o.Bundle == null) o.Bundle = a;
                        else throw UsageError("unexpected argument '" + a + "'");
                        break;
                }
            }
            if (o.Bundle == null) throw UsageError("the BUNDLE directory is missing");
            if ((o.PromptIds == null) == (o.Inputs == null))
                throw UsageError("pass exactly one of --prompt-ids IDS and --inputs FILE (written by omni-export tokenize)");
            if (o.Greedy && o.Sample) throw UsageError("--greedy and --sample conflict");
            bool implied = o.Temperature.HasValue || o.TopK.HasValue || o.TopP.HasValue || o.Seed.HasValue;
            if (o.Greedy && implied) throw UsageError("--greedy conflicts with --seed, --temperature, --top-k, --top-p (sampling options)");
            if (o.MaxNewTokens.HasValue && o.MaxNewTokens < 1)
                throw new HostError("--max-new-tokens must be an integer >= 1, got " + o.MaxNewTokens, "", "ask for at least 1 new token");
            if (o.TalkerMaxNewTokens.HasValue && o.TalkerMaxNewTokens < 1) throw UsageError("--talker-max-new-tokens must be >= 1");
            if (o.Seed.HasValue && o.Seed < 0) throw UsageError("--seed must be >= 0");
            if (o.Device != "auto" && o.Device != "cpu")
                throw new HostError("--device " + o.Device + " is not supported by the C# host", "", "use --device cpu (or the C++ host for CUDA)");
            if (o.MaxSpeechSeconds.HasValue && o.MaxSpeechSeconds <= 0) throw UsageError("--max-speech-seconds must be > 0");
            if (o.Wav == null)
            {
                var needWav = new[] { Tuple.Create("--speaker", o.Speaker != null), Tuple.Create("--stream-audio", o.StreamAudio),
                                      Tuple.Create("--solver", o.Solver != null), Tuple.Create("--noise", o.Noise != null),
                                      Tuple.Create("--talker-max-new-tokens", o.TalkerMaxNewTokens.HasValue),
                                      Tuple.Create("--max-speech-seconds", o.MaxSpeechSeconds.HasValue) };
                foreach (var flag in needWav)
                    if (flag.Item2) throw new HostError(flag.Item1 + " needs --wav", "", "add --wav OUT.wav to hear the answer, or drop " + flag.Item1);
            }
            else
            {
                string dir = Path.GetDirectoryName(Path.GetFullPath(o.Wav));
                if (Directory.Exists(o.Wav)) throw new HostError("is a directory", o.Wav, "pass a file name for --wav, e.g. --wav answer.wav");
                if (!Directory.Exists(dir))
                    throw new HostError("directory does not exist, so --wav cannot write into it", dir,
                                        "create the directory first (mkdir -p), or choose another --wav path");
            }
            return o;
        }

        static List<long> ParseIds(string text)
        {
            var ids = new List<long>();
            foreach (var piece in text.Split(','))
            {
                if (piece.Length == 0) throw UsageError("--prompt-ids: empty id in '" + text.Substring(0, Math.Min(40, text.Length)) + "'");
                ids.Add(ParseLong("--prompt-ids", piece));
            }
            return ids;
        }

        static Tensor NpyTensor(NpyArray a)
        {
            return a.Dtype == "float32" ? Tensor.Floats(a.Shape, a.Floats()) : Tensor.Longs(a.Shape, a.Longs());
        }

        // --inputs (omni-export tokenize): encoder rows merged at the placeholders, TMRoPE positions
        static Prompt MediaPrompt(Bundle b, SessionPool pool, JObject inputs, string baseDir, string file, List<long> ids)
        {
            var prompt = new Prompt { Ids = ids };
            var encoders = inputs.ContainsKey("encoders") ? inputs["encoders"] as JObject : null;
            if (encoders == null || encoders.Count == 0) return prompt;
            var rope = inputs.ContainsKey("rope") ? (JObject)inputs["rope"] : new JObject();
            var media = new RopeInputs();
            Func<string, List<object>> list = key => rope.ContainsKey(key) ? (List<object>)rope[key] : new List<object>();
            foreach (var g in list("image_grid_thw")) media.ImageGrids.Add(((List<object>)g).Select(x => (long)x).ToArray());
            foreach (var g in list("video_grid_thw")) media.VideoGrids.Add(((List<object>)g).Select(x => (long)x).ToArray());
            foreach (var v in list("audio_seqlens")) media.AudioSeqlens.Add((long)v);
            foreach (var v in list("second_per_grids")) media.SecondPerGrids.Add((float)Bundle.Num(v));
            media.UseAudioInVideo = rope.ContainsKey("use_audio_in_video") && true.Equals(rope["use_audio_in_video"]);
            var rows = new Dictionary<string, float[]> { { "audio", new float[0] }, { "image", new float[0] }, { "video", new float[0] } };
            long width = (long)b.Config("thinker")["hidden_size"];
            var th = b.Config("thinker");
            long merge = th.ContainsKey("spatial_merge_size") ? (long)th["spatial_merge_size"] : 2;
            foreach (var enc in new[] { new[] { "audio_encoder", "audio_embeds" }, new[] { "vision_encoder", "vision_embeds" } })
            {
                if (!encoders.ContainsKey(enc[0])) continue;
                var feeds = new Dictionary<string, Tensor>();
                var names = (JObject)encoders[enc[0]];
                foreach (var key in names.Order)
                {
                    string name = (string)names[key];
                    if (name.Length == 0 || name.StartsWith("/") || name.Contains(".."))
                        throw new HostError("unsafe input file name '" + name + "'", file, "rewrite it with omni-export tokenize");
                    feeds[key] = NpyTensor(NpyArray.Read(Path.Combine(baseDir, name)));
                }
                var o = SessionPool.Run(pool.Get(enc[0]), feeds, new[] { enc[1] })[0].F;
                pool.Done(enc[0]);
                if (enc[0] == "audio_encoder") rows["audio"] = o;
                else
                {
                    long imageRows = 0;
                    foreach (var g in media.ImageGrids) imageRows += g[0] * g[1] * g[2] / (merge * merge);
                    long split = Math.Min(imageRows * width, o.Length);
                    rows["image"] = o.Take((int)split).ToArray();
                    rows["video"] = o.Skip((int)split).ToArray();
                }
            }
            var embeds = Stages.Embed(b, pool, "thinker_embedding", ids);
            long W = embeds.Length / ids.Count;
            foreach (var kind in new[] { "audio", "image", "video" })
            {
                long token = b.Special(kind);
                var r = rows[kind];
                long count = ids.Count(id => id == token);
                if (count * W != r.Length)
                    throw new HostError(count + " <|" + kind + "|> placeholder(s) in the prompt but the encoder produced " + (r.Length / W) +
                                        " row(s)", file, "write the prompt and its media inputs together with omni-export tokenize");
                long k = 0;
                for (int i = 0; i < ids.Count; ++i)
                    if (ids[i] == token) { Array.Copy(r, k * W, embeds, i * W, W); k++; }
            }
            prompt.Embeds = embeds;
            long delta;
            prompt.Positions = Rope.Index(ids, b, media, out delta);
            prompt.RopeDelta = delta;
            return prompt;
        }

        static int Run(Options o)
        {
            var bundle = Bundle.Open(o.Bundle);
            var thinker = bundle.Config("thinker");
            long vocab = bundle.Int(thinker, "vocab_size", "config.thinker");
            long context = bundle.Int(thinker, "max_position_embeddings", "config.thinker");
            JObject inputs = null;
            List<long> ids;
            if (o.Inputs != null)
            {
                string text;
                try { text = File.ReadAllText(o.Inputs); }
                catch (Exception) { throw new HostError("cannot read the inputs file (missing?)", o.Inputs, "write it with omni-export tokenize BUNDLE --prompt TEXT --out DIR"); }
                try { inputs = Json.Parse(text) as JObject; }
                catch (JsonError e) { throw new HostError("invalid JSON: " + e.Message, o.Inputs, "write it with omni-export tokenize"); }
                if (inputs == null || !inputs.ContainsKey("prompt_ids") || !(inputs["prompt_ids"] is List<object>))
                    throw new HostError("no prompt_ids list", o.Inputs, "write it with omni-export tokenize");
                ids = new List<long>();
                foreach (var id in (List<object>)inputs["prompt_ids"])
                {
                    if (!(id is long)) throw new HostError("prompt_ids holds a non-integer", o.Inputs, "write it with omni-export tokenize");
                    ids.Add((long)id);
                }
            }
            else ids = ParseIds(o.PromptIds);
            if (ids.Count == 0) throw new HostError("the prompt has no token ids", "", "pass at least one id");
            foreach (long id in ids)
                if (id < 0 || id >= vocab)
                    throw new HostError("prompt id " + id + " is outside the vocabulary 0.." + (vocab - 1), "", "pass ids made by omni-export tokenize for this bundle");
            long P = ids.Count, room = context - P;
            if (room < 1)
                throw new HostError("the prompt is " + P + " tokens but the model's context holds " + context +
                                    " positions: no room is left for an answer", "", "shorten the prompt to fit in " + (context - 1) + " tokens");
            long limit;
            string limitReason = "length";
            var generation = (JObject)bundle.Data["generation"];
            if (o.MaxNewTokens.HasValue)
            {
                if (o.MaxNewTokens > room)
                    throw new HostError("--max-new-tokens " + o.MaxNewTokens + " does not fit: the prompt takes " + P + " of the model's " + context +
                                        " context positions, so at most " + room + " new tokens are possible", "",
                                        "ask for at most " + room + " new tokens, or shorten the prompt");
                limit = o.MaxNewTokens.Value;
            }
            else
            {
                limit = generation.ContainsKey("max_new_tokens") ? (long)generation["max_new_tokens"] : 512;
                if (limit > room) { limit = room; limitReason = "context"; }
            }
            var sampling = new Sampling
            {
                DoSample = generation.ContainsKey("do_sample") && true.Equals(generation["do_sample"]),
                Temperature = generation.ContainsKey("temperature") ? (float)Bundle.Num(generation["temperature"]) : 1f,
                TopK = generation.ContainsKey("top_k") ? (long)generation["top_k"] : 0,
                TopP = generation.ContainsKey("top_p") ? (float)Bundle.Num(generation["top_p"]) : 1f,
                RepetitionPenalty = generation.ContainsKey("repetition_penalty") ? (float)Bundle.Num(generation["repetition_penalty"]) : 1f,
            };
            if (o.Temperature.HasValue) sampling.Temperature = (float)o.Temperature.Value;
            if (o.TopK.HasValue) sampling.TopK = o.TopK.Value;
            if (o.TopP.HasValue) sampling.TopP = (float)o.TopP.Value;
            if (o.RepetitionPenalty.HasValue) sampling.RepetitionPenalty = (float)o.RepetitionPenalty.Value;
            if (o.Greedy) sampling.DoSample = false;
            else if (o.Sample || o.Temperature.HasValue || o.TopK.HasValue || o.TopP.HasValue || o.Seed.HasValue) sampling.DoSample = true;
            if (sampling.DoSample && !(sampling.Temperature > 0)) throw new HostError("--temperature must be > 0 when sampling", "", "use --temperature > 0, or --greedy");
            if (!(sampling.TopP > 0 && sampling.TopP <= 1)) throw UsageError("--top-p must be in (0, 1]");
            if (sampling.TopK < 0) throw UsageError("--top-k must be >= 0 (0 = off)");
            if (!(sampling.RepetitionPenalty > 0)) throw UsageError("--repetition-penalty must be > 0");
            ulong seed = o.Seed.HasValue ? (ulong)o.Seed.Value : 0;
            bool speech = o.Wav != null;
            Sampling talkerSampling = null;
            long maxCodes = 0;
            string speechLimit = "length";
            Speaker speaker = null;
            if (speech)
            {
                if (!bundle.HasSpeech())
                    throw new HostError("this bundle has no speech output (no talker or token2wav graphs), so --wav cannot be written",
                                        bundle.ManifestPath, "leave out --wav for a text answer, or rebuild the bundle with a talker");
                var t = (JObject)bundle.Config("talker")["sampling"];
                talkerSampling = new Sampling
                {
                    DoSample = true.Equals(t["do_sample"]), Temperature = (float)Bundle.Num(t["temperature"]), TopK = (long)t["top_k"],
                    TopP = (float)Bundle.Num(t["top_p"]), RepetitionPenalty = (float)Bundle.Num(t["repetition_penalty"]),
                };
                if (o.Greedy) talkerSampling.DoSample = false;
                maxCodes = o.TalkerMaxNewTokens ?? (long)t["max_new_tokens"];
                var t2w = bundle.Config("token2wav");
                if (o.MaxSpeechSeconds.HasValue)
                {
                    double perSecond = Bundle.Num(t2w["sample_rate"]) / (Bundle.Num(t2w["mel_per_code"]) * Bundle.Num(t2w["hop_length"]));
                    long secondsCodes = Math.Max(1, (long)(o.MaxSpeechSeconds.Value * perSecond));
                    if (secondsCodes < maxCodes) { maxCodes = secondsCodes; speechLimit = "seconds"; }
                }
                if (!o.StreamAudio && maxCodes * (long)t2w["mel_per_code"] > (long)t2w["max_mel_frames"])
                    throw new HostError(maxCodes + " talker codes can make more mel frames than token2wav solves at once", "",
                                        "stream the audio (--stream-audio), or ask for fewer codes (--talker-max-new-tokens)");
                speaker = Speaker.Load(bundle, o.Speaker ?? (string)t2w["default_speaker"]);
            }
            string noiseFile = o.Noise;
            if (noiseFile == null && inputs != null && inputs.ContainsKey("noise") && speech)
                noiseFile = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(o.Inputs)), (string)inputs["noise"]);

            Ort.Init();
            IntPtr env;
            Ort.Check(Ort.CreateEnv(3 /* ORT_LOGGING_LEVEL_ERROR */, "omni-host-cs", out env));
            var pool = new SessionPool(bundle, env, o.Threads);
            var started = Stopwatch.StartNew();
            var prompt = inputs != null ? MediaPrompt(bundle, pool, inputs, Path.GetDirectoryName(Path.GetFullPath(o.Inputs)), o.Inputs, ids)
                                        : new Prompt { Ids = ids };
            pool.Get("thinker_embedding");  // loaded before the clock starts
            pool.Get("thinker_decoder");
            var gen = Stages.Thinker(bundle, pool, prompt, limit, limitReason, sampling, seed, speech);
            float[] textRows = speech ? Stages.TalkerTextRows(bundle, pool, speaker.BosToken) : null;
            pool.Done("thinker_embedding");
            pool.Done("thinker_decoder");
            var result = new JObject();
            Json.Set(result, "prompt_ids", ids);
            Json.Set(result, "token_ids", gen.TokenIds);
            Json.Set(result, "finish_reason", gen.FinishReason);
            Json.Set(result, "codes", null);
            Json.Set(result, "prefill_seconds", gen.PrefillSeconds);
            Json.Set(result, "decode_seconds", gen.DecodeSeconds);  // the tokens after the first
            if (speech)
            {
                var codes = Stages.Talker(bundle, pool, gen.States, textRows, talkerSampling, seed, maxCodes);
                pool.Done("talker_embedding");
                pool.Done("talker_decoder");
                var t2w = bundle.Config("token2wav");
                var noise = new Noise((long)t2w["mel_dim"], noiseFile, seed);
                double firstAudio = -1;
                var audio = Token2Wav.Run(bundle, pool, codes, speaker, noise, o.StreamAudio, o.Solver,
                                          (pcm, last) => { if (firstAudio < 0) firstAudio = started.Elapsed.TotalSeconds; });
                int rate = (int)(long)t2w["sample_rate"];
                Wav.Write(o.Wav, audio, rate);
                Json.Set(result, "codes", codes);
                Json.Set(result, "speaker", speaker.Name);
                Json.Set(result, "sample_rate", (long)rate);
                Json.Set(result, "audio_seconds", (double)audio.Length / rate);
                Json.Set(result, "first_audio_seconds", firstAudio);
                Json.Set(result, "speech_finish_reason", codes.Count >= maxCodes ? speechLimit : "eos");
                Json.Set(result, "wav", o.Wav);
            }
            if (o.Json) Console.WriteLine(Json.Write(result));
            else
            {
                Console.WriteLine("token_ids: " + Json.Write(gen.TokenIds) + " (" + gen.FinishReason + "; text: omni-export detokenize BUNDLE IDS)");
                if (speech) Console.Error.WriteLine("wrote " + o.Wav);
            }
            return 0;
        }

        static int Main(string[] args)
        {
            try
            {
                return Run(Parse(args));
            }
            catch (HostError e)
            {
                Console.Error.WriteLine("error: " + e.Text());
                return 2;
            }
            catch (OrtException e)
            {
                Console.Error.WriteLine("error: onnxruntime: " + e.Message);
                return 1;
            }
            catch (Exception e)
            {
                Console.Error.WriteLine("error: " + e);
                return 1;
            }
        }
    }
}
