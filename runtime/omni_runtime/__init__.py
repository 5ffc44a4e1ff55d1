"""omni-runtime: run Qwen2.5-Omni ONNX bundles built by omni-export, without torch.

The package depends only on numpy, tokenizers, jinja2 and onnxruntime (imported lazily,
only when a graph is loaded). ``load_manifest`` opens and validates a bundle directory.
"""

from omni_runtime.errors import BundleError, OmniError
from omni_runtime.bundle.manifest import Manifest, load_manifest

__version__ = "0.1.0"

__all__ = ["BundleError", "Manifest", "OmniError", "__version__", "load_manifest"]
