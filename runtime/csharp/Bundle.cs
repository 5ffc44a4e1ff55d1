// The manifest, the bundle's files (checked as docs/bundle-format.md says), sha256, .npy and WAV.
using System;
using System.Collections.Generic;
using System.IO;
using System.Security.Cryptography;
using System.Text;

namespace OmniHost
{
    // A user-facing error: a problem, the path it concerns and the fix. Exit code 2.
    class HostError : Exception
    {
        public readonly string Where, Fix;
        public HostError(string problem, string where, string fix) : base(problem) { Where = where; Fix = fix; }

        public string Text()
        {
            string s = string.IsNullOrEmpty(Where) ? Message : Where + ": " + Message;
            if (!string.IsNullOrEmpty(Fix)) s += "\n  fix: " + Fix;
            return s;
        }
    }

    class TensorSpec
    {
        public string Name, Dtype;
        public List<object> Shape;
    }

    class GraphSpec
    {
        public string Name, File;
        public List<string> ExternalData = new List<string>();
        public JObject Quantization;
        public List<TensorSpec> Inputs = new List<TensorSpec>(), Outputs = new List<TensorSpec>();
        public List<KeyValuePair<string, string>> SessionConfig = new List<KeyValuePair<string, string>>();

        public List<string> Files()
        {
            var all = new List<string> { File };
            all.AddRange(ExternalData);
            return all;
        }

        public TensorSpec Input(string name)
        {
            foreach (var t in Inputs) if (t.Name == name) return t;
            return null;
        }
    }

    class Bundle
    {
        public const string RebuildFix = "rebuild the bundle with a matching omni-export (omni-export build)";
        public const string CopyFix = "copy the bundle again, or rebuild it with omni-export build";
        public string Root, ManifestPath;
        public JObject Data;
        public Dictionary<string, GraphSpec> Graphs = new Dictionary<string, GraphSpec>();
        readonly HashSet<string> verified = new HashSet<string>();

        public static JObject Obj(object o, string where, string file)
        {
            var obj = o as JObject;
            if (obj == null) throw new HostError(where + " is not an object", file, RebuildFix);
            return obj;
        }

        public JObject Need(JObject obj, string key, string where)
        {
            if (obj == null || !obj.ContainsKey(key)) throw Error(where + " is missing key '" + key + "'");
            return Obj(obj[key], where + "." + key, ManifestPath);
        }

        public long Int(JObject obj, string key, string where)
        {
            if (obj == null || !obj.ContainsKey(key) || !(obj[key] is long))
                throw Error(where + "." + key + " is missing or not an integer");
            return (long)obj[key];
        }

        public string Str(JObject obj, string key, string where)
        {
            if (obj == null || !obj.ContainsKey(key) || !(obj[key] is string))
                throw Error(where + "." + key + " is missing or not a string");
            return (string)obj[key];
        }

        public static double Num(object o) { return o is long ? (long)o : (double)o; }

        HostError Error(string problem) { return new HostError(problem, ManifestPath, RebuildFix); }

        static string RelpathProblem(string rel)
        {
            if (rel.Length == 0) return "is empty";
            if (rel.Contains("\\")) return "contains a backslash (use '/')";
            if (rel.Contains("\0")) return "contains a NUL character";
            if (rel.StartsWith("/")) return "is absolute";
            if (rel.Contains(":")) return "contains ':' (a drive letter or stream name)";
            string[] parts = rel.Split('/');
            foreach (var p in parts) if (p == "..") return "contains a '..' part";
            foreach (var p in parts) if (p.Length == 0) return "contains an empty part";
            foreach (var p in parts) if (p == ".") return "contains a '.' part";
            return null;
        }

