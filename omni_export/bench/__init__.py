"""``omni-export bench``: one whole request per repeat, measured per stage, against PyTorch.

- ``runtime_side``: the request through the torch-free runtime, in its own process (no torch);
- ``pytorch_side``: the same request through transformers, in its own process (``--model``);
- ``trace``: the stage timeline both sides share (segments, peak RSS per segment, session loads);
- ``driver``: runs the processes, ``report``: medians and ranges, the table and the JSON.

Nothing in this package imports torch at import time.
"""

#: the stage names, in request order (shared with ``omni-export plan``)
STAGES = ("audio_encoder", "vision_encoder", "thinker_prefill", "thinker_decode", "speech")
