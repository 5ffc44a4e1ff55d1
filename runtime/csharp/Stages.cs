// Sessions, token choice, the KV decoder loop, the thinker, the talker, TMRoPE and token2wav:
// the C++ host's decode.cpp, rope.cpp and token2wav.cpp (which mirror the Python runtime), in C# 7.
// float32 arithmetic is forced with explicit (float) casts where the order of operations matters.
using System;
using System.Collections.Generic;
using System.Linq;
using System.Runtime.InteropServices;

namespace OmniHost
{
    class Tensor
    {
        public long[] Shape;
        public float[] F;
        public long[] L;
        public static Tensor Floats(long[] shape, float[] values) { return new Tensor { Shape = shape, F = values }; }
        public static Tensor Longs(long[] shape, long[] values) { return new Tensor { Shape = shape, L = values }; }
    }

    sealed class Session : IDisposable
    {
        public IntPtr Handle;
        public GraphSpec Spec;
        public void Dispose() { if (Handle != IntPtr.Zero) Ort.ReleaseSession(Handle); Handle = IntPtr.Zero; }
    }

    // Sessions created on demand and freed when a stage is done (the Python runtime's lazy policy).
    class SessionPool
    {
        public static IntPtr Cpu;
        readonly Bundle bundle;
        readonly IntPtr env;
        readonly int threads;
        readonly Dictionary<string, Session> sessions = new Dictionary<string, Session>();

        public SessionPool(Bundle bundle, IntPtr env, int threads)
        {
            this.bundle = bundle;
            this.env = env;
            this.threads = threads;
            if (Cpu == IntPtr.Zero) Ort.Check(Ort.CreateCpuMemoryInfo(1 /* OrtArenaAllocator */, 0, out Cpu));
        }

        public Session Get(string name)
        {
            Session s;
            if (sessions.TryGetValue(name, out s)) return s;
            var spec = bundle.Graph(name);
            foreach (var rel in spec.Files()) bundle.Verify(rel);
            IntPtr options;
            Ort.Check(Ort.CreateSessionOptions(out options));
            string path = bundle.PathOf(spec.File);
            try
            {
                Ort.Check(Ort.SetIntraOpNumThreads(options, threads));
                Ort.Check(Ort.SetSessionGraphOptimizationLevel(options, 99 /* ORT_ENABLE_ALL */));
                Ort.Check(Ort.SetSessionLogSeverityLevel(options, 3));
                Ort.Check(Ort.DisableCpuMemArena(options));
                if (spec.Quantization != null && spec.Quantization.ContainsKey("accuracy_level") && spec.Quantization["accuracy_level"] is long)
                {
                    long level = (long)spec.Quantization["accuracy_level"];
                    if (level >= 0 && level <= 4)
                        Ort.Check(Ort.AddSessionConfigEntry(options, "session.qdq_matmulnbits_accuracy_level", level.ToString()));
                }
                foreach (var kv in spec.SessionConfig) Ort.Check(Ort.AddSessionConfigEntry(options, kv.Key, kv.Value));
                IntPtr handle;
                try
                {
                    Ort.Check(Ort.CreateSession(env, path, options, out handle));
                }
                catch (OrtException e)
                {
                    throw new HostError("ONNX Runtime cannot load graph '" + name + "': " + e.Message, path,
                                        "rebuild the bundle, or use an ONNX Runtime >= 1.20");
                }
                s = new Session { Handle = handle, Spec = spec };
            }
            finally
            {
                Ort.ReleaseSessionOptions(options);
            }
            CheckIo(s, path);
            sessions[name] = s;
            return s;
        }

        static void CheckIo(Session s, string path)
        {
            IntPtr allocator;
            Ort.Check(Ort.GetAllocatorWithDefaultOptions(out allocator));
            var problems = new List<string>();
            for (int io = 0; io < 2; ++io)
            {
                UIntPtr count;
                Ort.Check(io == 0 ? Ort.SessionGetInputCount(s.Handle, out count) : Ort.SessionGetOutputCount(s.Handle, out count));
                var actual = new HashSet<string>();
                for (ulong i = 0; i < count.ToUInt64(); ++i)
                {
                    IntPtr name;
                    Ort.Check(io == 0 ? Ort.SessionGetInputName(s.Handle, new UIntPtr(i), allocator, out name)
                                      : Ort.SessionGetOutputName(s.Handle, new UIntPtr(i), allocator, out name));
                    actual.Add(Marshal.PtrToStringAnsi(name));
                    Ort.AllocatorFree(allocator, name);
                }
                var wanted = new HashSet<string>((io == 0 ? s.Spec.Inputs : s.Spec.Outputs).Select(t => t.Name));
                string kind = io == 0 ? "input" : "output";
                foreach (var n in wanted) if (!actual.Contains(n)) problems.Add("the manifest's " + kind + " '" + n + "' is missing");
                foreach (var n in actual) if (!wanted.Contains(n)) problems.Add("unexpected " + kind + " '" + n + "'");
            }
            if (problems.Count > 0)
            {
                s.Dispose();
                throw new HostError("graph '" + s.Spec.Name + "' does not match the manifest: " + string.Join("; ", problems), path,
                                    "rebuild the bundle (the graph file and manifest.json come from different builds?)");
            }
        }

        public void Done(string name)
        {
            Session s;
            if (sessions.TryGetValue(name, out s)) { s.Dispose(); sessions.Remove(name); }
        }