        [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
        static extern IntPtr realpath(string path, IntPtr resolved);
        [System.Runtime.InteropServices.DllImport("libc")]
        static extern void free(IntPtr p);

        // the path with every symlink resolved (libc realpath); "" when it does not resolve
        static string Resolve(string path)
        {
            IntPtr p = realpath(path, IntPtr.Zero);
            if (p == IntPtr.Zero) return "";
            string s = System.Runtime.InteropServices.Marshal.PtrToStringAnsi(p);
            free(p);
            return s;
        }

        void CheckRelpath(string rel, string where)
        {
            string problem = RelpathProblem(rel);
            if (problem != null) throw Error("unsafe path '" + rel + "' in " + where + ": it " + problem);
            if (!((JObject)Data["files"]).ContainsKey(rel))
                throw Error(where + " '" + rel + "' is not listed in the manifest's files");
        }

        public static Bundle Open(string dir)
        {
            var b = new Bundle();
            if (!Directory.Exists(dir))
                throw new HostError("bundle directory does not exist (or is not a directory)", dir,
                                    "pass the directory omni-export build wrote (it holds manifest.json)");
            b.Root = Resolve(dir).TrimEnd('/');
            b.ManifestPath = b.Root + "/manifest.json";
            if (!System.IO.File.Exists(b.ManifestPath))
                throw new HostError("not a bundle: no manifest.json (an unfinished or partial copy?)", b.ManifestPath, CopyFix);
            try
            {
                b.Data = Json.Parse(System.IO.File.ReadAllText(b.ManifestPath, new UTF8Encoding(false, true))) as JObject;
            }
            catch (JsonError e)
            {
                throw b.Error("invalid JSON: " + e.Message);
            }
            catch (DecoderFallbackException)
            {
                throw b.Error("invalid JSON: not UTF-8");
            }
            var d = b.Data;
            if (d == null) throw b.Error("the manifest is not a JSON object");
            if (!d.ContainsKey("schema") || !"omni-export.bundle".Equals(d["schema"]))
                throw b.Error("not an omni-export bundle manifest (schema is not \"omni-export.bundle\")");
            if (!d.ContainsKey("schema_version") || !(d["schema_version"] is long) || (long)d["schema_version"] != 2)
            {
                string found = d.ContainsKey("schema_version") ? Json.Write(d["schema_version"]) : "missing";
                throw new HostError("manifest schema_version " + found + ", this host reads schema_version 2", b.ManifestPath,
                                    "rebuild the bundle with an omni-export that writes schema_version 2 (or use a host "
                                    + "of the bundle's version)");
            }
            foreach (var key in new[] { "files", "tokenizer", "special_tokens", "generation", "config", "graphs" })
                b.Need(d, key, "the manifest");
            var files = (JObject)d["files"];
            foreach (var rel in files.Order)
            {
                string problem = RelpathProblem(rel);
                if (problem != null) throw b.Error("unsafe path '" + rel + "' in files: it " + problem);
                var entry = Obj(files[rel], "files[\"" + rel + "\"]", b.ManifestPath);
                long bytes = b.Int(entry, "bytes", "files[\"" + rel + "\"]");
                if (b.Str(entry, "sha256", "files[\"" + rel + "\"]").Length != 64)
                    throw b.Error("files[\"" + rel + "\"].sha256 is not 64 hex digits");
                string full = b.Root + "/" + rel;
                if (!System.IO.File.Exists(full)) throw new HostError("missing file listed in the manifest", full, CopyFix);
                if (!Resolve(full).StartsWith(b.Root + "/"))
                    throw b.Error("unsafe path '" + rel + "' in files: it resolves outside the bundle (a symlink?)");
                long size = new FileInfo(full).Length;
                if (size != bytes)
                    throw new HostError("wrong size: " + size + " bytes, the manifest says " + bytes +
                                        " (truncated or replaced?)", full, CopyFix);
            }
            var graphs = (JObject)d["graphs"];
            foreach (var name in graphs.Order)
            {
                var g = new GraphSpec { Name = name };
                string where = "graphs." + name;
                var entry = Obj(graphs[name], where, b.ManifestPath);
                g.File = b.Str(entry, "file", where);
                b.CheckRelpath(g.File, where + ".file");
                var extra = entry.ContainsKey("external_data") ? entry["external_data"] as List<object> : null;
                if (extra == null) throw b.Error(where + ".external_data is missing or not a list");
                foreach (var e in extra)
                {
                    if (!(e is string)) throw b.Error(where + ".external_data holds a non-string");
                    g.ExternalData.Add((string)e);
                    b.CheckRelpath((string)e, where + ".external_data");
                }
                g.Quantization = entry.ContainsKey("quantization") ? entry["quantization"] as JObject : null;
                foreach (var io in new[] { "inputs", "outputs" })
                {
                    var list = entry.ContainsKey(io) ? entry[io] as List<object> : null;
                    if (list == null) throw b.Error(where + "." + io + " is missing or not a list");
                    var seen = new HashSet<string>();
                    foreach (var t in list)
                    {
                        var to = Obj(t, where + "." + io, b.ManifestPath);
                        var spec = new TensorSpec { Name = b.Str(to, "name", where + "." + io), Dtype = b.Str(to, "dtype", where + "." + io),
                                                    Shape = to.ContainsKey("shape") ? to["shape"] as List<object> : null };
                        if (spec.Shape == null) throw b.Error(where + "." + io + " has a tensor without a shape list");
                        if (!seen.Add(spec.Name)) throw b.Error(where + "." + io + " has duplicate name '" + spec.Name + "'");
                        (io == "inputs" ? g.Inputs : g.Outputs).Add(spec);
                    }
                }
                var sc = entry.ContainsKey("session_config") ? entry["session_config"] as JObject : null;
                if (sc != null)
                    foreach (var k in sc.Order) if (sc[k] is string) g.SessionConfig.Add(new KeyValuePair<string, string>(k, (string)sc[k]));
                b.Graphs[name] = g;
            }
            foreach (var key in new[] { "thinker_embedding", "thinker_decoder" })
                if (!b.Graphs.ContainsKey(key)) throw b.Error("the manifest has no graph '" + key + "'");
            var config = (JObject)d["config"];
            b.Need(config, "thinker", "config");
            foreach (var block in new[] { "thinker", "talker" })
            {
                if (!config.ContainsKey(block)) continue;
                var cfg = b.Need(config, block, "config");
                var section = cfg.ContainsKey("mrope_section") ? cfg["mrope_section"] as List<object> : null;
                if (section == null) throw b.Error("config." + block + ".mrope_section is missing");
                long sum = 0;
                foreach (var v in section) sum += (long)v;
                if (sum * 2 != b.Int(cfg, "head_dim", "config." + block))
                    throw b.Error("config." + block + ".mrope_section must sum to config." + block + ".head_dim/2");
            }
            if (config.ContainsKey("token2wav"))
            {
                var t2w = b.Need(config, "token2wav", "config");
                var speakers = b.Need(t2w, "speakers", "config.token2wav");
                string def = b.Str(t2w, "default_speaker", "config.token2wav");
                if (!speakers.ContainsKey(def))
                    throw b.Error("config.token2wav.default_speaker '" + def + "' is not one of its speakers");
                foreach (var name in speakers.Order)
                {
                    var s = Obj(speakers[name], "config.token2wav.speakers." + name, b.ManifestPath);
                    foreach (var key in new[] { "speaker_embedding", "reference_embedding", "null_reference_embedding" })
                        b.CheckRelpath(b.Str(s, key, "config.token2wav.speakers." + name), "config.token2wav.speakers." + name + "." + key);
                }
            }
            foreach (var pair in new[] { new[] { "thinker", "thinker_decoder" }, new[] { "talker", "talker_decoder" } })
            {
                if (!config.ContainsKey(pair[0]) || !b.Graphs.ContainsKey(pair[1])) continue;
                var cfg = (JObject)config[pair[0]];
                long layers = b.Int(cfg, "num_hidden_layers", "config." + pair[0]);
                long heads = b.Int(cfg, "num_key_value_heads", "config." + pair[0]);
                long headDim = b.Int(cfg, "head_dim", "config." + pair[0]);
                string kvDtype = b.Str(cfg, "kv_dtype", "config." + pair[0]);
                var g = b.Graphs[pair[1]];
                for (long i = 0; i < layers; ++i)
                    foreach (var kind in new[] { "key", "value" })
                    {
                        string past = "past_key_values." + i + "." + kind;
                        var t = g.Input(past);
                        if (t == null || t.Shape.Count != 4)
                            throw b.Error("config." + pair[0] + ".num_hidden_layers is " + layers + " but graph '" + pair[1] +
                                          "' has no input '" + past + "' of rank 4: they must agree");
                        if ((t.Shape[1] is long && (long)t.Shape[1] != heads) || (t.Shape[3] is long && (long)t.Shape[3] != headDim)
                            || t.Dtype != kvDtype)
                            throw b.Error("config." + pair[0] + " (num_key_value_heads, head_dim, kv_dtype) disagrees with graph '" +
                                          pair[1] + "' input '" + past + "': they must agree");
                    }
            }
            return b;
        }

        public string PathOf(string rel) { return Root + "/" + rel; }

        public void Verify(string rel)
        {
            if (verified.Contains(rel)) return;
            var files = (JObject)Data["files"];
            if (!files.ContainsKey(rel)) throw Error("'" + rel + "' is not listed in the manifest's files");
            string expected = ((string)((JObject)files[rel])["sha256"]).ToLowerInvariant();
            string actual;
            try
            {
                using (var sha = SHA256.Create())
                using (var stream = System.IO.File.OpenRead(PathOf(rel)))
                    actual = BitConverter.ToString(sha.ComputeHash(stream)).Replace("-", "").ToLowerInvariant();
            }
            catch (IOException)
            {
                throw new HostError("missing file listed in the manifest", PathOf(rel), CopyFix);
            }
            if (actual != expected)
                throw new HostError("corrupt: sha256 mismatch (manifest says " + expected + ", file has " + actual + ")",
                                    PathOf(rel), CopyFix);
            verified.Add(rel);
        }

        public GraphSpec Graph(string name)
        {
            GraphSpec g;
            if (!Graphs.TryGetValue(name, out g))
                throw new HostError("the bundle has no graph '" + name + "'", ManifestPath, "rebuild the bundle with a recipe that exports it");
            return g;
        }

        public JObject Config(string block) { return (JObject)((JObject)Data["config"])[block]; }
        public long Special(string name) { return Int((JObject)Data["special_tokens"], name, "special_tokens"); }

        public bool HasSpeech()
        {
            var c = (JObject)Data["config"];
            return c.ContainsKey("talker") && c.ContainsKey("token2wav") && Config("talker").ContainsKey("enable_audio_output")
                   && true.Equals(Config("talker")["enable_audio_output"]) && Graphs.ContainsKey("talker_embedding")
                   && Graphs.ContainsKey("talker_decoder") && Graphs.ContainsKey("token2wav_dit") && Graphs.ContainsKey("token2wav_bigvgan");
        }
    }

