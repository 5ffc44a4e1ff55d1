// A small strict JSON reader and writer (mono's class libraries have no System.Text.Json):
// objects -> Dictionary<string, object> (insertion order kept in Keys), arrays -> List<object>,
// integers -> long, other numbers -> double, strings, bools and null.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace OmniHost
{
    class JsonError : Exception
    {
        public JsonError(string message) : base(message) { }
    }

    class JObject : Dictionary<string, object>
    {
        public readonly List<string> Order = new List<string>();
    }

    static class Json
    {
        public static object Parse(string text)
        {
            int i = 0;
            object value = Value(text, ref i, 0);
            Space(text, ref i);
            if (i != text.Length) throw new JsonError("extra data at character " + i);
            return value;
        }

        static void Space(string s, ref int i)
        {
            while (i < s.Length && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
        }

        static object Value(string s, ref int i, int depth)
        {
            if (depth > 200) throw new JsonError("nested too deeply");
            Space(s, ref i);
            if (i >= s.Length) throw new JsonError("unexpected end of data");
            char c = s[i];
            if (c == '{')
            {
                i++;
                var obj = new JObject();
                Space(s, ref i);
                if (i < s.Length && s[i] == '}') { i++; return obj; }
                while (true)
                {
                    Space(s, ref i);
                    if (i >= s.Length || s[i] != '"') throw new JsonError("expected a key at character " + i);
                    string key = Str(s, ref i);
                    Space(s, ref i);
                    if (i >= s.Length || s[i] != ':') throw new JsonError("expected ':' at character " + i);
                    i++;
                    object v = Value(s, ref i, depth + 1);
                    if (!obj.ContainsKey(key)) obj.Order.Add(key);
                    obj[key] = v;
                    Space(s, ref i);
                    if (i < s.Length && s[i] == ',') { i++; continue; }
                    if (i < s.Length && s[i] == '}') { i++; return obj; }
                    throw new JsonError("expected ',' or '}' at character " + i);
                }
            }
            if (c == '[')
            {
                i++;
                var list = new List<object>();
                Space(s, ref i);
                if (i < s.Length && s[i] == ']') { i++; return list; }
                while (true)
                {
                    list.Add(Value(s, ref i, depth + 1));
                    Space(s, ref i);
                    if (i < s.Length && s[i] == ',') { i++; continue; }
                    if (i < s.Length && s[i] == ']') { i++; return list; }
                    throw new JsonError("expected ',' or ']' at character " + i);
                }
            }
            if (c == '"') return Str(s, ref i);
            if (s.Length - i >= 4 && string.CompareOrdinal(s, i, "true", 0, 4) == 0) { i += 4; return true; }
            if (s.Length - i >= 5 && string.CompareOrdinal(s, i, "false", 0, 5) == 0) { i += 5; return false; }
            if (s.Length - i >= 4 && string.CompareOrdinal(s, i, "null", 0, 4) == 0) { i += 4; return null; }
            int start = i;
            bool integer = true;
            if (i < s.Length && s[i] == '-') i++;
            while (i < s.Length && (char.IsDigit(s[i]) || s[i] == '.' || s[i] == 'e' || s[i] == 'E' || s[i] == '+' || s[i] == '-'))
            {
                if (!char.IsDigit(s[i])) integer = false;
                i++;
            }
            string number = s.Substring(start, i - start);
            if (number.Length == 0 || number == "-") throw new JsonError("unexpected character at " + start);
            long l;
            if (integer && long.TryParse(number, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out l)) return l;
            double d;
            if (!double.TryParse(number, NumberStyles.Float, CultureInfo.InvariantCulture, out d) || double.IsInfinity(d))
                throw new JsonError("bad number " + number);
            return d;
        }

        static string Str(string s, ref int i)
        {
            i++;  // the opening quote
            var sb = new StringBuilder();
            while (true)
            {
                if (i >= s.Length) throw new JsonError("unterminated string");
                char c = s[i++];
                if (c == '"') return sb.ToString();
                if (c != '\\') { sb.Append(c); continue; }
                if (i >= s.Length) throw new JsonError("unterminated string");
                char e = s[i++];
                switch (e)
                {
                    case '"': sb.Append('"'); break;
                    case '\\': sb.Append('\\'); break;
                    case '/': sb.Append('/'); break;
                    case 'b': sb.Append('\b'); break;
                    case 'f': sb.Append('\f'); break;
                    case 'n': sb.Append('\n'); break;
                    case 'r': sb.Append('\r'); break;
                    case 't': sb.Append('\t'); break;
                    case 'u':
                        if (i + 4 > s.Length) throw new JsonError("bad \\u escape");
                        sb.Append((char)Convert.ToInt32(s.Substring(i, 4), 16));
                        i += 4;
                        break;
                    default: throw new JsonError("bad escape \\" + e);
                }
            }
        }

        public static string Write(object value)
        {
            var sb = new StringBuilder();
            Write(sb, value);
            return sb.ToString();
        }

        static void Write(StringBuilder sb, object value)
        {
            if (value == null) { sb.Append("null"); return; }
            if (value is bool) { sb.Append((bool)value ? "true" : "false"); return; }
            if (value is string) { Quote(sb, (string)value); return; }
            if (value is long || value is int) { sb.Append(Convert.ToInt64(value).ToString(CultureInfo.InvariantCulture)); return; }
            if (value is double || value is float)
            {
                sb.Append(Convert.ToDouble(value).ToString("R", CultureInfo.InvariantCulture));
                return;
            }
            var obj = value as JObject;
            if (obj != null)
            {
                sb.Append('{');
                bool first = true;
                foreach (string key in obj.Order)
                {
                    if (!first) sb.Append(", ");
                    first = false;
                    Quote(sb, key);
                    sb.Append(": ");
                    Write(sb, obj[key]);
                }
                sb.Append('}');
                return;
            }
            var longs = value as IEnumerable<long>;
            if (longs != null)
            {
                sb.Append('[');
                bool first = true;
                foreach (long v in longs) { if (!first) sb.Append(", "); first = false; sb.Append(v.ToString(CultureInfo.InvariantCulture)); }
                sb.Append(']');
                return;
            }
            var list = value as System.Collections.IEnumerable;
            if (list != null)
            {
                sb.Append('[');
                bool first = true;
                foreach (object v in list) { if (!first) sb.Append(", "); first = false; Write(sb, v); }
                sb.Append(']');
                return;
            }
            throw new ArgumentException("cannot write " + value.GetType());
        }

        static void Quote(StringBuilder sb, string s)
        {
            sb.Append('"');
            foreach (char c in s)
            {
                if (c == '"') sb.Append("\\\"");
                else if (c == '\\') sb.Append("\\\\");
                else if (c < 0x20) sb.Append("\\u").Append(((int)c).ToString("x4"));
                else sb.Append(c);
            }
            sb.Append('"');
        }

        public static void Set(JObject obj, string key, object value)
        {
            if (!obj.ContainsKey(key)) obj.Order.Add(key);
            obj[key] = value;
        }
    }
}