        // Run a graph on named inputs; the named outputs as float arrays (with their shapes).
        public static List<Tensor> Run(Session s, Dictionary<string, Tensor> feeds, string[] outputs)
        {
            var pinned = new List<PinnedTensor>();
            var names = new List<IntPtr>();
            try
            {
                var inNames = new List<IntPtr>();
                var inValues = new List<IntPtr>();
                foreach (var kv in feeds)
                {
                    var t = kv.Value;
                    var spec = s.Spec.Input(kv.Key);
                    PinnedTensor p;
                    if (t.L != null) p = new PinnedTensor(Cpu, t.L, 8L * t.L.Length, t.Shape, ElementType.Int64);
                    else if (spec != null && spec.Dtype == "float16")
                        p = new PinnedTensor(Cpu, t.F.Select(Half.FromFloat).ToArray(), 2L * t.F.Length, t.Shape, ElementType.Float16);
                    else p = new PinnedTensor(Cpu, t.F, 4L * t.F.Length, t.Shape, ElementType.Float);
                    pinned.Add(p);
                    IntPtr n = Ort.Utf8(kv.Key);
                    names.Add(n);
                    inNames.Add(n);
                    inValues.Add(p.Value);
                }
                var outNames = outputs.Select(o => { IntPtr n = Ort.Utf8(o); names.Add(n); return n; }).ToArray();
                var outValues = new IntPtr[outputs.Length];
                Ort.Check(Ort.Run(s.Handle, IntPtr.Zero, inNames.ToArray(), inValues.ToArray(), new UIntPtr((ulong)inValues.Count),
                                  outNames, new UIntPtr((ulong)outNames.Length), outValues));
                var result = new List<Tensor>();
                foreach (var v in outValues)
                {
                    result.Add(Tensor.Floats(OrtValues.Shape(v), OrtValues.Floats(v)));
                    Ort.ReleaseValue(v);
                }
                return result;
            }
            finally
            {
                foreach (var p in pinned) p.Dispose();
                foreach (var n in names) Marshal.FreeHGlobal(n);
            }
        }
    }

    // numpy's SeedSequence + PCG64 (XSL-RR), so rng.random() draws equal numpy.random.default_rng(seed)'s.
    class Pcg64
    {
        ulong stateHi, stateLo, incHi, incLo;
        const ulong MultHi = 0x2360ED051FC65DA4UL, MultLo = 0x4385DF649FCCF645UL;

        static uint HashMix(uint value, ref uint hashConst)
        {
            value ^= hashConst;
            hashConst = unchecked(hashConst * 0x931e8875u);
            value = unchecked(value * hashConst);
            value ^= value >> 16;
            return value;
        }

        static uint Mix(uint x, uint y)
        {
            uint result = unchecked(0xca01f9ddu * x - 0x4973f715u * y);
            result ^= result >> 16;
            return result;
        }

        // 128-bit multiply-add: state = state * mult + inc
        void Step()
        {
            ulong lo = stateLo, hi = stateHi;
            // (hi, lo) * (MultHi, MultLo) mod 2^128
            ulong a0 = lo & 0xffffffffUL, a1 = lo >> 32, b0 = MultLo & 0xffffffffUL, b1 = MultLo >> 32;
            ulong p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
            ulong mid = (p00 >> 32) + (p01 & 0xffffffffUL) + (p10 & 0xffffffffUL);
            ulong resLo = (p00 & 0xffffffffUL) | (mid << 32);
            ulong resHi = unchecked(p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32) + lo * MultHi + hi * MultLo);
            ulong newLo = unchecked(resLo + incLo);
            ulong carry = newLo < resLo ? 1UL : 0UL;
            stateLo = newLo;
            stateHi = unchecked(resHi + incHi + carry);
        }

        public Pcg64(ulong seed)
        {
            var entropy = new List<uint>();
            if (seed == 0) entropy.Add(0);
            while (seed > 0) { entropy.Add((uint)(seed & 0xffffffffUL)); seed >>= 32; }
            var pool = new uint[4];
            uint hashConst = 0x43b0d7e5u;
            for (int i = 0; i < 4; ++i) pool[i] = HashMix(i < entropy.Count ? entropy[i] : 0, ref hashConst);
            for (int src = 0; src < 4; ++src)
                for (int dst = 0; dst < 4; ++dst)
                    if (src != dst) pool[dst] = Mix(pool[dst], HashMix(pool[src], ref hashConst));
            for (int src = 4; src < entropy.Count; ++src)
                for (int dst = 0; dst < 4; ++dst) pool[dst] = Mix(pool[dst], HashMix(entropy[src], ref hashConst));
            var words = new uint[8];
            uint hc = 0x8b51f9ddu;
            for (int i = 0; i < 8; ++i)
            {
                uint v = pool[i % 4];
                v ^= hc;
                hc = unchecked(hc * 0x58f38dedu);
                v = unchecked(v * hc);
                v ^= v >> 16;
                words[i] = v;
            }
            var val = new ulong[4];
            for (int i = 0; i < 4; ++i) val[i] = words[2 * i] | ((ulong)words[2 * i + 1] << 32);
            // inc = (initseq << 1) | 1 with initseq = (val[2], val[3])
            incHi = (val[2] << 1) | (val[3] >> 63);
            incLo = (val[3] << 1) | 1UL;
            stateHi = 0;
            stateLo = 0;
            Step();
            ulong lo = unchecked(stateLo + val[1]);
            stateHi = unchecked(stateHi + val[0] + (lo < stateLo ? 1UL : 0UL));
            stateLo = lo;
            Step();
        }