    class NpyArray
    {
        public string Dtype;
        public long[] Shape;
        public byte[] Data;

        public long Size { get { long n = 1; foreach (var d in Shape) n *= d; return n; } }

        public float[] Floats()
        {
            var f = new float[Size];
            Buffer.BlockCopy(Data, 0, f, 0, Data.Length);
            return f;
        }

        public long[] Longs()
        {
            var l = new long[Size];
            if (Dtype == "int64") Buffer.BlockCopy(Data, 0, l, 0, Data.Length);
            else for (long i = 0; i < Size; ++i) l[i] = BitConverter.ToInt32(Data, (int)(4 * i));
            return l;
        }

        public static NpyArray Read(string path)
        {
            const string fix = "write it with numpy.save (little-endian float32/int64, C order), e.g. omni-export tokenize";
            byte[] all;
            try
            {
                all = System.IO.File.ReadAllBytes(path);
            }
            catch (Exception)
            {
                throw new HostError("cannot read this .npy file (missing?)", path, "pass the files omni-export tokenize wrote");
            }
            if (all.Length < 10 || all[0] != 0x93 || Encoding.ASCII.GetString(all, 1, 5) != "NUMPY")
                throw new HostError("not a .npy file", path, fix);
            int headerLen, offset;
            if (all[6] == 1) { headerLen = all[8] | (all[9] << 8); offset = 10; }
            else { headerLen = BitConverter.ToInt32(all, 8); offset = 12; }
            string header = Encoding.ASCII.GetString(all, offset, headerLen);
            var a = new NpyArray();
            int q = header.IndexOf("'descr':");
            int q1 = header.IndexOf('\'', q + 8), q2 = header.IndexOf('\'', q1 + 1);
            string descr = header.Substring(q1 + 1, q2 - q1 - 1);
            int item;
            if (descr == "<f4") { a.Dtype = "float32"; item = 4; }
            else if (descr == "<i8") { a.Dtype = "int64"; item = 8; }
            else if (descr == "<i4") { a.Dtype = "int32"; item = 4; }
            else throw new HostError("dtype " + descr + " is not supported (float32, int64 or int32)", path, fix);
            if (header.Contains("'fortran_order': True")) throw new HostError("Fortran-ordered arrays are not supported", path, fix);
            int s = header.IndexOf("'shape':"), p1 = header.IndexOf('(', s), p2 = header.IndexOf(')', p1);
            var dims = new List<long>();
            foreach (var piece in header.Substring(p1 + 1, p2 - p1 - 1).Split(','))
                if (piece.Trim().Length > 0) dims.Add(long.Parse(piece.Trim()));
            a.Shape = dims.ToArray();
            long bytes = a.Size * item;
            if (offset + headerLen + bytes > all.Length) throw new HostError("truncated .npy data", path, fix);
            a.Data = new byte[bytes];
            Buffer.BlockCopy(all, offset + headerLen, a.Data, 0, (int)bytes);
            return a;
        }
    }

