// The ONNX Runtime C API through P/Invoke, for Debian's mono (mcs, C# 7): OrtGetApiBase() ->
// GetApi(version) -> the OrtApi function table, whose entries are turned into delegates with
// Marshal.GetDelegateForFunctionPointer. The slot of each function is OrtSlots.X, generated at
// build time from the header by gen_slots.c (offsetof(OrtApi, X) / sizeof(void*)).
using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;
using System.Text;

namespace OmniHost
{
    [StructLayout(LayoutKind.Sequential)]
    struct OrtApiBase
    {
        public IntPtr GetApi;            // const OrtApi* (*)(uint32_t version)
        public IntPtr GetVersionString;  // const char* (*)(void)
    }

    static class Ort
    {
        [DllImport("onnxruntime", CallingConvention = CallingConvention.Cdecl)]
        static extern IntPtr OrtGetApiBase();

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetApiFn(uint version);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] delegate IntPtr GetVersionFn();

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr CreateEnvFn(int level, string logid, out IntPtr env);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr OutPtrFn(out IntPtr result);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr PtrIntFn(IntPtr p, int value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr PtrFn(IntPtr p);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate void ReleaseFn(IntPtr p);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr ConfigEntryFn(IntPtr options, string key, string value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr CreateSessionFn(IntPtr env, string path, IntPtr options, out IntPtr session);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr CountFn(IntPtr session, out UIntPtr count);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr NameFn(IntPtr session, UIntPtr index, IntPtr allocator, out IntPtr name);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr AllocatorFreeFn(IntPtr allocator, IntPtr p);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr CreateCpuMemoryInfoFn(int type, int memType, out IntPtr info);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr CreateTensorFn(IntPtr info, IntPtr data, UIntPtr bytes, long[] shape, UIntPtr rank, int type, out IntPtr value);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr RunFn(IntPtr session, IntPtr runOptions, IntPtr[] inputNames, IntPtr[] inputs, UIntPtr inputCount, IntPtr[] outputNames, UIntPtr outputCount, IntPtr[] outputs);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr OutOfFn(IntPtr p, out IntPtr result);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr SizeOfFn(IntPtr p, out UIntPtr result);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr DimsFn(IntPtr info, long[] dims, UIntPtr count);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr ElementTypeFn(IntPtr info, out int type);
        [UnmanagedFunctionPointer(CallingConvention.Cdecl)] public delegate IntPtr ErrorMessageFn(IntPtr status);

        public static CreateEnvFn CreateEnv;
        public static OutPtrFn CreateSessionOptions, GetAllocatorWithDefaultOptions;
        public static PtrIntFn SetIntraOpNumThreads, SetSessionGraphOptimizationLevel, SetSessionLogSeverityLevel;
        public static PtrFn DisableCpuMemArena;
        public static ConfigEntryFn AddSessionConfigEntry;
        public static CreateSessionFn CreateSession;
        public static CountFn SessionGetInputCount, SessionGetOutputCount;
        public static NameFn SessionGetInputName, SessionGetOutputName;
        public static AllocatorFreeFn AllocatorFree;
        public static CreateCpuMemoryInfoFn CreateCpuMemoryInfo;
        public static CreateTensorFn CreateTensorWithDataAsOrtValue;
        public static RunFn Run;
        public static OutOfFn GetTensorMutableData, GetTensorTypeAndShape;
        public static SizeOfFn GetDimensionsCount;
        public static DimsFn GetDimensions;
        public static ElementTypeFn GetTensorElementType;
        public static ReleaseFn ReleaseTensorTypeAndShapeInfo, ReleaseValue, ReleaseSession, ReleaseSessionOptions,
                                ReleaseMemoryInfo, ReleaseEnv, ReleaseStatus;
        public static ErrorMessageFn GetErrorMessage;
        public static string Version;

        static IntPtr api;

        static T Slot<T>(int slot) where T : class
        {
            IntPtr fn = Marshal.ReadIntPtr(api, slot * IntPtr.Size);
            if (fn == IntPtr.Zero) throw new HostError("ONNX Runtime's API table has no entry " + slot, "",
                                                       "use an ONNX Runtime >= 1.20 (docs/hosts.md)");
            return Marshal.GetDelegateForFunctionPointer(fn, typeof(T)) as T;
        }

        public static void Init()
        {
            IntPtr basePtr;
            try
            {
                basePtr = OrtGetApiBase();
            }
            catch (DllNotFoundException e)
            {
                throw new HostError("cannot load libonnxruntime.so.1 (" + e.Message + ")", "",
                                    "run `make hosts` (it links build/hosts/libonnxruntime.so.1), or put the library's "
                                    + "directory on LD_LIBRARY_PATH");
            }
            var table = (OrtApiBase)Marshal.PtrToStructure(basePtr, typeof(OrtApiBase));
            var getApi = (GetApiFn)Marshal.GetDelegateForFunctionPointer(table.GetApi, typeof(GetApiFn));
            var getVersion = (GetVersionFn)Marshal.GetDelegateForFunctionPointer(table.GetVersionString, typeof(GetVersionFn));
            Version = Marshal.PtrToStringAnsi(getVersion());
            api = getApi(OrtSlots.ApiVersion);
            if (api == IntPtr.Zero)
                throw new HostError("ONNX Runtime " + Version + " does not provide API version " + OrtSlots.ApiVersion, "",
                                    "use an ONNX Runtime >= 1.29 (the headers' API version)");
            CreateEnv = Slot<CreateEnvFn>(OrtSlots.CreateEnv);
            CreateSessionOptions = Slot<OutPtrFn>(OrtSlots.CreateSessionOptions);
            GetAllocatorWithDefaultOptions = Slot<OutPtrFn>(OrtSlots.GetAllocatorWithDefaultOptions);
            SetIntraOpNumThreads = Slot<PtrIntFn>(OrtSlots.SetIntraOpNumThreads);
            SetSessionGraphOptimizationLevel = Slot<PtrIntFn>(OrtSlots.SetSessionGraphOptimizationLevel);
            SetSessionLogSeverityLevel = Slot<PtrIntFn>(OrtSlots.SetSessionLogSeverityLevel);
            DisableCpuMemArena = Slot<PtrFn>(OrtSlots.DisableCpuMemArena);
            AddSessionConfigEntry = Slot<ConfigEntryFn>(OrtSlots.AddSessionConfigEntry);
            CreateSession = Slot<CreateSessionFn>(OrtSlots.CreateSession);
            SessionGetInputCount = Slot<CountFn>(OrtSlots.SessionGetInputCount);
            SessionGetOutputCount = Slot<CountFn>(OrtSlots.SessionGetOutputCount);
            SessionGetInputName = Slot<NameFn>(OrtSlots.SessionGetInputName);
            SessionGetOutputName = Slot<NameFn>(OrtSlots.SessionGetOutputName);
            AllocatorFree = Slot<AllocatorFreeFn>(OrtSlots.AllocatorFree);
            CreateCpuMemoryInfo = Slot<CreateCpuMemoryInfoFn>(OrtSlots.CreateCpuMemoryInfo);
            CreateTensorWithDataAsOrtValue = Slot<CreateTensorFn>(OrtSlots.CreateTensorWithDataAsOrtValue);
            Run = Slot<RunFn>(OrtSlots.Run);
            GetTensorMutableData = Slot<OutOfFn>(OrtSlots.GetTensorMutableData);
            GetTensorTypeAndShape = Slot<OutOfFn>(OrtSlots.GetTensorTypeAndShape);
            GetDimensionsCount = Slot<SizeOfFn>(OrtSlots.GetDimensionsCount);
            GetDimensions = Slot<DimsFn>(OrtSlots.GetDimensions);
            GetTensorElementType = Slot<ElementTypeFn>(OrtSlots.GetTensorElementType);
            ReleaseTensorTypeAndShapeInfo = Slot<ReleaseFn>(OrtSlots.ReleaseTensorTypeAndShapeInfo);
            ReleaseValue = Slot<ReleaseFn>(OrtSlots.ReleaseValue);
            ReleaseSession = Slot<ReleaseFn>(OrtSlots.ReleaseSession);
            ReleaseSessionOptions = Slot<ReleaseFn>(OrtSlots.ReleaseSessionOptions);
            ReleaseMemoryInfo = Slot<ReleaseFn>(OrtSlots.ReleaseMemoryInfo);
            ReleaseEnv = Slot<ReleaseFn>(OrtSlots.ReleaseEnv);
            ReleaseStatus = Slot<ReleaseFn>(OrtSlots.ReleaseStatus);
            GetErrorMessage = Slot<ErrorMessageFn>(OrtSlots.GetErrorMessage);
        }

        // A non-null OrtStatus is an error: its message, as an OrtException.
        public static void Check(IntPtr status)
        {
            if (status == IntPtr.Zero) return;
            string message = Marshal.PtrToStringAnsi(GetErrorMessage(status));
            ReleaseStatus(status);
            throw new OrtException(message);
        }

        public static IntPtr Utf8(string text)
        {
            byte[] bytes = Encoding.UTF8.GetBytes(text);
            IntPtr p = Marshal.AllocHGlobal(bytes.Length + 1);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            Marshal.WriteByte(p, bytes.Length, 0);
            return p;
        }
    }

    class OrtException : Exception
    {
        public OrtException(string message) : base(message) { }
    }

    // ONNX element types used here
    static class ElementType
    {
        public const int Float = 1, Int32 = 6, Int64 = 7, Float16 = 10;
    }

    // A tensor in managed memory, pinned while an OrtValue wraps it.
    sealed class PinnedTensor : IDisposable
    {
        public IntPtr Value;
        GCHandle handle;

        public PinnedTensor(IntPtr memoryInfo, Array data, long bytes, long[] shape, int type)
        {
            handle = GCHandle.Alloc(data, GCHandleType.Pinned);
            IntPtr value;
            Ort.Check(Ort.CreateTensorWithDataAsOrtValue(memoryInfo, handle.AddrOfPinnedObject(), new UIntPtr((ulong)bytes),
                                                         shape, new UIntPtr((ulong)shape.Length), type, out value));
            Value = value;
        }

        public void Dispose()
        {
            if (Value != IntPtr.Zero) Ort.ReleaseValue(Value);
            Value = IntPtr.Zero;
            if (handle.IsAllocated) handle.Free();
        }
    }

    static class OrtValues
    {
        public static long[] Shape(IntPtr value)
        {
            IntPtr info;
            Ort.Check(Ort.GetTensorTypeAndShape(value, out info));
            try
            {
                UIntPtr rank;
                Ort.Check(Ort.GetDimensionsCount(info, out rank));
                var dims = new long[(int)rank.ToUInt64()];
                Ort.Check(Ort.GetDimensions(info, dims, rank));
                return dims;
            }
            finally
            {
                Ort.ReleaseTensorTypeAndShapeInfo(info);
            }
        }

        public static int Type(IntPtr value)
        {
            IntPtr info;
            Ort.Check(Ort.GetTensorTypeAndShape(value, out info));
            try
            {
                int type;
                Ort.Check(Ort.GetTensorElementType(info, out type));
                return type;
            }
            finally
            {
                Ort.ReleaseTensorTypeAndShapeInfo(info);
            }
        }

        // float32 (or float16, converted) contents of an output value
        public static float[] Floats(IntPtr value)
        {
            long[] shape = Shape(value);
            long n = 1;
            foreach (long d in shape) n *= d;
            IntPtr data;
            Ort.Check(Ort.GetTensorMutableData(value, out data));
            var result = new float[n];
            int type = Type(value);
            if (type == ElementType.Float)
            {
                if (n > 0) Marshal.Copy(data, result, 0, (int)n);
            }
            else if (type == ElementType.Float16)
            {
                var halves = new short[n];
                if (n > 0) Marshal.Copy(data, halves, 0, (int)n);
                for (long i = 0; i < n; ++i) result[i] = Half.ToFloat((ushort)halves[i]);
            }
            else
            {
                throw new HostError("a graph output is neither float32 nor float16", "", Bundle.RebuildFix);
            }
            return result;
        }
    }

    static class Half
    {
        public static float ToFloat(ushort h)
        {
            int sign = (h >> 15) & 1, exp = (h >> 10) & 31, mant = h & 1023;
            float value;
            if (exp == 0) value = (float)(mant * Math.Pow(2, -24));
            else if (exp == 31) value = mant == 0 ? float.PositiveInfinity : float.NaN;
            else value = (float)((1 + mant / 1024.0) * Math.Pow(2, exp - 15));
            return sign == 1 ? -value : value;
        }

        public static ushort FromFloat(float f)
        {
            // round to nearest even, through the bit pattern
            uint x = BitConverter.ToUInt32(BitConverter.GetBytes(f), 0);
            uint sign = (x >> 16) & 0x8000;
            int exp = (int)((x >> 23) & 0xff) - 127 + 15;
            uint mant = x & 0x7fffff;
            if (((x >> 23) & 0xff) == 0xff) return (ushort)(sign | 0x7c00 | (mant != 0 ? 0x200u : 0));
            if (exp >= 31) return (ushort)(sign | 0x7c00);
            if (exp <= 0)
            {
                if (exp < -10) return (ushort)sign;
                mant |= 0x800000;
                int shift = 14 - exp;
                uint half = mant >> shift, rest = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
                if (rest > mid || (rest == mid && (half & 1) == 1)) half++;
                return (ushort)(sign | half);
            }
            uint h = (uint)(exp << 10) | (mant >> 13);
            uint r = mant & 0x1fff;
            if (r > 0x1000 || (r == 0x1000 && (h & 1) == 1)) h++;
            return (ushort)(sign | h);
        }
    }
}