        public ulong Next64()
        {
            Step();
            ulong x = stateHi ^ stateLo;
            int rot = (int)(stateHi >> 58);
            return (x >> rot) | (x << ((64 - rot) & 63));
        }

        public double NextDouble() { return (Next64() >> 11) * (1.0 / 9007199254740992.0); }

        bool has32;
        uint next32;

        // numpy's buffered halves: the low 32 bits of a draw, then its high 32
        public uint Next32()
        {
            if (has32) { has32 = false; return next32; }
            ulong v = Next64();
            has32 = true;
            next32 = (uint)(v >> 32);
            return (uint)(v & 0xffffffffUL);
        }

        public float NextFloat() { return (float)((float)(Next32() >> 8) * (1.0f / 16777216.0f)); }

        [DllImport("libm.so.6")] static extern float log1pf(float x);

        // The 256-level float ziggurat tables (Marsaglia & Tsang's construction, as numpy's
        // ziggurat_constants.h holds them), computed in double once.
        static readonly uint[] Ki = new uint[256];
        static readonly float[] Wi = new float[256], Fi = new float[256];

        static Pcg64()
        {
            double r = 3.6541528853610088, v = 0.00492867323399, m1 = 8388608.0;
            double dn = r, tn = dn, q = v / Math.Exp(-0.5 * dn * dn);
            Ki[0] = (uint)((dn / q) * m1);
            Ki[1] = 0;
            Wi[0] = (float)(q / m1);
            Wi[255] = (float)(dn / m1);
            Fi[0] = 1f;
            Fi[255] = (float)Math.Exp(-0.5 * dn * dn);
            for (int i = 254; i >= 1; --i)
            {
                dn = Math.Sqrt(-2.0 * Math.Log(v / dn + Math.Exp(-0.5 * dn * dn)));
                Ki[i + 1] = (uint)((dn / tn) * m1);
                tn = dn;
                Fi[i] = (float)Math.Exp(-0.5 * dn * dn);
                Wi[i] = (float)(dn / m1);
            }
        }