    static class Wav
    {
        // 32-bit float mono WAV, written to a temporary file beside ``path`` and renamed when complete
        public static void Write(string path, float[] audio, int rate)
        {
            string dir = Path.GetDirectoryName(Path.GetFullPath(path));
            string tmp = Path.Combine(dir, "." + Path.GetFileName(path) + "." + Guid.NewGuid().ToString("N").Substring(0, 8) + ".partial");
            try
            {
                using (var f = new BinaryWriter(System.IO.File.Create(tmp)))
                {
                    uint dataBytes = (uint)(audio.Length * 4);
                    f.Write(Encoding.ASCII.GetBytes("RIFF"));
                    f.Write((uint)(4 + (8 + 16) + (8 + 4) + (8 + dataBytes)));
                    f.Write(Encoding.ASCII.GetBytes("WAVEfmt "));
                    f.Write(16u);
                    f.Write((ushort)3);
                    f.Write((ushort)1);
                    f.Write((uint)rate);
                    f.Write((uint)rate * 4);
                    f.Write((ushort)4);
                    f.Write((ushort)32);
                    f.Write(Encoding.ASCII.GetBytes("fact"));
                    f.Write(4u);
                    f.Write((uint)audio.Length);
                    f.Write(Encoding.ASCII.GetBytes("data"));
                    f.Write(dataBytes);
                    var bytes = new byte[dataBytes];
                    Buffer.BlockCopy(audio, 0, bytes, 0, bytes.Length);
                    f.Write(bytes);
                }
                if (System.IO.File.Exists(path)) System.IO.File.Delete(path);
                System.IO.File.Move(tmp, path);
            }
            catch (Exception e)
            {
                try { System.IO.File.Delete(tmp); } catch (Exception) { }
                throw new HostError("cannot write the WAV file (" + e.Message + ")", path,
                                    "check the disk space and permissions, or choose another --wav path");
            }
        }
    }
}
