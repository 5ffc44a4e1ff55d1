"""Running a bundle never imports torch or transformers (the runtime is torch-free)."""

import json
import subprocess
import sys
import textwrap


def test_runtime_runs_without_torch(tiny_bundle):
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "transformers", "torchvision", "omni_export"):
                    raise ImportError("blocked in this test: " + name)
                return None

        sys.meta_path.insert(0, Block())
        from omni_runtime.runner import OmniRunner
        from omni_runtime.stages.sampling import SamplingConfig
        result = OmniRunner({str(tiny_bundle)!r}, device="cpu").chat(
            "hello", max_new_tokens=4, sampling=SamplingConfig(do_sample=False))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print(json.dumps({{"tokens": result.token_ids, "loaded": loaded}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout.strip().splitlines()[-1])
    assert body["loaded"] == []
    assert len(body["tokens"]) >= 1