        // numpy's float32 standard_normal (random_standard_normal_f in distributions.c)
        public float StandardNormal()
        {
            const float R = 3.6541528853610088f, InvR = 0.27366123732975828f;
            while (true)
            {
                uint bits = Next32();
                int idx = (int)(bits & 0xff);
                uint sign = (bits >> 8) & 1, rabs = (bits >> 9) & 0x7fffff;
                float x = (float)((float)rabs * Wi[idx]);
                if (sign == 1) x = -x;
                if (rabs < Ki[idx]) return x;
                if (idx == 0)
                {
                    while (true)
                    {
                        float xx = (float)(-InvR * log1pf(-NextFloat()));
                        float yy = -log1pf(-NextFloat());
                        if ((float)(yy + yy) > (float)(xx * xx)) return ((rabs >> 8) & 1) == 1 ? -(float)(R + xx) : (float)(R + xx);
                    }
                }
                if ((float)((float)((float)(Fi[idx - 1] - Fi[idx]) * NextFloat()) + Fi[idx]) < Math.Exp(-0.5 * (double)x * x))
                    return x;
            }
        }
    }

    class Sampling
    {
        public bool DoSample;
        public float Temperature = 1f, TopP = 1f, RepetitionPenalty = 1f;
        public long TopK;
        public Sampling Copy() { return (Sampling)MemberwiseClone(); }
    }

    static class Choose
    {
        public static void RepetitionPenalty(float[] scores, List<long> history, float penalty)
        {
            var seen = new bool[scores.Length];
            foreach (long id in history) if (id >= 0 && id < scores.Length) seen[id] = true;
            for (int i = 0; i < scores.Length; ++i)
                if (seen[i]) scores[i] = scores[i] < 0 ? (float)(scores[i] * penalty) : (float)(scores[i] / penalty);
        }

        static float PairwiseSum(float[] a, int start, int n)
        {
            if (n < 8)
            {
                float res = 0f;
                for (int i = 0; i < n; ++i) res = (float)(res + a[start + i]);
                return res;
            }
            if (n <= 128)
            {
                var r = new float[8];
                for (int j = 0; j < 8; ++j) r[j] = a[start + j];
                int i = 8;
                for (; i < n - (n % 8); i += 8)
                    for (int j = 0; j < 8; ++j) r[j] = (float)(r[j] + a[start + i + j]);
                float res = (float)((float)((float)(r[0] + r[1]) + (float)(r[2] + r[3])) + (float)((float)(r[4] + r[5]) + (float)(r[6] + r[7])));
                for (; i < n; ++i) res = (float)(res + a[start + i]);
                return res;
            }
            int n2 = n / 2;
            n2 -= n2 % 8;
            return (float)(PairwiseSum(a, start, n2) + PairwiseSum(a, start + n2, n - n2));
        }

        static float[] Softmax(float[] x)
        {
            float top = float.NegativeInfinity;
            foreach (float v in x) top = Math.Max(top, v);
            var e = new float[x.Length];
            for (int i = 0; i < x.Length; ++i) e[i] = (float)Math.Exp((float)(x[i] - top));
            float sum = e.Length == 0 ? 0f : (float)(e[0] + PairwiseSum(e, 1, e.Length - 1));
            for (int i = 0; i < e.Length; ++i) e[i] = (float)(e[i] / sum);
            return e;
        }

        public static long Next(float[] scoresIn, List<long> history, Sampling cfg, Pcg64 rng)
        {
            var scores = (float[])scoresIn.Clone();
            if (cfg.RepetitionPenalty != 1f) RepetitionPenalty(scores, history, cfg.RepetitionPenalty);
            int vocab = scores.Length;
            if (!cfg.DoSample)
            {
                int best = 0;
                for (int i = 1; i < vocab; ++i) if (scores[i] > scores[best]) best = i;
                return best;
            }
            if (cfg.Temperature != 1f) for (int i = 0; i < vocab; ++i) scores[i] = (float)(scores[i] / cfg.Temperature);
            if (cfg.TopK != 0)
            {
                int k = (int)Math.Min(cfg.TopK, vocab);
                var sorted = (float[])scores.Clone();
                Array.Sort(sorted);
                float kth = sorted[vocab - k];
                for (int i = 0; i < vocab; ++i) if (scores[i] < kth) scores[i] = float.NegativeInfinity;
            }
            if (cfg.TopP < 1f)
            {
                var order = Enumerable.Range(0, vocab).OrderBy(i => scores[i]).ToArray();  // stable
                var sortedScores = order.Select(i => scores[i]).ToArray();
                var probs = Softmax(sortedScores);
                double cumulative = 0;
                float cutoff = (float)(1.0 - (double)cfg.TopP);
                var remove = new bool[vocab];
                for (int i = 0; i < vocab; ++i)
                {
                    cumulative += probs[i];
                    remove[order[i]] = (float)cumulative <= cutoff && i != vocab - 1;
                }
                for (int i = 0; i < vocab; ++i) if (remove[i]) scores[i] = float.NegativeInfinity;
            }
            var p = Softmax(scores);
            var cdf = new double[vocab];
            double run = 0;
            for (int i = 0; i < vocab; ++i) cdf[i] = run += p[i];
            double total = cdf[vocab - 1], draw = rng.NextDouble();
            long count = 0;
            for (int i = 0; i < vocab; ++i) if (cdf[i] / total <= draw) count++;
            return count;
        }
    }

    class KVCache
    {
        public List<float[]> Keys = new List<float[]>(), Values = new List<float[]>();
        public List<ushort[]> KeysHalf = new List<ushort[]>(), ValuesHalf = new List<ushort[]>();
        public List<PinnedTensor> KeyValues = new List<PinnedTensor>(), ValueValues = new List<PinnedTensor>();
        public long Capacity, Length;

        public void Dispose()
        {
            foreach (var v in KeyValues) v.Dispose();
            foreach (var v in ValueValues) v.Dispose();
        }
    }

    // One KV-cached decoder graph, run over buffers passed as both past inputs and (preallocated)
    // present outputs, so GroupQueryAttention writes the new positions in place.
    class KVDecoder
    {
        readonly Session session;
        readonly List<string> past = new List<string>(), present = new List<string>();
        readonly long kvHeads, headDim, layers;
        readonly bool kvHalf, embedsHalf;
        public readonly long Width;
        const int Chunk = 256;

        public KVDecoder(Session session)
        {
            this.session = session;
            var spec = session.Spec;
            foreach (var t in spec.Inputs) if (t.Name.StartsWith("past_key_values.")) past.Add(t.Name);
            foreach (var t in spec.Outputs) if (t.Name.StartsWith("present.")) present.Add(t.Name);
            foreach (var n in new[] { "inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length" })
                if (spec.Input(n) == null || past.Count == 0 || past.Count != present.Count)
                    throw new HostError("graph '" + spec.Name + "' is not a KV decoder", "", Bundle.RebuildFix);
            var first = spec.Input(past[0]);
            kvHeads = (long)first.Shape[1];
            headDim = (long)first.Shape[3];
            kvHalf = first.Dtype == "float16";
            if (!kvHalf && first.Dtype != "float32") throw new HostError("KV dtype " + first.Dtype + " is not supported", "", Bundle.RebuildFix);
            layers = past.Count / 2;
            var embeds = spec.Input("inputs_embeds");
            embedsHalf = embeds.Dtype == "float16";
            Width = (long)embeds.Shape[2];
        }

        public KVCache NewCache(long capacity)
        {
            var cache = new KVCache { Capacity = capacity };
            var shape = new[] { 1, kvHeads, capacity, headDim };
            long n = kvHeads * capacity * headDim;
            for (long i = 0; i < layers; ++i)
            {
                if (kvHalf)
                {
                    var k = new ushort[n]; var v = new ushort[n];
                    cache.KeysHalf.Add(k); cache.ValuesHalf.Add(v);
                    cache.KeyValues.Add(new PinnedTensor(SessionPool.Cpu, k, 2 * n, shape, ElementType.Float16));
                    cache.ValueValues.Add(new PinnedTensor(SessionPool.Cpu, v, 2 * n, shape, ElementType.Float16));
                }
                else
                {
                    var k = new float[n]; var v = new float[n];
                    cache.Keys.Add(k); cache.Values.Add(v);
                    cache.KeyValues.Add(new PinnedTensor(SessionPool.Cpu, k, 4 * n, shape, ElementType.Float));
                    cache.ValueValues.Add(new PinnedTensor(SessionPool.Cpu, v, 4 * n, shape, ElementType.Float));
                }
            }
            return cache;
        }

        // Append embeds [seq, width] at positions [3][seq]; the last position's logits.
        public float[] Step(KVCache cache, float[] embeds, long seq, long[] positions, List<float> hidden)
        {
            if (cache.Length + seq > cache.Capacity)
                throw new HostError("the KV cache holds " + cache.Capacity + " positions, " + (cache.Length + seq) + " were asked", "",
                                    "allocate the cache for the prompt plus max_new_tokens");
            if (hidden != null) hidden.Clear();
            float[] logits = null;
            for (long start = 0; start < seq; start += Chunk)
            {
                long stop = Math.Min(seq, start + Chunk), n = stop - start;
                var pos = new long[3 * n];
                for (int a = 0; a < 3; ++a) Array.Copy(positions, a * seq + start, pos, a * n, n);
                var chunk = new float[n * Width];
                Array.Copy(embeds, start * Width, chunk, 0, n * Width);
                float[] h;
                logits = RunOnce(cache, chunk, n, pos, out h);
                if (hidden != null) hidden.AddRange(h);
            }
            return logits;
        }

        float[] RunOnce(KVCache cache, float[] embeds, long seq, long[] positions, out float[] hidden)
        {
            long total = cache.Length + seq;
            var pinned = new List<PinnedTensor>();
            var names = new List<IntPtr>();
            try
            {
                PinnedTensor e = embedsHalf
                    ? new PinnedTensor(SessionPool.Cpu, embeds.Select(Half.FromFloat).ToArray(), 2L * embeds.Length, new[] { 1, seq, Width }, ElementType.Float16)
                    : new PinnedTensor(SessionPool.Cpu, embeds, 4L * embeds.Length, new[] { 1, seq, Width }, ElementType.Float);
                pinned.Add(e);
                pinned.Add(new PinnedTensor(SessionPool.Cpu, positions, 8L * positions.Length, new[] { 3L, 1, seq }, ElementType.Int64));
                pinned.Add(new PinnedTensor(SessionPool.Cpu, new[] { (int)(total - 1) }, 4, new[] { 1L }, ElementType.Int32));
                pinned.Add(new PinnedTensor(SessionPool.Cpu, new[] { (int)total }, 4, new long[0], ElementType.Int32));
                var inNames = new List<string> { "inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length" };
                var inValues = pinned.Select(p => p.Value).ToList();
                var outNames = new List<string> { "logits", "last_hidden_state" };
                var outValues = new List<IntPtr> { IntPtr.Zero, IntPtr.Zero };
                for (int i = 0; i < layers; ++i)
                {
                    inNames.Add(past[2 * i]); inValues.Add(cache.KeyValues[i].Value);
                    inNames.Add(past[2 * i + 1]); inValues.Add(cache.ValueValues[i].Value);
                    outNames.Add(present[2 * i]); outValues.Add(cache.KeyValues[i].Value);
                    outNames.Add(present[2 * i + 1]); outValues.Add(cache.ValueValues[i].Value);
                }
                var inPtrs = inNames.Select(n => { IntPtr p = Ort.Utf8(n); names.Add(p); return p; }).ToArray();
                var outPtrs = outNames.Select(n => { IntPtr p = Ort.Utf8(n); names.Add(p); return p; }).ToArray();
                var outs = outValues.ToArray();
                Ort.Check(Ort.Run(session.Handle, IntPtr.Zero, inPtrs, inValues.ToArray(), new UIntPtr((ulong)inPtrs.Length),
                                  outPtrs, new UIntPtr((ulong)outPtrs.Length), outs));
                cache.Length = total;
                float[] all = OrtValues.Floats(outs[0]);
                long[] shape = OrtValues.Shape(outs[0]);
                hidden = OrtValues.Floats(outs[1]);
                Ort.ReleaseValue(outs[0]);
                Ort.ReleaseValue(outs[1]);
                long v = shape[shape.Length - 1];
                var last = new float[v];
                Array.Copy(all, all.Length - v, last, 0, v);
                return last;
            }
            finally
            {
                foreach (var p in pinned) p.Dispose();
                foreach (var n in names) Marshal.FreeHGlobal(n);
            }
        }
    }

    class Prompt
    {
        public List<long> Ids = new List<long>();
        public float[] Embeds;       // [seq, hidden] or null for text
        public long[] Positions;     // [3][seq] or null for text
        public long RopeDelta;
    }

    class ThinkerStates
    {
        public List<long> PromptIds, TokenIds;
        public List<float> Embeds = new List<float>(), Hidden = new List<float>();
        public long[] PromptPositions;
    }

    class Generation
    {
        public List<long> TokenIds = new List<long>();
        public string FinishReason;
        public double PrefillSeconds, DecodeSeconds;  // up to the first token; the tokens after it
        public ThinkerStates States = new ThinkerStates();
    }

    static class Stages
    {
        public static float[] Embed(Bundle b, SessionPool pool, string graph, List<long> ids)
        {
            return SessionPool.Run(pool.Get(graph), new Dictionary<string, Tensor> {
                { "input_ids", Tensor.Longs(new long[] { 1, ids.Count }, ids.ToArray()) } }, new[] { "inputs_embeds" })[0].F;
        }

        static List<long> Longs(object list) { return ((List<object>)list).Select(x => (long)x).ToList(); }

        public static Generation Thinker(Bundle b, SessionPool pool, Prompt prompt, long maxNew, string limitReason,
                                         Sampling sampling, ulong seed, bool keepStates)
        {
            int P = prompt.Ids.Count;
            var eos = Longs(((JObject)b.Data["generation"])["eos_token_ids"]);
            var rng = new Pcg64(seed);
            var decoder = new KVDecoder(pool.Get("thinker_decoder"));
            long W = decoder.Width;
            var cache = decoder.NewCache(P + maxNew);
            try
            {
                float[] embeds = prompt.Embeds ?? Embed(b, pool, "thinker_embedding", prompt.Ids);
                long[] positions = prompt.Positions;
                if (positions == null)
                {
                    positions = new long[3 * P];
                    for (int a = 0; a < 3; ++a) for (int i = 0; i < P; ++i) positions[a * P + i] = i;
                }
                var gen = new Generation { FinishReason = limitReason };
                var clock = System.Diagnostics.Stopwatch.StartNew();
                var hidden = keepStates ? new List<float>() : null;
                float[] logits = decoder.Step(cache, embeds, P, positions, hidden);
                var st = gen.States;
                if (keepStates)
                {
                    st.PromptIds = prompt.Ids;
                    st.PromptPositions = positions;
                    var zeroed = (float[])embeds.Clone();
                    var placeholders = new HashSet<long> { b.Special("audio"), b.Special("image"), b.Special("video") };
                    for (int i = 0; i < P; ++i) if (placeholders.Contains(prompt.Ids[i])) for (long j = 0; j < W; ++j) zeroed[i * W + j] = 0f;
                    st.Embeds.AddRange(zeroed);
                    st.Hidden.AddRange(hidden);
                }
                var history = new List<long>(prompt.Ids);
                for (long step = 0; step < maxNew; ++step)
                {
                    long token = Choose.Next(logits, history, sampling, rng);
                    gen.TokenIds.Add(token);
                    if (step == 0) gen.PrefillSeconds = clock.Elapsed.TotalSeconds;
                    if (eos.Contains(token)) { gen.FinishReason = "eos"; break; }
                    if (step == maxNew - 1) break;
                    history.Add(token);
                    float[] e = Embed(b, pool, "thinker_embedding", new List<long> { token });
                    if (keepStates) st.Embeds.AddRange(e);
                    long p = cache.Length + prompt.RopeDelta;
                    logits = decoder.Step(cache, e, 1, new[] { p, p, p }, hidden);
                    if (keepStates) st.Hidden.AddRange(hidden);
                }
                st.TokenIds = gen.TokenIds;
                gen.DecodeSeconds = clock.Elapsed.TotalSeconds - gen.PrefillSeconds;
                return gen;
            }
            finally
            {
                cache.Dispose();
            }
        }

        public static float[] TalkerTextRows(Bundle b, SessionPool pool, long speakerBos)
        {
            var text = (JObject)b.Config("talker")["text"];
            return Embed(b, pool, "thinker_embedding", new List<long> { speakerBos, (long)text["eos"], (long)text["pad"] });
        }

        public static List<long> Talker(Bundle b, SessionPool pool, ThinkerStates o, float[] text, Sampling sampling, ulong seed,
                                        long maxNew)
        {
            var cfg = b.Config("talker");
            var codec = (JObject)cfg["codec"];
            long codecBos = (long)codec["bos"], codecPad = (long)codec["pad"], codecMask = (long)codec["mask"];
            long vocab = (long)cfg["vocab_size"];
            var eos = Longs(cfg["eos_token_ids"]);
            var suppress = Longs(cfg["suppress_tokens"]).Where(s => s >= 0 && s < vocab).ToList();
            int P = o.PromptIds.Count, R = o.TokenIds.Count;
            if (R < 2) return new List<long>();
            int W = (int)(long)cfg["embedding_size"];
            int F = P + R - 1;
            var states = new float[F * W];
            for (int i = 0; i < F * W; ++i) states[i] = (float)(o.Hidden[i] + o.Embeds[i]);
            var rng = new Pcg64(seed);
            var prefill = new float[(P + 2) * W];
            Array.Copy(states, 0, prefill, 0, P * W);
            Array.Copy(text, 0, prefill, P * W, W);
            Array.Copy(states, P * W, prefill, (P + 1) * W, W);
            var special = Embed(b, pool, "talker_embedding", new List<long> { codecPad, codecBos });
            for (int i = 0; i < 2 * W; ++i) prefill[P * W + i] = (float)(prefill[P * W + i] + special[i]);
            long top = -1;
            foreach (long v in o.PromptPositions) top = Math.Max(top, v);
            int S = P + 2;
            var positions = new long[3 * S];
            for (int a = 0; a < 3; ++a)
            {
                for (int i = 0; i < P; ++i) positions[a * S + i] = o.PromptPositions[a * P + i];
                positions[a * S + P] = top + 1;
                positions[a * S + P + 1] = top + 2;
            }
            int replyRows = F - (P + 1) + 1;
            var reply = new float[replyRows * W];
            Array.Copy(states, (P + 1) * W, reply, 0, (F - (P + 1)) * W);
            Array.Copy(text, W, reply, (F - (P + 1)) * W, W);
            long delta = top + 3 - (P + 2);
            var decoder = new KVDecoder(pool.Get("talker_decoder"));
            var cache = decoder.NewCache(S + maxNew);
            try
            {
                float[] logits = decoder.Step(cache, prefill, S, positions, null);
                var history = Enumerable.Repeat(codecMask, P).ToList();
                history.Add(codecPad);
                history.Add(codecBos);
                var warp = sampling.Copy();
                warp.RepetitionPenalty = 1f;
                var codes = new List<long>();
                bool stopped = false;
                for (long step = 0; step < maxNew; ++step)
                {
                    var scores = (float[])logits.Clone();
                    if (sampling.RepetitionPenalty != 1f) Choose.RepetitionPenalty(scores, history, sampling.RepetitionPenalty);
                    foreach (long s in suppress) scores[s] = float.NegativeInfinity;
                    long code = Choose.Next(scores, history, warp, rng);
                    codes.Add(code);
                    if (eos.Contains(code)) { stopped = true; break; }
                    if (step == maxNew - 1) break;
                    history.Add(code);
                    var e = Embed(b, pool, "talker_embedding", new List<long> { code });
                    int extra = step < replyRows ? (int)step * W : -1;
                    for (int i = 0; i < W; ++i) e[i] = (float)(e[i] + (extra >= 0 ? reply[extra + i] : text[2 * W + i]));
                    long p = cache.Length + delta;
                    logits = decoder.Step(cache, e, 1, new[] { p, p, p }, null);
                }
                if (stopped) codes.RemoveAt(codes.Count - 1);
                return codes;
            }
            finally
            {
                cache.Dispose();
            }
        }
    }

    class RopeInputs
    {
        public List<long[]> ImageGrids = new List<long[]>(), VideoGrids = new List<long[]>();
        public List<long> AudioSeqlens = new List<long>();
        public List<float> SecondPerGrids = new List<float>();
        public bool UseAudioInVideo;
    }

    // TMRoPE position ids [3][seq] and the rope delta (omni_runtime.prompt.rope.rope_index).
    static class Rope
    {
        public static long AudioOutputLength(long frames) { return ((frames - 1) / 2 + 1 - 2) / 2 + 1; }

        static long[][] Span(long length, long start)
        {
            var o = new long[3][];
            for (int a = 0; a < 3; ++a) { o[a] = new long[length]; for (long i = 0; i < length; ++i) o[a][i] = start + i; }
            return o;
        }

        static long NextStart(List<long[][]> parts)
        {
            if (parts.Count == 0) return 0;
            long top = long.MinValue;
            foreach (var axis in parts[parts.Count - 1]) foreach (var v in axis) top = Math.Max(top, v);
            return top + 1;
        }

        static long[][] Vision(long start, long[] grid, long merge, List<long> tIndex)
        {
            long gh = grid[1] / merge, gw = grid[2] / merge;
            var o = new[] { new List<long>(), new List<long>(), new List<long>() };
            foreach (long t in tIndex)
                for (long h = 0; h < gh; ++h)
                    for (long w = 0; w < gw; ++w) { o[0].Add(t + start); o[1].Add(h + start); o[2].Add(w + start); }
            return new[] { o[0].ToArray(), o[1].ToArray(), o[2].ToArray() };
        }

        static List<long[]> Chunks(long[] t, long perChunk, long offset)
        {
            var o = new List<long[]>();
            long start = 0, chunk = 1;
            for (long i = 0; i < t.Length; ++i)
                if (t[i] - offset >= chunk * perChunk) { o.Add(new[] { start, i }); start = i; chunk++; }
            o.Add(new[] { start, (long)t.Length });
            return o;
        }

        static List<long> VideoT(long gridT, float secondPerGrid, long perSecond)
        {
            var o = new List<long>();
            for (long i = 0; i < gridT; ++i) o.Add((long)Math.Truncate((float)((float)((float)i * secondPerGrid) * (float)perSecond)));
            return o;
        }

        static long[][] Slice(long[][] p, long a, long b)
        {
            var o = new long[3][];
            for (int k = 0; k < 3; ++k) { o[k] = new long[b - a]; Array.Copy(p[k], a, o[k], 0, b - a); }
            return o;
        }

        public static long[] Index(List<long> tokens, Bundle bundle, RopeInputs media, out long delta)
        {
            var th = bundle.Config("thinker");
            long merge = th.ContainsKey("spatial_merge_size") ? (long)th["spatial_merge_size"] : 2;
            long perSecond = th.ContainsKey("position_id_per_seconds") ? (long)th["position_id_per_seconds"] : 25;
            long perChunkSeconds = th.ContainsKey("seconds_per_chunk") ? (long)th["seconds_per_chunk"] : 2;
            long image = bundle.Special("image"), video = bundle.Special("video"), audio = bundle.Special("audio");
            long visionStart = bundle.Special("vision_bos"), audioStart = bundle.Special("audio_bos");
            int n = tokens.Count;
            var o = new long[3 * n];
            if (media.ImageGrids.Count == 0 && media.VideoGrids.Count == 0)
            {
                for (int a = 0; a < 3; ++a) for (int i = 0; i < n; ++i) o[a * n + i] = i;
                delta = 0;
                return o;
            }
            bool aiv = media.UseAudioInVideo;
            long imageCount = 0, videoCount = 0, audioCount = 0;
            for (int i = 0; i < n; ++i)
            {
                if (tokens[i] == audioStart) audioCount++;
                if (tokens[i] == visionStart && i + 1 < n)
                {
                    if (tokens[i + 1] == image) imageCount++;
                    if (tokens[i + 1] == (aiv ? audioStart : video)) videoCount++;
                }
            }
            long remainImage = imageCount, remainVideo = videoCount, remainAudio = audioCount;
            long total = imageCount + audioCount + (aiv ? 0 : videoCount);
            int ci = 0, cv = 0, ca = 0;
            long st = 0, end = n + 1;
            var parts = new List<long[][]>();
            Func<long, long, long> find = (token, remain) => {
                if (remain > 0) { int at = tokens.IndexOf(token, (int)st); if (at >= 0) return at; }
                return end;
            };
            const string fix = "write the prompt and its media inputs with omni-export tokenize";
            for (long k = 0; k < total; ++k)
            {
                long edImage = find(image, remainImage), edVideo = find(video, remainVideo), edAudio = find(audio, remainAudio);
                long first = Math.Min(edImage, Math.Min(edVideo, edAudio));
                if (first == edAudio)
                {
                    if (ca >= media.AudioSeqlens.Count) throw new HostError("more audio placeholders than audio inputs", "", fix);
                    long text = first - st - 1;
                    if (text != 0) parts.Add(Span(text, NextStart(parts)));
                    parts.Add(Span(1, NextStart(parts)));
                    long length = AudioOutputLength(media.AudioSeqlens[ca]);
                    parts.Add(Span(length, NextStart(parts)));
                    parts.Add(Span(1, NextStart(parts)));
                    st += text + 2 + length;
                    ca++; remainAudio--;
                }
                else if (first == edImage)
                {
                    if (ci >= media.ImageGrids.Count) throw new HostError("more image placeholders than image inputs", "", fix);
                    long text = first - st - 1;
                    if (text != 0) parts.Add(Span(text, NextStart(parts)));
                    parts.Add(Span(1, NextStart(parts)));
                    var grid = media.ImageGrids[ci];
                    var tIndex = new List<long>();
                    for (long t = 0; t < grid[0]; ++t) tIndex.Add(t * perSecond);
                    parts.Add(Vision(NextStart(parts), grid, merge, tIndex));
                    parts.Add(Span(1, NextStart(parts)));
                    st += text + 2 + grid[0] * grid[1] * grid[2] / (merge * merge);
                    ci++; remainImage--;
                }
                else if (!aiv)
                {
                    if (cv >= media.VideoGrids.Count) throw new HostError("more video placeholders than video inputs", "", fix);
                    long text = first - st - 1;
                    if (text != 0) parts.Add(Span(text, NextStart(parts)));
                    parts.Add(Span(1, NextStart(parts)));
                    var grid = media.VideoGrids[cv];
                    parts.Add(Vision(NextStart(parts), grid, merge, VideoT(grid[0], media.SecondPerGrids[cv], perSecond)));
                    parts.Add(Span(1, NextStart(parts)));
                    st += text + 2 + grid[0] * grid[1] * grid[2] / (merge * merge);
                    cv++; remainVideo--;
                }
                else
                {
                    if (cv >= media.VideoGrids.Count || ca >= media.AudioSeqlens.Count)
                        throw new HostError("more video placeholders than video inputs", "", fix);
                    long text = first - st - 2;
                    if (text != 0) parts.Add(Span(text, NextStart(parts)));
                    long start = NextStart(parts);
                    parts.Add(Span(1, start)); parts.Add(Span(1, start));
                    start = NextStart(parts);
                    long length = AudioOutputLength(media.AudioSeqlens[ca]);
                    var audioPos = Span(length, start);
                    var grid = media.VideoGrids[cv];
                    var videoPos = Vision(start, grid, merge, VideoT(grid[0], media.SecondPerGrids[cv], perSecond));
                    long perChunk = perSecond * perChunkSeconds;
                    var vc = Chunks(videoPos[0], perChunk, start);
                    var ac = Chunks(audioPos[0], perChunk, start);
                    for (int j = 0; j < Math.Max(vc.Count, ac.Count); ++j)
                    {
                        if (j < vc.Count) parts.Add(Slice(videoPos, vc[j][0], vc[j][1]));
                        if (j < ac.Count) parts.Add(Slice(audioPos, ac[j][0], ac[j][1]));
                    }
                    start = NextStart(parts);
                    parts.Add(Span(1, start)); parts.Add(Span(1, start));
                    st += text + 4 + length + grid[0] * grid[1] * grid[2] / (merge * merge);
                    ca++; cv++; remainVideo--; remainAudio--;
                }
            }
            if (st < n) parts.Add(Span(n - st, NextStart(parts)));
            long filled = 0, top = long.MinValue;
            foreach (var p in parts)
            {
                long len = p[0].Length;
                if (filled + len > n) throw new HostError("the media inputs describe more tokens than the prompt holds", "", fix);
                for (int a = 0; a < 3; ++a) for (long i = 0; i < len; ++i) { o[a * n + filled + i] = p[a][i]; top = Math.Max(top, p[a][i]); }
                filled += len;
            }
            if (filled != n) throw new HostError("the media inputs do not match the prompt's placeholders", "", fix);
            delta = top + 1 - n;
            return o;
        }
    }
}
